"""A model trained with fastreg's layers, then saved, shipped and deployed: whole-model pickles,
state dicts into and out of torch.nn models, torch.export (.pt2) and TorchScript archives
loaded in a fresh process, torch.compile across train/eval switches, AOTInductor packages.
Each is compared with the same model built from torch.nn's layers. (ONNX: test_onnx_export.py.)"""

from __future__ import annotations

import copy
import io
import os
import pickle
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn
from torch._dynamo.testing import CompileCounter

import fastreg

from .helpers import use_kernels


def torch_model(seed: int = 0) -> nn.Sequential:
    """A conv/linear model with every layer kind fastreg converts, with running statistics that
    are not the defaults (three training batches)."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Dropout2d(0.2),
        nn.Flatten(),
        nn.Linear(8 * 6 * 6, 16),
        nn.BatchNorm1d(16),
        nn.ReLU(),
        nn.Dropout(0.3),
        nn.Linear(16, 4),
    )
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(8, 3, 6, 6))
    return model.eval()


def fastreg_model(seed: int = 0) -> nn.Sequential:
    return fastreg.convert(torch_model(seed))


def inputs(batch: int = 5, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, 6, 6, generator=torch.Generator().manual_seed(seed))


def assert_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    # fp32: fastreg's batch norm and torch's round differently (the outputs differ by ~3e-8)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)


def run_fresh(code: str, *, import_fastreg: bool = True) -> subprocess.CompletedProcess:
    """``code`` in a new Python process, with ``import fastreg`` first or not, as a deployment
    loads an artifact: none of this process's op registrations, loaded kernels or caches."""
    prefix = "import torch\n" + ("import fastreg\n" if import_fastreg else "")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
    return subprocess.run(
        [sys.executable, "-c", prefix + textwrap.dedent(code)], env=env, capture_output=True, text=True, timeout=600
    )


def check_fresh(code: str, **kwargs) -> None:
    result = run_fresh(code, **kwargs)
    assert result.returncode == 0, result.stderr[-4000:]


# --- pickles and state dicts ------------------------------------------------------------------


def _pickled_copies(model: nn.Module):
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    yield "torch.save", torch.load(buffer, weights_only=False)
    yield "pickle", pickle.loads(pickle.dumps(model))
    yield "deepcopy", copy.deepcopy(model)


def test_whole_model_pickles_with_its_classes_and_computes_torchs_outputs():
    model = fastreg.convert(torch_model(), mask_mode="bits")
    expected = torch_model()(inputs())
    for how, copied in _pickled_copies(model):
        assert [type(m) for m in copied.modules()] == [type(m) for m in model.modules()], how
        assert copied[8].mask_mode == "bits", how
        assert_close(copied(inputs()), expected)
        copied.train()(inputs(8)).sum().backward()  # and trains on
        assert int(copied[1].num_batches_tracked) == 4, how


def test_state_dict_moves_between_torch_and_fastreg_models():
    """What deploys a fastreg-trained model where fastreg is not installed: its state_dict (a
    weights_only checkpoint) loads into the torch.nn model, buffers and num_batches_tracked
    included, and back."""
    trained = fastreg_model(seed=0).train()
    for n in (4, 6):
        trained(inputs(n, seed=n)).sum().backward()
    buffer = io.BytesIO()
    torch.save(trained.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer)  # weights_only=True, torch's default
    plain = torch_model(seed=1)
    assert plain.load_state_dict(state) and list(plain.state_dict()) == list(state)
    assert int(plain[1].num_batches_tracked) == int(plain[6].num_batches_tracked) == 5
    x = inputs()
    assert_close(plain.eval()(x), trained.eval()(x))
    back = fastreg_model(seed=2)
    back.load_state_dict(plain.state_dict())
    assert_close(back(x), plain(x))
    assert all(torch.equal(a, b) for a, b in zip(back.state_dict().values(), state.values()))


# --- torch.export ---------------------------------------------------------------------------


def test_exported_programs_load_in_a_fresh_process_and_compute_the_eager_outputs(tmp_path):
    """torch.export.save/load (.pt2) of the eval model with a dynamic batch, and of the training
    model: the loading process needs `import fastreg` (it defines the fastreg::* ops the graph
    calls), then the eval program computes the torch model's outputs for any batch and the
    training program updates the running statistics as the eager model does."""
    model = fastreg_model()
    batch = torch.export.Dim("batch", min=2, max=64)
    torch.export.save(torch.export.export(model, (inputs(),), dynamic_shapes=({0: batch},)), tmp_path / "eval.pt2")
    torch.export.save(torch.export.export(copy.deepcopy(model).train(), (inputs(),)), tmp_path / "train.pt2")
    x = {n: inputs(n, seed=n) for n in (2, 7, 33)}
    torch.save(x, tmp_path / "x.pt")
    check_fresh(f"""
        x = torch.load({str(tmp_path / "x.pt")!r})
        module = torch.export.load({str(tmp_path / "eval.pt2")!r}).module()
        torch.save({{n: module(v) for n, v in x.items()}}, {str(tmp_path / "eval_out.pt")!r})
        module = torch.export.load({str(tmp_path / "train.pt2")!r}).module()
        module(x[7][:5])
        torch.save(module.state_dict(), {str(tmp_path / "train_state.pt")!r})
    """)
    outputs = torch.load(tmp_path / "eval_out.pt")
    reference = torch_model()
    for n, v in x.items():
        assert_close(outputs[n], reference(v))
    eager = copy.deepcopy(model).train()
    eager(x[7][:5])
    state = torch.load(tmp_path / "train_state.pt")
    for name in ("1.running_mean", "1.running_var", "1.num_batches_tracked"):  # before any dropout
        torch.testing.assert_close(state[name], eager.state_dict()[name])


@pytest.mark.filterwarnings("ignore:`torch.jit.*` is deprecated:DeprecationWarning")
def test_artifacts_loaded_without_import_fastreg_fail_naming_the_missing_op(tmp_path):
    """A .pt2 or TorchScript archive of a fastreg model calls fastreg's ops: loading it in a
    process that has not imported fastreg is torch's error for an unknown custom op, which names
    it (docs/architecture.md, "Deployment"). A torch.nn model, via the state_dict, needs none."""
    model = fastreg_model()
    torch.export.save(torch.export.export(model, (inputs(),)), tmp_path / "model.pt2")
    torch.jit.save(torch.jit.script(model), tmp_path / "scripted.pt")
    for load in ("torch.export.load", "torch.jit.load"):
        path = tmp_path / ("model.pt2" if load == "torch.export.load" else "scripted.pt")
        result = run_fresh(f"{load}({str(path)!r})", import_fastreg=False)
        assert result.returncode != 0, load
        assert "fastreg::batch_norm" in result.stderr or "fastreg.batch_norm" in result.stderr, result.stderr[-2000:]


# --- TorchScript ----------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:`torch.jit.*` is deprecated:DeprecationWarning")
def test_scripted_and_traced_models_load_in_a_fresh_process(tmp_path):
    """torch.jit.save of the scripted and of the traced eval model; loaded (after `import
    fastreg`), both compute the torch model's outputs, and the scripted one trains on (a traced
    graph keeps the mode it was traced in, as torch's does)."""
    model = fastreg_model()
    torch.jit.save(torch.jit.script(model), tmp_path / "scripted.pt")
    torch.jit.save(torch.jit.trace(model, (inputs(),)), tmp_path / "traced.pt")
    torch.save(inputs(7), tmp_path / "x.pt")
    check_fresh(f"""
        x = torch.load({str(tmp_path / "x.pt")!r})
        out = {{kind: torch.jit.load({str(tmp_path)!r} + "/" + kind + ".pt")(x) for kind in ("scripted", "traced")}}
        scripted = torch.jit.load({str(tmp_path / "scripted.pt")!r}).train()
        scripted(x).sum().backward()  # dropout's and batch norm's training ops and their gradients
        out["batches"] = scripted.state_dict()["1.num_batches_tracked"]
        out["grad"] = scripted.state_dict(keep_vars=True)["0.weight"].grad
        torch.save(out, {str(tmp_path / "out.pt")!r})
    """)
    out = torch.load(tmp_path / "out.pt")
    expected = torch_model()(inputs(7))
    assert_close(out["scripted"], expected)
    assert_close(out["traced"], expected)
    assert int(out["batches"]) == 4 and out["grad"] is not None


# --- torch.compile --------------------------------------------------------------------------


def test_compiled_model_follows_eval_train_eval_switches_as_torchs_does():
    """One graph per mode, as torch's model: eval outputs equal the eager model's, training
    updates the running statistics once per step."""
    results = []
    for build in (torch_model, fastreg_model):
        torch._dynamo.reset()
        model = build()
        graphs = CompileCounter()
        compiled = torch.compile(model, backend=graphs)
        evals = []
        for mode in ("eval", "train", "eval", "train", "eval"):
            getattr(model, mode)()
            y = compiled(inputs())
            if mode == "train":
                y.sum().backward()
            else:
                assert_close(y, model(inputs()))
                evals.append(y)
        assert int(model[1].num_batches_tracked) == 5
        results.append((graphs.frame_count, evals[0]))
    assert results[1][0] == results[0][0]
    assert_close(results[1][1], results[0][1])


# --- dynamic batch sizes once the compiled kernels have run ------------------------------------


def _train_one_eager_step(model: nn.Module) -> None:
    """What every training script does before it exports or compiles: an eager step, which
    loads the compiled library (and with it dropout's C++ autograd kernel)."""
    model.train()
    model(inputs(4)).sum().backward()
    model.zero_grad()


@pytest.mark.parametrize("strict", [False, True], ids=["nonstrict", "strict"])
def test_training_exports_with_a_dynamic_batch_after_an_eager_step(strict):
    """The C++ autograd kernel of fastreg::dropout read the output's concrete sizes (Dynamo's
    and export's fake tensors have symbolic ones), which specialised the batch dimension:
    "Constraints violated (batch)! ... specialized it to be a constant (5)". Export of the
    training model with a Dim worked only in a process that had not run the kernels yet."""
    use_kernels("cpu", ["dropout", "batch_norm_train"])
    model = fastreg_model()
    _train_one_eager_step(model)
    batch = torch.export.Dim("batch", min=2, max=64)
    program = torch.export.export(model, (inputs(5),), dynamic_shapes=({0: batch},), strict=strict)
    for n in (2, 7, 33):
        assert program.module()(inputs(n)).shape == (n, 4)


def test_compiled_training_makes_one_graph_for_every_batch_size_after_an_eager_step():
    """The same specialisation under torch.compile: one graph per batch size, up to Dynamo's
    recompile limit (8), after which the model ran eagerly. torch's model makes one graph."""
    use_kernels("cpu", ["dropout", "batch_norm_train"])
    for convert in (False, True):
        torch._dynamo.reset()
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 2))
        if convert:
            fastreg.convert(model)
        model(torch.randn(4, 8)).sum().backward()  # an eager step (it loads the kernels)
        graphs = CompileCounter()
        compiled = torch.compile(model, backend=graphs, dynamic=True, fullgraph=True)
        for n in (3, 5, 9, 17):
            compiled(torch.randn(n, 8)).sum().backward()
        assert graphs.frame_count == 1, "fastreg" if convert else "torch"


# --- AOTInductor ----------------------------------------------------------------------------


@pytest.mark.slow  # compiles C++: about 30 s on 2 cores
def test_aoti_package_runs_in_a_fresh_process_after_import_fastreg(tmp_path):
    """aoti_compile_and_package of the exported eval model (dynamic batch): the package calls
    fastreg::batch_norm_eval through torch's proxy executor, so the loading process imports
    fastreg first; it then computes the torch model's outputs. Without the import, torch's
    error names the op."""
    batch = torch.export.Dim("batch", min=2, max=64)
    program = torch.export.export(fastreg_model(), (inputs(),), dynamic_shapes=({0: batch},))
    package = torch._inductor.aoti_compile_and_package(program, package_path=str(tmp_path / "model.pt2"))
    torch.save(inputs(9), tmp_path / "x.pt")
    check_fresh(f"""
        module = torch._inductor.aoti_load_package({package!r})
        torch.save(module(torch.load({str(tmp_path / "x.pt")!r})), {str(tmp_path / "out.pt")!r})
    """)
    assert_close(torch.load(tmp_path / "out.pt"), torch_model()(inputs(9)))
    result = run_fresh(f"torch._inductor.aoti_load_package({package!r})", import_fastreg=False)
    assert result.returncode != 0 and "fastreg::batch_norm_eval" in result.stderr, result.stderr[-2000:]
