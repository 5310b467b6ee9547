"""fastreg::dropout, fastreg::dropout_, fastreg::dropout_seeded, fastreg::dropout_backward.

rng_state is an int64 tensor (seed, offset) on the input's device: the forward op draws it
from the device's generator (on CUDA inside the kernel, so CUDA-graph capture works) and
returns it; backward regenerates the mask from it, so the default mode stores no mask.
``dropout_`` overwrites its input (no output allocation, one pass over memory) and is
differentiable as torch's in-place ops are: its autograd is registered by hand below
(``InplaceDropout``), since torch.library does not attach autograd to mutating ops.
"""

from __future__ import annotations

import torch

from .._library import (
    LIBRARY,
    apply_function,
    define,
    grad_for_lower_levels,
    register_autograd,
    trace_with_python_autograd,
)
from ..memory_format import dense_strides, memory_dense
from ..reference import dropout as ref
from ..reference.in_place import check_overwritable

define(
    "dropout",
    "(Tensor input, float p, int mask_mode, Generator? generator=None)"
    " -> (Tensor output, Tensor mask, Tensor rng_state)",
    ref.dropout,
    random=True,
)
define(
    "dropout_",
    "(Tensor(a!) input, float p, int mask_mode, Generator? generator=None) -> (Tensor mask, Tensor rng_state)",
    ref.dropout_,
    random=True,
)
define(
    "dropout_seeded",
    "(Tensor input, float p, Tensor rng_state, int mask_mode) -> (Tensor output, Tensor mask)",
    ref.dropout_seeded,
)
define(
    "dropout_backward",
    "(Tensor grad_output, Tensor mask, Tensor rng_state, float p, int mask_mode) -> Tensor",
    ref.dropout_backward,
)


def _fake_mask(dense: torch.Tensor, mask_mode: int) -> torch.Tensor:
    if mask_mode == ref.BITS:
        return dense.new_empty(((dense.numel() + ref.GROUP - 1) // ref.GROUP,), dtype=torch.uint8)
    if mask_mode == ref.BOOL:
        return torch.empty_like(dense, dtype=torch.bool)
    return dense.new_empty((0,), dtype=torch.uint8)


# The fakes run the reference's checks, which read no data: they are also the Meta kernels, which
# a call mixing meta and CPU tensors reaches, and must refuse it rather than return empty tensors.
def _check_forward(input, p, mask_mode, op="fastreg.dropout"):
    ref.check_input(input, op)
    ref.check_p(p)
    ref.check_mode(mask_mode)


@torch.library.register_fake("fastreg::dropout")
def _dropout_fake(input, p, mask_mode, generator=None):
    _check_forward(input, p, mask_mode)
    ref.check_generator(generator, input)
    dense = memory_dense(input)
    return torch.empty_like(dense), _fake_mask(dense, mask_mode), input.new_empty((2,), dtype=torch.int64)


@torch.library.register_fake("fastreg::dropout_")
def _dropout_inplace_fake(input, p, mask_mode, generator=None):
    _check_forward(input, p, mask_mode, "fastreg.dropout_")
    check_overwritable(input, "fastreg.dropout_", "input", ref.INPLACE_DIFFERENTIABLE_FORM)
    ref.check_generator(generator, input, "fastreg.dropout_")
    return _fake_mask(memory_dense(input), mask_mode), input.new_empty((2,), dtype=torch.int64)


@torch.library.register_fake("fastreg::dropout_seeded")
def _dropout_seeded_fake(input, p, rng_state, mask_mode):
    _check_forward(input, p, mask_mode)
    ref.check_rng_state(rng_state, input, "fastreg.dropout_seeded")
    dense = memory_dense(input)
    return torch.empty_like(dense), _fake_mask(dense, mask_mode)


@torch.library.register_fake("fastreg::dropout_backward")
def _dropout_backward_fake(grad_output, mask, rng_state, p, mask_mode):
    ref.check_grad_output(grad_output)
    ref.check_p(p)
    ref.check_rng_state(rng_state, grad_output, "fastreg.dropout_backward")
    ref.check_mode(mask_mode)
    ref.check_saved_mask(mask, grad_output, mask_mode)
    return torch.empty_like(grad_output)


def in_layout(grad: torch.Tensor, like_size, like_stride) -> torch.Tensor:
    """grad laid out with the forward output's strides: the mask is indexed in that memory order."""
    if tuple(grad.stride()) == tuple(like_stride):
        return grad
    return grad.new_empty_strided(like_size, like_stride).copy_(grad)  # a method: batched under vmap


def _setup_forward(ctx, p, mask_mode, output, mask, rng_state):
    ctx.save_for_backward(mask, rng_state)
    ctx.p, ctx.mask_mode = p, mask_mode
    ctx.layout = (output.shape, output.stride())
    # The mask and rng_state get no gradient: materialised, theirs would be zeros made in
    # every backward (a full-size bool mask in bool mode).
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_output):
    if grad_output is None:
        return None
    mask, rng_state = ctx.saved_tensors
    grad = in_layout(grad_output, *ctx.layout)
    return torch.ops.fastreg.dropout_backward(grad, mask, rng_state, ctx.p, ctx.mask_mode)


def _dropout_setup(ctx, inputs, output):
    _, p, mask_mode, _ = inputs
    _setup_forward(ctx, p, mask_mode, *output)


def _dropout_seeded_setup(ctx, inputs, output):
    _, p, rng_state, mask_mode = inputs
    _setup_forward(ctx, p, mask_mode, output[0], output[1], rng_state)


def _dropout_grad(ctx, grad_output, _grad_mask, _grad_state):
    return _backward(ctx, grad_output), None, None, None


def _dropout_seeded_grad(ctx, grad_output, _grad_mask):
    return _backward(ctx, grad_output), None, None, None


def _dropout_backward_setup(ctx, inputs, output):
    grad_output, mask, rng_state, p, mask_mode = inputs
    _setup_forward(ctx, p, mask_mode, output, mask, rng_state)


def _dropout_backward_grad(ctx, grad_grad_input):
    # backward is linear in grad_output, with the same mask: its gradient is itself.
    return _backward(ctx, grad_grad_input), None, None, None, None


register_autograd("dropout", _dropout_grad, setup_context=_dropout_setup)
register_autograd("dropout_seeded", _dropout_seeded_grad, setup_context=_dropout_seeded_setup)
register_autograd("dropout_backward", _dropout_backward_grad, setup_context=_dropout_backward_setup)


class InplaceDropout(torch.autograd.Function):
    """Autograd of ``fastreg::dropout_`` on the reference backend: the input becomes the output
    (``mark_dirty``) and backward needs only the mask or the rng_state, never the overwritten
    values. The compiled library registers the same in C++ (csrc/dropout/dropout_autograd.cpp)."""

    @staticmethod
    def forward(ctx, input, p, mask_mode, generator, drawn):
        # mark_dirty bumps the input's version: the kernel's own bump is undone, so that the call
        # bumps it once, as torch's in-place ops and the C++ autograd kernel do.
        with (
            torch._C._AutoDispatchBelowAutograd(),
            grad_for_lower_levels(),
            torch.autograd._unsafe_preserve_version_counter(input),
        ):
            mask, rng_state = torch.ops.fastreg.dropout_(input, p, mask_mode, generator)
        # Returned through `drawn`, not as outputs: autograd refuses a Function that overwrites
        # a view and returns more than that view.
        drawn.extend((mask, rng_state))
        ctx.mark_dirty(input)
        ctx.save_for_backward(mask, rng_state)
        ctx.save_for_forward(mask, rng_state)
        ctx.p, ctx.mask_mode = p, mask_mode
        ctx.layout = (input.shape, dense_strides(input))  # the layout the kernel's mask follows
        return input

    @staticmethod
    def backward(ctx, grad_output):
        return _backward(ctx, grad_output), None, None, None, None

    @staticmethod
    def jvp(ctx, tangent, *_):
        # the map is linear: the tangent goes through the same mask, in place as its primal did
        return tangent.copy_(_backward(ctx, tangent))


#: the creation of a view that in-place ops may overwrite in grad mode (its history is rebased)
_REBASABLE_VIEW = torch._C._autograd.CreationMeta.DEFAULT


def _has_tangent(t: torch.Tensor) -> bool:
    return torch.autograd.forward_ad._current_level >= 0 and torch._VF._unpack_dual(t, 0)[1] is not None


@torch.library.impl(LIBRARY, "dropout_", "Autograd")
def _dropout_inplace_autograd(input, p, mask_mode, generator=None):
    # torch.library attaches no autograd to a mutating op: this is registered by hand.
    records = torch.is_grad_enabled() and input.requires_grad
    if records:  # torch's check_inplace, before anything is written (mark_dirty checks only after)
        if input._is_view() and torch._C._autograd._get_creation_meta(input) != _REBASABLE_VIEW:
            # A view autograd cannot rebase (made in no_grad or inference mode, one of several
            # outputs, a custom Function's output): torch's check_inplace refuses it, with a
            # message that names how it was made. An in-place op that would change nothing gets
            # that refusal from torch itself, before anything is written.
            input.mul_(1)
        if input._base is not None and input._base.is_leaf:
            raise RuntimeError("a view of a leaf Variable that requires grad is being used in an in-place operation.")
        if input.is_leaf:
            raise RuntimeError("a leaf Variable that requires grad is being used in an in-place operation.")
    if records or _has_tangent(input):
        drawn = []
        apply_function(InplaceDropout, (input, p, mask_mode, generator, drawn))
        return tuple(drawn)
    with torch._C._AutoDispatchBelowAutograd():
        return torch.ops.fastreg.dropout_(input, p, mask_mode, generator)


# The C++ autograd kernels (csrc/dropout/dropout_autograd.cpp) keep the output's sizes as
# integers, for the mask's memory order in backward: on the symbolic sizes of torch's tracers
# that guarded the batch dimension to its example value. torch.compile(dynamic=True) made one
# graph per batch size up to its recompile limit, and torch.export of a training model with a
# dynamic batch failed ("specialized it to be a constant"), once an eager call had loaded the
# library. The tracers record the Python autograd, which keeps sizes symbolic.
for _name in ("dropout", "dropout_seeded", "dropout_backward"):
    trace_with_python_autograd(_name)
trace_with_python_autograd("dropout_", _dropout_inplace_autograd)
