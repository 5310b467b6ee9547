"""L1/L2 weight penalty ops' numerics: the compiled kernels are registered; the value, the in-place
gradient and the differentiable form (fastreg.penalty.weight_penalty) agree with the naive formula
and the reference, bit for bit where they must, across dtypes, sizes, layouts, thread counts,
mixed float32 + float64 lists, empty lists, NaN and inf; the tensor-coefficient twins give the
float ops' bits; the baselines agree with the op. Errors are in test_weight_penalty_errors.py,
WeightPenalty in test_weight_penalty_module.py, torch.compile and CUDA graphs in
test_weight_penalty_graphs.py."""

from __future__ import annotations

import math

import pytest
import torch

from fastreg import _loader, penalty
from fastreg._library import has_kernel
from fastreg.bench import penalty_baselines, penalty_inputs
from fastreg.reference import weight_penalty as ref
from fastreg.testing import mismatch

from .helpers import DEVICES
from .weight_penalty_helpers import (
    EDGE_SHAPES,
    KERNELS_ONLY,
    OPS,
    PENALTY_OPS,
    assert_value_close,
    kernels,  # noqa: F401 (autouse: the CPU kernels, loaded once per module)
    make,
    many_shapes,
    use_kernels,
)

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
COEFFICIENTS = [(0.0, 0.0), (0.3, 0.0), (0.0, 0.7), (0.3, 0.7), (1e-5, 1e-4)]


# --- the compiled kernels are what is tested ------------------------------------------------------


@KERNELS_ONLY
@pytest.mark.parametrize("device", DEVICES)
def test_kernels_are_registered(device):
    assert _loader.load_kernels(device), _loader.STATE.reason
    for name in PENALTY_OPS:
        assert has_kernel(name, device), f"{name}: no {device} kernel ({_loader.STATE.reason})"


# --- value ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("l1,l2", COEFFICIENTS)
def test_value_matches_naive_formula(device, dtype, l1, l2):
    use_kernels(device)
    params = make(EDGE_SHAPES + many_shapes(), dtype, device)
    value = OPS.weight_penalty_value(params, l1, l2)
    assert value.device.type == device
    assert_value_close(value, params, l1, l2)
    assert_value_close(ref.weight_penalty_value(params, l1, l2), params, l1, l2)


@KERNELS_ONLY
@pytest.mark.parametrize("device", DEVICES)
def test_value_is_bitwise_stable_across_runs_and_thread_counts(device):
    use_kernels(device)
    params = make(penalty_inputs.small_cpu_shapes()[:24] + EDGE_SHAPES, torch.float32, device)
    first = OPS.weight_penalty_value(params, 0.01, 0.02)
    threads = torch.get_num_threads()
    try:
        for n in (1, max(2, threads)):
            torch.set_num_threads(n)
            for _ in range(3):
                assert torch.equal(OPS.weight_penalty_value(params, 0.01, 0.02), first)
    finally:
        torch.set_num_threads(threads)
    assert_value_close(first, params, 0.01, 0.02)


@pytest.mark.parametrize("device", DEVICES)
def test_value_of_mixed_dtypes_is_float64_when_any_is(device):
    use_kernels(device)
    params = make([(300,), (70, 3), (1025,), (5,)], torch.float32, device)
    params = [params[0], params[1].half(), params[2].bfloat16(), params[3].double()]
    value = OPS.weight_penalty_value(params, 0.2, 0.5)
    assert value.dtype == torch.float64 and value.device.type == device
    assert_value_close(value, params, 0.2, 0.5)  # the float64 tensor accumulates in float64, the rest in float32
    assert_value_close(OPS.weight_penalty_value(params[3:], 0.2, 0.5), params[3:], 0.2, 0.5, rtol=1e-14)
    assert OPS.weight_penalty_value(params[:3], 0.2, 0.5).dtype == torch.float32


@pytest.mark.parametrize("device", DEVICES)
def test_value_of_non_dense_views(device):
    use_kernels(device)
    base = make([(64, 90)], device=device)[0]
    views = [base[:, ::3], base.t(), base[10:20], base.unsqueeze(0).expand(3, 64, 90)]
    assert_value_close(OPS.weight_penalty_value(views, 0.1, 0.3), views, 0.1, 0.3)


@pytest.mark.parametrize("device", DEVICES)
def test_empty_list_and_empty_tensors(device):
    use_kernels(device)
    empties = [torch.empty(0, device=device), torch.empty(3, 0, device=device)]
    value = OPS.weight_penalty_value(empties, 1.0, 1.0)  # no blocks on CUDA: the final kernel still writes 0
    assert value.device.type == device and float(value) == 0.0
    grads = [torch.empty(0, device=device), torch.empty(3, 0, device=device)]
    assert float(OPS.weight_penalty_grad_(grads, empties, 1.0, 1.0)) == 0.0
    outputs = OPS.weight_penalty_backward(torch.tensor(1.0, device=device), empties, 1.0, 1.0)
    assert [tuple(o.shape) for o in outputs] == [(0,), (3, 0)] and all(o.device.type == device for o in outputs)
    assert float(penalty.weight_penalty([], l1=1.0)) == 0.0


@pytest.mark.parametrize("device", DEVICES)
def test_nan_and_inf_propagate_like_the_formula(device):
    use_kernels(device)
    big = [torch.tensor([1.0, 3e30]), torch.tensor([2.0])]  # sum of squares overflows float32
    for params, l1, l2 in [
        (big, 1.0, 0.0),
        (big, 0.0, 1.0),
        (big, 0.0, 0.0),
        ([torch.tensor([float("nan")])], 1.0, 1.0),
    ]:
        expected = float(ref.naive_penalty(params, l1, l2))  # 0 * inf is nan there too
        got = float(OPS.weight_penalty_value([p.to(device) for p in params], l1, l2))
        assert (math.isnan(got) and math.isnan(expected)) or got == expected, (params, l1, l2, got, expected)


def test_value_above_the_float32_range_is_inf_like_the_formula():
    """A float32 value beyond float32's range is inf, as the naive formula's float32 sum is."""
    use_kernels("cpu")
    params = make([(40, 3), (9,)])
    assert float(ref.naive_penalty(params, 1e38, 0.0)) == math.inf
    assert float(OPS.weight_penalty_value(params, 1e38, 0.0)) == math.inf
    big = [torch.full((1024,), 1e18)]  # each square fits in float32, their sum does not
    assert float(ref.naive_penalty(big, 0.0, 1.0)) == math.inf
    grad = torch.zeros(1024)
    assert float(OPS.weight_penalty_grad_([grad], big, 0.0, 1.0)) == math.inf
    assert torch.equal(grad, torch.full((1024,), 2e18)), "the gradients are still the formula's"


# --- in-place gradient ----------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("l1,l2", COEFFICIENTS)
def test_grad_inplace_matches_reference_bitwise(device, dtype, l1, l2):
    use_kernels(device)
    params = make(EDGE_SHAPES + many_shapes(), dtype, device)
    grads = make(EDGE_SHAPES + many_shapes(), dtype, device, seed=1)
    expected = [g.clone() for g in grads]
    ref_value = ref.weight_penalty_grad_(expected, params, l1, l2)
    value = OPS.weight_penalty_grad_(grads, params, l1, l2)
    assert mismatch(grads, expected, exact=True) is None
    assert_value_close(value, params, l1, l2)
    assert_value_close(ref_value, params, l1, l2)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("l1,l2", COEFFICIENTS)
def test_grad_inplace_matches_autograd_on_naive_formula(device, dtype, l1, l2):
    use_kernels(device)
    leaves = [p.requires_grad_() for p in make(EDGE_SHAPES + many_shapes(40), dtype, device)]
    initial = make(EDGE_SHAPES + many_shapes(40), dtype, device, seed=1)
    for p, g in zip(leaves, initial):
        p.grad = g.clone()
    ref.naive_penalty(leaves, l1, l2).backward()
    autograd = [p.grad for p in leaves]
    grads = [g.clone() for g in initial]
    OPS.weight_penalty_grad_(grads, [p.detach() for p in leaves], l1, l2)
    # fp32/fp64: the same expressions in the same order, so the same bits, on CUDA too: autograd's
    # steps there are single IEEE multiplies and adds, and the CUDA kernel rounds each of its steps
    # explicitly (__fmul_rn/__fadd_rn, no FMA contraction), so nothing is loosened for CUDA.
    # fp16/bf16: autograd rounds each intermediate to the parameter dtype, the kernels only the
    # result, so they may differ by a few roundings of the terms (g, l1 * sign(w), 2 * l2 * w),
    # not of their sum.
    if dtype in (torch.float32, torch.float64):
        assert mismatch(grads, autograd, exact=True) is None
    else:
        eps = torch.finfo(dtype).eps
        for a, b, g0, w in zip(grads, autograd, initial, leaves):
            scale = g0.double().abs() + l1 + 2 * l2 * w.detach().double().abs()
            assert bool(((a.double() - b.double()).abs() <= 2 * eps * scale + 1e-7).all())


@pytest.mark.parametrize("device", DEVICES)
def test_grad_inplace_sign_of_zero_is_zero(device):
    use_kernels(device)
    params = [torch.tensor([0.0, -0.0, 2.0, -3.0], device=device)]
    grads = [torch.zeros(4, device=device)]
    OPS.weight_penalty_grad_(grads, params, 1.0, 0.0)
    assert grads[0].tolist() == [0.0, 0.0, 1.0, -1.0]


@pytest.mark.parametrize("device", DEVICES)
def test_grad_inplace_with_layouts_differing_from_the_parameter(device):
    use_kernels(device)
    # parameter channels_last, gradient contiguous; a non-dense parameter view; a permuted pair
    conv = make([(8, 5, 3, 3)], device=device)[0].to(memory_format=torch.channels_last)
    base = make([(40, 60)], device=device, seed=2)[0]
    params = [conv, base[:, ::2], base.t()]
    grads = make([(8, 5, 3, 3), (40, 30), (60, 40)], device=device, seed=3)
    grads[2] = grads[2].t().contiguous().t()
    expected = [g.clone() for g in grads]
    ref.weight_penalty_grad_(expected, params, 0.1, 0.2)
    OPS.weight_penalty_grad_(grads, params, 0.1, 0.2)
    assert mismatch(grads, expected, exact=True) is None
    assert grads[2].stride() == (1, 60)  # updated in place, layout kept


@KERNELS_ONLY
def test_grad_inplace_is_bitwise_stable_across_thread_counts():
    params = make(penalty_inputs.small_cpu_shapes()[:16], torch.float32)
    start = make(penalty_inputs.small_cpu_shapes()[:16], torch.float32, seed=3)
    results = []
    threads = torch.get_num_threads()
    try:
        for n in (1, max(2, threads), 1):
            torch.set_num_threads(n)
            grads = [g.clone() for g in start]
            results.append((OPS.weight_penalty_grad_(grads, params, 0.05, 0.01), grads))
    finally:
        torch.set_num_threads(threads)
    for value, grads in results[1:]:
        assert torch.equal(value, results[0][0]) and mismatch(grads, results[0][1], exact=True) is None


# --- differentiable form --------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("l1,l2", COEFFICIENTS)
def test_functional_value_and_grad_match_naive_autograd(device, dtype, l1, l2):
    use_kernels(device)
    shapes = EDGE_SHAPES + many_shapes(30)
    ours = [p.requires_grad_() for p in make(shapes, dtype, device)]
    naive = [p.detach().clone().requires_grad_() for p in ours]
    value = penalty.weight_penalty(ours, l1=l1, l2=l2)
    (value * 1.5).backward()
    (ref.naive_penalty(naive, l1, l2) * 1.5).backward()
    assert value.device.type == device
    assert_value_close(value.detach(), ours, l1, l2)
    for a, b in zip(ours, naive):  # fp32/fp64 bit for bit on every device (see the in-place test)
        assert a.grad.device == a.device
        assert mismatch(a.grad, b.grad, exact=dtype in (torch.float32, torch.float64)) is None


@pytest.mark.parametrize("device", DEVICES)
def test_functional_gradcheck_and_gradgradcheck(device):
    use_kernels(device)
    g = torch.Generator().manual_seed(4)
    params = [
        (torch.rand(s, dtype=torch.float64, generator=g) + 0.1)
        * torch.tensor([1.0, -1.0], dtype=torch.float64).repeat(math.prod(s) // 2 + 1)[: math.prod(s)].reshape(s)
        for s in [(3, 4), (5,), (2, 3, 2)]
    ]
    params = [p.to(device).requires_grad_() for p in params]

    def fn(*ps):
        return penalty.weight_penalty(ps, l1=0.3, l2=0.7)

    assert torch.autograd.gradcheck(fn, params)
    assert torch.autograd.gradgradcheck(fn, params)


@pytest.mark.parametrize("device", DEVICES)
def test_functional_groups_mixed_dtypes_into_one_value(device):
    use_kernels(device)
    params = [p.requires_grad_() for p in make([(30, 3), (100,)], torch.float32, device)]
    params.append(make([(40,)], torch.bfloat16, device, seed=5)[0].requires_grad_())
    value = penalty.weight_penalty(params, l1=0.1, l2=0.2)
    value.backward()
    assert value.device.type == device
    assert_value_close(value.detach(), params, 0.1, 0.2)
    assert all(p.grad is not None and p.grad.dtype == p.dtype and p.grad.device == p.device for p in params)


@pytest.mark.parametrize("shape", [(), (6, 5)])
def test_functional_takes_one_tensor_as_one_parameter(shape):
    # was iterated over: a 0-dim tensor raised "iteration over a 0-d tensor", a matrix became one tensor per row
    use_kernels("cpu")
    w = make([shape], zeros_every=3)[0].requires_grad_()
    naive = w.detach().clone().requires_grad_()
    value = penalty.weight_penalty(w, l1=0.3, l2=0.7)
    value.backward()
    ref.naive_penalty([naive], 0.3, 0.7).backward()
    assert_value_close(value.detach(), [w], 0.3, 0.7)
    assert mismatch(w.grad, naive.grad, exact=True) is None


@KERNELS_ONLY
@pytest.mark.parametrize("device", DEVICES)
def test_compiled_library_records_its_cpp_autograd_node(device):
    # register_autograd's Python kernel walks the list in Python (about 1 ms of host time per
    # forward + backward over 161 tensors); the compiled library registers the same formula in
    # C++ (weight_penalty_autograd.cpp), and only a double backward goes through Python.
    use_kernels(device)
    trainable = [torch.randn(s, device=device, requires_grad=True) for s in [(3, 4), (5,), (2, 3, 2)]]
    frozen = torch.randn(7, device=device)  # counts in the value, gets no gradient
    value = penalty.weight_penalty([trainable[0], frozen, *trainable[1:]], l1=0.3, l2=0.7)
    assert value.grad_fn.name() == "fastreg::WeightPenaltyBackward"
    value.backward()
    assert frozen.grad is None
    for p in trainable:
        expected = 0.3 * torch.sign(p.detach()) + 2 * 0.7 * p.detach()
        assert mismatch(p.grad, expected) is None
    with torch.no_grad():  # nothing to record: no node
        assert penalty.weight_penalty(trainable, l1=0.3).grad_fn is None
    assert penalty.weight_penalty([frozen], l2=0.7).grad_fn is None


# --- mixed float32 + float64 lists ----------------------------------------------------------------


@pytest.mark.parametrize("order", ["f32_first", "f64_first"])
def test_mixed_float32_float64_gradients_match_autograd_bitwise(order):
    """With a float64 tensor in the list the value is float64, and autograd on the naive formula
    forms go * l1 and go * l2 in float64 before casting them to float32: the kernels form them
    alike. They formed them in float32 (float(go) * float(l1)): up to 2 ulp off in about a
    quarter of these cases."""
    use_kernels("cpu")
    g = torch.Generator().manual_seed(0)
    for trial in range(60):
        l1, l2, scale = torch.rand(3, generator=g, dtype=torch.float64).tolist()
        p32 = torch.randn(64, generator=g).requires_grad_()
        q64 = torch.randn(3, generator=g, dtype=torch.float64).requires_grad_()
        ours = [p32, q64] if order == "f32_first" else [q64, p32]
        naive = [t.detach().clone().requires_grad_() for t in ours]
        (penalty.weight_penalty(ours, l1=l1, l2=l2) * (10 * scale)).backward()
        (ref.naive_penalty(naive, l1, l2) * (10 * scale)).backward()
        for a, b in zip(ours, naive):
            assert mismatch(a.grad, b.grad, exact=True) is None, (trial, a.dtype)


# --- tensor-coefficient twins (torch.compile's form), eagerly -------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", ["op", "reference"])
def test_tensor_coefficient_ops_equal_the_float_ops(impl, device):
    """The *_tensor_coefficients twins (torch.compile's form) give the float ops' bits: values,
    in-place gradients, autograd gradients, double backward and vmap."""
    if impl == "op":
        use_kernels(device)
    lib = OPS if impl == "op" else ref  # the reference module has functions of the ops' names
    ops = (lib.weight_penalty_value, lib.weight_penalty_grad_, lib.weight_penalty_backward)
    twins = (
        lib.weight_penalty_value_tensor_coefficients,
        lib.weight_penalty_grad_tensor_coefficients_,
        lib.weight_penalty_backward_tensor_coefficients,
    )
    shapes = [(3, 5), (0,), (17,), (2, 2, 3), (257,)]
    params = make(shapes, device=device)
    params[1], params[3] = params[1].half(), params[3].bfloat16()
    go = torch.tensor(1.7, device=device)
    for l1, l2 in COEFFICIENTS:
        t1, t2 = torch.tensor(l1, dtype=torch.float64), torch.tensor(l2, dtype=torch.float64)
        assert torch.equal(twins[0](params, t1, t2), ops[0](params, l1, l2))
        grads = [g.to(p.dtype) for g, p in zip(make(shapes, device=device, seed=3), params)]
        twin_grads = [g.clone() for g in grads]
        assert torch.equal(twins[1](twin_grads, params, t1, t2), ops[1](grads, params, l1, l2))
        assert mismatch(twin_grads, grads, exact=True) is None
        assert mismatch(list(twins[2](go, params, t1, t2)), list(ops[2](go, params, l1, l2)), exact=True) is None
    if impl == "reference":
        return
    l1, l2, t1, t2 = 0.3, 0.7, torch.tensor(0.3, dtype=torch.float64), torch.tensor(0.7, dtype=torch.float64)
    w = [p.detach().double().requires_grad_() for p in params]

    def double_backward(value_fn):
        (first,) = torch.autograd.grad(value_fn(w) * 1.5, w[4], create_graph=True)
        return first, torch.autograd.grad((first * first).sum(), w)

    first, second = double_backward(lambda ps: OPS.weight_penalty_value(ps, l1, l2))
    twin_first, twin_second = double_backward(lambda ps: OPS.weight_penalty_value_tensor_coefficients(ps, t1, t2))
    assert torch.equal(twin_first, first) and mismatch(list(twin_second), list(second), exact=True) is None
    stacked = [torch.stack([p.detach(), 2 * p.detach()]) for p in params]
    assert torch.equal(
        torch.func.vmap(lambda *ps: OPS.weight_penalty_value_tensor_coefficients(list(ps), t1, t2))(*stacked),
        torch.func.vmap(lambda *ps: OPS.weight_penalty_value(list(ps), l1, l2))(*stacked),
    )


# --- baselines and model-shaped lists -------------------------------------------------------------


def test_model_shaped_lists_have_the_real_sizes():
    for shapes, count, elements in [
        (penalty_inputs.resnet50_shapes(), 161, 25_557_032),
        (penalty_inputs.gpt2_small_shapes(), 148, 124_439_808),
    ]:
        assert len(shapes) == count and sum(math.prod(s) for s in shapes) == elements
    assert penalty_inputs.resnet50_host_shapes() == [(1,)] * 161
    small = penalty_inputs.small_cpu_shapes()
    assert len(small) == 80 and 9e6 < sum(math.prod(s) for s in small) < 12e6
    params = penalty_inputs.resnet50_like_params(dtype=torch.bfloat16, grads=True)
    assert len(params) == 161 and all(p.dtype == torch.bfloat16 and p.grad is not None for p in params)


@pytest.mark.parametrize("device", DEVICES)
def test_baselines_agree_with_the_op(device):
    use_kernels(device)
    params = penalty_inputs.make_params(many_shapes(50), device, grads=True)
    initial = [p.grad.clone() for p in params]
    ours = [g.clone() for g in initial]
    value = OPS.weight_penalty_grad_(ours, [p.detach() for p in params], 0.01, 0.02)
    foreach_value = penalty_baselines.foreach_penalty_(params, 0.01, 0.02)
    assert math.isclose(float(foreach_value), float(value), rel_tol=1e-5)
    assert mismatch([p.grad for p in params], ours) is None
    for p, g in zip(params, initial):
        p.grad = g.clone()
    naive_value = penalty_baselines.naive_autograd_penalty(params, 0.01, 0.02)
    naive_value.backward()
    assert math.isclose(float(naive_value.detach()), float(value), rel_tol=1e-5)
    assert mismatch([p.grad for p in params], ours, exact=True) is None
