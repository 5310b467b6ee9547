"""Dense tensors whose data starts off a vector boundary (a view one element into a buffer, as
flat parameter buffers and slices give): every kernel has a scalar or peeled path for them,
which aligned inputs never reach. Each op is compared with the reference on such inputs, the
masks and the penalty gradients bit for bit."""

from __future__ import annotations

import pytest
import torch

from fastreg.reference import batch_norm as ref_bn
from fastreg.reference import dropout as ref_dropout
from fastreg.reference import weight_penalty as ref_penalty
from fastreg.testing import mismatch

from .helpers import DEVICES, FLOAT_DTYPES, require_kernel

OPS = torch.ops.fastreg


def misaligned(shape, dtype, device, skip=1, seed=0, strides=None):
    """Random values in a dense tensor starting `skip` elements into its storage."""
    numel = torch.Size(shape).numel()
    g = torch.Generator().manual_seed(seed)
    buffer = torch.randn(numel + skip, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)
    if strides is None:
        return buffer[skip:].view(shape)
    return buffer[skip:].as_strided(shape, strides)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("mode", [0, 1, 2])
def test_dropout_on_misaligned_tensors_matches_reference_bits(device, dtype, mode):
    require_kernel(device)
    rng_state = torch.tensor([123, 4], dtype=torch.int64, device=device)
    x = misaligned((3, 1001), dtype, device)
    assert x.data_ptr() % 16 != 0
    got = OPS.dropout_seeded(x, 0.3, rng_state, mode)
    want = ref_dropout.dropout_seeded(x, 0.3, rng_state, mode)
    assert mismatch(got, want, exact=True) is None, mismatch(got, want, exact=True)

    grad = misaligned((3, 1001), dtype, device, seed=1)
    mask = want[1]
    if mode == 2:  # a bool mask that is misaligned too
        mask = misaligned((3, 1001), torch.float32, device, seed=2).gt(0)
    got_dx = OPS.dropout_backward(grad, mask, rng_state, 0.3, mode)
    want_dx = ref_dropout.dropout_backward(grad, mask, rng_state, 0.3, mode)
    assert mismatch(got_dx, want_dx, exact=True) is None

    inplace = misaligned((3, 1001), dtype, device, seed=3)
    original = inplace.clone()
    drawn = OPS.dropout_(inplace, 0.3, mode, torch.Generator(device=device).manual_seed(1))[1]
    assert mismatch(inplace, ref_dropout.dropout_seeded(original, 0.3, drawn, mode)[0], exact=True) is None


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_penalty_on_misaligned_tensors_matches_reference(device, dtype):
    require_kernel(device)
    shapes_and_skips = [((37, 129), 1), ((16385,), 3), ((5,), 1), ((2, 8), 0)]
    params = [misaligned(s, dtype, device, skip, seed=i) for i, (s, skip) in enumerate(shapes_and_skips)]
    grads = [misaligned(p.shape, dtype, device, 1, seed=10 + i) for i, p in enumerate(params)]
    expected = [g.clone() for g in grads]
    want_value = ref_penalty.weight_penalty_grad_(expected, params, 0.1, 0.2)
    got_value = OPS.weight_penalty_grad_(grads, params, 0.1, 0.2)
    assert mismatch(grads, expected, exact=True) is None
    assert mismatch(got_value, want_value) is None, (got_value, want_value)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("shape,channels_last", [((6, 5, 7, 9), False), ((6, 8, 7, 9), True), ((6, 3, 4, 4), False)])
def test_batch_norm_on_misaligned_tensors_matches_reference(device, dtype, shape, channels_last):
    require_kernel(device)
    strides = torch.empty(shape).contiguous(memory_format=torch.channels_last).stride() if channels_last else None
    x = misaligned(shape, dtype, device, seed=0, strides=strides)
    grad = misaligned(shape, dtype, device, seed=1, strides=strides)
    stats_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    weight = torch.linspace(0.5, 1.5, shape[1], device=device, dtype=stats_dtype)
    bias = torch.linspace(-1, 1, shape[1], device=device, dtype=stats_dtype)
    got = OPS.batch_norm_train(x, weight, bias, 1e-5)
    want = ref_bn.batch_norm_train(x, weight, bias, 1e-5)
    assert got[0].stride() == x.stride()
    assert mismatch(got, want) is None, mismatch(got, want)
    got_grads = OPS.batch_norm_backward(grad, x, got[1], got[2], weight, True)
    want_grads = ref_bn.batch_norm_backward(grad, x, got[1], got[2], weight, True)
    assert mismatch(got_grads, want_grads) is None, mismatch(got_grads, want_grads)
