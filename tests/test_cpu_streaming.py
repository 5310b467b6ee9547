"""The CPU kernels of batch norm and dropout write large float outputs with non-temporal stores
and small ones with ordinary stores (csrc/common/cpu_cache.h): both paths must give the same
bits. The test's own process takes the ordinary path on these small tensors; a child process
with FASTREG_CPU_CACHE_MB=0 streams every float output. The child computes the same ops and the
parent compares bitwise."""

from __future__ import annotations

import pytest
import torch

from .helpers import require_kernel, result_in_child


def _sample(shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * 2 + 0.5).to(dtype)


def _inputs():
    """Layouts that reach every walk, with runs that end mid cache line and inputs that start
    mid line (a storage offset of one element)."""
    for dtype in (torch.float32, torch.float64):
        for shape in ((4, 3, 5, 7), (2, 8, 16, 16), (3, 40, 2, 2)):
            base = _sample((1 + shape[0] * shape[1] * shape[2] * shape[3],), dtype, seed=len(shape) + shape[1])
            nchw = base[1:].view(shape)  # starts one element past a cache-line boundary
            yield f"{dtype}-{shape}-nchw-offset", nchw
            yield f"{dtype}-{shape}-nchw", nchw.clone()
            yield f"{dtype}-{shape}-cl", nchw.contiguous(memory_format=torch.channels_last)


def compute_all() -> dict[str, torch.Tensor]:
    """Batch norm train forward, its backward and eval forward on every input, and dropout
    forward and backward (all through the fastreg ops, which on CPU run the compiled kernels)."""
    import fastreg.functional as FF

    results = {}
    for name, x in _inputs():
        channels = x.shape[1]
        weight = torch.linspace(0.5, 1.5, channels, dtype=x.dtype).requires_grad_()
        bias = torch.linspace(-1, 1, channels, dtype=x.dtype).requires_grad_()
        xg = x.detach().requires_grad_()
        y = FF.batch_norm(xg, None, None, weight, bias, training=True)
        dy = torch.cos(torch.arange(y.numel(), dtype=x.dtype)).view(y.shape)
        dx, dw, db = torch.autograd.grad(y, (xg, weight, bias), dy)
        running_mean = torch.linspace(-0.5, 0.5, channels, dtype=x.dtype)
        running_var = torch.linspace(0.5, 2.0, channels, dtype=x.dtype)
        eval_y = FF.batch_norm(x, running_mean, running_var, weight.detach(), bias.detach(), training=False)
        results.update({f"{name}/train": y.detach(), f"{name}/dx": dx, f"{name}/dw": dw, f"{name}/db": db})
        results[f"{name}/eval"] = eval_y
    for dtype in (torch.float32, torch.float64):
        x = _sample((3 * 4099,), dtype, seed=7).requires_grad_()  # a partial last group
        y = FF.dropout(x, p=0.3, generator=torch.Generator().manual_seed(1234))
        (dx,) = torch.autograd.grad(y, x, torch.cos(torch.arange(y.numel(), dtype=dtype)))
        results.update({f"dropout-{dtype}/y": y.detach(), f"dropout-{dtype}/dx": dx})
    return results


def test_streaming_and_cached_stores_give_the_same_bits(tmp_path):
    require_kernel("cpu")
    streamed = result_in_child(tmp_path, "tests.test_cpu_streaming", "compute_all", FASTREG_CPU_CACHE_MB="0")
    cached = compute_all()
    assert streamed.keys() == cached.keys()
    for key, expected in cached.items():
        actual = streamed[key]
        assert actual.stride() == expected.stride(), key
        if not torch.equal(actual, expected):
            pytest.fail(
                f"{key}: streamed output differs from the cached one, max |diff| "
                f"{(actual - expected).abs().max().item():.3g}"
            )
