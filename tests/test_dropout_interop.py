"""fastreg's dropout under the tools that take torch.nn's: TorchScript, tracing, export, and
the tensor types its kernels do not take (which torch's dropout serves)."""

import io
import warnings

import pytest
import torch

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
