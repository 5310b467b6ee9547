"""Philox4x32-10 in PyTorch int64 ops, bit-identical to csrc/common/philox.h (spec: docs/rng.md).

32-bit words live in int64 tensors; products are split into 16-bit halves so that no
intermediate overflows 63 bits.
"""

from __future__ import annotations

import torch

MUL0, MUL1 = 0xD2511F53, 0xCD9E8D57
WEYL0, WEYL1 = 0x9E3779B9, 0xBB67AE85
MASK32 = 0xFFFFFFFF


def _mulhilo(a: torch.Tensor, multiplier: int) -> tuple[torch.Tensor, torch.Tensor]:
    high_part = a * (multiplier >> 16)
    low_part = a * (multiplier & 0xFFFF)
    partial = ((high_part & 0xFFFF) << 16) + low_part
    return (high_part >> 16) + (partial >> 32), partial & MASK32


def philox4x32_10(counter: list[torch.Tensor], key: tuple[int, int]) -> list[torch.Tensor]:
    """Ten rounds on counters given as four int64 tensors of 32-bit words."""
    c0, c1, c2, c3 = counter
    k0, k1 = key
    for _ in range(10):
        hi0, lo0 = _mulhilo(c0, MUL0)
        hi1, lo1 = _mulhilo(c2, MUL1)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0, k1 = (k0 + WEYL0) & MASK32, (k1 + WEYL1) & MASK32
    return [c0, c1, c2, c3]
