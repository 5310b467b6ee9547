"""The ops under PyTorch's machinery: opcheck, gradcheck, torch.compile, saved tensors."""

import pytest
import torch

import fastreg
import fastreg.functional as F
from fastreg.testing import opcheck

from .helpers import DEVICES


def state(device):
    return torch.tensor([42, 8], dtype=torch.int64, device=device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", [0, 1, 2])
def test_opcheck(device, mode):
    x = torch.randn(5, 13, device=device, requires_grad=True)
    opcheck(torch.ops.fastreg.dropout_seeded.default, (x, 0.3, state(device), mode))
    # dropout draws from the generator, so its outputs differ call to call: skip the
    # checks that compare two runs and keep schema / fake / autograd registration.
    opcheck(torch.ops.fastreg.dropout.default, (x, 0.3, mode), test_utils=("test_schema", "test_faketensor"))
    opcheck(
        torch.ops.fastreg.dropout_.default,
        (x.detach().clone(), 0.3, mode),
        test_utils=("test_schema", "test_faketensor"),
    )
    out, mask = torch.ops.fastreg.dropout_seeded(x.detach(), 0.3, state(device), mode)
    opcheck(
        torch.ops.fastreg.dropout_backward.default,
        (torch.randn_like(out, requires_grad=True), mask, state(device), 0.3, mode),
    )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", [0, 1, 2])
def test_gradcheck_fp64(device, mode):
    x = torch.randn(3, 17, dtype=torch.float64, device=device, requires_grad=True)
    fn = lambda t: torch.ops.fastreg.dropout_seeded(t, 0.4, state(device), mode)[0]  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x,))
    assert torch.autograd.gradgradcheck(fn, (x,))


@pytest.mark.parametrize("device", DEVICES)
def test_compiles_fullgraph_and_matches_eager(device):
    torch._dynamo.reset()
    model = torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.ReLU())
    model.to(device)

    def step(x):
        return F.dropout(model(x), 0.5, mask_mode="regenerate").sum()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    x = torch.randn(16, 32, device=device)
    torch.manual_seed(0)
    eager_value = step(x)
    torch.manual_seed(0)
    compiled_value = compiled(x)
    assert torch.allclose(eager_value, compiled_value)
    torch.manual_seed(0)
    a, b = compiled(x), compiled(x)
    assert not torch.equal(a, b), "each call of the compiled graph must draw fresh masks"


@pytest.mark.parametrize("device", DEVICES)
def test_inplace_compiles_fullgraph_and_matches_eager(device):
    torch._dynamo.reset()
    model = torch.nn.Sequential(torch.nn.Linear(32, 32), fastreg.Dropout(0.5, inplace=True)).to(device)
    x = torch.randn(16, 32, device=device)

    def step(x):
        return model(x).square().sum()

    torch.manual_seed(0)
    eager_value = step(x)
    eager_value.backward()
    eager_grad = model[0].weight.grad.clone()
    model.zero_grad()
    torch.manual_seed(0)
    compiled_value = torch.compile(step, fullgraph=True, backend="aot_eager")(x)
    compiled_value.backward()
    assert torch.allclose(eager_value, compiled_value)
    assert torch.allclose(eager_grad, model[0].weight.grad)


def saved_bytes(fn, x):
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(x)
    return total


@pytest.mark.parametrize("device", DEVICES)
def test_saved_bytes_per_mask_mode(device):
    n = 1 << 16
    x = torch.randn(n, device=device, requires_grad=True)
    rng_state_bytes = 16
    assert saved_bytes(lambda t: F.dropout(t, 0.5), x) == rng_state_bytes
    assert saved_bytes(lambda t: F.dropout(t, 0.5, mask_mode="bits"), x) == n // 8 + rng_state_bytes
    assert saved_bytes(lambda t: F.dropout(t, 0.5, mask_mode="bool"), x) == n + rng_state_bytes
    assert saved_bytes(lambda t: torch.nn.functional.dropout(t, 0.5), x) >= n
    assert saved_bytes(lambda t: F.dropout(t * 1.0, 0.5, inplace=True), x) == rng_state_bytes
    assert saved_bytes(lambda t: F.dropout(t * 1.0, 0.5, inplace=True, mask_mode="bits"), x) == n // 8 + rng_state_bytes


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_inplace_allocates_no_output_on_cuda():
    x = torch.randn(1 << 22, device="cuda")
    F.dropout(x, 0.5, inplace=True)  # warm-up: kernels loaded, generator state allocated
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    F.dropout(x, 0.5, inplace=True)
    torch.cuda.synchronize()
    assert torch.cuda.max_memory_allocated() - before < x.numel() * x.element_size() // 8


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", list(F.MASK_MODES))
def test_all_mask_modes_give_the_same_gradients(device, mode):
    x = torch.randn(1000, device=device, requires_grad=True)
    g = torch.Generator(device=device).manual_seed(3)
    y = F.dropout(x, 0.5, generator=g, mask_mode=mode)
    y.backward(torch.ones_like(y))
    assert torch.equal(x.grad, (y != 0).float() * 2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graph_capture_replays_fresh_masks():
    x = torch.ones(1 << 16, device="cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        F.dropout(x, 0.5)  # warm-up outside the graph
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = F.dropout(x, 0.5)
    graph.replay()
    first = out.clone()
    graph.replay()
    assert not torch.equal(first, out), "each replay must advance the philox offset"
    assert 0.45 < (out == 0).float().mean().item() < 0.55

    inplace_graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(inplace_graph):
        hidden = x * 1.0
        F.dropout(hidden, 0.5, inplace=True)
    inplace_graph.replay()
    first = hidden.clone()
    inplace_graph.replay()
    assert not torch.equal(first, hidden), "each replay must advance the philox offset"
    assert 0.45 < (hidden == 0).float().mean().item() < 0.55
