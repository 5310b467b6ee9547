"""L1/L2 weight penalty: the ops, fastreg.penalty's API, and their agreement with the naive formula."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch._dynamo.utils import counters

from fastreg import _loader, penalty
from fastreg._library import has_kernel
from fastreg.reference import weight_penalty as ref
from fastreg.testing import mismatch, opcheck

from .helpers import DEVICES, REFERENCE_BACKEND, compiled_autograd
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


DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
COEFFICIENTS = [(0.0, 0.0), (0.3, 0.0), (0.0, 0.7), (0.3, 0.7), (1e-5, 1e-4)]
CUDA_ONLY = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

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


# --- the compiled kernels are what is tested ---------------------------------------------


KERNELS_ONLY = pytest.mark.skipif(
    REFERENCE_BACKEND,
    reason="a property of the kernels (torch.sum's order follows threads)",
)


@KERNELS_ONLY
@pytest.mark.parametrize("device", DEVICES)
def test_kernels_are_registered(device):
    assert _loader.load_kernels(device), _loader.STATE.reason
    for name in PENALTY_OPS:
        assert has_kernel(name, device), f"{name}: no {device} kernel ({_loader.STATE.reason})"


# --- value -------------------------------------------------------------------------------


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
    params = make(penalty.small_cpu_shapes()[:24] + EDGE_SHAPES, torch.float32, device)
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


# --- in-place gradient ---------------------------------------------------------------------


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
    params = make(penalty.small_cpu_shapes()[:16], torch.float32)
    start = make(penalty.small_cpu_shapes()[:16], torch.float32, seed=3)
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


# --- differentiable form -------------------------------------------------------------------


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


@pytest.mark.parametrize("device", DEVICES)
def test_compiled_autograd_traces_the_backward_of_an_eager_forward(device):
    """Compiled autograd records the penalty's backward in its graph (fullgraph: no eager
    fallback), with the naive formula's gradients; a frozen tensor counts and gets none."""
    use_kernels(device)
    trainable = [p.requires_grad_() for p in make([(3, 4), (5,), (2, 3, 2)], torch.float32, device)]
    frozen = make([(7,)], torch.float32, device, seed=9)[0]
    naive = [p.detach().clone().requires_grad_() for p in trainable]
    value = penalty.weight_penalty([trainable[0], frozen, *trainable[1:]], l1=0.3, l2=0.7)
    with compiled_autograd():
        (value * 1.5).backward()
    (ref.naive_penalty(naive, 0.3, 0.7) * 1.5).backward()
    assert frozen.grad is None
    for ours, theirs in zip(trainable, naive):
        assert mismatch(ours.grad, theirs.grad, exact=True) is None


# --- WeightPenalty and helpers ----------------------------------------------------------------


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


class SmallNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.bn = nn.BatchNorm2d(8)
        self.embed = nn.Embedding(10, 4)
        self.head = nn.Linear(8, 5)
        self.norm = nn.LayerNorm(5)
        self.frozen = nn.Linear(5, 5)
        self.frozen.requires_grad_(False)


def test_select_decay_parameters_takes_linear_and_conv_weights_only():
    net = SmallNet()
    selected = penalty.select_decay_parameters(net)
    assert [id(p) for p in selected] == [id(net.conv.weight), id(net.head.weight)]
    widened = penalty.select_decay_parameters(net, decay_types=(nn.Linear, nn.Embedding))
    assert {id(p) for p in widened} == {id(net.embed.weight), id(net.head.weight)}


@pytest.mark.parametrize("device", DEVICES)
def test_weight_penalty_add_grad_matches_naive_and_allocates_grads(device):
    use_kernels(device)
    torch.manual_seed(0)
    net = SmallNet().to(device)
    decay = penalty.select_decay_parameters(net)
    wp = penalty.WeightPenalty(decay, l1=1e-3, l2=1e-2)
    clone = SmallNet().to(device)
    clone.load_state_dict(net.state_dict())
    x = torch.randn(2, 3, 6, 6).to(device)

    def loss_of(model):
        h = model.bn(model.conv(x)).mean(dim=(2, 3))
        return model.norm(model.head(h)).square().sum()

    loss_of(net).backward()
    net.conv.weight.grad = None  # a parameter without a gradient gets one allocated
    bias_grad = net.head.bias.grad.clone()
    value = wp.add_grad_()
    assert value.device.type == device and net.conv.weight.grad.device == net.conv.weight.device
    clone_decay = penalty.select_decay_parameters(clone)
    (loss_of(clone) + ref.naive_penalty(clone_decay, 1e-3, 1e-2)).backward()
    assert_value_close(value, decay, 1e-3, 1e-2)
    assert mismatch(net.head.weight.grad, clone.head.weight.grad) is None
    expected_conv = 1e-3 * torch.sign(net.conv.weight) + 2e-2 * net.conv.weight
    assert mismatch(net.conv.weight.grad, expected_conv.detach()) is None
    assert mismatch(net.head.bias.grad, bias_grad, exact=True) is None  # not penalised: untouched
    # The two networks' own gradients agree bit for bit on the CPU; on CUDA, cuDNN may pick
    # different (or non-deterministic) algorithms for them, which has nothing to do with the penalty.
    assert mismatch(net.head.bias.grad, clone.head.bias.grad, exact=device == "cpu") is None


def test_weight_penalty_groups_have_their_own_coefficients():
    a, b, c = (p.requires_grad_() for p in make([(50, 4), (33,), (7, 7)]))
    for p in (a, b, c):
        p.grad = torch.zeros_like(p)
    wp = penalty.WeightPenalty([{"params": [a], "l2": 0.5}, {"params": [b], "l1": 0.25}, {"params": c}], l1=0.1)
    value = wp.add_grad_()
    expected = naive_fp64([a], 0.1, 0.5) + naive_fp64([b], 0.25, 0.0) + naive_fp64([c], 0.1, 0.0)
    assert math.isclose(float(value), expected, rel_tol=1e-6)
    assert mismatch(a.grad, (0.1 * torch.sign(a) + 1.0 * a).detach()) is None
    assert mismatch(b.grad, (0.25 * torch.sign(b)).detach()) is None
    assert math.isclose(float(wp().detach()), expected, rel_tol=1e-6) and math.isclose(
        float(wp.value()), expected, rel_tol=1e-6
    )


def test_weight_penalty_skips_zero_groups_and_takes_modules():
    net = SmallNet()
    wp = penalty.WeightPenalty(
        [
            {"params": penalty.select_decay_parameters(net), "l2": 0.1},
            {"params": [net.bn.weight, net.bn.bias], "l2": 0.0},
        ]
    )
    wp.add_grad_()
    assert net.bn.weight.grad is None and net.conv.weight.grad is not None
    whole = penalty.WeightPenalty(net, l2=0.1)  # a module: its trainable parameters
    assert sum(len(g["params"]) for g in whole.param_groups) == sum(1 for p in net.parameters() if p.requires_grad)


def test_parameters_are_grouped_by_device_in_order_of_first_appearance():
    # weight_penalty and WeightPenalty make one op call per device; "meta" stands in for a second
    # device where there is no GPU (the CUDA test below runs the whole path).
    a, b, c = torch.zeros(2), torch.zeros(3), torch.zeros(4)
    m1, m2 = torch.empty(5, device="meta"), torch.empty(6, device="meta")
    groups = penalty._by_device([a, m1, b, m2, c])
    assert [[id(t) for t in group] for group in groups] == [[id(a), id(b), id(c)], [id(m1), id(m2)]]


@CUDA_ONLY
def test_weight_penalty_and_add_grad_take_parameters_on_several_devices():
    use_kernels("cpu")
    use_kernels("cuda")
    on_cpu = make([(30, 4), (17,)])
    on_cuda = make([(50,), (6, 7)], device="cuda", seed=1)
    params = [p.requires_grad_() for p in (on_cpu[0], on_cuda[0], on_cpu[1], on_cuda[1])]
    naive = [p.detach().cpu().requires_grad_() for p in params]
    ref.naive_penalty(naive, 0.1, 0.2).backward()
    expected = naive_fp64(naive, 0.1, 0.2)

    value = penalty.weight_penalty(params, l1=0.1, l2=0.2)  # on the first parameter's device
    assert value.device == params[0].device and math.isclose(float(value), expected, rel_tol=1e-6)
    value.backward()
    for p, n in zip(params, naive):
        assert p.grad.device == p.device and mismatch(p.grad, n.grad, exact=True) is None

    for p in params:
        p.grad = None
    wp = penalty.WeightPenalty([params[1], params[0], params[2], params[3]], l1=0.1, l2=0.2)
    value = wp.add_grad_()
    assert value.device == params[1].device and math.isclose(float(value), expected, rel_tol=1e-6)
    for p, n in zip(params, naive):
        assert p.grad.device == p.device and mismatch(p.grad, n.grad, exact=True) is None
    assert math.isclose(float(wp.value()), expected, rel_tol=1e-6)


def test_weight_penalty_rejects_bad_input():
    p = torch.randn(3, requires_grad=True)
    with pytest.raises(ValueError, match="more than once"):
        penalty.WeightPenalty([{"params": [p]}, {"params": [p]}], l2=0.1)
    with pytest.raises(ValueError, match="l2 must be a finite number >= 0"):
        penalty.WeightPenalty([p], l2=-0.1)
    with pytest.raises(ValueError, match="l1 must be a finite number >= 0"):
        penalty.WeightPenalty([{"params": [p], "l1": float("nan")}])
    with pytest.raises(TypeError, match="dtype torch.int64"):
        penalty.WeightPenalty([torch.ones(3, dtype=torch.int64)], l2=0.1)
    wp = penalty.WeightPenalty([p], l2=0.1)
    p.grad = torch.randn(3).to_sparse()
    with pytest.raises(RuntimeError, match="sparse gradient"):
        wp.add_grad_()


# --- errors from the ops (compiled and reference alike) ---------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", ["op", "reference"])
def test_op_errors_name_the_problem(impl, device):
    if impl == "op":
        use_kernels(device)
    value = OPS.weight_penalty_value if impl == "op" else ref.weight_penalty_value
    grad_ = OPS.weight_penalty_grad_ if impl == "op" else ref.weight_penalty_grad_
    w = make([(4, 6), (5,)], device=device)
    g = make([(4, 6), (5,)], device=device, seed=1)
    with pytest.raises(ValueError, match="l1 must be a finite number >= 0, got -1"):
        value(w, -1.0, 0.0)
    with pytest.raises(ValueError, match="l2 must be a finite number >= 0"):
        grad_(g, w, 0.0, float("inf"))
    with pytest.raises(TypeError, match=r"params\[1\] has dtype .*[Ii]nt"):
        value([w[0], torch.ones(3, dtype=torch.int32, device=device)], 0.1, 0.1)
    # sparse tensors (SparseCPU / SparseCUDA keys) reach the reference, which names them
    with pytest.raises(RuntimeError, match=r"params\[0\] has layout .*[Ss]parse"):
        value([w[0].to_sparse()], 0.1, 0.1)
    with pytest.raises(RuntimeError, match=r"grads\[1\] is a sparse gradient"):
        grad_([g[0], g[1].to_sparse()], w, 0.1, 0.1)
    with pytest.raises(RuntimeError, match=r"grads\[0\] is a view with gaps"):
        grad_([torch.zeros(4, 12, device=device)[:, ::2], g[1]], w, 0.1, 0.1)
    with pytest.raises(RuntimeError, match=r"grads\[0\] is a view with gaps"):
        grad_([torch.zeros(1, 6, device=device).expand(4, 6), g[1]], w, 0.1, 0.1)
    with pytest.raises(RuntimeError, match=r"grads\[1\] has shape"):
        grad_([g[0], torch.zeros(6, device=device)], w, 0.1, 0.1)
    with pytest.raises(TypeError, match=r"grads\[1\] has dtype"):
        grad_([g[0], g[1].double()], w, 0.1, 0.1)
    with pytest.raises(RuntimeError, match="got 1 gradients for 2 parameters"):
        grad_(g[:1], w, 0.1, 0.1)
    with pytest.raises(RuntimeError, match="share memory"):
        shared = torch.zeros(5, device=device)
        grad_([shared, shared], [torch.ones(5, device=device), torch.ones(5, device=device)], 0.1, 0.1)
    with pytest.raises(RuntimeError, match=r"grads\[0\] is the memory of params\[0\]"):
        grad_([w[0]], [w[0]], 0.1, 0.1)


@CUDA_ONLY
@pytest.mark.parametrize("impl", ["op", "reference"])
def test_mixed_devices_name_the_problem(impl):
    # A list holding any CUDA tensor dispatches to the CUDA kernel, even when its first tensor is
    # on the CPU: the kernel must check every tensor before it takes a device guard.
    if impl == "op":
        use_kernels("cuda")
    value = OPS.weight_penalty_value if impl == "op" else ref.weight_penalty_value
    grad_ = OPS.weight_penalty_grad_ if impl == "op" else ref.weight_penalty_grad_
    cpu = make([(4, 6), (5,)])
    cuda = [t.cuda() for t in cpu]
    cpu_grads = make([(4, 6), (5,)], seed=1)
    cuda_grads = [g.cuda() for g in cpu_grads]
    one_device = "; pass the tensors of one device per call"
    with pytest.raises(RuntimeError, match=r"params\[1\] is on cuda:\d+ but params\[0\] is on cpu" + one_device):
        value([cpu[0], cuda[1]], 0.1, 0.2)
    with pytest.raises(RuntimeError, match=r"params\[1\] is on cpu but params\[0\] is on cuda:\d+" + one_device):
        value([cuda[0], cpu[1]], 0.1, 0.2)
    with pytest.raises(RuntimeError, match=r"params\[1\] is on cpu but params\[0\] is on cuda:\d+"):
        grad_(cuda_grads, [cuda[0], cpu[1]], 0.1, 0.2)
    with pytest.raises(RuntimeError, match=r"params\[1\] is on cuda:\d+ but params\[0\] is on cpu"):
        grad_(cpu_grads, [cpu[0], cuda[1]], 0.1, 0.2)
    grads = [cuda_grads[0], cpu_grads[1].clone()]
    with pytest.raises(RuntimeError, match=r"grads\[1\] is on cpu but params\[1\] is on cuda:\d+"):
        grad_(grads, cuda, 0.1, 0.2)
    grads = [cpu_grads[0].cuda(), cpu_grads[1].cuda()]
    with pytest.raises(RuntimeError, match=r"grads\[0\] is on cuda:\d+ but params\[0\] is on cpu"):
        grad_(grads, cpu, 0.1, 0.2)  # only the gradients on CUDA: the CUDA kernel still runs
    # nothing was written before the errors
    assert mismatch(cuda_grads, make([(4, 6), (5,)], device="cuda", seed=1), exact=True) is None
    assert mismatch(grads, cpu_grads, exact=True) is None
    backward = OPS.weight_penalty_backward if impl == "op" else ref.weight_penalty_backward
    # both backends check grad_output's device: a 0-dim CPU tensor would otherwise mix in silently
    with pytest.raises(RuntimeError, match=r"grad_output is on cpu but the parameters are on cuda:\d+"):
        backward(torch.tensor(1.0), cuda, 0.1, 0.2)
    with pytest.raises(RuntimeError, match=r"grad_output is on cuda:\d+ but the parameters are on cpu"):
        backward(torch.tensor(1.0, device="cuda"), cpu, 0.1, 0.2)
    with pytest.raises(RuntimeError, match=r"grad_output is on cuda:\d+ but the parameters are on cpu"):
        backward(torch.tensor(1.0, device="cuda"), [], 0.1, 0.2)  # no parameters count as CPU ones
    with pytest.raises(RuntimeError, match=r"params\[1\] is on cuda:\d+ but params\[0\] is on cpu"):
        backward(torch.tensor(1.0), [cpu[0], cuda[1]], 0.1, 0.2)


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


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", ["op", "reference"])
def test_tensor_coefficient_errors_name_the_problem(impl, device):
    if impl == "op":
        use_kernels(device)
    lib = OPS if impl == "op" else ref
    value, grad_ = lib.weight_penalty_value_tensor_coefficients, lib.weight_penalty_grad_tensor_coefficients_
    w = make([(4, 6), (5,)], device=device)
    good = torch.tensor(0.1, dtype=torch.float64)
    with pytest.raises(ValueError, match="l1 must be a finite number >= 0, got -1"):
        value(w, torch.tensor(-1.0), good)
    with pytest.raises(ValueError, match="l2 must be a finite number >= 0, got nan"):
        grad_(make([(4, 6), (5,)], device=device, seed=1), w, good, torch.tensor(math.nan))
    with pytest.raises(TypeError, match=r"the l2 tensor has dtype (torch\.int64|Long); expected a floating-point"):
        value(w, good, torch.tensor(1))
    with pytest.raises(ValueError, match="the l1 tensor must have one element, got 2"):
        value(w, torch.tensor([0.1, 0.2]), good)
    with pytest.raises(RuntimeError, match=r"the l1 tensor is on cpu with layout \S*[Ss]parse\S*; coefficient tensors"):
        value(w, torch.tensor([0.1]).to_sparse(), good)
    if device == "cuda":
        with pytest.raises(RuntimeError, match=r"the l2 tensor is on cuda:0 with layout \S*[Ss]trided; coefficient"):
            value(w, good, good.cuda())
        with pytest.raises(RuntimeError, match="the l1 tensor is on cuda:0 .* must be dense CPU tensors"):
            value([p.cpu() for p in w], good.cuda(), good)  # CPU parameters: the CUDA kernel refuses it too


# --- torch.library contracts and torch.compile ----------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    use_kernels(device)
    params = make([(3, 5), (0,), (17,), (2, 2, 3)], device=device)
    grads = make([(3, 5), (0,), (17,), (2, 2, 3)], device=device, seed=1)
    opcheck(OPS.weight_penalty_value, ([p.clone().requires_grad_() for p in params], 0.2, 0.3))
    opcheck(OPS.weight_penalty_value, ([params[0].half(), params[2].double()], 0.2, 0.0))
    opcheck(OPS.weight_penalty_grad_, ([g.clone() for g in grads], params, 0.2, 0.3))
    go = torch.tensor(1.5, device=device)
    opcheck(OPS.weight_penalty_backward, (go, [p.clone().requires_grad_() for p in params], 0.2, 0.3))
    l1, l2 = torch.tensor(0.2, dtype=torch.float64), torch.tensor([0.3])  # CPU tensors, any float dtype
    opcheck(OPS.weight_penalty_value_tensor_coefficients, ([p.clone().requires_grad_() for p in params], l1, l2))
    opcheck(OPS.weight_penalty_grad_tensor_coefficients_, ([g.clone() for g in grads], params, l1, l2))
    opcheck(OPS.weight_penalty_backward_tensor_coefficients, (go, [p.clone().requires_grad_() for p in params], l1, l2))


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_fullgraph(device):
    use_kernels(device)
    torch._dynamo.reset()
    model = nn.Sequential(nn.Linear(6, 7), nn.Tanh(), nn.Linear(7, 2)).to(device)
    decay = penalty.select_decay_parameters(model)
    x = torch.randn(5, 6).to(device)

    def step(x):
        return model(x).square().mean() + penalty.weight_penalty(decay, l1=0.01, l2=0.1)

    def inplace(grads, params):
        return OPS.weight_penalty_grad_(grads, params, 0.01, 0.1) * 2

    compiled_loss = torch.compile(step, fullgraph=True)(x)
    compiled_loss.backward()
    compiled_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    eager_loss = step(x)
    eager_loss.backward()
    assert mismatch(compiled_loss.detach(), eager_loss.detach()) is None
    assert mismatch(compiled_grads, [p.grad for p in model.parameters()]) is None

    params = make([(4, 4), (9,)], device=device)
    g_compiled, g_eager = make([(4, 4), (9,)], device=device, seed=1), make([(4, 4), (9,)], device=device, seed=1)
    v = torch.compile(inplace, fullgraph=True)(g_compiled, params)
    assert torch.equal(v, inplace(g_eager, params)) and mismatch(g_compiled, g_eager, exact=True) is None


def _graph_recorder(graphs: list):
    """A torch.compile backend that keeps Dynamo's graphs and runs them as traced."""

    def backend(gm, example_inputs):
        graphs.append(gm.graph)
        return gm.forward

    return backend


def _called_ops(graphs) -> set[str]:
    # Dynamo's graphs call the overload packet (fastreg.op), some releases the overload (.default)
    names = {str(node.target) for graph in graphs for node in graph.nodes if node.op == "call_function"}
    return {name.removesuffix(".default") for name in names}


@pytest.mark.parametrize("device", DEVICES)
def test_compiled_add_grad_runs_the_fused_kernel_with_eager_bits(device):
    """Under torch.compile add_grad_ calls the tensor-coefficient twin of weight_penalty_grad_:
    the eager kernel, one pass over w and g, so the gradients and the value have eager's bits.
    It was a _foreach_ pipeline (about 20 bytes per fp32 parameter, Inductor's FMAs). On CUDA the
    coefficients stay CPU tensors, read on the host."""
    use_kernels(device)
    shapes = [(6, 5), (700,), (3, 2, 2), (40000,)]
    params = [p.requires_grad_() for p in make(shapes, device=device)]
    params[2] = params[2].detach().half().requires_grad_()
    start = make(shapes, device=device, seed=2)
    start[2] = start[2].half()
    wp = penalty.WeightPenalty(params, l1=0.013, l2=0.17)

    def run(add_grad):
        for p, g in zip(params, start):
            p.grad = g.clone()
        value = add_grad()
        return value, [p.grad for p in params]

    eager_value, eager_grads = run(wp.add_grad_)
    graphs: list = []
    torch._dynamo.reset()
    recorded_value, recorded_grads = run(torch.compile(wp.add_grad_, fullgraph=True, backend=_graph_recorder(graphs)))
    ops = _called_ops(graphs)
    assert "fastreg.weight_penalty_grad_tensor_coefficients_" in ops, ops
    assert not any("foreach" in op or "weight_penalty_value" in op for op in ops), ops
    torch._dynamo.reset()
    compiled_value, compiled_grads = run(torch.compile(wp.add_grad_, fullgraph=True))
    for value, grads in ((recorded_value, recorded_grads), (compiled_value, compiled_grads)):
        assert torch.equal(value, eager_value)
        assert mismatch(grads, eager_grads, exact=True) is None


@pytest.mark.parametrize("device", DEVICES)
def test_compiled_weight_penalty_is_one_op_with_eager_bits(device):
    """weight_penalty under torch.compile: one tensor-coefficient op, not a pass per coefficient;
    its value and gradients are the eager ones, bit for bit."""
    use_kernels(device)
    params = [p.requires_grad_() for p in make([(6, 5), (700,), (3, 2, 2)], device=device)]

    def penalised():
        return penalty.weight_penalty(params, l1=0.013, l2=0.17) * 1.5

    def value_and_grads(fn):
        value = fn()
        return value.detach(), torch.autograd.grad(value, params)

    eager = value_and_grads(penalised)
    graphs: list = []
    torch._dynamo.reset()
    recorded = value_and_grads(torch.compile(penalised, fullgraph=True, backend=_graph_recorder(graphs)))
    ops = _called_ops(graphs)
    assert "fastreg.weight_penalty_value_tensor_coefficients" in ops, ops
    assert "fastreg.weight_penalty_value" not in ops, ops
    torch._dynamo.reset()
    compiled = value_and_grads(torch.compile(penalised, fullgraph=True))
    for value, grads in (recorded, compiled):
        assert torch.equal(value, eager[0])
        assert mismatch(list(grads), list(eager[1]), exact=True) is None


def _compile_error_text(excinfo) -> str:
    """Dynamo reports an error raised while it traces in an exception of its own: the message
    is in its text or its cause's."""
    return f"{excinfo.value} {excinfo.value.__cause__}"


@pytest.mark.parametrize("which", ["l1", "l2"])
def test_torch_compile_follows_a_changing_coefficient_in_two_graphs(which):
    """A coefficient schedule under torch.compile: a graph for the first value and one taking the
    coefficient as a symbolic float for all others, as for the naive formula. It failed at the
    second value (fullgraph: math.isfinite of a symbolic float), and the ops' float arguments
    would have made a graph per value, up to Dynamo's recompile limit."""
    use_kernels("cpu")
    torch._dynamo.reset()
    counters.clear()
    params = [p.requires_grad_() for p in make([(6, 5), (7,), (3, 2, 2)])]

    def coefficients(c):
        return (c, 0.05) if which == "l1" else (0.05, c)

    def penalised(c):
        l1, l2 = coefficients(c)
        return penalty.weight_penalty(params, l1=l1, l2=l2)

    compiled = torch.compile(penalised, fullgraph=True, backend="aot_eager")
    for step in range(12):
        c = 0.1 * (step + 1)
        for p in params:
            p.grad = None
        value = compiled(c)
        (value * 1.5).backward()
        naive = [p.detach().clone().requires_grad_() for p in params]
        expected = ref.naive_penalty(naive, *coefficients(c))
        (expected * 1.5).backward()
        assert mismatch(value.detach(), expected.detach()) is None, step
        assert mismatch([p.grad for p in params], [n.grad for n in naive]) is None, step
    assert counters["stats"]["unique_graphs"] == 2


def test_torch_compile_checks_coefficients_that_change():
    """Negative, nan and inf coefficients are refused under torch.compile too, also once the
    coefficient is a symbolic float (a torch._check there); eagerly the message is unchanged."""
    use_kernels("cpu")
    torch._dynamo.reset()
    params = [p.requires_grad_() for p in make([(4, 3)])]
    compiled = torch.compile(lambda c: penalty.weight_penalty(params, l2=c), fullgraph=True, backend="aot_eager")
    compiled(0.1)
    compiled(0.2)  # the second graph: l2 symbolic
    for bad in (-1.0, math.nan, math.inf):
        with pytest.raises(Exception) as excinfo:
            compiled(bad)
        assert "fastreg.weight_penalty: l2 must be a finite number >= 0" in _compile_error_text(excinfo), bad
        with pytest.raises(ValueError, match=f"l2 must be a finite number >= 0, got {bad}"):
            penalty.weight_penalty(params, l2=bad)
    assert math.isclose(float(compiled(0.3).detach()), 0.3 * naive_fp64(params, 0.0, 1.0), rel_tol=1e-6)


def test_torch_compile_asks_for_float_coefficients():
    """A tensor coefficient under torch.compile would be a data-dependent float in the graph (it
    failed with a guard error on float(c)); the error names the fix. Eagerly it is taken by value."""
    use_kernels("cpu")
    torch._dynamo.reset()
    params = [p.requires_grad_() for p in make([(4, 3)])]
    compiled = torch.compile(lambda c: penalty.weight_penalty(params, l2=c), fullgraph=True, backend="aot_eager")
    with pytest.raises(Exception) as excinfo:
        compiled(torch.tensor(0.1))
    assert "under torch.compile pass l1 and l2 as Python floats, not tensors" in _compile_error_text(excinfo)
    assert torch.equal(penalty.weight_penalty(params, l2=torch.tensor(0.1)), penalty.weight_penalty(params, l2=0.1))


def test_compiled_add_grad_follows_a_coefficient_schedule():
    """WeightPenalty's coefficients changed in param_groups before each compiled add_grad_ (as a
    scheduler changes lr): two graphs, the formula's gradients at every step. It recompiled per
    value and failed at Dynamo's recompile limit (fullgraph), after about 9 values."""
    use_kernels("cpu")
    torch._dynamo.reset()
    counters.clear()
    params = [p.requires_grad_() for p in make([(6, 5), (7,), (3, 2, 2)])]
    frozen = make([(5,)], seed=4)[0]  # counts in the value only
    wp = penalty.WeightPenalty([*params, frozen], l1=0.01, l2=0.1)
    compiled = torch.compile(wp.add_grad_, fullgraph=True)
    start = make([(6, 5), (7,), (3, 2, 2)], seed=2)
    for step in range(12):
        l1, l2 = 0.01 * (step + 1), 0.1 / (step + 1)
        wp.param_groups[0]["l1"], wp.param_groups[0]["l2"] = l1, l2
        for p, g in zip(params, start):
            p.grad = g.clone()
        value = compiled()
        naive = [p.detach().clone().requires_grad_() for p in params]
        for n, g in zip(naive, start):
            n.grad = g.clone()
        ref.naive_penalty(naive, l1, l2).backward()
        assert_value_close(value, [*params, frozen], l1, l2)
        assert mismatch([p.grad for p in params], [n.grad for n in naive]) is None, step
        assert frozen.grad is None
    assert counters["stats"]["unique_graphs"] == 2
    wp.param_groups[0]["l2"] = -1.0
    with pytest.raises(Exception) as excinfo:
        compiled()
    assert "l2 must be a finite number >= 0" in _compile_error_text(excinfo)


@pytest.mark.skipif(not hasattr(torch.Tag, "cudagraph_unsafe"), reason="this torch has no cudagraph_unsafe tag")
def test_only_the_ops_that_read_coefficient_tensors_on_the_host_are_kept_out_of_cuda_graphs():
    """A CUDA graph's replay would not read l1 and l2 again: Inductor must run those ops outside
    its graphs. The float ops take their coefficients as graph constants and can stay inside."""
    for name in PENALTY_OPS:
        tags = getattr(OPS, name).default.tags
        assert (torch.Tag.cudagraph_unsafe in tags) == name.endswith(("_tensor_coefficients", "_tensor_coefficients_"))


@CUDA_ONLY
def test_compiled_add_grad_with_cuda_graphs_follows_a_coefficient_schedule():
    """mode="reduce-overhead" with a coefficient schedule: the second graph takes the coefficients
    as CPU tensor inputs, which the ops read on the host when they launch. Inside a replayed CUDA
    graph they would keep the captured values; every step must give eager's bits instead."""
    use_kernels("cuda")
    torch._dynamo.reset()
    shapes = [(64, 33), (129,), (3, 5, 7)]
    params = [p.requires_grad_() for p in make(shapes, device="cuda")]
    for p in params:
        p.grad = torch.zeros_like(p)
    wp = penalty.WeightPenalty(params, l1=0.01, l2=0.1)
    compiled = torch.compile(wp.add_grad_, mode="reduce-overhead", fullgraph=True)
    start = make(shapes, device="cuda", seed=2)
    expected_grads = [torch.empty_like(g) for g in start]
    for step in range(8):
        l1, l2 = 0.01 * (step + 1), 0.1 / (step + 1)
        wp.param_groups[0]["l1"], wp.param_groups[0]["l2"] = l1, l2
        for p, g in zip(params, start):
            p.grad.copy_(g)
        value = compiled().clone()  # a graph's output is overwritten by its next replay
        for e, g in zip(expected_grads, start):
            e.copy_(g)
        expected = OPS.weight_penalty_grad_(expected_grads, [p.detach() for p in params], l1, l2)
        assert torch.equal(value, expected), (step, float(value), float(expected))
        assert mismatch([p.grad for p in params], expected_grads, exact=True) is None, step


# --- baselines and model-shaped lists --------------------------------------------------------


def test_model_shaped_lists_have_the_real_sizes():
    for shapes, count, elements in [
        (penalty.resnet50_shapes(), 161, 25_557_032),
        (penalty.gpt2_small_shapes(), 148, 124_439_808),
    ]:
        assert len(shapes) == count and sum(math.prod(s) for s in shapes) == elements
    assert penalty.resnet50_host_shapes() == [(1,)] * 161
    small = penalty.small_cpu_shapes()
    assert len(small) == 80 and 9e6 < sum(math.prod(s) for s in small) < 12e6
    params = penalty.resnet50_like_params(dtype=torch.bfloat16, grads=True)
    assert len(params) == 161 and all(p.dtype == torch.bfloat16 and p.grad is not None for p in params)


@pytest.mark.parametrize("device", DEVICES)
def test_baselines_agree_with_the_op(device):
    use_kernels(device)
    params = penalty.make_params(many_shapes(50), device, grads=True)
    initial = [p.grad.clone() for p in params]
    ours = [g.clone() for g in initial]
    value = OPS.weight_penalty_grad_(ours, [p.detach() for p in params], 0.01, 0.02)
    foreach_value = penalty.foreach_penalty_(params, 0.01, 0.02)
    assert math.isclose(float(foreach_value), float(value), rel_tol=1e-5)
    assert mismatch([p.grad for p in params], ours) is None
    for p, g in zip(params, initial):
        p.grad = g.clone()
    naive_value = penalty.naive_autograd_penalty(params, 0.01, 0.02)
    naive_value.backward()
    assert math.isclose(float(naive_value.detach()), float(value), rel_tol=1e-5)
    assert mismatch([p.grad for p in params], ours, exact=True) is None


# --- CUDA only: cross-device agreement and graph capture --------------------------------------


@CUDA_ONLY
def test_cuda_matches_cpu_and_captures_in_a_graph():
    use_kernels("cpu")
    use_kernels("cuda")
    params = make(EDGE_SHAPES + many_shapes(), torch.float32)
    grads = make(EDGE_SHAPES + many_shapes(), torch.float32, seed=1)
    cpu_grads = [g.clone() for g in grads]
    cpu_value = OPS.weight_penalty_grad_(cpu_grads, params, 0.1, 0.2)
    dp, dg = [p.cuda() for p in params], [g.cuda() for g in grads]
    value = OPS.weight_penalty_grad_(dg, dp, 0.1, 0.2)
    assert mismatch([g.cpu() for g in dg], cpu_grads, exact=True) is None
    assert math.isclose(float(value), float(cpu_value), rel_tol=1e-6)

    dg = [g.cuda() for g in grads]
    static = [g.clone() for g in dg]
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        OPS.weight_penalty_grad_([g.clone() for g in dg], dp, 0.1, 0.2)  # warm-up outside capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = OPS.weight_penalty_grad_(static, dp, 0.1, 0.2)
    for g, s in zip(dg, static):
        s.copy_(g)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured, value) and mismatch([s.cpu() for s in static], cpu_grads, exact=True) is None


@CUDA_ONLY
def test_add_grad_captures_in_a_cuda_graph():
    """The training-loop form inside a captured step: the compiled loop allocates nothing once
    every .grad exists, and its kernels read the parameters at replay."""
    use_kernels("cuda")
    params = [p.requires_grad_() for p in make(many_shapes(40), device="cuda")]
    for p in params:
        p.grad = torch.zeros_like(p)
    wp = penalty.WeightPenalty(params, l1=0.1, l2=0.2)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        wp.add_grad_()  # warm-up outside capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = wp.add_grad_()
    for p in params:
        p.grad.zero_()
    graph.replay()
    torch.cuda.synchronize()
    assert_value_close(captured, params, 0.1, 0.2)
    for p in params:
        assert mismatch(p.grad, (0.1 * torch.sign(p) + 0.4 * p).detach()) is None


# --- inputs the user API must take like the formula, or name --------------------------------


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


def test_functional_names_items_that_are_not_tensors():
    # was AttributeError: 'str' object has no attribute 'device'
    net = nn.Linear(3, 2)
    with pytest.raises(TypeError, match=r"params\[0\] is a str, not a tensor"):
        penalty.weight_penalty(dict(net.named_parameters()), l2=0.1)
    with pytest.raises(TypeError, match=r"params\[0\] is a tuple, not a tensor"):
        penalty.weight_penalty(net.named_parameters(), l2=0.1)


def test_sets_of_parameters_are_rejected():
    # a set's order changes from run to run, and with it the order of the sums (torch.optim rejects sets too)
    params = {p.requires_grad_() for p in make([(3,), (4,)])}
    with pytest.raises(TypeError, match="set"):
        penalty.weight_penalty(params, l2=0.1)
    with pytest.raises(TypeError, match="set"):
        penalty.WeightPenalty(params, l2=0.1)
    with pytest.raises(TypeError, match="set"):
        penalty.WeightPenalty([{"params": params}], l2=0.1)


def test_coefficients_given_as_tensors_or_not_numbers():
    use_kernels("cpu")
    w = make([(5, 4)])[0].requires_grad_()
    expected = penalty.weight_penalty([w], l1=0.25, l2=0.5)
    assert torch.equal(penalty.weight_penalty([w], l1=torch.tensor(0.25), l2=torch.tensor(0.5)), expected)
    # the penalty has no gradient for its coefficients: one that requires grad would be cut off silently
    learned = torch.tensor(0.25, requires_grad=True)
    with pytest.raises(TypeError, match="l1 is a tensor that requires grad"):
        penalty.weight_penalty([w], l1=learned)
    with pytest.raises(TypeError, match="l2 is a tensor that requires grad"):
        penalty.WeightPenalty([{"params": [w], "l2": learned}])
    with pytest.raises(TypeError, match="l1 must be a number, got NoneType"):
        penalty.WeightPenalty([{"params": [w], "l1": None}])
    wp = penalty.WeightPenalty([w], l1=torch.tensor(0.25), l2=1)
    assert wp.param_groups[0]["l1"] == 0.25 and type(wp.param_groups[0]["l1"]) is float
    assert "l1=0.25, l2=1.0" in repr(wp)


def test_add_grad_leaves_frozen_parameters_alone():
    # The formula gives no gradient to a tensor that does not require grad (a frozen layer), but
    # still counts its value; a .grad written there would make the optimizer move the frozen weight.
    use_kernels("cpu")
    a, b, c = (p.requires_grad_() for p in make([(20, 3), (7,), (4, 4)]))
    wp = penalty.WeightPenalty([a, b, c], l1=0.1, l2=0.2)
    b.requires_grad_(False)  # frozen after the penalty was built
    c.requires_grad_(False)
    c.grad = torch.ones(4, 4)  # left from before it was frozen
    value = wp.add_grad_()
    assert b.grad is None and torch.equal(c.grad, torch.ones(4, 4))
    assert mismatch(a.grad, (0.1 * torch.sign(a) + 0.4 * a).detach(), exact=True) is None
    assert_value_close(value, [a, b, c], 0.1, 0.2)


def _mixed_group(device="cpu"):
    """Parameters that take every branch of add_grad_'s loop: a .grad to allocate, a frozen one,
    channels_last, several dtypes, and odd sizes."""
    params = make([(6, 3, 5, 5), (40,), (13, 7), (3,), (257,)], device=device, seed=3)
    params[0] = params[0].to(memory_format=torch.channels_last)
    params[2] = params[2].to(torch.bfloat16)
    params[4] = params[4].double()
    generator = torch.Generator().manual_seed(4)
    for p in params:
        p.requires_grad_()
        p.grad = torch.empty_like(p).copy_(torch.randn(p.shape, generator=generator))  # p's layout
    params[1].grad = params[3].grad = None
    params[3].requires_grad_(False)
    return params


@KERNELS_ONLY
@pytest.mark.parametrize("device", DEVICES)
def test_compiled_add_grad_loop_matches_the_python_loop(device):
    """WeightPenalty.add_grad_ runs its per-step loop in C++ (WeightPenaltyGroup) where the kernels
    are loaded; the Python loop serves the reference backend and torch.compile. Same bits."""
    use_kernels(device)
    values, grads = [], []
    for native in (True, False):
        params = _mixed_group(device)
        wp = penalty.WeightPenalty([{"params": params[:3], "l1": 0.3}, {"params": params[3:]}], l2=0.7)
        if not native:
            wp._native_loop = lambda group_params: None
        values.append(wp.add_grad_())
        grads.append([p.grad for p in params])
        assert (wp._native_loop(params[:3]) is not None) == native
    assert values[0].dtype == values[1].dtype == torch.float64
    assert mismatch(values[0], values[1], exact=True) is None
    assert grads[0][3] is None and grads[1][3] is None  # frozen: counted, not touched
    for native_grad, python_grad in zip(grads[0], grads[1]):
        if native_grad is not None:
            assert native_grad.stride() == python_grad.stride()
            assert mismatch(native_grad, python_grad, exact=True) is None


def test_add_grad_follows_changes_to_the_group():
    use_kernels("cpu")
    a, b, c = (p.requires_grad_() for p in make([(20, 3), (7,), (4, 4)]))
    wp = penalty.WeightPenalty([a, b], l2=0.5)
    wp.add_grad_()
    b_grad = b.grad.clone()
    wp.param_groups[0]["params"][1] = c  # the same length, another tensor
    wp.param_groups[0]["l2"] = 0.25  # coefficients are read at each call, as optimizers read lr
    value = wp.add_grad_()
    assert torch.equal(b.grad, b_grad)  # out of the group: untouched
    assert_value_close(value, [a, c], 0.0, 0.25)
    assert mismatch(c.grad, (0.5 * c).detach(), exact=True) is None


def test_weight_penalty_pickles_and_copies_after_a_step():
    import copy
    import pickle

    use_kernels("cpu")
    params = [p.requires_grad_() for p in make([(5, 3), (4,)])]
    wp = penalty.WeightPenalty(params, l1=0.1, l2=0.2)
    wp.add_grad_()
    for clone in (pickle.loads(pickle.dumps(wp)), copy.deepcopy(wp)):
        twin = clone.param_groups[0]["params"]
        grads = [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in twin]  # pickle drops .grad
        clone.add_grad_()
        for p, g in zip(twin, grads):
            assert mismatch(p.grad, (g + 0.1 * torch.sign(p) + 0.4 * p).detach()) is None


def test_tensor_subclass_parameters_take_the_python_loop():
    class Tagged(torch.Tensor):
        pass

    use_kernels("cpu")
    p = torch.randn(5).as_subclass(Tagged).requires_grad_()
    wp = penalty.WeightPenalty([p], l2=0.5)
    wp.add_grad_()
    assert wp._native_loop([p]) is None
    assert mismatch(p.grad.as_subclass(torch.Tensor), p.detach().as_subclass(torch.Tensor)) is None


@pytest.mark.parametrize("device", DEVICES)
def test_add_grad_follows_parameters_swapped_by_swap_tensors(device):
    """torch.utils.swap_tensors keeps a parameter's Python object and puts another tensor under
    it. It refused parameters whose penalty had run ("Expected use_count ... 1 or 2": the compiled
    loop held every tensor), and add_grad_ must then update the new tensor, not the old one."""
    use_kernels(device)
    torch.manual_seed(0)
    linear = nn.Linear(4, 3).to(device)
    wp = penalty.WeightPenalty(linear, l1=0.01, l2=0.1)
    wp.add_grad_()
    linear.zero_grad(set_to_none=True)
    other = nn.Parameter(torch.full((3, 4), 5.0, device=device))
    torch.utils.swap_tensors(linear.weight, other)
    assert float(linear.weight[0, 0].detach()) == 5.0
    wp.add_grad_()
    for p in (linear.weight, linear.bias):
        assert mismatch(p.grad, (0.01 * torch.sign(p) + 0.2 * p).detach(), exact=True) is None
    assert other.grad is None  # the old tensor, now under `other`, is left alone


@pytest.mark.parametrize("assign", [False, True])
def test_swap_module_conversion_and_load_state_dict_after_add_grad(assign):
    """With torch.__future__.set_swap_module_params_on_conversion(True), module.double() and
    load_state_dict swap each parameter's tensor: that failed ("Couldn't swap Linear.weight") once
    add_grad_ had run; afterwards add_grad_ updates the converted and the loaded tensors."""
    use_kernels("cpu")
    torch.manual_seed(0)
    previous = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)
    try:
        linear = nn.Linear(4, 3)
        wp = penalty.WeightPenalty(linear, l2=0.1)
        linear(torch.randn(2, 4)).sum().backward()
        wp.add_grad_()
        linear.double()
        assert linear.weight.dtype == linear.weight.grad.dtype == torch.float64
        state = {k: v * 2 for k, v in linear.state_dict().items()}
        linear.load_state_dict(state, assign=assign)
        assert torch.equal(linear.weight.detach(), state["weight"])
    finally:
        torch.__future__.set_swap_module_params_on_conversion(previous)
    linear.zero_grad(set_to_none=True)
    value = wp.add_grad_()
    assert value.dtype == torch.float64
    assert_value_close(value, list(linear.parameters()), 0.0, 0.1)
    for p in linear.parameters():
        assert mismatch(p.grad, (0.2 * p).detach(), exact=True) is None


def test_weight_penalty_rejects_non_leaf_tensors():
    # was accepted: add_grad_ wrote the .grad of the view or product, the leaf's gradient got nothing
    w = torch.randn(6, 4, requires_grad=True)
    for non_leaf in (w[:, ::2], w.t(), w * 2):
        with pytest.raises(ValueError, match=r"params\[0\] is not a leaf tensor"):
            penalty.WeightPenalty([non_leaf], l2=0.1)
    penalty.WeightPenalty([torch.randn(6, 4)[:, ::2]], l2=0.1)  # a view of a tensor without grad is a leaf


def test_select_decay_parameters_takes_the_tensors_of_parametrized_weights():
    # a parametrized weight (weight_norm, spectral_norm, ...) is computed from the originals the optimizer updates
    linear = nn.utils.parametrizations.weight_norm(nn.Linear(4, 3))
    conv = nn.utils.parametrizations.spectral_norm(nn.Conv2d(2, 3, 3))
    net = nn.Sequential(linear, conv, nn.BatchNorm2d(3))
    selected = penalty.select_decay_parameters(net)
    originals = linear.parametrizations.weight
    assert [id(p) for p in selected] == [
        id(originals.original0),
        id(originals.original1),
        id(conv.parametrizations.weight.original),
    ]


def _selected_names(module, **kwargs) -> list[str]:
    names = {id(p): name for name, p in module.named_parameters()}
    return [names[id(p)] for p in penalty.select_decay_parameters(module, **kwargs)]


def test_select_decay_parameters_takes_attention_projections():
    # in_proj_weight (or q/k/v_proj_weight) were left out: a Transformer's attention was half decayed
    packed = nn.MultiheadAttention(8, 2)
    assert _selected_names(packed) == ["in_proj_weight", "out_proj.weight"]
    separate = nn.MultiheadAttention(8, 2, kdim=4, vdim=6, bias=True, add_bias_kv=True)
    assert _selected_names(separate) == ["q_proj_weight", "k_proj_weight", "v_proj_weight", "out_proj.weight"]
    layer = nn.TransformerEncoderLayer(8, 2, 16)
    assert _selected_names(layer) == [
        "self_attn.in_proj_weight",
        "self_attn.out_proj.weight",
        "linear1.weight",
        "linear2.weight",
    ]
    # narrowed to Linear: out_proj only
    assert _selected_names(layer, decay_types=(nn.Linear,)) == [
        "self_attn.out_proj.weight",
        "linear1.weight",
        "linear2.weight",
    ]


def test_select_decay_parameters_takes_recurrent_weights():
    lstm = nn.LSTM(4, 6, num_layers=2, bidirectional=True, proj_size=3)
    expected = [
        f"weight_{kind}_l{layer}{direction}"
        for layer in (0, 1)
        for direction in ("", "_reverse")
        for kind in ("ih", "hh", "hr")
    ]
    assert _selected_names(lstm) == expected
    assert _selected_names(nn.GRU(3, 5)) == ["weight_ih_l0", "weight_hh_l0"]
    assert _selected_names(nn.RNN(3, 5, num_layers=2)) == [
        "weight_ih_l0",
        "weight_hh_l0",
        "weight_ih_l1",
        "weight_hh_l1",
    ]
    for cell in (nn.RNNCell(3, 4), nn.LSTMCell(3, 4), nn.GRUCell(3, 4)):
        assert _selected_names(cell) == ["weight_ih", "weight_hh"]


def test_select_decay_parameters_takes_bilinear_weights_and_leaves_the_rest():
    net = nn.Sequential(nn.Bilinear(3, 4, 5), nn.Embedding(10, 5), nn.LayerNorm(5), nn.GroupNorm(1, 5), nn.PReLU())
    assert _selected_names(net) == ["0.weight"]
    widened = _selected_names(net, decay_types=(*penalty.DECAY_TYPES, nn.Embedding))
    assert widened == ["0.weight", "1.weight"]


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_select_decay_parameters_takes_the_parameters_of_old_weight_and_spectral_norm():
    # torch.nn.utils.weight_norm / spectral_norm make 'weight' a plain tensor computed from
    # weight_g and weight_v, or weight_orig: those, which the optimizer updates, were left out
    net = nn.Sequential(
        nn.utils.weight_norm(nn.Linear(4, 4)),
        nn.utils.spectral_norm(nn.Conv2d(2, 3, 3)),
        nn.utils.weight_norm(nn.GRU(3, 3), name="weight_hh_l0"),
    )
    assert _selected_names(net) == [
        "0.weight_g",
        "0.weight_v",
        "1.weight_orig",
        "2.weight_ih_l0",
        "2.weight_hh_l0_g",
        "2.weight_hh_l0_v",
    ]
    assert not isinstance(net[0].weight, nn.Parameter) and not isinstance(net[1].weight, nn.Parameter)


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


def _grad_calls(grads, params):
    return OPS.weight_penalty_grad_(grads, params, 0.3, 0.7)


@pytest.mark.parametrize(
    "case",
    ["partial_overlap", "shifted_own_param", "grad_is_another_param"],
)
def test_in_place_gradients_that_overlap_memory_they_touch_raise(case):
    # They used to run: one gradient updated twice, or a parameter changed while it was read.
    buf = torch.zeros(20)
    if case == "partial_overlap":
        grads, params, match = [buf[0:10], buf[5:15]], make([(10,), (10,)]), r"grads\[1\] and grads\[0\] overlap"
    elif case == "shifted_own_param":
        grads, params, match = [buf[1:11]], [buf[0:10]], r"grads\[0\] overlaps params\[0\]"
    else:
        grads, params = [buf[10:20], torch.zeros(10)], [buf[0:10], buf[10:20]]
        match = r"grads\[0\] overlaps params\[1\]"
    before = [g.clone() for g in grads]
    with pytest.raises(RuntimeError, match=match):
        _grad_calls(grads, params)
    assert all(torch.equal(g, b) for g, b in zip(grads, before))  # refused before writing anything


def test_in_place_gradients_in_one_flat_buffer_are_fine():
    flat_w, flat_g = torch.randn(30), torch.zeros(30)
    params = [flat_w[0:10], flat_w[10:30].view(4, 5)]
    grads = [flat_g[0:10], flat_g[10:30].view(4, 5)]
    value = _grad_calls(grads, params)
    torch.testing.assert_close(value, ref.naive_penalty(params, 0.3, 0.7))
    torch.testing.assert_close(flat_g, 0.3 * flat_w.sign() + 1.4 * flat_w, rtol=0, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_in_place_op_refuses_gradients_that_require_grad_and_bumps_versions(device):
    params = make([(3,), (2, 2)], device=device)
    grads = [torch.zeros(3, device=device, requires_grad=True), torch.zeros(2, 2, device=device)]
    message = r"weight_penalty_grad_: overwrites grads\[0\], which requires grad.*weight_penalty\(params"
    with pytest.raises(RuntimeError, match=message):
        OPS.weight_penalty_grad_(grads, params, 0.3, 0.7)
    assert not grads[0].detach().any() and not grads[1].any()  # refused before writing
    with torch.no_grad():
        OPS.weight_penalty_grad_(grads, params, 0.3, 0.7)
    assert all(g._version > 0 for g in grads)  # so autograd refuses values saved before


def test_meta_tensors_mixed_with_cpu_ones_raise():
    # A meta tensor among CPU ones dispatches to the Meta kernel (the fake): it used to return
    # uninitialised CPU tensors (value and gradients) instead of saying that the devices differ.
    p = make([(3,), (2, 2)])
    meta = torch.zeros(3, device="meta")
    with pytest.raises(RuntimeError, match=r"params\[1\] is on meta but params\[0\] is on cpu"):
        OPS.weight_penalty_value([p[0], meta], 0.3, 0.7)
    with pytest.raises(RuntimeError, match="grad_output is on meta but the parameters are on cpu"):
        OPS.weight_penalty_backward(torch.ones((), device="meta"), p, 0.3, 0.7)
    with pytest.raises(RuntimeError, match=r"grads\[0\] is on meta but params\[0\] is on cpu"):
        OPS.weight_penalty_grad_([meta, torch.zeros(2, 2)], p, 0.3, 0.7)


def test_fake_kernels_raise_like_the_kernels():
    from torch._subclasses.fake_tensor import FakeTensorMode

    mode = FakeTensorMode()
    p = [mode.from_tensor(t) for t in make([(3,), (2, 2)])]
    ints = [mode.from_tensor(torch.arange(3))]
    two, g3, g4 = (mode.from_tensor(t) for t in (torch.ones(2), torch.zeros(3), torch.zeros(4)))
    with mode:
        with pytest.raises(TypeError, match=r"params\[0\] has dtype"):
            OPS.weight_penalty_value(ints, 0.3, 0.7)
        with pytest.raises(RuntimeError, match="grad_output must have one element"):
            OPS.weight_penalty_backward(two, p, 0.3, 0.7)
        with pytest.raises(RuntimeError, match=r"grads\[1\] has shape"):
            OPS.weight_penalty_grad_([g3, g4], p, 0.3, 0.7)


@pytest.mark.parametrize("requires_grad", [False, True])
def test_forward_mode_ad_is_refused_not_dropped(requires_grad):
    import torch.autograd.forward_ad as fwAD

    w = torch.randn(5, requires_grad=requires_grad)
    with fwAD.dual_level(), pytest.raises(NotImplementedError, match=r"forward.mode AD"):
        penalty.weight_penalty([fwAD.make_dual(w, torch.ones_like(w))], l1=0.1, l2=0.2)


# --- training-loop recipes (docs/weight_penalty.md) -------------------------------------------


def _sgd_model(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3))
    return model, torch.optim.SGD(model.parameters(), lr=0.5)


def test_add_grad_after_grad_scaler_unscale_matches_the_naive_formula():
    """With a GradScaler, add_grad_ goes after scaler.unscale_(optimizer): before it, the
    penalty's gradient would be added, unscaled, to scaled gradients (65536x too weak here)."""
    use_kernels("cpu")
    x, y = torch.randn(8, 5, generator=torch.Generator().manual_seed(1)), torch.randn(8, 3)
    results = {}
    for recipe in ("naive", "fastreg", "fastreg_before_unscale"):
        model, optimizer = _sgd_model()
        decay = penalty.select_decay_parameters(model)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
        wp = penalty.WeightPenalty(decay, l1=1e-3, l2=1e-2)
        loss = (model(x) - y).square().mean()
        if recipe == "naive":
            scaler.scale(loss + ref.naive_penalty(decay, 1e-3, 1e-2)).backward()
        else:
            scaler.scale(loss).backward()
            if recipe == "fastreg":
                scaler.unscale_(optimizer)
                wp.add_grad_()
            else:
                wp.add_grad_()
        scaler.step(optimizer)
        scaler.update()
        results[recipe] = [p.detach().clone() for p in model.parameters()]
    assert mismatch(results["fastreg"], results["naive"]) is None
    assert mismatch(results["fastreg_before_unscale"], results["naive"]) is not None


def test_add_grad_once_per_step_with_gradient_accumulation_matches_the_naive_formula():
    """With gradient accumulation, add_grad_ runs once per optimizer step, after the last micro-batch
    (once per micro-batch would add the penalty's gradient that many times)."""
    use_kernels("cpu")
    micro = [(torch.randn(4, 5), torch.randn(4, 3)) for _ in range(4)]
    results = {}
    for recipe in ("naive", "fastreg", "fastreg_per_micro_batch"):
        model, optimizer = _sgd_model()
        decay = penalty.select_decay_parameters(model)
        wp = penalty.WeightPenalty(decay, l2=1e-2)
        for x, y in micro:
            loss = (model(x) - y).square().mean() / len(micro)
            if recipe == "naive":  # the formula in every micro-batch's loss, scaled like it
                loss = loss + ref.naive_penalty(decay, 0.0, 1e-2) / len(micro)
            loss.backward()
            if recipe == "fastreg_per_micro_batch":
                wp.add_grad_()
        if recipe == "fastreg":
            wp.add_grad_()
        optimizer.step()
        results[recipe] = [p.detach().clone() for p in model.parameters()]
    assert mismatch(results["fastreg"], results["naive"]) is None
    assert mismatch(results["fastreg_per_micro_batch"], results["naive"]) is not None


def test_torch_func_hessian_is_refused_and_jacrev_of_jacrev_works():
    """torch.func.hessian is forward-over-reverse: forward-mode AD, which the ops refuse rather
    than drop; reverse-over-reverse (jacrev(jacrev(f))) works (docs/weight_penalty.md)."""
    from torch.func import hessian, jacrev

    x = torch.randn(4, dtype=torch.float64)

    def f(q):
        return penalty.weight_penalty([q], l1=0.3, l2=0.7)

    with pytest.raises(NotImplementedError, match=r"forward.mode AD"):
        hessian(f)(x)
    torch.testing.assert_close(jacrev(jacrev(f))(x), 1.4 * torch.eye(4, dtype=torch.float64))


# --- mixed float32 + float64 lists --------------------------------------------------------------


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
