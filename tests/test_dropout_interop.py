"""fastreg's dropout under the tools that take torch.nn's: TorchScript, tracing, export, and
the tensor types its kernels do not take (which torch's dropout serves)."""

import io
import warnings

import pytest
import torch
import torch.fx

import fastreg
import fastreg.functional as F
from fastreg.reference import dropout as ref

#: each module with an input of the rank it is meant for
MODULE_INPUTS = {
    "Dropout": (64, 32),
    "Dropout1d": (8, 16, 10),
    "Dropout2d": (8, 16, 4, 4),
    "Dropout3d": (8, 16, 2, 3, 3),
}


def _script(module):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch >= 2.10 deprecates TorchScript
        return torch.jit.script(module)


def _channels_dropped(y, shape):
    """Which (sample, channel) pairs a feature dropout zeroed; for plain dropout, which elements."""
    per_channel = y.reshape(shape[0], shape[1], -1) if len(shape) > 2 else y.reshape(*shape, 1)
    zero = (per_channel == 0).all(-1)
    assert bool((zero | (per_channel != 0).all(-1)).all()), "a channel is dropped whole or kept whole"
    return zero


@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("name", list(MODULE_INPUTS))
def test_modules_script_as_torchs_do_and_behave_the_same_scripted(name, inplace):
    # torch.jit.script refused all four (a keyword-only argument, a tuple of unknown length, an
    # import); torch.nn's script, and fastreg.BatchNorm* did already.
    shape = MODULE_INPUTS[name]
    _script(getattr(torch.nn, name)(0.5))
    kwargs = {"mask_mode": "bits"} if name == "Dropout" else {}
    module = getattr(fastreg, name)(0.5, inplace=inplace, **kwargs)
    scripted = _script(module)
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.save(scripted, buffer)
        buffer.seek(0)
        loaded = torch.jit.load(buffer)
    x = torch.rand(shape) + 1
    scale = ref.keep_scale(ref.keep_threshold(0.5))
    for run in (scripted, loaded):
        torch.manual_seed(0)
        expected = module(x.clone())
        torch.manual_seed(0)
        assert torch.equal(run(x.clone()), expected), "the same kernel and the same draw as eager"
        first, second = _channels_dropped(run(x.clone()), shape), _channels_dropped(run(x.clone()), shape)
        assert first.any() and not torch.equal(first, second), "a fresh mask per call"

        leaf = x.clone().requires_grad_()
        y = run(leaf * 1)
        y.backward(torch.ones_like(y))
        assert torch.equal(leaf.grad, torch.where(y == 0, 0.0, scale))

        run.eval()
        assert run(x) is x, "eval mode returns the input itself"
        run.train()


def test_scripted_dropout_refuses_a_bad_p_or_mask_mode():
    # p is a constant of torch's scripted modules: set after construction, before scripting
    module = fastreg.Dropout(0.5)
    module.p = 1.5
    with pytest.raises(torch.jit.Error, match="between 0 and 1"):
        _script(module)(torch.ones(4))
    module.p = 0.5
    scripted = _script(module)
    scripted.mask_mode = "bytes"
    with pytest.raises(torch.jit.Error, match="mask_mode must be one of"):
        scripted(torch.ones(4))


def _trace(module, x):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        traced = torch.jit.trace(module, x, check_trace=False)
    return traced, [str(w.message) for w in caught if issubclass(w.category, torch.jit.TracerWarning)]


@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("name", list(MODULE_INPUTS))
def test_modules_trace_without_tracer_warnings_and_draw_fresh_masks(name, inplace):
    # fastreg's emptiness test read numel(), a traced value under torch.jit.trace: "Converting a
    # tensor to a Python boolean" (torch's traced modules give no warning).
    shape = MODULE_INPUTS[name]
    x = torch.rand(shape) + 1
    assert _trace(getattr(torch.nn, name)(0.5, inplace=inplace), x.clone())[1] == []
    traced, tracer_warnings = _trace(getattr(fastreg, name)(0.5, inplace=inplace), x.clone())
    assert tracer_warnings == []
    assert "fastreg::dropout" in str(traced.graph), "the op is in the graph, not a mask baked into it"
    first, second = _channels_dropped(traced(x.clone()), shape), _channels_dropped(traced(x.clone()), shape)
    assert first.any() and not torch.equal(first, second), "a fresh mask per call"
    leaf = x.clone().requires_grad_()
    y = traced(leaf * 1)
    y.backward(torch.ones_like(y))
    assert torch.equal(leaf.grad, torch.where(y == 0, 0.0, ref.keep_scale(ref.keep_threshold(0.5))))


def _export_warnings(fn, shape, strict):
    module = type("M", (torch.nn.Module,), {"forward": lambda self, x: fn(x, 0.5)})()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.export.export(module, (torch.randn(shape),), strict=strict)
    return [str(w.message) for w in caught if str(w.message).startswith(("dropout2d:", "dropout3d:"))]


@pytest.mark.parametrize("strict", [False, True])
@pytest.mark.parametrize("fn,shape", [("dropout2d", (4, 3, 3)), ("dropout2d", (4, 3)), ("dropout3d", (4, 3, 3))])
def test_export_keeps_the_deprecation_warnings(fn, shape, strict):
    # Non-strict export runs the Python code with is_compiling() set but without Dynamo, where
    # the comptime warning fastreg used under is_compiling() said nothing. torch warns once
    # there; strict export (Dynamo) makes torch warn once per trace, fastreg once.
    theirs = _export_warnings(getattr(torch.nn.functional, fn), shape, strict)
    ours = _export_warnings(getattr(F, fn), shape, strict)
    assert ours and set(ours) == set(theirs)
    if not strict:
        assert ours == theirs


FUNCTIONS = ["dropout", "dropout1d", "dropout2d", "dropout3d"]


def _outcome(call):
    """The exception a call raises, or None."""
    try:
        call()
    except Exception as error:  # noqa: BLE001 - what is raised is what is compared
        return error
    return None


def _jagged(requires_grad=False):
    rows = [torch.rand(2, 8) + 1, torch.rand(5, 8) + 1]
    return torch.nested.nested_tensor(rows, layout=torch.jagged, requires_grad=requires_grad)


@pytest.mark.parametrize("name", list(MODULE_INPUTS))
def test_fx_symbolic_trace_keeps_each_module_as_one_call(name):
    """torch.fx traced into the modules' forward, whose branches a Proxy cannot decide: a model
    holding one did not trace. Inside a model each is one call_module node, as torch.nn's are;
    traced on its own, one call of its function (as torch.nn.Dropout traces)."""
    module = getattr(fastreg, name)(0.4)
    shape = MODULE_INPUTS[name]
    model = torch.nn.Sequential(torch.nn.Identity(), module)
    traced = torch.fx.symbolic_trace(model)
    assert [(n.op, str(n.target)) for n in traced.graph.nodes][1:-1] == [("call_module", "0"), ("call_module", "1")]
    alone = torch.fx.symbolic_trace(module)
    functional = {"Dropout": F.dropout, "Dropout1d": F.dropout1d, "Dropout2d": F.dropout2d, "Dropout3d": F.dropout3d}
    assert [n.target for n in alone.graph.nodes if n.op == "call_function"] == [functional[name]]
    x = torch.randn(shape)
    for graph in (traced, alone):
        torch.manual_seed(5)
        got = graph(x)
        torch.manual_seed(5)
        assert torch.equal(got, module(x))  # the same draw as the module itself


def test_jagged_nested_tensors_use_torchs_dropout():
    # The kernels take strided tensors only: a jagged nested tensor raised "must be a strided
    # (dense) tensor". torch's dropout serves it (its values zeroed or scaled by 1 / (1 - p)).
    x = _jagged(requires_grad=True)
    torch.manual_seed(0)
    theirs = torch.nn.functional.dropout(x, 0.5)
    for run in (lambda t: F.dropout(t, 0.5), fastreg.Dropout(0.5)):
        torch.manual_seed(0)
        ours = run(x)
        assert ours.layout == torch.jagged and torch.equal(ours.values(), theirs.values())
        values = x.values().detach()
        kept = ours.values() != 0
        assert kept.any() and not kept.all()
        assert torch.allclose(ours.values()[kept], values[kept] * 2)
        (grad,) = torch.autograd.grad(ours.values().sum(), x)
        assert torch.equal(grad.values(), torch.where(kept, 2.0, 0.0))
    y = _jagged()
    for ours in (F.dropout(y, 0.5, training=False), fastreg.Dropout(0.5).eval()(y)):
        assert ours.layout == torch.jagged and torch.equal(ours.values(), y.values())


@pytest.mark.parametrize("fn", FUNCTIONS)
def test_jagged_nested_tensors_get_torchs_result_or_error(fn):
    # torch itself supports jagged inputs in F.dropout only (out of place): the others raise,
    # and fastreg's must raise the same.
    warnings.simplefilter("ignore")  # torch's dropout2d/3d warn about the rank (pytest restores the filters)
    for training in (True, False):
        for inplace in (False, True):
            x = _jagged()
            torch.manual_seed(0)
            theirs = _outcome(lambda: getattr(torch.nn.functional, fn)(x.clone(), 0.5, training, inplace))
            torch.manual_seed(0)
            ours = _outcome(lambda: getattr(F, fn)(x.clone(), 0.5, training, inplace))
            if theirs is None:
                assert ours is None, (fn, training, inplace, ours)
            else:
                assert type(ours) is type(theirs) and str(ours) == str(theirs), (fn, training, inplace)


@pytest.fixture
def one_process_group(tmp_path):
    """A gloo process group of this process alone, for DTensors on the CPU."""
    dist = torch.distributed
    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    if dist.is_initialized():
        pytest.skip("a process group is already initialized")
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("fn", FUNCTIONS)
def test_dtensors_use_torchs_dropout(one_process_group, fn):
    # fastreg's ops have no sharding rule ("does not have a sharding strategy registered"), and
    # dropout2d mixed a plain noise tensor with the DTensor. torch's dropout draws a DTensor's
    # mask through DTensor's RNG tracker, so that shards get one consistent mask: it serves them.
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard, distribute_tensor

    name = "Dropout" + fn[7:]
    shape = MODULE_INPUTS[name]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # DTensor's notes on its RNG tracker
        x = distribute_tensor(torch.rand(shape) + 1, init_device_mesh("cpu", (1,)), [Shard(0)])
        for training in (True, False):
            for inplace in (False, True):
                module = getattr(fastreg, name)(0.5, inplace=inplace).train(training)
                for ours_fn in (lambda t: getattr(F, fn)(t, 0.5, training, inplace), module):
                    theirs_input, ours_input = x.clone(), x.clone()
                    torch.manual_seed(0)
                    try:
                        theirs = getattr(torch.nn.functional, fn)(theirs_input, 0.5, training, inplace)
                    except NotImplementedError as error:  # torch's own limits: dropout3d in place
                        with pytest.raises(type(error)):
                            ours_fn(ours_input)
                        continue
                    torch.manual_seed(0)
                    ours = ours_fn(ours_input)
                    assert isinstance(ours, DTensor) and (ours is ours_input) == (theirs is theirs_input)
                    assert torch.equal(ours_input.to_local(), theirs_input.to_local()), "the same draw as torch"
                    dropped = _channels_dropped(ours.to_local(), shape)
                    assert dropped.any() and not dropped.all() if training else not dropped.any()
        leaf = x.detach().requires_grad_()
        y = getattr(F, fn)(leaf * 1, 0.5)
        y.sum().backward()
        assert isinstance(leaf.grad, DTensor)
        assert torch.equal(leaf.grad.to_local(), torch.where(y.to_local() == 0, 0.0, 2.0))
