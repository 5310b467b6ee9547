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
deterministic given their rng_state and go through vmap's per-sample fallback, which is right
for them.
"""

from __future__ import annotations

import torch

from .._library import LIBRARY

_VMAP_MODE = torch._C.DispatchKeySet(torch._C.DispatchKey.FuncTorchVmapMode)

RANDOMNESS_ERROR = (
    "vmap: called random operation while in randomness error mode. Please either use the 'same' or "
    "'different' randomness flags on vmap or perform the randomness operation out of vmap"
)


def _vmap_level() -> tuple[int, int, str]:
    from torch._functorch.pyfunctorch import retrieve_current_functorch_interpreter

    interpreter = retrieve_current_functorch_interpreter()
    return interpreter.level(), interpreter.batch_size(), interpreter.randomness()


def _samples(input: torch.Tensor, level: int, batch_size: int) -> tuple[list[torch.Tensor], bool]:
    """The input of each sample, and whether the input is batched at this level."""
    if torch._C._functorch.is_batchedtensor(input) and torch._C._functorch.maybe_get_level(input) == level:
        physical, bdim = torch._C._functorch._unwrap_batched(input, level)
        return [physical.select(bdim, i) for i in range(batch_size)], True
    return [input] * batch_size, False


def _stacked(parts: list[torch.Tensor]) -> torch.Tensor:
    """The parts along a new dim 0, each keeping its strides (torch.stack may not)."""
    first = parts[0]
    out = torch.empty_strided(
        (len(parts), *first.shape),
        (max(first.numel(), 1), *first.stride()),
        dtype=first.dtype,
        device=first.device,
    )
    for i, part in enumerate(parts):
        out[i].copy_(part)
    return out


def _batched(t: torch.Tensor, level: int) -> torch.Tensor:
    return torch._C._functorch._add_batch_dim(t, 0, level)


def _vmap_call(input: torch.Tensor) -> tuple[int, str, list[torch.Tensor], bool]:
    """(level, randomness, each sample's input, whether the input is batched) of a random op's
    call inside vmap; refuses the call in randomness="error" mode, as torch's random ops do."""
    level, batch_size, randomness = _vmap_level()
    if randomness == "error":
        raise RuntimeError(RANDOMNESS_ERROR)
    return (level, randomness, *_samples(input, level, batch_size))


def _dropout_vmap(input, p, mask_mode, generator=None):
    level, randomness, samples, batched = _vmap_call(input)
    with torch._C._ExcludeDispatchKeyGuard(_VMAP_MODE):
        if randomness == "same" and not batched:
            return torch.ops.fastreg.dropout(input, p, mask_mode, generator)
        first = torch.ops.fastreg.dropout(samples[0], p, mask_mode, generator)
        if randomness == "same":
            outputs = [first[0]] + [torch.ops.fastreg.dropout_seeded(x, p, first[2], mask_mode)[0] for x in samples[1:]]
            return _batched(_stacked(outputs), level), first[1], first[2]
        results = [first] + [torch.ops.fastreg.dropout(x, p, mask_mode, generator) for x in samples[1:]]
        return tuple(_batched(_stacked(list(parts)), level) for parts in zip(*results))


def _dropout_inplace_vmap(input, p, mask_mode, generator=None):
    level, randomness, samples, batched = _vmap_call(input)
    with torch._C._ExcludeDispatchKeyGuard(_VMAP_MODE):
        if not batched:
            if randomness == "different":  # torch's words for its own in-place random ops
                raise RuntimeError(
                    "vmap: Cannot ask for different inplace randomness on an unbatched tensor. "
                    "This will appear like same randomness. (fastreg.dropout_ would write one mask "
                    "into a tensor that all samples share: use randomness='same', or inplace=False.)"
                )
            return torch.ops.fastreg.dropout_(input, p, mask_mode, generator)
        first = torch.ops.fastreg.dropout_(samples[0], p, mask_mode, generator)
        if randomness == "same":
            for x in samples[1:]:
                x.copy_(torch.ops.fastreg.dropout_seeded(x, p, first[1], mask_mode)[0])
            return first
        results = [first] + [torch.ops.fastreg.dropout_(x, p, mask_mode, generator) for x in samples[1:]]
        return tuple(_batched(_stacked(list(parts)), level) for parts in zip(*results))


LIBRARY.impl("dropout", _dropout_vmap, "FuncTorchVmapMode")
LIBRARY.impl("dropout_", _dropout_inplace_vmap, "FuncTorchVmapMode")
