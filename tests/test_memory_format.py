"""The memory-format rule (fastreg/memory_format.py, csrc/common/tensor_glue.h): a dense input
keeps its strides, any other is laid out as torch.empty_like lays it out, over random layouts."""

import random

import pytest
import torch

import fastreg.functional as F
from fastreg.memory_format import dense_strides, is_non_overlapping_and_dense, memory_dense
from fastreg.reference import dropout as ref

from .helpers import DEVICES


def random_layout(rng: random.Random, device: str) -> torch.Tensor:
    """A view of a random base of values in [1, 2): permuted, sliced with steps and offsets,
    some dims expanded."""
    dims = rng.randint(1, 5)
    shape = [rng.randint(1, 6) for _ in range(dims)]
    t = torch.rand(shape, device=device) + 1
    order = list(range(dims))
    rng.shuffle(order)
    t = t.permute(order)
    for d in range(dims):
        if t.shape[d] > 1 and rng.random() < 0.4:
            start = rng.randint(0, 1)
            t = t.narrow(d, start, t.shape[d] - start)[(slice(None),) * d + (slice(None, None, rng.randint(1, 3)),)]
    if rng.random() < 0.2:
        d = rng.randrange(dims)
        t = t.narrow(d, 0, 1).expand(*t.shape[:d], rng.randint(2, 4), *t.shape[d + 1 :])
    return t


LAYOUTS = 300


def layout_order(t: torch.Tensor) -> list[int]:
    """The strides of the dims that have more than one element."""
    return [stride for stride, size in zip(t.stride(), t.shape) if size > 1]


def test_dense_layout_is_empty_likes():
    rng = random.Random(0)
    non_dense = 0
    for _ in range(LAYOUTS):
        t = random_layout(rng, "cpu")
        expected = torch.empty_like(t).stride()
        dense = memory_dense(t)
        assert dense_strides(t) == dense.stride() == expected, (t.shape, t.stride())
        assert is_non_overlapping_and_dense(dense) and torch.equal(dense, t)
        non_dense += not is_non_overlapping_and_dense(t)
    assert non_dense > LAYOUTS // 4, "the layouts must exercise the copy"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mask_mode", ["regenerate", "bits", "bool"])
def test_dropout_outputs_and_gradients_follow_the_rule_on_random_layouts(device, mask_mode):
    """The kernels' outputs have empty_like's strides (torch's dropout outputs have them too),
    and backward maps each gradient element to its own element's mask whatever the layouts."""
    rng = random.Random(1)
    scale = ref.keep_scale(ref.keep_threshold(0.5))
    non_dense = 0
    for _ in range(LAYOUTS // 3):
        x = random_layout(rng, device).requires_grad_()
        non_dense += not is_non_overlapping_and_dense(x)
        y = F.dropout(x, 0.5, mask_mode=mask_mode)
        assert y.stride() == torch.empty_like(x).stride()
        # torch's output comes from TensorIterator, whose strides of size-1 dims differ; they address nothing
        assert layout_order(y) == layout_order(torch.nn.functional.dropout(x, 0.5))
        assert torch.equal(y.detach(), torch.where(y == 0, 0.0, x.detach() * scale))
        grad = torch.rand(x.shape, device=device) + 1
        (dx,) = torch.autograd.grad(y, x, grad)
        assert torch.equal(dx, torch.where(y == 0, 0.0, grad * scale))
    assert non_dense > LAYOUTS // 12, "the layouts must exercise the copy"
