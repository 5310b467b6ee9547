"""The weight penalty in traced and captured graphs: the torch.library contracts (opcheck); torch.compile
(fullgraph, the fused tensor-coefficient ops with eager's bits, coefficient schedules in two graphs,
coefficient checks); compiled autograd of an eager forward; CUDA graphs (the cudagraph_unsafe tags,
mode="reduce-overhead" with a coefficient schedule, and the CUDA-only captures of the op and of
add_grad_)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch._dynamo.utils import counters

from fastreg import penalty
from fastreg.reference import weight_penalty as ref
from fastreg.testing import mismatch, opcheck

from .helpers import DEVICES, compiled_autograd
from .weight_penalty_helpers import (
    CUDA_ONLY,
    EDGE_SHAPES,
    OPS,
    PENALTY_OPS,
    assert_value_close,
    kernels,  # noqa: F401 (autouse: the CPU kernels, loaded once per module)
    make,
    many_shapes,
    naive_fp64,
    use_kernels,
)

# No "compile" in this file's name: scripts/gpu_check.sh runs compute-sanitizer with
# -k "cuda and not compile", which matches module names too and would skip every test here.


# --- torch.library contracts ----------------------------------------------------------------------


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


# --- torch.compile --------------------------------------------------------------------------------


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


# --- compiled autograd ----------------------------------------------------------------------------


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


# --- CUDA graphs ----------------------------------------------------------------------------------


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
