"""Shared by the tests and the benchmark: one tolerance table, comparison and opcheck helpers."""

from __future__ import annotations

import torch

#: (rtol, atol) per dtype for results that are not bit-exact by spec (reductions, fp32 math).
TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float64: (1e-10, 1e-12),
    torch.float32: (1e-5, 1e-6),
    torch.float16: (1e-3, 1e-3),
    torch.bfloat16: (1e-2, 1e-2),
}


def tolerance(dtype: torch.dtype) -> tuple[float, float]:
    return TOLERANCES[dtype]


def mismatch(actual, expected, *, exact: bool = False) -> str | None:
    """None when ``actual`` matches ``expected`` (tensors, or tuples of them), else a message."""
    if isinstance(expected, (tuple, list)):
        if not isinstance(actual, (tuple, list)) or len(actual) != len(expected):
            return f"expected {len(expected)} results, got {type(actual).__name__}"
        for i, (a, e) in enumerate(zip(actual, expected)):
            problem = mismatch(a, e, exact=exact)
            if problem:
                return f"result {i}: {problem}"
        return None
    if expected is None:
        return None if actual is None else "expected None"
    if actual.shape != expected.shape or actual.dtype != expected.dtype:
        return f"shape/dtype {tuple(actual.shape)}/{actual.dtype} != {tuple(expected.shape)}/{expected.dtype}"
    a, e = actual.detach().cpu(), expected.detach().cpu()
    if exact:
        same = (
            torch.equal(a, e) or bool(((a == e) | (a.isnan() & e.isnan())).all())
            if a.is_floating_point()
            else torch.equal(a, e)
        )
        if not same:
            return f"not bit-identical: {int((a != e).sum())} of {a.numel()} elements differ"
        return None
    rtol, atol = tolerance(a.dtype) if a.is_floating_point() else (0.0, 0.0)
    try:
        torch.testing.assert_close(a, e, rtol=rtol, atol=atol, equal_nan=True)
    except AssertionError as error:
        return str(error).splitlines()[0] + " " + " ".join(str(error).splitlines()[1:4])
    return None


def opcheck(op, args, kwargs=None, **opcheck_kwargs) -> None:
    """Runs torch.library.opcheck on a fastreg op and raises on the first failing check."""
    results = torch.library.opcheck(op, args, kwargs, **opcheck_kwargs)
    failed = {name: result for name, result in results.items() if result != "SUCCESS"}
    if failed:
        raise AssertionError(f"opcheck failed for {op}: {failed}")
