"""The ops under PyTorch's machinery: opcheck, gradcheck, torch.compile, saved tensors."""

import contextlib

import pytest
import torch
import torch.autograd.forward_ad as fwAD

import fastreg
import fastreg.functional as F
from fastreg.testing import opcheck

from .helpers import DEVICES, REFERENCE_BACKEND, DispatchedOps, compiled_autograd, use_kernels


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


@pytest.mark.skipif(REFERENCE_BACKEND, reason="the compiled library's autograd")
@pytest.mark.parametrize("device", DEVICES)
def test_compiled_library_records_its_cpp_autograd_nodes(device):
    # register_autograd's Python kernels cost tens of us per forward + backward; the compiled
    # library registers the same formulas in C++ for AutogradCPU/AutogradCUDA (dropout_autograd.cpp).
    use_kernels(device, ("dropout", "dropout_seeded", "dropout_backward"))
    x = torch.randn(8, device=device, requires_grad=True)
    y = F.dropout(x, 0.5)
    assert y.grad_fn.name() == "fastreg::DropoutBackward"
    (g,) = torch.autograd.grad(y, x, torch.ones_like(y, requires_grad=True), create_graph=True)
    assert g.grad_fn.name() == "fastreg::DropoutBackwardBackward"
    seeded = torch.ops.fastreg.dropout_seeded(x, 0.5, state(device), 0)[0]
    assert seeded.grad_fn.name() == "fastreg::DropoutSeededBackward"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mask_mode", list(F.MASK_MODES))
def test_compiled_autograd_traces_the_backward_of_an_eager_forward(device, mask_mode):
    """Compiled autograd records the dropout node's backward in its graph (fullgraph: no eager
    fallback). The second step hits the cached graph and must use that step's own mask."""
    base = torch.randn(6, 5, 4, device=device)
    x = base.permute(2, 0, 1).requires_grad_()  # a layout whose gradient the node re-lays out
    weight = torch.randn(4, 6, 5, device=device)
    for seed in (1, 2):
        torch.manual_seed(seed)
        (expected,) = torch.autograd.grad((F.dropout(x, 0.4, mask_mode=mask_mode) * weight).sum(), x)
        torch.manual_seed(seed)
        y = F.dropout(x, 0.4, mask_mode=mask_mode)
        with compiled_autograd():
            (y * weight).sum().backward()
        assert torch.equal(x.grad, expected)
        x.grad = None


@pytest.mark.parametrize("device", DEVICES)
def test_compiled_autograd_traces_in_place_dropout_on_a_view(device):
    """In place on a view, the node runs inside CopySlices, which compiled autograd traces too."""
    leaf = torch.randn(8, 6, device=device, requires_grad=True)
    weight = torch.randn(8, 6, device=device)
    grads = []
    for compiled in (False, True):
        torch.manual_seed(0)
        hidden = leaf * 2
        F.dropout(hidden[:, 1:5], 0.5, inplace=True)
        with compiled_autograd() if compiled else contextlib.nullcontext():
            (hidden * weight).sum().backward()
        grads.append(leaf.grad)
        leaf.grad = None
    assert torch.equal(*grads)


@pytest.mark.skipif(REFERENCE_BACKEND, reason="the compiled library's autograd propagates tangents")
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", [0, 1, 2])
@pytest.mark.parametrize("requires_grad", [False, True])
def test_forward_mode_ad_takes_the_tangent_through_the_same_mask(device, mode, requires_grad):
    use_kernels(device, ("dropout_seeded", "dropout_backward"))
    x = torch.randn(6, 33, dtype=torch.float64, device=device, requires_grad=requires_grad)
    tangent = torch.randn(33, 6, dtype=torch.float64, device=device).t()  # another memory order than x
    rng = state(device)
    with fwAD.dual_level():
        out = torch.ops.fastreg.dropout_seeded(fwAD.make_dual(x, tangent), 0.4, rng, mode)[0]
        primal, out_tangent = fwAD.unpack_dual(out)
    expected = torch.ops.fastreg.dropout_seeded(x.detach(), 0.4, rng, mode)[0]
    # the mask follows memory order, so the tangent must be taken in x's order to meet the same mask
    assert torch.equal(primal, expected)
    assert torch.equal(out_tangent, torch.ops.fastreg.dropout_seeded(tangent.contiguous(), 0.4, rng, mode)[0])
    assert (primal == 0).any() and (primal != 0).any()
    if requires_grad:  # reverse mode still recorded alongside
        (grad,) = torch.autograd.grad(out, x, torch.ones_like(out))
        assert torch.equal(grad != 0, primal != 0)


@pytest.mark.skipif(REFERENCE_BACKEND, reason="the compiled library's autograd propagates tangents")
@pytest.mark.parametrize("device", DEVICES)
def test_jvp_of_dropout_matches_its_own_linear_map(device):
    x = torch.randn(257, device=device)
    tangent = torch.randn_like(x)
    generator = torch.Generator(device=device)
    generator.manual_seed(5)
    out, out_tangent = torch.func.jvp(lambda t: F.dropout(t, 0.3, generator=generator), (x,), (tangent,))
    generator.manual_seed(5)
    assert torch.equal(out, F.dropout(x, 0.3, generator=generator))
    keep = out != 0
    assert torch.allclose(out_tangent, torch.where(keep, tangent / 0.7, torch.zeros_like(tangent)), rtol=1e-4)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("requires_grad", [False, True])
def test_forward_mode_ad_in_place_overwrites_the_tangent_through_the_same_mask(device, requires_grad):
    base = torch.randn(300, device=device, requires_grad=requires_grad)
    tangent = torch.randn(300, device=device)
    generator = torch.Generator(device=device)
    generator.manual_seed(11)
    with fwAD.dual_level():
        dual = fwAD.make_dual(base * 1.0, tangent.clone())
        out = F.dropout(dual, 0.4, inplace=True, generator=generator)
        primal, out_tangent = fwAD.unpack_dual(out)
    assert out is dual
    generator.manual_seed(11)
    assert torch.equal(primal, F.dropout(base.detach(), 0.4, generator=generator))
    generator.manual_seed(11)
    assert torch.equal(out_tangent, F.dropout(tangent, 0.4, generator=generator))


@pytest.mark.skipif(not REFERENCE_BACKEND, reason="the reference backend's refusal")
def test_reference_refuses_tangents_rather_than_dropping_them():
    x = torch.randn(8)
    with fwAD.dual_level(), pytest.raises(NotImplementedError, match="fastreg.dropout: forward-mode AD"):
        F.dropout(fwAD.make_dual(x, torch.ones_like(x)), 0.5)


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


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mask_mode", [0, 1, 2])
def test_raw_inplace_op_is_differentiable_as_torch_inplace_ops_are(device, mask_mode):
    """dropout_ rebases the history of what it overwrites, through a view onto its base too
    (CopySlices), and refuses a leaf that requires grad, or a view of one, before writing."""
    leaf = torch.randn(8, 6, device=device, requires_grad=True)
    before = leaf.detach().clone()
    for tensor in (leaf, leaf[:, 1:]):
        with pytest.raises(RuntimeError, match="leaf Variable that requires grad"):
            torch.ops.fastreg.dropout_(tensor, 0.5, mask_mode)
    assert torch.equal(leaf.detach(), before) and leaf._version == 0
    weight = torch.randn(8, 6, device=device)

    def generator():
        return torch.Generator(device).manual_seed(3)

    hidden = leaf * 2
    torch.ops.fastreg.dropout_(hidden[:, 1:5], 0.5, mask_mode, generator())  # a strided view
    (grad,) = torch.autograd.grad((hidden * weight).sum(), leaf)
    doubled = leaf * 2  # the same with the out-of-place op and the same draw
    middle = torch.ops.fastreg.dropout(doubled[:, 1:5], 0.5, mask_mode, generator())[0]
    expected = torch.cat([doubled[:, :1], middle, doubled[:, 5:]], dim=1)
    (expected_grad,) = torch.autograd.grad((expected * weight).sum(), leaf)
    assert torch.equal(hidden, expected) and torch.equal(grad, expected_grad)

    def step(t):
        h = t * 2
        torch.ops.fastreg.dropout_(h, 0.5, mask_mode)
        return (h * weight).sum()

    torch._dynamo.reset()
    grads = []
    for run in (step, torch.compile(step, fullgraph=True, backend="aot_eager")):
        torch.manual_seed(5)
        grads.append(torch.autograd.grad(run(leaf), leaf)[0])
    assert torch.equal(*grads)


@pytest.mark.parametrize("device", DEVICES)
def test_raw_inplace_op_bumps_the_version_so_autograd_refuses_stale_saved_values(device):
    a = torch.randn(64, device=device, requires_grad=True)
    b = a.sigmoid()  # sigmoid's backward reads its saved output
    with torch.no_grad():
        torch.ops.fastreg.dropout_(b, 0.5, 0)
    assert b._version > 0
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        b.sum().backward()


def _inplace_version_cases(device):
    """(name, tensor to overwrite, grad mode): what networks pass to dropout(inplace=True)."""
    hidden = torch.randn(4, 8, device=device, requires_grad=True) * 1
    yield "plain", torch.randn(4, 8, device=device), True
    yield "non-leaf", torch.randn(4, 8, device=device, requires_grad=True) * 1, True
    yield "view of a non-leaf", hidden[:2], True
    yield "strided view", torch.randn(4, 8, device=device)[:, ::2], True
    yield "requires grad, in no_grad", torch.randn(4, 8, device=device, requires_grad=True) * 1, False


@pytest.mark.parametrize("device", DEVICES)
def test_inplace_bumps_the_version_once_like_torch(device):
    # The reference bumped it twice (its copy and its explicit bump), three times when it recorded
    # a backward (mark_dirty bumps too): harmless to autograd, but not what torch and the compiled
    # kernels do, and code that watches _version (caches, torch.compile's guards) sees it.
    runs = {
        "torch": torch.nn.functional.dropout,
        "fastreg": F.dropout,
        "the raw op": lambda t, p, inplace: OPS.dropout_(t, p, 0),
    }
    for label, run in runs.items():
        for name, tensor, grad_mode in _inplace_version_cases(device):
            before = tensor._version
            with torch.set_grad_enabled(grad_mode):
                run(tensor, 0.5, inplace=True)
            assert tensor._version == before + 1, (label, name, tensor._version - before)


def _unrebasable_views(device):
    """Views that torch's check_inplace refuses to overwrite in grad mode, each made afresh."""
    hidden = torch.randn(4, 8, device=device, requires_grad=True) * 1
    with torch.no_grad():
        view = hidden[:2]
    yield "made in no_grad mode", view
    yield "one of several outputs", hidden.unbind(0)[1]

    class Identity(torch.autograd.Function):
        @staticmethod
        def forward(ctx, t):
            return t.view_as(t)

        @staticmethod
        def backward(ctx, grad):
            return grad

    yield "made in a custom Function", Identity.apply(hidden)


@pytest.mark.parametrize("device", DEVICES)
def test_inplace_on_a_view_autograd_cannot_rebase_raises_torchs_error_before_writing(device):
    # The reference called a view made in no_grad mode a leaf, and wrote into the views that
    # autograd refuses after a mark_dirty (one of several outputs, a custom Function's output).
    for case, view in _unrebasable_views(device):
        with pytest.raises(RuntimeError) as theirs:
            torch.nn.functional.dropout(view, 0.5, inplace=True)
        values, version = view.detach().clone(), view._version
        with pytest.raises(RuntimeError) as ours:
            F.dropout(view, 0.5, inplace=True)
        assert str(ours.value) == str(theirs.value), case
        assert torch.equal(view.detach(), values) and view._version == version, f"{case}: written before refusing"


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


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", list(F.MASK_MODES))
@pytest.mark.parametrize("inplace", [False, True])
def test_backward_makes_no_gradients_for_the_mask(device, mode, inplace):
    """The mask and rng_state outputs get no gradient: autograd must not fill zero tensors for
    them (in bool mode a full-size mask's worth of memset in every backward)."""
    x = torch.randn(1000, device=device, requires_grad=True)
    y = F.dropout(x * 1.0 if inplace else x, 0.5, inplace=inplace, mask_mode=mode)
    dy = torch.ones_like(y)
    with DispatchedOps() as seen:
        y.backward(dy)
    assert "fastreg.dropout_backward.default" in seen.names
    assert not [n for n in seen.names if "zeros" in n or "fill" in n], seen.names
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


# Hostile inputs: a clear error naming the problem, never uninitialised memory or a misleading message.
OPS = torch.ops.fastreg


def _dropout_op_calls(x, rng, mask):
    return [
        lambda: OPS.dropout(x, 0.5, 1),
        lambda: OPS.dropout_(x, 0.5, 1),
        lambda: OPS.dropout_seeded(x, 0.5, rng, 1),
        lambda: OPS.dropout_backward(x, mask, rng, 0.5, 1),
    ]


def test_meta_arguments_mixed_with_cpu_ones_raise():
    # A meta tensor among CPU ones dispatches to the Meta kernel (the fake): it used to return
    # uninitialised CPU tensors instead of saying that the devices differ.
    x = torch.randn(4, 6)
    rng = state("cpu")
    mask = OPS.dropout_seeded(x, 0.5, rng, 1)[1]
    with pytest.raises(RuntimeError, match="rng_state is on meta"):
        OPS.dropout_seeded(x, 0.5, rng.to("meta"), 1)
    with pytest.raises(RuntimeError, match="rng_state is on meta"):
        OPS.dropout_backward(x, mask, rng.to("meta"), 0.5, 1)
    with pytest.raises(RuntimeError, match="mask .* on meta"):
        OPS.dropout_backward(x, mask.to("meta"), rng, 0.5, 1)
    with pytest.raises(RuntimeError, match="mask .* on meta"):  # regenerate mode: the mask is unused
        OPS.dropout_backward(x, torch.empty(0, device="meta"), rng, 0.5, 0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cpu_tensors_with_a_cuda_rng_state_or_mask_raise_naming_the_devices():
    # Any CUDA argument sends the call to the CUDA kernel, which must say the devices differ.
    x = torch.randn(4, 6)
    rng = state("cpu")
    mask = OPS.dropout_seeded(x, 0.5, rng, 1)[1]
    calls = [
        lambda: OPS.dropout_seeded(x, 0.5, rng.cuda(), 1),
        lambda: OPS.dropout_backward(x, mask, rng.cuda(), 0.5, 1),
        lambda: OPS.dropout_backward(x, mask.cuda(), rng, 0.5, 1),
        lambda: OPS.dropout_backward(x, torch.empty(0, device="cuda"), rng, 0.5, 0),  # mask unused
    ]
    for call in calls:
        with pytest.raises(RuntimeError, match=r"is on (cpu|cuda)") as error:
            call()
        assert "Guard" not in str(error.value)


@pytest.mark.parametrize("device", DEVICES)
def test_refused_calls_draw_no_random_numbers(device):
    # Every check comes before the generator advances: a call that raises leaves the stream as it was.
    use_kernels(device, ("dropout", "dropout_"))
    generator = torch.Generator(device=device).manual_seed(0)
    before = generator.get_state()
    x = torch.ones(8, device=device)
    calls = [
        (lambda: OPS.dropout(x, 1.5, 0, generator), ValueError, "between 0 and 1"),
        (lambda: OPS.dropout(x, 0.5, 3, generator), ValueError, "mask_mode"),
        (lambda: OPS.dropout(x.int(), 0.5, 0, generator), TypeError, "floating-point"),
        (lambda: OPS.dropout_(x.clone(), 1.5, 0, generator), ValueError, "between 0 and 1"),
        (lambda: OPS.dropout_(x.clone(), 0.5, 3, generator), ValueError, "mask_mode"),
    ]
    for call, error, message in calls:
        with pytest.raises(error, match=message):
            call()
        assert torch.equal(generator.get_state(), before), message


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_generator_of_another_device_is_refused_by_name():
    # torch.ops calls pick the kernel from the tensors, C++ calls (the autograd node's) from the
    # generator too: both paths, and the reference, must name the mismatch.
    x = torch.randn(4, 6)
    cuda_generator, cpu_generator = torch.Generator("cuda"), torch.Generator()
    calls = [
        (lambda: F.dropout(x.requires_grad_(), 0.5, generator=cuda_generator), "cuda.* but input is on cpu"),
        (lambda: OPS.dropout(x.detach(), 0.5, 0, cuda_generator), "cuda.* but input is on cpu"),
        (lambda: OPS.dropout_(x.detach().clone(), 0.5, 0, cuda_generator), "cuda.* but input is on cpu"),
        (lambda: F.dropout(x.detach().cuda(), 0.5, generator=cpu_generator), "cpu but input is on cuda"),
        (lambda: OPS.dropout_(x.detach().cuda(), 0.5, 0, cpu_generator), "cpu but input is on cuda"),
    ]
    for call, message in calls:
        with pytest.raises(RuntimeError, match="generator is on " + message):
            call()


def _fake_or_meta(convert):
    """(context, converter): FakeTensorMode and its tensors, or meta tensors."""
    if convert == "meta":
        return contextlib.nullcontext(), lambda t: t.to("meta")
    from torch._subclasses.fake_tensor import FakeTensorMode

    mode = FakeTensorMode()
    return mode, mode.from_tensor


@pytest.mark.parametrize("convert", ["meta", "fake"])
def test_fake_kernels_raise_like_the_kernels(convert):
    ctx, to = _fake_or_meta(convert)
    x = torch.randn(4, 6)
    rng, mask = state("cpu"), OPS.dropout_seeded(x, 0.5, state("cpu"), 1)[1]
    xi, xf, ri, mi = to(torch.arange(24).view(4, 6)), to(x), to(rng), to(mask)
    rng3, short_mask, gappy = to(torch.tensor([1, 2, 3])), to(torch.zeros(2, dtype=torch.uint8)), to(torch.randn(4, 12))
    with ctx:
        for call in _dropout_op_calls(xi, ri, mi):
            with pytest.raises(TypeError, match="floating-point"):
                call()
        for op in (OPS.dropout, OPS.dropout_):
            with pytest.raises(ValueError, match="dropout probability"):
                op(xf, float("nan"), 1)
            with pytest.raises(ValueError, match="mask_mode"):
                op(xf, 0.5, 3)
        with pytest.raises(RuntimeError, match="rng_state must be"):
            OPS.dropout_seeded(xf, 0.5, rng3, 1)
        with pytest.raises(RuntimeError, match="mask"):
            OPS.dropout_backward(xf, short_mask, ri, 0.5, 1)
        with pytest.raises(RuntimeError, match="dense"):
            OPS.dropout_backward(gappy[:, ::2], mi, ri, 0.5, 1)


@pytest.mark.parametrize("layout", ["coo", "csr"])
def test_inplace_on_a_sparse_input_says_it_is_sparse(layout):
    # It used to raise ATen's overlap message (coo) or "Sparse CSR tensors do not have strides".
    x = torch.randn(4, 6)
    x = x.to_sparse() if layout == "coo" else x.to_sparse_csr()
    with pytest.raises(RuntimeError, match="fastreg.dropout_: input must be a strided"):
        OPS.dropout_(x, 0.5, 0)


def test_backward_with_a_sparse_grad_or_rng_state_names_it():
    # They used to fail inside the reference's helpers ("flat_memory_view needs ...",
    # "Cannot access data pointer of Tensor that doesn't have storage").
    x = torch.randn(4, 6)
    rng = state("cpu")
    with pytest.raises(RuntimeError, match="fastreg.dropout_backward: grad_output must be a strided"):
        OPS.dropout_backward(x.to_sparse(), torch.empty(0, dtype=torch.uint8), rng, 0.5, 0)
    with pytest.raises(RuntimeError, match="fastreg.dropout_seeded: rng_state must be"):
        OPS.dropout_seeded(x, 0.5, rng.to_sparse(), 0)


@pytest.mark.skipif(REFERENCE_BACKEND, reason="the compiled library's autograd node")
def test_a_memoryless_zero_gradient_passes_through_without_a_kernel_reading_it():
    use_kernels("cpu", ("dropout", "dropout_backward"))
    x = torch.randn(16, requires_grad=True)
    (grad,) = torch.autograd.grad(F.dropout(x, 0.5), x, torch._efficientzerotensor(16))
    assert torch.equal(grad, torch.zeros(16))
