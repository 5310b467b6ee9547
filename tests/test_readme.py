"""The README stays true: its Python examples run as written (on the CPU) and do what their
comments say, its two set-up commands exist, and every ``FASTREG_*`` setting that the code reads
is documented there.

The examples are one session: each block goes on from the names the earlier ones made. The
names a block takes from the reader's own code (``x``, ``criterion``, ``optimizer``, ...) come
from a prelude for that block; each block is found by a phrase in it, so that a README edit that
moves or drops an example fails here by name instead of running the wrong prelude.
"""

import math
import os
import re
import warnings
from pathlib import Path

import pytest
import torch

import fastreg

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def _code_blocks(language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", README, flags=re.S | re.M)


def _block(phrase: str) -> str:
    found = [block for block in _code_blocks("python") if phrase in block]
    assert len(found) == 1, f"README: expected one python example containing {phrase!r}, found {len(found)}"
    return found[0]


def _run(block: str, namespace: dict) -> None:
    exec(compile(block, "README.md", "exec"), namespace)


def _dense_model_inputs(namespace: dict, batch: int = 8) -> None:
    generator = torch.Generator().manual_seed(1)
    namespace["x"] = torch.randn(batch, 512, generator=generator)
    namespace["y"] = torch.randn(batch, 512, generator=generator)


@pytest.fixture(scope="module")
def session():
    """Runs the examples in README order in one namespace; each test checks one of them."""
    torch.manual_seed(0)
    ns: dict = {}
    results = {}

    _run(_block("fastreg.Dropout(p=0.1)"), ns)
    results["dropout"] = dict(ns)

    _dense_model_inputs(ns)
    ns["criterion"] = torch.nn.MSELoss()
    ns["optimizer"] = torch.optim.SGD(ns["model"].parameters(), lr=0.1)
    weights_before = [p.detach().clone() for p in ns["model"].parameters()]
    _run(_block("fastreg.weight_penalty(decay"), ns)
    results["penalty"] = dict(ns, weights_before=weights_before)

    generator = torch.Generator().manual_seed(2)
    ns["x"] = torch.randn(4, 64, 5, 5, generator=generator) * 3 + 1
    ns["running_mean"], ns["running_var"] = torch.zeros(64), torch.ones(64)
    ns["weight"], ns["bias"] = torch.rand(64, generator=generator) + 0.5, torch.randn(64, generator=generator)
    inputs = {k: ns[k].clone() for k in ("x", "running_mean", "running_var", "weight", "bias")}
    _run(_block("fastreg.BatchNorm2d(64)"), ns)
    results["batch_norm"] = dict(ns, inputs=inputs)

    _dense_model_inputs(ns, batch=3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _run(_block("per_sample_grads"), ns)
    results["func"] = dict(ns, warnings=[str(w.message) for w in caught])

    # A validation loss that improves for 5 epochs, then stays flat: the stopper must stop 6
    # epochs after the best one and give back the best epoch's weights.
    losses = iter([1.0, 0.8, 0.6, 0.5, 0.412] + [0.5] * 100)
    model = ns["model"]
    epoch_weights = []

    def train_one_epoch():
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1.0)
        epoch_weights.append([p.detach().clone() for p in model.parameters()])

    ns["train_one_epoch"], ns["evaluate"] = train_one_epoch, lambda: next(losses)
    _run(_block("fastreg.EarlyStopping(model"), ns)
    results["early_stopping"] = dict(ns, epoch_weights=epoch_weights)
    return results


def test_dropout_example_builds_fastreg_layers_and_drops(session):
    ns = session["dropout"]
    assert isinstance(ns["model"][1], fastreg.Dropout) and ns["model"][1].p == 0.1
    assert ns["drop"].mask_mode == "bits"
    y = ns["y"]
    assert y.shape == (64, 512)
    kept = y != 0
    assert 0.05 < 1 - kept.float().mean().item() < 0.15  # p = 0.1
    assert ns["h"].shape == (64, 512) and (ns["h"] >= 0).all()


def test_weight_penalty_example_adds_the_formulas_gradient_and_value(session):
    ns = session["penalty"]
    decay = ns["decay"]
    linear = ns["model"][0]
    assert len(decay) == 1 and decay[0] is linear.weight  # no bias
    before = ns["weights_before"][0]
    naive = 1e-5 * before.abs().sum() + 1e-4 * (before**2).sum()
    torch.testing.assert_close(ns["penalty_value"], naive, rtol=1e-6, atol=0)
    # optimizer.step() moved the weight by lr * (loss gradient + penalty gradient): the penalty
    # part is 1e-5 * sign(w) + 2e-4 * w
    assert not torch.equal(linear.weight.detach(), before)


def test_batch_norm_example_matches_torch(session):
    ns = session["batch_norm"]
    inputs = ns["inputs"]
    assert isinstance(ns["bn"], fastreg.BatchNorm2d)
    running_mean, running_var = inputs["running_mean"].clone(), inputs["running_var"].clone()
    expected = torch.nn.functional.batch_norm(
        inputs["x"], running_mean, running_var, inputs["weight"], inputs["bias"], training=True
    )
    torch.testing.assert_close(ns["y"], expected)
    torch.testing.assert_close(ns["running_mean"], running_mean)
    torch.testing.assert_close(ns["running_var"], running_var)


def test_torch_func_example_gives_one_gradient_per_sample(session):
    ns = session["func"]
    grads = ns["per_sample_grads"]
    assert set(grads) == set(ns["params"])
    for name, g in grads.items():
        assert g.shape == (3, *ns["params"][name].shape), name
    # randomness="different": each sample has its own dropout mask, so no two weight gradients agree
    weight_grads = grads["0.weight"]
    assert not torch.equal(weight_grads[0], weight_grads[1])
    assert ns["warnings"] == []  # e.g. none of vmap's "performance drop" for an op without a vmap rule


def test_early_stopping_example_stops_as_its_comment_says_and_restores_the_best(session, capsys):
    ns = session["early_stopping"]
    stopper = ns["stopper"]
    assert stopper.should_stop and stopper.stopped_epoch == 11 and stopper.best_epoch == 5
    assert stopper.reason == "no improvement in 6 epochs since epoch 5 (best 0.412)"
    comment = re.search(r'# e\.g\. "(.*)"', _block("fastreg.EarlyStopping(model")).group(1)
    assert re.fullmatch(r"no improvement in 6 epochs since epoch \d+ \(best [\d.]+\)", comment), comment
    for restored, best in zip(ns["model"].parameters(), ns["epoch_weights"][4], strict=True):
        assert torch.equal(restored.detach(), best)
    assert not math.isnan(stopper.best)


def test_setup_commands_exist_and_are_executable():
    commands = [line.split()[0] for line in _code_blocks("bash")[0].splitlines() if line.strip()]
    assert commands == ["./scripts/bench.sh", "./scripts/test.sh"]
    for command in commands:
        path = ROOT / command
        assert path.is_file() and os.access(path, os.X_OK), command


_SETTING_READS = [
    (("fastreg", "*.py"), r"os\.environ(?:\.get\(|\[)\s*\"(FASTREG_\w+)\""),
    (("setup.py",), r"os\.environ(?:\.get\(|\[)\s*\"(FASTREG_\w+)\""),
    (("csrc", "**/*"), r"getenv\(\"(FASTREG_\w+)\"\)"),
    (("scripts", "*.sh"), r"\$\{(FASTREG_\w+)"),
]


def _settings_read() -> dict[str, str]:
    found = {}
    for where, pattern in _SETTING_READS:
        paths = [ROOT / where[0]] if len(where) == 1 else sorted((ROOT / where[0]).glob(where[1]))
        for path in paths:
            if path.is_file() and path.suffix in (".py", ".sh", ".h", ".cpp", ".cu", ".cuh"):
                for name in re.findall(pattern, path.read_text()):
                    found.setdefault(name, str(path.relative_to(ROOT)))
    return found


def test_every_setting_the_code_reads_is_documented_in_the_readme():
    settings = _settings_read()
    # the scan must see the settings it is meant to: one from each kind of file
    assert {"FASTREG_BACKEND", "FASTREG_BUILD_OPS", "FASTREG_CPU_ISA", "FASTREG_VENV"} <= set(settings)
    undocumented = {name: path for name, path in settings.items() if f"`{name}" not in README}
    assert not undocumented, f"read by the code but not in README.md: {undocumented}"
