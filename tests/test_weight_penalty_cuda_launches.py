"""The CUDA weight penalty passes its tensor list to the kernel in argument tables: 512 tensors
per launch where the toolkit and driver take 32 KB of kernel arguments (CUDA 12.1+), else 128
(the classic 4 KB; FASTREG_CUDA_LARGE_KERNEL_ARGS=0 forces it). Blocks write their partial sums
to slots in list order either way (csrc/weight_penalty/weight_penalty_launch_plan.h), so both
must give the same bits. This process runs the default tables, a child the 4 KB one, over lists
that take one launch or several with either; the parent compares bitwise, checks the gradients
against the CPU kernel, and counts the launches with the profiler."""

from __future__ import annotations

import ctypes
import math

import pytest
import torch

from fastreg.testing import mismatch

from .helpers import REFERENCE_BACKEND, result_in_child, use_kernels

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.skipif(REFERENCE_BACKEND, reason="a property of the CUDA kernels"),
]

OPS = torch.ops.fastreg
PENALTY_OPS = ("weight_penalty_value", "weight_penalty_grad_", "weight_penalty_backward")
L1, L2 = 0.1, 0.2
# 100 tensors: one launch with either table; 161 (ResNet-50's count): one or two; 600: two or five
LIST_LENGTHS = (100, 161, 600)


def tensor_list(count: int, dtype: torch.dtype) -> list[torch.Tensor]:
    """Odd sizes, some empty, some over one 16K-element chunk; a fixed seed."""
    g = torch.Generator().manual_seed(count)
    sizes = [0 if i % 17 == 5 else 40_000 + i if i % 50 == 3 else (i * 37) % 3000 + 1 for i in range(count)]
    return [torch.randn(n, generator=g).to(dtype) for n in sizes]


def mixed_list(count: int) -> list[torch.Tensor]:
    """fp32, bf16 and fp64 in one list: a float64 value and per-tensor dtypes in the table."""
    dtypes = (torch.float32, torch.bfloat16, torch.float64)
    return [t.to(dtypes[i % 3]) for i, t in enumerate(tensor_list(count, torch.float32))]


def lists() -> dict[str, list[torch.Tensor]]:
    found = {f"fp32-{n}": tensor_list(n, torch.float32) for n in LIST_LENGTHS}
    found["mixed-600"] = mixed_list(600)
    return found


def compute_all() -> dict[str, torch.Tensor | list[torch.Tensor]]:
    """Every mode of the CUDA kernels over every list, results on the CPU."""
    use_kernels("cuda", PENALTY_OPS)
    results: dict[str, torch.Tensor | list[torch.Tensor]] = {}
    for name, params in lists().items():
        params = [p.cuda() for p in params]
        grads = [torch.full_like(p, 0.25) for p in params]
        go = torch.tensor(1.5, dtype=OPS.weight_penalty_value(params, L1, L2).dtype, device="cuda")
        results[f"{name}/value"] = OPS.weight_penalty_value(params, L1, L2).cpu()
        results[f"{name}/grad_value"] = OPS.weight_penalty_grad_(grads, params, L1, L2).cpu()
        results[f"{name}/grads"] = [g.cpu() for g in grads]
        results[f"{name}/backward"] = [t.cpu() for t in OPS.weight_penalty_backward(go, params, L1, L2)]
    return results


def penalty_launches() -> int:
    """Kernel launches of one value + gradient call on the 161-tensor list (the final sum excluded)."""
    use_kernels("cuda", PENALTY_OPS)
    params = [p.cuda() for p in tensor_list(161, torch.float32)]
    grads = [torch.zeros_like(p) for p in params]
    OPS.weight_penalty_grad_(grads, params, L1, L2)
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        OPS.weight_penalty_grad_(grads, params, L1, L2)
        torch.cuda.synchronize()
    return sum(
        1
        for event in prof.events()
        if event.device_type == torch.autograd.DeviceType.CUDA
        and "penalty_kernel" in event.name
        and "final" not in event.name
    )


def compute_all_and_count_launches() -> dict:
    results = compute_all()
    results["launches"] = torch.tensor(penalty_launches())
    return results


def driver_takes_large_arguments() -> bool:
    version = ctypes.c_int(0)
    try:
        ctypes.CDLL("libcuda.so.1").cuDriverGetVersion(ctypes.byref(version))
    except OSError:
        return False
    toolkit = tuple(int(x) for x in (torch.version.cuda or "0.0").split(".")[:2])
    return version.value >= 12010 and toolkit >= (12, 1)


def same(a, b) -> bool:
    if isinstance(a, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)


def test_both_argument_tables_give_the_same_bits_and_the_cpu_gradients(tmp_path):
    module = "tests.test_weight_penalty_cuda_launches"
    small = result_in_child(tmp_path, module, "compute_all_and_count_launches", FASTREG_CUDA_LARGE_KERNEL_ARGS="0")
    default = compute_all()

    assert int(small.pop("launches")) == 2, "FASTREG_CUDA_LARGE_KERNEL_ARGS=0: 161 tensors take two 4 KB tables"
    expected_launches = 1 if driver_takes_large_arguments() else 2
    assert penalty_launches() == expected_launches
    assert small.keys() == default.keys()
    for key, value in default.items():
        assert same(value, small[key]), f"{key}: the 4 KB tables give other bits than the default ones"

    use_kernels("cpu", PENALTY_OPS)
    for name, params in lists().items():
        grads = [torch.full_like(p, 0.25) for p in params]
        cpu_value = OPS.weight_penalty_grad_(grads, params, L1, L2)
        assert mismatch(default[f"{name}/grads"], grads, exact=True) is None, name
        assert math.isclose(float(default[f"{name}/grad_value"]), float(cpu_value), rel_tol=1e-6), name
