"""The ``fastreg`` op namespace, defined from Python.

Every op's schema is defined here at import, with its pure-PyTorch reference registered as
the ``CompositeExplicitAutograd`` kernel. The compiled library (csrc/) adds ``CPU`` and
``CUDA`` kernels with ``TORCH_LIBRARY_IMPL``; the dispatcher prefers those over the
composite one. So the ops exist, work under autograd, ``torch.compile`` and ``opcheck``, and
give the reference's results, even where nothing could be compiled.

The reference kernel is also where the compiled kernels are loaded lazily: the first call of
an op on a device tries to load (or JIT-build) them, and if that brings a kernel for the
device, re-dispatches to it.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Callable

import torch

LIBRARY = torch.library.Library("fastreg", "DEF")  # noqa: TOR901 - the namespace is ours

#: op name -> schema, in definition order; fastreg.info and the tests iterate over it.
SCHEMAS: dict[str, str] = {}

_DISPATCH_KEY = {"cpu": "CPU", "cuda": "CUDA"}

#: op name -> the Python autograd kernel register_autograd made for it (trace_with_python_autograd)
_AUTOGRAD_KERNELS: dict[str, Callable] = {}


def define(name: str, schema: str, reference: Callable, *, random: bool = False, tags: tuple = ()) -> None:
    """Define ``fastreg::name`` with the reference as its fallback kernel."""
    tags = (torch.Tag.nondeterministic_seeded, *tags) if random else tags
    LIBRARY.define(f"{name}{schema}", tags=tags)
    SCHEMAS[name] = schema
    LIBRARY.impl(name, _lazy_kernel(name, reference), "CompositeExplicitAutograd")


def has_kernel(name: str, device_type: str) -> bool:
    """True when a compiled kernel of ``fastreg::name`` is registered for the device type."""
    key = _DISPATCH_KEY.get(device_type)
    return key is not None and torch._C._dispatch_has_kernel_for_dispatch_key(f"fastreg::{name}", key)


def _device_type(args) -> str:
    return next((t.device.type for t in _tensors(args)), "cpu")


_REENTRY = threading.local()


def _tensors(args):
    for a in args:
        if isinstance(a, torch.Tensor):
            yield a
        elif isinstance(a, (list, tuple)):
            yield from (t for t in a if isinstance(t, torch.Tensor))


#: the keys a kernel runs below; reading a tangent dispatches through them (torch asserts without)
_AUTOGRAD_KEYS = (
    torch._C.DispatchKeySet(torch._C.DispatchKey.AutogradFunctionality)
    .add(torch._C.DispatchKey.AutogradOther)
    .add(torch._C.DispatchKey.AutogradNestedTensor)
)


def _refuse_tangents(name: str, args) -> None:
    """Forward-mode AD keeps a tangent on the tensor. The reference runs below autograd, so its
    outputs would come back without one: refuse, as the compiled ops without a tangent rule do."""
    # No dual level entered and no torch.func transform (whose jvp keeps its tangents at a level
    # of its own, unseen by forward_ad): no tangents anywhere.
    if torch.autograd.forward_ad._current_level < 0 and not torch._C._are_functorch_transforms_active():
        return
    below = torch._C._dispatch_tls_local_exclude_set()
    with torch._C._ForceDispatchKeyGuard(torch._C._dispatch_tls_local_include_set(), below - _AUTOGRAD_KEYS):
        for t in _tensors(args):  # strided only: a sparse tensor's tangent cannot be read (torch asserts)
            if t.layout == torch.strided and torch._VF._unpack_dual(t, 0)[1] is not None:
                raise NotImplementedError(
                    f"fastreg.{name}: forward-mode AD is not supported by the pure-PyTorch reference kernels "
                    "(an input carries a tangent); use reverse mode (backward, torch.autograd.grad)"
                )


def _lazy_kernel(name: str, reference: Callable) -> Callable:
    @functools.wraps(reference)
    def kernel(*args, **kwargs):
        from . import _loader

        # Inputs the compiled kernels do not take (sparse tensors, an empty tensor list) land
        # here again after the re-dispatch below: the second arrival runs the reference,
        # which gives them a result or a clear error instead of recursing.
        _refuse_tangents(name, args)
        if getattr(_REENTRY, "active", False):
            return reference(*args, **kwargs)
        device_type = _device_type(args)
        if _loader.load_kernels(device_type) and has_kernel(name, device_type):
            _REENTRY.active = True
            try:
                return getattr(torch.ops.fastreg, name)(*args, **kwargs)
            finally:
                _REENTRY.active = False
        return reference(*args, **kwargs)

    return kernel


def _single_level_apply():
    """How a generated autograd Function is applied; see register_autograd."""
    try:
        from torch._functorch.utils import enable_single_level_autograd_function
    except ImportError:  # a torch without these private helpers: plain autograd, no torch.func
        return None

    def apply(cls, args):
        if torch._C._are_functorch_transforms_active():
            # Function.apply would refuse, or lift the Function through every transform level:
            # its base class's apply records one node at the level this kernel runs at.
            with enable_single_level_autograd_function():
                return super(torch.autograd.Function, cls).apply(*args)
        return cls.apply(*args)  # outside torch.func, Function.apply is the single-level one

    return apply


_APPLY = _single_level_apply()


def apply_function(cls, args: tuple):
    """``cls.apply(*args)`` for a fastreg autograd Function run by an op's autograd kernel,
    inside torch.func transforms too (see register_autograd)."""
    return cls.apply(*args) if _APPLY is None else _APPLY(cls, args)


@contextlib.contextmanager
def grad_for_lower_levels():
    """A Function's forward runs without grad mode. Inside torch.func that would reach the
    transform levels below this one (an outer grad), which then record nothing: a nested
    grad (a Hessian) came out as zeros. As functorch's own single-level Functions do, the
    forward turns gradients back on for them; this level's autograd keys stay excluded."""
    if not torch._C._are_functorch_transforms_active():
        yield
        return
    previous = torch._C._is_fwd_grad_enabled()
    torch._C._set_fwd_grad_enabled(True)
    try:
        with torch.enable_grad():
            yield
    finally:
        torch._C._set_fwd_grad_enabled(previous)


def _with_defaults(schema, args: tuple) -> tuple:
    """The dispatcher leaves out trailing arguments equal to their defaults; put them back."""
    missing = schema.arguments[len(args) :]
    return args + tuple(a.default_value for a in missing)


def _flatten(values) -> tuple[list, list]:
    """Tensor lists spread out into single entries (autograd.Function takes no lists), with the
    lengths to put them back: None for an entry that was not a list."""
    flat, lengths = [], []
    for v in values:
        if isinstance(v, (list, tuple)):
            flat.extend(v)
            lengths.append(len(v))
        else:
            flat.append(v)
            lengths.append(None)
    return flat, lengths


def _unflatten(flat, lengths) -> tuple:
    out, i = [], 0
    for n in lengths:
        if n is None:
            out.append(flat[i])
            i += 1
        else:
            out.append(list(flat[i : i + n]))
            i += n
    return tuple(out)


def register_autograd(name: str, backward: Callable, setup_context: Callable | None = None) -> None:
    """``torch.library.register_autograd`` for ``fastreg::name``, usable inside ``torch.func``
    transforms (``grad``, ``vjp``, ``jacrev``, ``vmap`` of those).

    torch's own generates an ``autograd.Function`` that ``torch.func`` refuses ("must override
    the setup_context staticmethod", pytorch/pytorch#170834) in every release we test, 2.5 to
    2.13. This one is applied as a single-level Function inside transforms, as functorch
    applies the autograd of one transform level: the op's autograd kernel already runs at that
    level, so the Function must not be lifted through the transforms again. Same contract:
    ``setup_context(ctx, inputs, output)`` and ``backward(ctx, *grads)`` returning one gradient
    per op argument (a list for a ``Tensor[]``); ``ctx.needs_input_grad`` follows the op's
    arguments.
    """
    if _APPLY is None:
        if setup_context is None:
            torch.library.register_autograd(f"fastreg::{name}", backward)
        else:
            torch.library.register_autograd(f"fastreg::{name}", backward, setup_context=setup_context)
        return
    op = getattr(torch.ops.fastreg, name).default
    schema = op._schema

    def forward(ctx, lengths, out_lengths, *flat):
        args = _unflatten(flat, lengths)
        with torch._C._AutoDispatchBelowAutograd(), grad_for_lower_levels():
            output = op(*args)
        if setup_context is not None:
            setup_context(ctx, args, output)
        ctx.arg_lengths, ctx.out_lengths = lengths, out_lengths  # out_lengths is filled below
        # One output, one list output (Tensor[]) or a tuple of outputs: all flattened the same way.
        flat_out, lengths_out = _flatten(output if isinstance(output, tuple) else (output,))
        out_lengths.extend(lengths_out)
        return tuple(flat_out)

    def backward_flat(ctx, *flat_grads):
        structured = _unflatten(flat_grads, ctx.out_lengths)
        per_arg = _unflatten(ctx.needs_input_grad[2:], ctx.arg_lengths)
        previous = ctx.needs_input_grad
        ctx.needs_input_grad = tuple(any(n) if isinstance(n, list) else n for n in per_arg)
        try:
            grads = backward(ctx, *structured)
        finally:
            ctx.needs_input_grad = previous
        grads = grads if isinstance(grads, tuple) else (grads,)
        flat = []
        for g, n in zip(grads, ctx.arg_lengths):
            if n is None:
                flat.append(g)
            else:
                flat.extend(g if g is not None else [None] * n)
        return (None, None, *flat)

    generated = type(
        f"Fastreg_{name}_Backward",
        (torch.autograd.Function,),  # a Function for compiled autograd; applied single-level
        {"forward": staticmethod(forward), "backward": staticmethod(backward_flat)},
    )

    def autograd_kernel(*args):
        args = _with_defaults(schema, args)
        flat, lengths = _flatten(args)
        # Here, not only in the reference kernel: below this key torch.func's jvp has unwrapped
        # its tensors, and their tangents are out of sight.
        _refuse_tangents(name, flat)
        if not (torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in flat)):
            with torch._C._AutoDispatchBelowAutograd():
                return op(*args)
        out_lengths: list = []
        flat_out = apply_function(generated, (lengths, out_lengths, *flat))
        flat_out = flat_out if isinstance(flat_out, tuple) else (flat_out,)
        outputs = _unflatten(flat_out, out_lengths)
        return outputs if len(schema.returns) > 1 else outputs[0]

    LIBRARY.impl(name, autograd_kernel, "Autograd")
    _AUTOGRAD_KERNELS[name] = autograd_kernel


def trace_with_python_autograd(name: str, kernel: Callable | None = None) -> None:
    """Under torch's Python dispatcher, which its tracers turn on (Dynamo's fake-tensor runs,
    AOTAutograd, torch.export, make_fx), ``fastreg::name`` records its Python autograd
    (``kernel``, by default the one ``register_autograd`` made) instead of the compiled
    library's C++ node: a C++ node that keeps the output's sizes as integers reads a symbolic
    size as its current value, which specialises it (a dynamic batch dimension becomes a
    constant). Eager calls do not go through the Python dispatcher and keep the C++ node."""
    kernel = kernel or _AUTOGRAD_KERNELS.get(name)
    if kernel is None:  # a torch without the single-level Function: torch's own autograd kernel
        return
    op = getattr(torch.ops.fastreg, name).default
    for key in (torch._C.DispatchKey.AutogradCPU, torch._C.DispatchKey.AutogradCUDA):
        op.py_impl(key)(kernel)
