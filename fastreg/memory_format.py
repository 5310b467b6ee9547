"""The memory-format rules every fastreg op follows (one place, used by reference and tests).

An op walks its input in memory order. A non-overlapping, dense input (contiguous,
channels_last, permuted, ...) is used as it is and the output gets its exact strides; any
other input (a slice with gaps, an expanded tensor) is first copied into the layout
``torch.empty_like`` gives it: dense, with the input's order of dimensions by stride (a slice
of a channels_last tensor stays channels_last, of a transposed one transposed), which is also
the layout of torch's own outputs for it (tests/test_memory_format.py). csrc/common/tensor_glue.h
has the same rule for the C++ ops.
"""

from __future__ import annotations

import torch
import torch._prims_common as _prims

# Named is_non_overlapping_and_dense in older torch, ..._or_false (symbolic-shape safe) in newer.
is_non_overlapping_and_dense = getattr(
    _prims, "is_non_overlapping_and_dense_or_false", getattr(_prims, "is_non_overlapping_and_dense", None)
)


def memory_dense(t: torch.Tensor) -> torch.Tensor:
    # clone() keeps the format (torch.preserve_format): a dense copy laid out as empty_like(t)
    return t if is_non_overlapping_and_dense(t) else t.clone()


def dense_strides(t: torch.Tensor) -> tuple[int, ...]:
    """The strides of ``memory_dense(t)``, without copying anything."""
    if is_non_overlapping_and_dense(t):
        return tuple(t.stride())
    return torch.empty_like(t, device="meta").stride()


def flat_memory_view(t: torch.Tensor) -> torch.Tensor:
    """A 1-D view of a dense tensor's elements in the order they lie in memory."""
    if not is_non_overlapping_and_dense(t):
        raise ValueError("flat_memory_view needs a non-overlapping, dense tensor")
    return t.as_strided((t.numel(),), (1,), t.storage_offset())


def from_memory_order(flat: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A tensor shaped and strided like the dense tensor ``like`` holding ``flat`` in memory order."""
    out = torch.empty_like(like, dtype=flat.dtype)
    flat_memory_view(out).copy_(flat)
    return out
