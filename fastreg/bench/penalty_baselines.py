"""What the weight-penalty benchmark compares fastreg against: the formula as users write it
(autograd on it) and the best ``torch._foreach_*`` pipeline. The tests also check them against
the op (tests/test_weight_penalty.py), so a row's speedup is against a correct baseline."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from ..reference.weight_penalty import naive_penalty


def naive_autograd_penalty(params: Iterable[torch.Tensor], l1: float, l2: float) -> torch.Tensor:
    """The formula as users write it; ``.backward()`` on it accumulates the gradient into ``.grad``."""
    return naive_penalty(list(params), l1, l2)


@torch.no_grad()
def foreach_penalty_(params: Iterable[torch.Tensor], l1: float, l2: float) -> torch.Tensor:
    """The best ``torch._foreach_*`` pipeline for value + in-place gradient (the benchmark's
    "PyTorch multi-tensor" baseline): norms for the value, then ``.grad += l1 * sign(w)`` and
    ``.grad += 2 * l2 * w``; terms with a zero coefficient are skipped. Returns the value."""
    params = list(params)
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    grads = [p.grad for p in params]
    value = torch.zeros((), dtype=torch.float32, device=params[0].device if params else "cpu")
    if not params:
        return value
    if l1 != 0.0:
        value = value + l1 * torch.stack(torch._foreach_norm(params, 1, dtype=torch.float32)).sum()
        torch._foreach_add_(grads, torch._foreach_sign(params), alpha=l1)
    if l2 != 0.0:
        value = value + l2 * torch.stack(torch._foreach_norm(params, 2, dtype=torch.float32)).square().sum()
        torch._foreach_add_(grads, params, alpha=2.0 * l2)
    return value
