"""Batch norm: agreement with torch.nn.functional.batch_norm and with the reference, memory
formats, running statistics, modules, errors, and the ops under opcheck/gradcheck/compile."""

from __future__ import annotations

import contextlib
import copy
import warnings

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.fx
import torch.nn.functional as F
from torch import nn
from torch._dynamo.testing import CompileCounter

import fastreg
from fastreg.reference import batch_norm as ref
from fastreg.sync_batch_norm import SyncBatchNormFunction
from fastreg.testing import mismatch, opcheck

from .helpers import DEVICES, REFERENCE_BACKEND, DispatchedOps, compiled_autograd
from .helpers import use_kernels as _use_kernels

OPS = torch.ops.fastreg
BN_OPS = (
    "batch_norm_train",
    "batch_norm_eval",
    "batch_norm_stats",
    "batch_norm_elemt",
    "batch_norm_backward",
    "batch_norm_backward_reduce",
    "batch_norm_backward_elemt",
    "batch_norm_update_stats_",
)


def use_kernels(device: str) -> None:
    _use_kernels(device, BN_OPS)


DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
# Against torch (a different summation order, and torch rounds 16-bit intermediate results).
VS_TORCH = {
    torch.float64: (1e-9, 1e-10),
    torch.float32: (2e-4, 2e-5),
    torch.float16: (1e-2, 1e-2),
    torch.bfloat16: (4e-2, 4e-2),
}


def layout(x: torch.Tensor, kind: str) -> torch.Tensor:
    """The same values in another memory layout."""
    if kind == "contiguous":
        return x.contiguous()
    if kind == "channels_last":
        return x.contiguous(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)
    if kind == "permuted":  # channels innermost-but-one, batch innermost: neither NCHW nor NHWC
        dims = list(range(x.dim()))
        order = dims[2:] + [1, 0]
        return x.permute(order).contiguous().permute([order.index(d) for d in dims])
    if kind == "sliced":  # a view with gaps: the ops copy it to a dense layout
        wide = torch.cat([x, x], dim=-1)
        return wide[..., : x.shape[-1]]
    raise ValueError(kind)


def sample(shape, dtype, device, seed=0, mean=0.5, std=2.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * std + mean).to(device=device, dtype=dtype)


def assert_close(actual, expected, dtype):
    rtol, atol = VS_TORCH[dtype]
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol)


SHAPES = [(6, 3), (5, 4, 7), (4, 3, 5, 6), (2, 3, 4, 5, 3), (3, 1, 4, 4), (1, 5, 3, 3)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("affine", [True, False])
def test_training_matches_torch(device, dtype, shape, affine):
    use_kernels(device)
    c = shape[1]
    x = sample(shape, dtype, device).requires_grad_()
    w = sample((c,), dtype, device, seed=1).requires_grad_() if affine else None
    b = sample((c,), dtype, device, seed=2).requires_grad_() if affine else None
    stats = [sample((c,), dtype, device, seed=3), sample((c,), dtype, device, seed=4).abs() + 0.5]
    torch_stats = [s.clone() for s in stats]
    y = fastreg.functional.batch_norm(x, *stats, w, b, True, 0.1, 1e-5)
    expected = F.batch_norm(x, *torch_stats, w, b, True, 0.1, 1e-5)
    assert_close(y, expected, dtype)
    assert_close(stats[0], torch_stats[0], dtype)
    assert_close(stats[1], torch_stats[1], dtype)
    dy = sample(shape, dtype, device, seed=5)
    inputs = (x, w, b) if affine else (x,)
    grads = torch.autograd.grad(y, inputs, dy)
    expected_grads = torch.autograd.grad(expected, inputs, dy)
    for got, want in zip(grads, expected_grads):
        assert_close(got, want, dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(6, 3), (4, 3, 5, 6), (2, 3, 4, 5, 3)])
def test_eval_matches_torch(device, dtype, shape):
    use_kernels(device)
    c = shape[1]
    x = sample(shape, dtype, device).requires_grad_()
    w = sample((c,), dtype, device, seed=1).requires_grad_()
    b = sample((c,), dtype, device, seed=2).requires_grad_()
    rm, rv = sample((c,), dtype, device, seed=3), sample((c,), dtype, device, seed=4).abs() + 0.5
    y = fastreg.functional.batch_norm(x, rm, rv, w, b, False, 0.1, 1e-3)
    dy = sample(shape, dtype, device, seed=5)
    # 16-bit: torch's formula in float64 on the same values, rounded once. Torch's own CUDA
    # kernels are no oracle there: on the H100, its weight gradient of channel 1 for
    # (4, 3, 5, 6) bf16 was 2.078 where the exact value is 2.229 (ours, and torch's CPU: 2.234).
    oracle = torch.float64 if dtype in (torch.float16, torch.bfloat16) else dtype
    x64, w64, b64 = (t.detach().to(oracle).requires_grad_() for t in (x, w, b))
    expected = F.batch_norm(x64, rm.to(oracle), rv.to(oracle), w64, b64, False, 0.1, 1e-3)
    assert_close(y, expected.to(dtype), dtype)
    got_grads = torch.autograd.grad(y, (x, w, b), dy)
    for got, want in zip(got_grads, torch.autograd.grad(expected, (x64, w64, b64), dy.to(oracle))):
        assert_close(got, want.to(dtype), dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["contiguous", "channels_last", "permuted", "sliced"])
@pytest.mark.parametrize("shape", [(4, 6, 5, 7), (2, 6, 3, 4, 5)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_memory_formats(device, kind, shape, dtype):
    """Values as for a contiguous input; output and grad_input laid out as torch lays them out."""
    use_kernels(device)
    base = sample(shape, dtype, device)
    x = layout(base, kind).requires_grad_()
    w, b = sample((shape[1],), torch.float32, device, seed=1), sample((shape[1],), torch.float32, device, seed=2)
    y = fastreg.functional.batch_norm(x, None, None, w, b, True)
    expected = F.batch_norm(x, None, None, w.to(dtype), b.to(dtype), True)
    assert_close(y, expected, dtype)
    if kind != "sliced":
        assert y.stride() == x.stride()
    dy = layout(sample(shape, dtype, device, seed=5), kind)
    (gx,) = torch.autograd.grad(y, x, dy)
    (want,) = torch.autograd.grad(expected, x, dy)
    assert_close(gx, want, dtype)
    if kind != "sliced":
        assert gx.stride() == x.stride()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_float32_parameters_with_16bit_input(device, dtype):
    """As under autocast: 16-bit activations, float32 weight, bias and running statistics."""
    use_kernels(device)
    x = sample((8, 4, 6, 6), dtype, device).requires_grad_()
    w = sample((4,), torch.float32, device, seed=1).requires_grad_()
    b = sample((4,), torch.float32, device, seed=2).requires_grad_()
    rm, rv = torch.zeros(4, device=device), torch.ones(4, device=device)
    rm2, rv2 = rm.clone(), rv.clone()
    y = fastreg.functional.batch_norm(x, rm, rv, w, b, True)
    expected = F.batch_norm(x, rm2, rv2, w, b, True)
    assert y.dtype == dtype
    assert_close(y, expected, dtype)
    torch.testing.assert_close(rm, rm2, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(rv, rv2, rtol=1e-5, atol=1e-6)
    dy = sample(x.shape, dtype, device, seed=5)
    grads = torch.autograd.grad(y, (x, w, b), dy)
    assert [g.dtype for g in grads] == [dtype, torch.float32, torch.float32]
    for got, want in zip(grads, torch.autograd.grad(expected, (x, w, b), dy)):
        assert_close(got, want, dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("kind", ["contiguous", "channels_last"])
def test_kernels_match_reference(device, dtype, kind):
    """Every op against the reference, with the tolerance table the benchmark uses."""
    use_kernels(device)
    shape = (5, 6, 7, 9)
    x = layout(sample(shape, dtype, device), kind)
    dy = layout(sample(shape, dtype, device, seed=5), kind)
    w, b = sample((6,), dtype, device, seed=1), sample((6,), dtype, device, seed=2)
    rm, rv = sample((6,), dtype, device, seed=3), sample((6,), dtype, device, seed=4).abs() + 0.5
    train = OPS.batch_norm_train(x, w, b, 1e-5)
    assert mismatch(train, ref.batch_norm_train(x, w, b, 1e-5)) is None
    mean, invstd = train[1], train[2]
    cases = [
        (OPS.batch_norm_eval(x, rm, rv, w, b, 1e-5), ref.batch_norm_eval(x, rm, rv, w, b, 1e-5)),
        (OPS.batch_norm_stats(x), ref.batch_norm_stats(x)),
        (OPS.batch_norm_elemt(x, mean, invstd, w, None), ref.batch_norm_elemt(x, mean, invstd, w, None)),
        (OPS.batch_norm_backward_reduce(dy, x, mean), ref.batch_norm_backward_reduce(dy, x, mean)),
    ]
    for training in (True, False):
        cases.append(
            (
                OPS.batch_norm_backward(dy, x, mean, invstd, w, training),
                ref.batch_norm_backward(dy, x, mean, invstd, w, training),
            )
        )
    sums = ref.batch_norm_backward_reduce(dy, x, mean)
    count = x.numel() // 6 * 3  # as if two more processes held the same batch (SyncBatchNorm)
    cases.append(
        (
            OPS.batch_norm_backward_elemt(dy, x, mean, invstd, w, *sums, count),
            ref.batch_norm_backward_elemt(dy, x, mean, invstd, w, *sums, count),
        )
    )
    for i, (got, want) in enumerate(cases):
        assert mismatch(got, want) is None, f"case {i}: {mismatch(got, want)}"
    for got, want in zip(train, (None,) + tuple(train[1:])):
        if want is not None:
            assert got.dtype == ref.compute_dtype(dtype) and got.shape == (6,)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["contiguous", "channels_last"])
def test_statistics_are_stable_for_a_large_mean(device, kind):
    """1e4 + N(0, 1) in float32: sum(x^2) - sum(x)^2 would lose every digit of the variance."""
    use_kernels(device)
    x = layout(sample((16, 8, 12, 12), torch.float32, device, mean=1e4, std=1.0), kind)
    mean, var = OPS.batch_norm_stats(x)
    want_var, want_mean = torch.var_mean(x.double(), (0, 2, 3), correction=0)
    torch.testing.assert_close(mean.double(), want_mean, rtol=1e-7, atol=0)
    torch.testing.assert_close(var.double(), want_var, rtol=1e-4, atol=0)
    y = OPS.batch_norm_train(x, None, None, 1e-5)[0]
    torch.testing.assert_close(
        y.double().std(), torch.tensor(1.0, dtype=torch.float64, device=device), rtol=1e-3, atol=0
    )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["contiguous", "channels_last"])
def test_results_are_deterministic(device, kind):
    use_kernels(device)
    x = layout(sample((8, 16, 20, 20), torch.float32, device), kind)
    dy = layout(sample((8, 16, 20, 20), torch.float32, device, seed=5), kind)
    first = OPS.batch_norm_train(x, None, None, 1e-5)
    back = OPS.batch_norm_backward(dy, x, first[1], first[2], None, True)
    for _ in range(3):
        assert mismatch(OPS.batch_norm_train(x, None, None, 1e-5), first, exact=True) is None
        assert mismatch(OPS.batch_norm_backward(dy, x, first[1], first[2], None, True), back, exact=True) is None


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(3, 5), (2, 5, 7), (2, 5, 3, 4)])
def test_gradcheck(device, shape):
    x = sample(shape, torch.float64, device).requires_grad_()
    w = sample((5,), torch.float64, device, seed=1).requires_grad_()
    b = sample((5,), torch.float64, device, seed=2).requires_grad_()
    rm, rv = sample((5,), torch.float64, device, seed=3), sample((5,), torch.float64, device, seed=4).abs() + 0.5

    def train(x, w, b):
        return fastreg.functional.batch_norm(x, None, None, w, b, True)

    def evaluate(x, w, b):
        return fastreg.functional.batch_norm(x, rm, rv, w, b, False)

    assert torch.autograd.gradcheck(train, (x, w, b))
    assert torch.autograd.gradcheck(evaluate, (x, w, b))


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    x = sample((3, 4, 5, 2), torch.float32, device)
    dy = sample((3, 4, 5, 2), torch.float32, device, seed=5)
    w = sample((4,), torch.float32, device, seed=1).requires_grad_()
    b = sample((4,), torch.float32, device, seed=2).requires_grad_()
    rm, rv = sample((4,), torch.float32, device, seed=3), sample((4,), torch.float32, device, seed=4).abs() + 0.5
    mean, var = ref.batch_norm_stats(x)
    invstd = torch.rsqrt(var + 1e-5)
    xg = x.clone().requires_grad_()
    opcheck(OPS.batch_norm_train.default, (xg, w, b, 1e-5))
    opcheck(OPS.batch_norm_train.default, (x.to(memory_format=torch.channels_last), None, None, 1e-5))
    opcheck(OPS.batch_norm_eval.default, (xg, rm, rv, w, b, 1e-5))
    opcheck(OPS.batch_norm_stats.default, (x,))
    opcheck(OPS.batch_norm_elemt.default, (x, mean, invstd, w.detach(), None))
    opcheck(OPS.batch_norm_backward.default, (dy, x, mean, invstd, w.detach(), True))
    opcheck(OPS.batch_norm_backward_reduce.default, (dy, x, mean))
    opcheck(OPS.batch_norm_backward_elemt.default, (dy, x, mean, invstd, None, mean, var, 30))
    opcheck(OPS.batch_norm_update_stats_.default, (rm.clone(), rv.clone(), mean, var, 0.1, 30))
    opcheck(OPS.batch_norm_update_stats_.default, (rm.clone(), rv.clone(), mean, var, 0.1, None))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "running_dtype, batch_dtype",
    # The kernels' pairs (16-bit running statistics as under autocast), then two that go to ATen.
    [(d, torch.float64 if d == torch.float64 else torch.float32) for d in DTYPES]
    + [(torch.float64, torch.float32), (torch.float32, torch.float64)],
)
@pytest.mark.parametrize("channels, step", [(7, 1), (300, 1), (5, 3)])
def test_running_statistics_update_matches_reference_bits(device, running_dtype, batch_dtype, channels, step):
    """Every product and sum rounded as in the reference, in the batch statistics' dtype; 300
    channels span more than one CUDA block; step 3 updates a strided view in place."""
    use_kernels(device)
    mean = sample((channels,), batch_dtype, device, seed=1)
    var = sample((channels,), batch_dtype, device, seed=2).abs()
    # count: the batch variance is biased over count values (scaled by count / (count - 1)); None: unbiased
    for momentum, count in ((0.1, 30), (1.0, None), (0.0, 2), (1 / 3, 7)):
        var_scale = 1.0 if count is None else count / (count - 1)
        storage = [sample((channels * step,), running_dtype, device, seed=s).abs() for s in (3, 4)]
        ours = [t[::step] for t in storage]
        theirs = [t.clone() for t in ours]
        before = [t.to(torch.float64, copy=True) for t in ours]
        versions = [t._version for t in ours]
        OPS.batch_norm_update_stats_(*ours, mean, var, momentum, count)
        ref.batch_norm_update_stats_(*theirs, mean, var, momentum, count)
        assert mismatch(ours, theirs, exact=True) is None, (momentum, count)
        assert all(t._version > v for t, v in zip(ours, versions))  # autograd sees the overwrite
        if step > 1:  # the elements between the view's are untouched
            assert torch.equal(
                storage[0][1::step], sample((channels * step,), running_dtype, device, seed=3).abs()[1::step]
            )
        # and the formula, against float64, to the precision of the coarser dtype
        rtol, atol = max(VS_TORCH[running_dtype], VS_TORCH[batch_dtype])
        for got, old, batch, scale in zip(ours, before, (mean, var), (1.0, var_scale)):
            want = (1 - momentum) * old + momentum * scale * batch.double()
            torch.testing.assert_close(got.double(), want, rtol=rtol, atol=atol)


@pytest.mark.parametrize("device", DEVICES)
def test_running_statistics_update_checks_its_arguments(device):
    use_kernels(device)
    mean, var = torch.zeros(7, device=device), torch.ones(7, device=device)
    running_mean, running_var = torch.zeros(7, device=device), torch.ones(7, device=device)
    with pytest.raises(RuntimeError, match="running_var has shape"):
        OPS.batch_norm_update_stats_(running_mean, running_var[:3], mean, var, 0.1, None)
    with pytest.raises(RuntimeError, match=f"running_mean is on {device}.* but the batch statistic on meta"):
        OPS.batch_norm_update_stats_(running_mean, running_var, mean.to("meta"), var.to("meta"), 0.1, None)
    with pytest.raises(RuntimeError, match="running_var is on meta but running_mean on"):
        OPS.batch_norm_update_stats_(running_mean, running_var.to("meta"), mean, var.to("meta"), 0.1, None)
    with pytest.raises(TypeError, match="running_mean has dtype"):
        OPS.batch_norm_update_stats_(running_mean.int(), running_var, mean, var, 0.1, None)
    with pytest.raises(RuntimeError, match="running_var has stride 0"):
        OPS.batch_norm_update_stats_(running_mean, running_var[:1].expand(7), mean, var, 0.1, None)
    # each pair matches, the pairs do not: the CUDA kernel walked both with running_mean's count
    with pytest.raises(RuntimeError, match="running_var has 3 elements but running_mean 7"):
        OPS.batch_norm_update_stats_(running_mean, running_var[:3], mean, var[:3], 0.1, None)
    for count in (1, 0, -3):  # no unbiased variance from fewer than 2 values
        with pytest.raises(RuntimeError, match=f"count is {count}; the variance of fewer than 2 values"):
            OPS.batch_norm_update_stats_(running_mean, running_var, mean, var, 0.1, count)
    assert torch.equal(running_mean, torch.zeros(7, device=device))
    assert torch.equal(running_var, torch.ones(7, device=device))


@pytest.mark.parametrize("device", DEVICES)
def test_module_compiles_fullgraph(device):
    torch._dynamo.reset()
    eager = nn.Sequential(nn.Conv2d(3, 4, 3), fastreg.BatchNorm2d(4)).to(device)
    compiled_model = nn.Sequential(nn.Conv2d(3, 4, 3), fastreg.BatchNorm2d(4)).to(device)
    compiled_model.load_state_dict(eager.state_dict())
    compiled = torch.compile(compiled_model, fullgraph=True, backend="aot_eager")
    x = sample((4, 3, 8, 8), torch.float32, device)
    for _ in range(2):
        y_eager, y_compiled = eager(x), compiled(x)
        torch.testing.assert_close(y_compiled, y_eager)
        y_eager.square().sum().backward()
        y_compiled.square().sum().backward()
    torch.testing.assert_close(compiled_model[1].running_var, eager[1].running_var)
    torch.testing.assert_close(compiled_model[1].weight.grad, eager[1].weight.grad)
    assert int(compiled_model[1].num_batches_tracked) == 2


def test_training_compiles_one_graph_for_every_batch_size():
    """The batch size reaches the running-statistics update as a SymInt count: with a float
    factor count / (count - 1) Dynamo made one graph per batch size and gave up after 8."""
    use_kernels("cpu")
    torch._dynamo.reset()
    graphs = CompileCounter()
    eager = nn.Sequential(nn.Conv2d(3, 4, 3), fastreg.BatchNorm2d(4))
    model = copy.deepcopy(eager)
    compiled = torch.compile(model, backend=graphs, dynamic=True, fullgraph=True)
    for n in range(2, 12):
        x = sample((n, 3, 6, 6), torch.float32, "cpu", seed=n)
        assert_close(compiled(x), eager(x), torch.float32)
    assert graphs.frame_count == 1
    for name, value in eager.state_dict().items():  # every step updated the statistics alike
        assert_close(model.state_dict()[name].float(), value.float(), torch.float32)


def test_training_exports_with_a_dynamic_batch_dimension():
    use_kernels("cpu")
    model = nn.Sequential(fastreg.BatchNorm2d(3))
    batch = torch.export.Dim("batch", min=2, max=64)
    program = torch.export.export(model, (torch.randn(4, 3, 5, 5),), dynamic_shapes={"input": {0: batch}})
    reference = copy.deepcopy(model)
    x = sample((9, 3, 5, 5), torch.float32, "cpu", seed=3)
    assert_close(program.module()(x), reference(x), torch.float32)


@pytest.mark.parametrize("training", [True, False])
def test_fx_symbolic_trace_keeps_each_layer_as_one_call_module(training):
    """torch.fx keeps torch.nn modules as leaves and traced into fastreg's forward, whose
    branches on the input a Proxy cannot decide: converted models did not trace."""
    use_kernels("cpu")
    model = fastreg.convert(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()))
    model.train(training)
    twin = copy.deepcopy(model)
    traced = torch.fx.symbolic_trace(model)
    calls = [(node.op, str(node.target)) for node in traced.graph.nodes if node.op not in ("placeholder", "output")]
    assert calls == [("call_module", "0"), ("call_module", "1"), ("call_module", "2")]
    x = sample((2, 3, 6, 6), torch.float32, "cpu")
    assert torch.equal(traced(x), twin(x))
    assert torch.equal(model[1].running_mean, twin[1].running_mean)  # the traced graph runs the module itself
    with pytest.raises(RuntimeError, match="cannot trace a BatchNorm2d on its own"):
        torch.fx.symbolic_trace(fastreg.BatchNorm2d(3))


def test_training_refuses_running_statistics_that_require_grad():
    """They are updated in place without autograd; torch refuses them too."""
    use_kernels("cpu")
    x = torch.randn(4, 3, 5, 5)
    for name in ("running_mean", "running_var"):
        stats = {"running_mean": torch.zeros(3), "running_var": torch.ones(3)}
        stats[name].requires_grad_()
        before = {k: v.detach().clone() for k, v in stats.items()}
        with pytest.raises(RuntimeError, match=f"{name} requires grad, but the running statistics"):
            fastreg.functional.batch_norm(x, stats["running_mean"], stats["running_var"], training=True)
        assert all(torch.equal(stats[k].detach(), before[k]) for k in stats)


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
@pytest.mark.parametrize("momentum", [0.1, None])
def test_module_scripts(momentum):
    """torch.jit.script takes torch's BatchNorm, so it must take fastreg's."""
    use_kernels("cpu")
    theirs, ours = nn.BatchNorm2d(5, momentum=momentum), fastreg.BatchNorm2d(5, momentum=momentum)
    scripted = torch.jit.script(ours)
    for step in range(2):
        x = sample((4, 5, 3, 3), torch.float32, "cpu", seed=step, mean=step)
        assert_close(scripted(x), theirs(x), torch.float32)
    for name, value in theirs.state_dict().items():
        assert_close(scripted.state_dict()[name].float(), value.float(), torch.float32)
    scripted.eval(), theirs.eval()
    assert_close(scripted(x), theirs(x), torch.float32)


def _tracer_warnings(module, x):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        traced = torch.jit.trace(module, x, check_trace=False)
    return traced, sum(issubclass(w.category, torch.jit.TracerWarning) for w in caught)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_traced_training_updates_running_stats_for_each_batch_size(device, dtype):
    """torch.jit.trace records sizes as traced values: the update must use each batch's count of
    values per channel (unbiased variance), not the traced batch's, and skip an empty batch,
    with eager's bits; and no more TracerWarnings than torch's traced BatchNorm2d gives."""
    use_kernels(device)
    eager = fastreg.BatchNorm2d(3, momentum=0.3, device=device, dtype=dtype)
    module = copy.deepcopy(eager)
    example = sample((2, 3, 1, 1), dtype, device, seed=0)
    traced, warned = _tracer_warnings(module, example)
    assert warned <= _tracer_warnings(nn.BatchNorm2d(3, device=device, dtype=dtype), example)[1]
    theirs = nn.BatchNorm2d(3, momentum=0.3, device=device, dtype=dtype)
    eager(example), theirs(example)  # the trace ran the module once
    for step, shape in enumerate([(64, 3, 4, 4), (0, 3, 4, 4), (5, 3, 2, 7), (2, 3, 1, 1)]):
        x = sample(shape, dtype, device, seed=step + 1, mean=step)
        assert torch.equal(traced(x), eager(x))
        theirs(x)
        for name, value in eager.state_dict().items():
            assert torch.equal(module.state_dict()[name], value), f"{name} after batch {shape}"
        assert_close(module.running_var, theirs.running_var, dtype)
        assert_close(module.running_mean, theirs.running_mean, dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("track", [True, False])
def test_module_matches_torch_over_steps(device, momentum, affine, track):
    use_kernels(device)
    kwargs = dict(momentum=momentum, affine=affine, track_running_stats=track, device=device)
    theirs, ours = nn.BatchNorm2d(5, **kwargs), fastreg.BatchNorm2d(5, **kwargs)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    assert repr(ours) == repr(theirs)
    for step in range(3):
        x = sample((4, 5, 3, 3), torch.float32, device, seed=step, mean=step)
        assert_close(ours(x), theirs(x), torch.float32)
    for name, value in theirs.state_dict().items():
        assert_close(ours.state_dict()[name].float(), value.float(), torch.float32)
    ours.eval(), theirs.eval()
    x = sample((2, 5, 3, 3), torch.float32, device, seed=9)
    assert_close(ours(x), theirs(x), torch.float32)


def test_module_classes_and_shapes():
    assert isinstance(fastreg.BatchNorm1d(3), nn.BatchNorm1d)
    assert isinstance(fastreg.BatchNorm3d(3), nn.BatchNorm3d)
    with pytest.raises(ValueError, match="expected 4D input"):
        fastreg.BatchNorm2d(3)(torch.randn(2, 3))
    bn1 = fastreg.BatchNorm1d(3)
    assert bn1(torch.randn(4, 3)).shape == (4, 3)
    assert bn1(torch.randn(4, 3, 7)).shape == (4, 3, 7)


def test_convert_swaps_batch_norm_in_place():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Sequential(nn.BatchNorm1d(4)))
    model[1].running_mean.fill_(0.25)
    bn = model[1]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    assert fastreg.convert(model) is model
    assert model[1] is bn and type(bn) is fastreg.BatchNorm2d
    assert type(model[2][0]) is fastreg.BatchNorm1d
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key])

    class MyNorm(nn.BatchNorm2d):
        pass

    mine = fastreg.convert(nn.Sequential(MyNorm(4)))
    assert type(mine[0]) is MyNorm


@pytest.mark.parametrize("device", DEVICES)
def test_empty_batch(device):
    x = torch.empty(0, 3, 4, 4, device=device, requires_grad=True)
    rm, rv = torch.zeros(3, device=device), torch.ones(3, device=device)
    y = fastreg.functional.batch_norm(x, rm, rv, training=True)
    assert y.shape == x.shape
    assert torch.equal(rm, torch.zeros(3, device=device)) and torch.equal(rv, torch.ones(3, device=device))
    y.sum().backward()
    assert x.grad.shape == x.shape
    mean, var = OPS.batch_norm_stats(x.detach())
    assert torch.equal(mean, torch.zeros(3, device=device)) and torch.equal(var, torch.zeros(3, device=device))


def test_errors():
    x = torch.randn(4, 3, 5)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        fastreg.functional.batch_norm(torch.randn(1, 3), None, None, training=True)
    with pytest.raises(ValueError, match="eps must be positive"):
        fastreg.functional.batch_norm(x, None, None, training=True, eps=0.0)
    with pytest.raises(RuntimeError, match="running_mean and running_var must be given"):
        fastreg.functional.batch_norm(x, None, None, training=False)
    with pytest.raises(TypeError, match="expected a floating-point tensor"):
        OPS.batch_norm_train(torch.ones(4, 3, dtype=torch.int32), None, None, 1e-5)
    with pytest.raises(ValueError, match="at least 2 dimensions"):
        OPS.batch_norm_train(torch.randn(5), None, None, 1e-5)
    with pytest.raises(RuntimeError, match="must be 1-D with 3 elements"):
        OPS.batch_norm_train(x, torch.ones(4), None, 1e-5)
    with pytest.raises(TypeError, match=r"weight has dtype torch.float64; expected torch.float32 \(the input's\)$"):
        OPS.batch_norm_train(x, torch.ones(3, dtype=torch.float64), None, 1e-5)
    with pytest.raises(TypeError, match=r"expected torch.float16 \(the input's\) or torch.float32$"):
        OPS.batch_norm_train(x.half(), torch.ones(3, dtype=torch.float64), None, 1e-5)
    with pytest.raises(ValueError, match="eps must be a finite number"):
        OPS.batch_norm_train(x, None, None, float("nan"))
    with pytest.raises(RuntimeError, match="grad_output has shape"):
        OPS.batch_norm_backward(torch.randn(4, 3), x, torch.zeros(3), torch.ones(3), None, True)
    with pytest.raises(RuntimeError, match="strided"):
        OPS.batch_norm_train(torch.randn(4, 3).to_sparse(), None, None, 1e-5)


def test_training_checks_the_running_statistics():
    """As torch: wrong running statistics are an error before anything runs or is updated."""
    x = torch.randn(4, 3, 5)
    with pytest.raises(RuntimeError, match="running_mean must be 1-D with 3 elements"):
        fastreg.functional.batch_norm(x, torch.zeros(4), torch.ones(4), training=True)
    with pytest.raises(TypeError, match="running_var has dtype torch.float16"):
        fastreg.functional.batch_norm(x, torch.zeros(3), torch.ones(3, dtype=torch.float16), training=True)
    running_mean = torch.zeros(3)
    with pytest.raises(ValueError, match="either both be None or neither be None"):
        fastreg.functional.batch_norm(x, running_mean, None, training=True)
    assert torch.equal(running_mean, torch.zeros(3))


@pytest.mark.parametrize("momentum", [None, "0.1"])
@pytest.mark.parametrize("stats", [True, False])
@pytest.mark.parametrize("training", [True, False])
def test_momentum_that_is_not_a_number_is_a_type_error_like_torch(momentum, stats, training):
    """torch refuses it in its argument parser, with or without running statistics; fastreg's op
    failed with a RuntimeError only when it had statistics to update, and never without."""
    x = torch.randn(4, 3, 5)
    for fn in (F.batch_norm, fastreg.functional.batch_norm):
        running = (torch.zeros(3), torch.ones(3)) if stats or not training else (None, None)
        with pytest.raises(TypeError, match="'momentum'.* must be float, not (NoneType|str)"):
            fn(x, *running, training=training, momentum=momentum)
        if running[0] is not None:
            assert torch.equal(running[0], torch.zeros(3)) and torch.equal(running[1], torch.ones(3))
    for fine in (True, 1, np.float32(0.2), torch.tensor(0.2)):  # what torch takes, fastreg takes
        fastreg.functional.batch_norm(x, torch.zeros(3), torch.ones(3), training=True, momentum=fine)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("affine", ["both", "bias_only", "weight_only", "none"])
@pytest.mark.parametrize("wanted", ["all", "bias", "weight", "input"])
def test_gradients_asked_for_match_torch(training, affine, wanted):
    """Any subset of gradients, with either affine tensor absent: the autograd formulas (Python
    and C++) map each gradient to its argument."""
    x = sample((4, 3, 5, 5), torch.float64, "cpu").requires_grad_()
    w = sample((3,), torch.float64, "cpu", seed=1).requires_grad_() if affine in ("both", "weight_only") else None
    b = sample((3,), torch.float64, "cpu", seed=2).requires_grad_() if affine in ("both", "bias_only") else None
    stats = (sample((3,), torch.float64, "cpu", seed=3), sample((3,), torch.float64, "cpu", seed=4).abs() + 0.5)
    targets = {"input": [x], "weight": [w], "bias": [b], "all": [x, w, b]}[wanted]
    targets = [t for t in targets if t is not None]
    if not targets:
        pytest.skip("no such argument in this case")
    grads = {}
    for name, fn in (("torch", F.batch_norm), ("fastreg", fastreg.functional.batch_norm)):
        out = fn(x, *(s.clone() for s in stats), w, b, training)
        grads[name] = torch.autograd.grad(out.pow(3).sum(), targets)
    for got, expected in zip(grads["fastreg"], grads["torch"]):
        torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("device", DEVICES)
def test_training_backward_makes_no_gradients_for_the_statistics(device):
    """batch_norm_train's mean/invstd/var outputs get no gradient: autograd must not fill zero
    tensors for them (three memsets per layer and step on a GPU). The backward dispatches the
    backward op and nothing that allocates."""
    use_kernels(device)
    x = sample((4, 3, 5, 5), torch.float32, device).requires_grad_()
    w = sample((3,), torch.float32, device, seed=1).requires_grad_()
    out, *stats = OPS.batch_norm_train(x, w, None, 1e-5)
    assert not any(s.requires_grad for s in stats)  # statistics, not differentiable outputs
    dy = torch.ones_like(out)
    with DispatchedOps() as seen:
        out.backward(dy)
    assert [n for n in seen.names if n != "aten.detach.default"] == ["fastreg.batch_norm_backward.default"]
    assert x.grad is not None and w.grad is not None


def test_running_statistics_that_require_grad_are_refused_in_eval():
    x = sample((4, 3, 5, 5), torch.float32, "cpu").requires_grad_()
    running_mean, running_var = torch.zeros(3, requires_grad=True), torch.ones(3)
    with pytest.raises(RuntimeError, match="running statistics are not supported"):
        fastreg.functional.batch_norm(x, running_mean, running_var, training=False)


@pytest.mark.skipif(REFERENCE_BACKEND, reason="the compiled library's autograd")
@pytest.mark.parametrize("device", DEVICES)
def test_compiled_library_records_its_cpp_autograd_nodes(device):
    # register_autograd's Python kernels would cost more host time than a small layer takes on a
    # GPU; the compiled library registers the same formulas in C++ (batch_norm_autograd.cpp).
    use_kernels(device)
    bn = fastreg.BatchNorm2d(3).to(device)
    x = sample((4, 3, 5, 5), torch.float32, device).requires_grad_()
    assert bn(x).grad_fn.name() == "fastreg::BatchNormBackward"
    assert bn.eval()(x).grad_fn.name() == "fastreg::BatchNormEvalBackward"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("affine", [True, False])
def test_compiled_autograd_traces_the_backward_of_an_eager_forward(device, training, affine):
    """Compiled autograd records batch norm's backward in its graph (fullgraph: no eager
    fallback), with the gradients of input, weight and bias that eager autograd gives."""
    use_kernels(device)
    bn = fastreg.BatchNorm2d(3, affine=affine).to(device).train(training)
    if affine:
        with torch.no_grad():
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
    x = sample((4, 3, 5, 5), torch.float32, device).to(memory_format=torch.channels_last).requires_grad_()
    dy = sample((4, 3, 5, 5), torch.float32, device, seed=3)
    targets = (x, bn.weight, bn.bias) if affine else (x,)
    expected = torch.autograd.grad(bn(x), targets, dy)
    out = bn(x)
    with compiled_autograd():
        out.backward(dy)
    for target, grad in zip(targets, expected):
        torch.testing.assert_close(target.grad, grad, rtol=0, atol=0)


@pytest.mark.parametrize("training", [True, False])
def test_double_backward_is_an_error(training):
    """Not supported (docs/batch_norm.md): an error, not silently zero second derivatives."""
    use_kernels("cpu")
    bn = fastreg.BatchNorm2d(3, dtype=torch.float64).train(training)
    x = sample((4, 3, 5, 5), torch.float64, "cpu").requires_grad_()
    (gx,) = torch.autograd.grad(bn(x).pow(3).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        gx.square().sum().backward()


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed with gloo")
def test_sync_function_in_one_process_group(tmp_path):
    """SyncBatchNorm's collectives in a group of one: batch norm's results, no deprecation warnings."""
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        x = sample((4, 3, 5, 6), torch.float32, "cpu").requires_grad_()
        w = sample((3,), torch.float32, "cpu", seed=1).requires_grad_()
        b = sample((3,), torch.float32, "cpu", seed=2).requires_grad_()
        with warnings.catch_warnings():
            warnings.simplefilter("error", FutureWarning)
            warnings.simplefilter("error", DeprecationWarning)
            y = SyncBatchNormFunction.apply(x, w, b, 1e-5, dist.group.WORLD, 1)[0]
            grads = torch.autograd.grad(y, (x, w, b), sample(x.shape, torch.float32, "cpu", seed=5))
    finally:
        dist.destroy_process_group()
    expected = F.batch_norm(x, None, None, w, b, True)
    assert_close(y, expected, torch.float32)
    expected_grads = torch.autograd.grad(expected, (x, w, b), sample(x.shape, torch.float32, "cpu", seed=5))
    for got, want in zip(grads, expected_grads):
        assert_close(got, want, torch.float32)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_device_mismatch_is_an_error():
    x = torch.randn(4, 3, 5, device="cuda")
    with pytest.raises(RuntimeError, match="weight is on cpu but input is on cuda"):
        OPS.batch_norm_train(x, torch.ones(3), None, 1e-5)
    with pytest.raises(RuntimeError, match="is on cuda"):
        OPS.batch_norm_train(x.cpu(), torch.ones(3, device="cuda"), None, 1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graph_capture():
    use_kernels("cuda")
    bn = fastreg.BatchNorm2d(8).cuda()
    x = sample((16, 8, 10, 10), torch.float32, "cuda")
    bn(x)  # warm-up outside capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = bn(x)
    before = bn.running_mean.clone()
    graph.replay()
    torch.cuda.synchronize()
    assert_close(y, F.batch_norm(x, None, None, bn.weight, bn.bias, True), torch.float32)
    assert not torch.equal(bn.running_mean, before)


def _bn_calls(x, c, dy=None):
    """Every op with the per-channel tensors ``c`` (a callable giving one) and ``dy``."""
    dy = x if dy is None else dy
    return {
        "batch_norm_train": lambda: OPS.batch_norm_train(x, c(), c(), 1e-5),
        "batch_norm_eval": lambda: OPS.batch_norm_eval(x, c(), c(), c(), c(), 1e-5),
        "batch_norm_elemt": lambda: OPS.batch_norm_elemt(x, c(), c(), c(), c()),
        "batch_norm_backward": lambda: OPS.batch_norm_backward(dy, x, c(), c(), c(), True),
        "batch_norm_backward_reduce": lambda: OPS.batch_norm_backward_reduce(dy, x, c()),
        "batch_norm_backward_elemt": lambda: OPS.batch_norm_backward_elemt(dy, x, c(), c(), c(), c(), c(), 8),
    }


@pytest.mark.parametrize("op", [op for op in BN_OPS if op not in ("batch_norm_stats", "batch_norm_update_stats_")])
def test_meta_per_channel_tensor_with_a_cpu_input_raises(op):
    # A meta tensor among CPU ones dispatches to the Meta kernel (the fake): it used to return
    # uninitialised CPU tensors instead of saying that the devices differ.
    x = torch.randn(2, 3, 4)
    with pytest.raises(RuntimeError, match="is on meta but input is on cpu"):
        _bn_calls(x, lambda: torch.ones(3, device="meta"))[op]()
    if "backward" in op:
        with pytest.raises(RuntimeError, match="grad_output is on meta but input is on cpu"):
            _bn_calls(x, lambda: torch.ones(3), dy=torch.randn(2, 3, 4, device="meta"))[op]()


@pytest.mark.parametrize("convert", ["meta", "fake"])
def test_fake_kernels_raise_like_the_kernels(convert):
    if convert == "meta":
        ctx, to = contextlib.nullcontext(), lambda t: t.to("meta")
    else:
        from torch._subclasses.fake_tensor import FakeTensorMode

        ctx = FakeTensorMode()
        to = ctx.from_tensor
    x, good, short = to(torch.randn(2, 3, 4)), to(torch.ones(3)), to(torch.ones(2))
    x1, xi, dy5 = to(torch.randn(3)), to(torch.ones(2, 3, 4, dtype=torch.int64)), to(torch.randn(2, 3, 5))
    with ctx:
        for call in _bn_calls(x1, lambda: good).values():
            with pytest.raises(ValueError, match="at least 2 dimensions"):  # was an IndexError
                call()
        with pytest.raises(ValueError, match="at least 2 dimensions"):
            OPS.batch_norm_stats(x1)
        for call in _bn_calls(x, lambda: short).values():
            with pytest.raises(RuntimeError, match="must be 1-D with 3 elements"):
                call()
        for call in _bn_calls(xi, lambda: good).values():
            with pytest.raises(TypeError, match="floating-point"):
                call()
        for name, call in _bn_calls(x, lambda: good, dy=dy5).items():
            if "backward" in name:
                with pytest.raises(RuntimeError, match="grad_output has shape"):
                    call()
        with pytest.raises(ValueError, match="count must be > 0"):
            OPS.batch_norm_backward_elemt(x, x, good, good, None, good, good, 0)


@pytest.mark.parametrize("shape", [(), (3,)])
def test_training_on_an_input_without_channels_says_so(shape):
    # F.batch_norm's running-statistics check read input.shape[1] first: an IndexError.
    with pytest.raises(ValueError, match="fastreg.batch_norm: expected an input of shape"):
        fastreg.functional.batch_norm(torch.randn(shape), torch.zeros(3), torch.ones(3), training=True)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("frozen", [False, True])
def test_forward_mode_ad_is_refused_not_dropped(device, training, frozen):
    """No tangent rule: a dual input must raise, also where nothing requires grad and the
    autograd layer would otherwise send the call straight to its kernel."""
    import torch.autograd.forward_ad as fwAD

    bn = fastreg.BatchNorm2d(3).to(device).train(training).requires_grad_(not frozen)
    x = torch.randn(2, 3, 4, 4, device=device)
    with fwAD.dual_level(), pytest.raises(NotImplementedError, match=r"forward.mode AD"):
        bn(fwAD.make_dual(x, torch.ones_like(x)))
