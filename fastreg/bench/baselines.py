"""Copy rows: the memory-bandwidth yardstick, measured in the same run as the ops.

Two copies, because on a CPU they differ a lot: ``copy_clone`` is an out-of-place clone, which
allocates a fresh output like every out-of-place op does (on this 2-core VM a fresh 64 MB
tensor costs about 50 ms of page faults); ``copy_inplace`` is ``dst.copy_(src)`` into a
buffer allocated once, the pure bandwidth bound. Percent-of-copy columns use each.
"""

from __future__ import annotations

import torch

from .cases import Impl


def _same(what: str, actual: torch.Tensor, expected: torch.Tensor) -> str | None:
    return None if torch.equal(actual, expected) else f"{what} is not an exact copy"


def copy_impls(src: torch.Tensor) -> dict[str, Impl]:
    src = src.detach()
    nbytes = 2 * src.numel() * src.element_size()  # read once, write once
    dst = torch.empty_like(src)
    return {
        "copy_clone": Impl(
            "copy_clone",
            run=lambda: src.clone(),
            check=lambda: _same("clone", src.clone(), src),
            bytes_moved=nbytes,
            baseline=True,
            note="out-of-place clone (allocates its output)",
        ),
        "copy_inplace": Impl(
            "copy_inplace",
            run=lambda: dst.copy_(src),
            check=lambda: _same("copy_", dst.copy_(src), src),
            bytes_moved=nbytes,
            baseline=True,
            note="dst.copy_(src) into a preallocated buffer",
        ),
    }


COPY_IMPLS = ("copy_clone", "copy_inplace")
