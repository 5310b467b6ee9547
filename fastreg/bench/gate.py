"""The correctness gate: every implementation is checked before it is timed.

fastreg and the reference share one random stream, so they are compared bit for bit for the
same rng_state. PyTorch's own dropout draws from a different stream, so for it the gate checks
what dropout means: each output is 0 or x times one scale near 1/(1-p), about a fraction p is
dropped, and the gradient is zero exactly where the output was dropped and scaled elsewhere.
Other ops compare against the reference within fastreg.testing's per-dtype tolerances.
"""

from __future__ import annotations

import math

import torch

from ..testing import mismatch, tolerance


def exact(what: str, actual, expected) -> str | None:
    problem = mismatch(actual, expected, exact=True)
    return f"{what}: {problem}" if problem else None


def close(what: str, actual, expected) -> str | None:
    problem = mismatch(actual, expected)
    return f"{what}: {problem}" if problem else None


def first_problem(*problems: str | None) -> str | None:
    return next((p for p in problems if p), None)


# the median of this many kept elements estimates the scale (sorting 128M values is wasteful)
_SCALE_SAMPLE = 1 << 20


def dropout_semantics(
    x: torch.Tensor,
    out: torch.Tensor,
    p: float,
    grad_out: torch.Tensor | None = None,
    grad_in: torch.Tensor | None = None,
) -> str | None:
    """Checks an output (and gradient) of dropout whose random stream we cannot reproduce."""
    if out.shape != x.shape or out.dtype != x.dtype:
        return f"output shape/dtype {tuple(out.shape)}/{out.dtype} != input {tuple(x.shape)}/{x.dtype}"
    # fp32 arithmetic is exact enough for every dtype but fp64, and halves the temporaries
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    xd, od = x.detach().to(compute).reshape(-1), out.detach().to(compute).reshape(-1)
    informative = xd != 0  # where x is 0 the output is 0 whether or not it was kept
    kept = informative & (od != 0)
    n, n_kept = int(informative.sum()), int(kept.sum())
    if n == 0:
        return None
    rtol, atol = tolerance(x.dtype)
    nominal = 1.0 / (1.0 - p) if p < 1 else 0.0
    scale = nominal
    if n_kept:
        sample = kept[:_SCALE_SAMPLE]
        scale = float((od[:_SCALE_SAMPLE][sample] / xd[:_SCALE_SAMPLE][sample]).median())
        # fastreg resolves p to 2^-16; the rest is the dtype's rounding of x * scale
        allowed = max(2.0**-16 / (1.0 - p) ** 2, rtol)
        if abs(scale - nominal) > allowed * nominal:
            return f"kept elements are scaled by {scale:.6g}, expected 1/(1-p) = {nominal:.6g}"
        expected = xd * scale
        bad = int((kept & ((od - expected).abs() > atol + rtol * expected.abs())).sum())
        if bad:
            return f"{bad} of {n_kept} nonzero outputs are not x * {scale:.6g} (neither dropped nor scaled)"
    fraction = n_kept / n
    sigma = math.sqrt(max(p * (1 - p), 1e-12) / n)
    if abs(fraction - (1 - p)) > 6 * sigma + 2.0**-15:
        return f"kept fraction {fraction:.5f} is not 1-p = {1 - p:.5f} (6 sigma = {6 * sigma:.5f})"
    if grad_in is None:
        return None
    if grad_in.shape != x.shape or grad_in.dtype != x.dtype:
        return f"gradient shape/dtype {tuple(grad_in.shape)}/{grad_in.dtype} != input's"
    gd, god = grad_in.detach().to(compute).reshape(-1), grad_out.detach().to(compute).reshape(-1)
    expected = torch.where(kept, god * scale, torch.zeros((), dtype=compute, device=god.device))
    bad = int((informative & ((gd - expected).abs() > atol + rtol * expected.abs())).sum())
    if bad:
        return f"gradient does not follow the forward mask at {bad} of {n} elements"
    return None
