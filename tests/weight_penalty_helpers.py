"""Shared by the tests/test_weight_penalty*.py files: the penalty ops, the check that their kernels
are active, the CPU kernels loaded once per module (an autouse fixture each file imports),
random parameter lists and edge-case sizes, and the comparison with the naive float64 formula."""

from __future__ import annotations

import math

import pytest
import torch

from fastreg import _loader
from fastreg.reference import weight_penalty as ref

from .helpers import REFERENCE_BACKEND
from .helpers import use_kernels as _use_kernels

OPS = torch.ops.fastreg
PENALTY_OPS = (
    "weight_penalty_value",
    "weight_penalty_grad_",
    "weight_penalty_backward",
    "weight_penalty_value_tensor_coefficients",
    "weight_penalty_grad_tensor_coefficients_",
    "weight_penalty_backward_tensor_coefficients",
)


def use_kernels(device: str) -> None:
    _use_kernels(device, PENALTY_OPS)


CUDA_ONLY = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


KERNELS_ONLY = pytest.mark.skipif(
    REFERENCE_BACKEND,
    reason="a property of the kernels (torch.sum's order follows threads)",
)


# Sizes around the CPU vector block (256 fp32), the CPU chunk (32768) and the CUDA chunk (16384).
EDGE_SHAPES = [
    (0,),
    (1,),
    (3, 0, 2),
    (7,),
    (255,),
    (256,),
    (257,),
    (16383,),
    (16385,),
    (32767,),
    (32769,),
    (5, 3, 3, 3),
]


@pytest.fixture(scope="module", autouse=True)
def kernels():
    _loader.load_kernels("cpu")


def make(shapes, dtype=torch.float32, device="cpu", seed=0, zeros_every=7):
    """Random tensors (some exact zeros, for sign(0) = 0), one per shape."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for shape in shapes:
        t = torch.randn(shape, generator=g)
        if t.numel():
            t.view(-1)[::zeros_every] = 0.0
        out.append(t.to(device=device, dtype=dtype))
    return out


def naive_fp64(params, l1, l2) -> float:
    return float(ref.naive_penalty([p.detach().double() for p in params], l1, l2))


def assert_value_close(value, params, l1, l2, rtol=1e-6):
    expected = naive_fp64(params, l1, l2)
    assert value.dim() == 0 and value.dtype == ref.value_dtype(params)
    assert math.isclose(float(value), expected, rel_tol=rtol, abs_tol=1e-30), (float(value), expected)


def many_shapes(count=211):
    """200+ tensors of mixed ranks and odd sizes."""
    return [((i * 37) % 500 + 1, (i % 5) + 1) if i % 3 else ((i * 101) % 3000 + 1,) for i in range(count)]
