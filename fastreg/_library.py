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

import functools
import threading
from collections.abc import Callable

import torch

LIBRARY = torch.library.Library("fastreg", "DEF")  # noqa: TOR901 - the namespace is ours

#: op name -> schema, in definition order; fastreg.info and the tests iterate over it.
SCHEMAS: dict[str, str] = {}

_DISPATCH_KEY = {"cpu": "CPU", "cuda": "CUDA"}


def define(name: str, schema: str, reference: Callable, *, random: bool = False) -> None:
    """Define ``fastreg::name`` with the reference as its fallback kernel."""
    tags = (torch.Tag.nondeterministic_seeded,) if random else ()
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
    if torch.autograd.forward_ad._current_level < 0:  # no dual level entered: no tangents anywhere
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
