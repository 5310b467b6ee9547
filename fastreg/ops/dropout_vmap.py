"""``torch.func.vmap`` of fastreg's random ops, ``dropout`` and ``dropout_``.

vmap's ``randomness`` option says what a random op means per sample, and torch's dropout follows
it: ``"error"`` (the default) refuses the call, ``"same"`` gives every sample the same mask,
``"different"`` draws independent masks. vmap's generic fallback knows none of this: it runs the
op once per sample, so ``"same"`` got different masks and ``"error"`` passed silently. And it
stacked the per-sample outputs contiguously, while each sample's mask follows its input's memory
order: for a permuted sample layout, backward read the mask in another order than forward wrote
it, and per-sample gradients were wrong.

So these kernels sit at ``FuncTorchVmapMode``, the key torch's own random ops use: it is active
for every call inside vmap, batched input or not (a dropout of an unbatched tensor inside vmap is
random per sample too). Each sample is one call of the op (``dropout_seeded`` with the first
sample's rng_state for ``"same"``), written into an output whose per-sample strides are that
call's, so forward and backward read masks in one order. vmap is for convenience, not speed
here: B samples cost B kernel calls. ``dropout_seeded`` and ``dropout_backward`` are
deterministic given their rng_state: each sample is one call on its own tensors, as vmap's
generic fallback would run them, without its warning on every call and over an empty batch too.

Inside another vmap (or grad), each sample's call goes on to the next level out, as any op that
a level has handled does: through functorch's ``DynamicLayerBackMode``, which the calls reach
with this level's key excluded, and which restores the dispatch keys the next level expects.
(``interpreter.lower()`` alone does not: these kernels run under the keys this level set, where
the next level has saved none, and functorch asserts.) An outer vmap level reaches these kernels
again, with its own randomness, and returns the sample's results batched at its level; the
stacked output is allocated by a method of the first sample's result, so it is batched (or
tracked by an outer grad level) as they are. Over a batch of no samples nothing is drawn: the
outputs are empty, each sample's part shaped as one call's.
"""

from __future__ import annotations

import torch

from .._library import LIBRARY
from .dropout import _check_forward, _fake_mask

_VMAP_MODE = torch._C.DispatchKeySet(torch._C.DispatchKey.FuncTorchVmapMode)

RANDOMNESS_ERROR = (
    "vmap: called random operation while in randomness error mode. Please either use the 'same' or "
    "'different' randomness flags on vmap or perform the randomness operation out of vmap"
)


def _vmap_level() -> tuple[int, int, str]:
    from torch._functorch.pyfunctorch import retrieve_current_functorch_interpreter

    interpreter = retrieve_current_functorch_interpreter()
    return interpreter.level(), interpreter.batch_size(), interpreter.randomness()


def _batched_at(level: int, *tensors: torch.Tensor) -> bool:
    return any(
        torch._C._functorch.is_batchedtensor(t) and torch._C._functorch.maybe_get_level(t) == level for t in tensors
    )


def _samples(input: torch.Tensor, level: int, batch_size: int) -> tuple[torch.Tensor, list[torch.Tensor], bool]:
    """The tensor under this level's batch dim (the input itself where it has none), the input of
    each sample, and whether the input is batched at this level."""
    if _batched_at(level, input):
        physical, bdim = torch._C._functorch._unwrap_batched(input, level)
        return physical, [physical.select(bdim, i) for i in range(batch_size)], True
    return input, [input] * batch_size, False


def _stacked(parts: list[torch.Tensor]) -> torch.Tensor:
    """The parts along a new dim 0, each keeping its strides (torch.stack may not). Allocated by a
    method of the first part: where the parts are batched at an outer vmap level or tracked by an
    outer grad level, so is the result, and each part is copied in at that level."""
    first = parts[0]
    out = first.new_empty_strided((len(parts), *first.shape), (max(first.numel(), 1), *first.stride()))
    for i, part in enumerate(parts):
        out[i].copy_(part)
    return out


def _batched(t: torch.Tensor, level: int) -> torch.Tensor:
    return torch._C._functorch._add_batch_dim(t, 0, level)


def _empty_batch(base: torch.Tensor, shape, dtype: torch.dtype, level: int) -> torch.Tensor:
    """A tensor batched at this level over no samples, each of this shape (base: the tensor
    whose method allocates it, so that it is batched or tracked at the outer levels as base is)."""
    return _batched(base.new_empty((0, *shape), dtype=dtype), level)


def _no_samples(base: torch.Tensor, like: torch.Tensor, mask_mode: int, level: int) -> tuple[torch.Tensor, ...]:
    """(output, mask, rng_state) over a batch of no samples, each sample's shaped as one call of
    the op on ``like`` gives them (the fakes' shapes in .dropout): vmap over an empty batch."""
    mask = _fake_mask(torch.empty(like.shape, device="meta"), mask_mode)
    return (
        _empty_batch(base, like.shape, like.dtype, level),
        _empty_batch(base, mask.shape, mask.dtype, level),
        _empty_batch(base, (2,), torch.int64, level),
    )


def _vmap_call(input: torch.Tensor) -> tuple[int, str, torch.Tensor, list[torch.Tensor], bool]:
    """(level, randomness, the tensor under this level's batch dim, each sample's input, whether the
    input is batched) of a random op's call inside vmap; refuses the call in randomness="error"
    mode, as torch's random ops do."""
    level, batch_size, randomness = _vmap_level()
    if randomness == "error":
        raise RuntimeError(RANDOMNESS_ERROR)
    return (level, randomness, *_samples(input, level, batch_size))


# The per-sample calls below run with this level's key excluded: not batched at this level, they
# go on to the next level out, or at the last level to the kernels (see the module's docstring).
def _dropout_vmap(input, p, mask_mode, generator=None):
    level, randomness, physical, samples, batched = _vmap_call(input)
    with torch._C._ExcludeDispatchKeyGuard(_VMAP_MODE):
        if randomness == "same" and not batched:
            return torch.ops.fastreg.dropout(input, p, mask_mode, generator)
        if not samples:
            _check_forward(input, p, mask_mode)
            return _no_samples(physical, input, mask_mode, level)
        first = torch.ops.fastreg.dropout(samples[0], p, mask_mode, generator)
        if randomness == "same":
            outputs = [first[0]] + [torch.ops.fastreg.dropout_seeded(x, p, first[2], mask_mode)[0] for x in samples[1:]]
            return _batched(_stacked(outputs), level), first[1], first[2]
        results = [first] + [torch.ops.fastreg.dropout(x, p, mask_mode, generator) for x in samples[1:]]
        return tuple(_batched(_stacked(list(parts)), level) for parts in zip(*results))


def _dropout_inplace_vmap(input, p, mask_mode, generator=None):
    level, randomness, physical, samples, batched = _vmap_call(input)
    with torch._C._ExcludeDispatchKeyGuard(_VMAP_MODE):
        if not batched:
            if randomness == "different":  # torch's words for its own in-place random ops
                raise RuntimeError(
                    "vmap: Cannot ask for different inplace randomness on an unbatched tensor. "
                    "This will appear like same randomness. (fastreg.dropout_ would write one mask "
                    "into a tensor that all samples share: use randomness='same', or inplace=False.)"
                )
            return torch.ops.fastreg.dropout_(input, p, mask_mode, generator)
        if not samples:  # nothing to overwrite
            _check_forward(input, p, mask_mode, "fastreg.dropout_")
            return _no_samples(physical, input, mask_mode, level)[1:]
        first = torch.ops.fastreg.dropout_(samples[0], p, mask_mode, generator)
        if randomness == "same":
            for x in samples[1:]:
                x.copy_(torch.ops.fastreg.dropout_seeded(x, p, first[1], mask_mode)[0])
            return first
        results = [first] + [torch.ops.fastreg.dropout_(x, p, mask_mode, generator) for x in samples[1:]]
        return tuple(_batched(_stacked(list(parts)), level) for parts in zip(*results))


# dropout_seeded and dropout_backward are deterministic: each sample is one call on that sample's
# tensors (the tensor itself where it has no batch dim at this level). vmap's generic fallback would
# do the same, but it warns on every call that a batching rule is missing, and it refuses a batch
# of no samples ("does not support vmap over dims of size 0"), e.g. the backward of per-sample
# gradients over an empty batch.
def _per_sample(call, tensors: tuple[torch.Tensor, ...], level: int, batch_size: int):
    """Each output of ``call(*sample_tensors)`` for every sample, stacked and batched at this level."""
    samples = [_samples(t, level, batch_size)[1] for t in tensors]
    results = [call(*sample) for sample in zip(*samples)]
    if isinstance(results[0], torch.Tensor):
        return _batched(_stacked(results), level)
    return tuple(_batched(_stacked(list(parts)), level) for parts in zip(*results))


def _dropout_seeded_vmap(input, p, rng_state, mask_mode):
    level, batch_size, _ = _vmap_level()
    with torch._C._ExcludeDispatchKeyGuard(_VMAP_MODE):
        if not _batched_at(level, input, rng_state):
            return torch.ops.fastreg.dropout_seeded(input, p, rng_state, mask_mode)
        if not batch_size:
            _check_forward(input, p, mask_mode)
            return _no_samples(_samples(input, level, 0)[0], input, mask_mode, level)[:2]
        return _per_sample(
            lambda x, state: torch.ops.fastreg.dropout_seeded(x, p, state, mask_mode),
            (input, rng_state),
            level,
            batch_size,
        )


def _dropout_backward_vmap(grad_output, mask, rng_state, p, mask_mode):
    level, batch_size, _ = _vmap_level()
    with torch._C._ExcludeDispatchKeyGuard(_VMAP_MODE):
        if not _batched_at(level, grad_output, mask, rng_state):
            return torch.ops.fastreg.dropout_backward(grad_output, mask, rng_state, p, mask_mode)
        if not batch_size:
            return _empty_batch(_samples(grad_output, level, 0)[0], grad_output.shape, grad_output.dtype, level)
        return _per_sample(
            lambda g, m, state: torch.ops.fastreg.dropout_backward(g, m, state, p, mask_mode),
            (grad_output, mask, rng_state),
            level,
            batch_size,
        )


LIBRARY.impl("dropout", _dropout_vmap, "FuncTorchVmapMode")
LIBRARY.impl("dropout_", _dropout_inplace_vmap, "FuncTorchVmapMode")
LIBRARY.impl("dropout_seeded", _dropout_seeded_vmap, "FuncTorchVmapMode")
LIBRARY.impl("dropout_backward", _dropout_backward_vmap, "FuncTorchVmapMode")
