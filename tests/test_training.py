"""fastreg.EarlyStopping: the stop rule, its agreement with ReduceLROnPlateau, best weights, checkpoints."""

from __future__ import annotations

import copy
import math

import pytest
import torch

import fastreg


def _run(stopper, values):
    """Feeds values until the stopper says stop; returns the epoch it stopped at (or None)."""
    for value in values:
        if stopper.step(value):
            return stopper.epoch
    return None


@pytest.mark.parametrize("patience", [0, 1, 3])
def test_stops_after_patience_epochs_without_improvement(patience):
    values = [5.0, 4.0, 3.0] + [3.0 + 0.1 * k for k in range(1, 10)]
    stopper = fastreg.EarlyStopping(patience=patience)
    # Epoch 3 is the best; epochs 4, 5, ... are worse: the stop comes `patience` of them later (at least one).
    assert _run(stopper, values) == 3 + max(1, patience)
    assert stopper.best == 3.0 and stopper.best_epoch == 3
    assert stopper.should_stop and "since epoch 3" in stopper.reason
    assert stopper.step(0.0) is True  # stays stopped, history unchanged
    assert stopper.best == 3.0


def test_max_mode_and_improvement_resets_the_count():
    stopper = fastreg.EarlyStopping(mode="max", patience=3)
    for value in [0.5, 0.4, 0.45, 0.6, 0.55, 0.58]:  # 0.6 at epoch 4 resets the count of bad epochs
        assert not stopper.step(value)
    assert stopper.num_bad_epochs == 2 and stopper.best == 0.6
    assert stopper.step(0.59)
    assert stopper.stopped_epoch == 7


@pytest.mark.parametrize("mode", ["min", "max"])
@pytest.mark.parametrize("threshold_mode, threshold", [("rel", 1e-4), ("rel", 0.05), ("abs", 0.0), ("abs", 0.02)])
def test_improvement_rule_is_reduce_lr_on_plateaus(mode, threshold_mode, threshold):
    # A noisy plateau, with negative values too (where "rel" has its quirks): each epoch, both
    # must agree on whether it improved, i.e. on the count of bad epochs.
    gen = torch.Generator().manual_seed(7)
    values = (torch.linspace(1.0, -0.2, 200) + 0.05 * torch.randn(200, generator=gen)).tolist()
    best_so_far = min(values[:50]) if mode == "min" else max(values[:50])
    values[50:60] = [best_so_far] * 10  # exact ties with the best are not improvements
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, mode=mode, threshold=threshold, threshold_mode=threshold_mode, patience=10**6
    )
    stopper = fastreg.EarlyStopping(mode=mode, threshold=threshold, threshold_mode=threshold_mode, patience=10**6)
    for value in values:
        scheduler.step(value)
        stopper.step(value)
        assert stopper.num_bad_epochs == scheduler.num_bad_epochs
        assert stopper.best == scheduler.best


def test_threshold_abs_needs_a_margin():
    stopper = fastreg.EarlyStopping(patience=2, threshold=0.1)
    assert _run(stopper, [1.0, 0.95, 0.91, 0.85]) == 3  # 0.95 and 0.91 are within 0.1 of 1.0


def test_min_epochs_delays_the_stop():
    stopper = fastreg.EarlyStopping(patience=1, min_epochs=4)
    assert _run(stopper, [1.0, 2.0, 2.0, 2.0, 2.0]) == 4


def test_baseline_must_be_beaten():
    stopper = fastreg.EarlyStopping(mode="max", patience=3, baseline=0.9)
    assert _run(stopper, [0.5, 0.8, 0.85, 0.95]) == 3
    assert stopper.best_epoch is None and "baseline 0.9" in stopper.reason
    stopper = fastreg.EarlyStopping(mode="max", patience=3, baseline=0.9)
    assert _run(stopper, [0.5, 0.8, 0.95, 0.9, 0.9]) is None
    assert stopper.best_epoch == 3


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_nonfinite_metric_stops_at_once(bad):
    stopper = fastreg.EarlyStopping(patience=5)
    assert _run(stopper, [1.0, 0.9, bad, 0.1]) == 3
    assert str(bad) in stopper.reason
    assert stopper.best == 0.9


def test_nonfinite_counts_as_bad_when_asked():
    stopper = fastreg.EarlyStopping(patience=2, stop_on_nonfinite=False)
    assert _run(stopper, [1.0, math.nan, 0.5, math.nan, math.nan, 0.1]) == 5
    stopper = fastreg.EarlyStopping(patience=2, stop_on_nonfinite=False)
    assert _run(stopper, [math.nan, math.nan]) == 2 and "no finite value" in stopper.reason


def test_tensor_metrics():
    stopper = fastreg.EarlyStopping(patience=1)
    stopper.step(torch.tensor(2.0))
    stopper.step(torch.tensor([1.5], dtype=torch.float64))
    assert stopper.best == 1.5 and isinstance(stopper.best, float)
    with pytest.raises(ValueError, match=r"one-element tensor, got a tensor of shape \(2,\)"):
        stopper.step(torch.ones(2))
    with pytest.raises(TypeError, match="real number"):
        stopper.step("0.5")
    with pytest.raises(TypeError, match="complex"):
        stopper.step(torch.tensor(1 + 1j))
    assert stopper.epoch == 2  # the refused calls did not count


def test_numpy_metrics():
    np = pytest.importorskip("numpy")
    stopper = fastreg.EarlyStopping(patience=1)
    for value in (np.float32(3.0), np.array(2.5), np.array([2.0])):  # as ReduceLROnPlateau takes them
        stopper.step(value)
    assert stopper.best == 2.0 and stopper.epoch == 3
    with pytest.raises(TypeError, match="real number"):
        stopper.step(np.array([1.0, 2.0]))


def test_relative_threshold_of_one_is_fine_in_max_mode():
    stopper = fastreg.EarlyStopping(mode="max", threshold=1.0, threshold_mode="rel", patience=1)
    assert not stopper.step(1.0) and stopper.step(1.5)  # 1.5 is not 100% better than 1.0
    assert stopper.best == 1.0


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"mode": "lowest"}, ValueError, "mode must be 'min' or 'max'"),
        ({"threshold_mode": "pct"}, ValueError, "threshold_mode"),
        ({"patience": -1}, ValueError, "patience must be an integer >= 0"),
        ({"patience": 2.5}, ValueError, "patience must be an integer"),
        ({"min_epochs": -3}, ValueError, "min_epochs"),
        ({"threshold": -0.1}, ValueError, "threshold must be a number >= 0"),
        ({"threshold": math.nan}, ValueError, "threshold"),
        ({"threshold": 1.0, "threshold_mode": "rel"}, ValueError, "threshold must be < 1 with threshold_mode='rel'"),
        ({"baseline": math.inf}, ValueError, "baseline must be finite"),
        ({"restore_best": True}, ValueError, "needs the module"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        fastreg.EarlyStopping(**kwargs)


def test_module_must_be_a_module():
    with pytest.raises(TypeError, match="nn.Module"):
        fastreg.EarlyStopping([torch.zeros(1)])


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 3), fastreg.BatchNorm1d(3))


@pytest.mark.parametrize("snapshot_device", ["cpu", None])
def test_restore_best_weights_brings_back_the_best_epoch(snapshot_device):
    model = _model()
    stopper = fastreg.EarlyStopping(model, patience=2, restore_best=True, snapshot_device=snapshot_device)
    with pytest.raises(RuntimeError, match="no epoch has improved"):
        stopper.restore_best_weights()
    states = []
    for value in [3.0, 1.0, 2.0, 2.5]:
        with torch.no_grad():  # an optimizer step and a batch norm forward: in-place updates
            for p in model.parameters():
                p.add_(torch.randn_like(p))
            model.train()(torch.randn(8, 4))
        states.append(copy.deepcopy(model.state_dict()))
        if stopper.step(value):
            break
    assert stopper.stopped_epoch == 4 and stopper.best_epoch == 2
    assert not torch.equal(model[0].weight, states[1]["0.weight"])
    stopper.restore_best_weights()
    for name, value in model.state_dict().items():
        assert torch.equal(value, states[1][name]), name  # weights, running stats, num_batches_tracked


def test_restore_needs_restore_best():
    stopper = fastreg.EarlyStopping(_model())
    stopper.step(1.0)
    assert stopper.best_state is None
    with pytest.raises(RuntimeError, match="restore_best=True"):
        stopper.restore_best_weights()


def test_state_dict_resumes_the_same_decisions():
    values = [5.0, 4.0, 4.5, 3.0, 3.5, 3.2, 3.1, 3.05]
    whole = fastreg.EarlyStopping(patience=4)
    expected = _run(whole, values)
    assert expected == 8
    first = fastreg.EarlyStopping(patience=4)
    assert _run(first, values[:5]) is None
    resumed = fastreg.EarlyStopping(patience=4)
    resumed.load_state_dict(first.state_dict())
    assert _run(resumed, values[5:]) == expected
    assert resumed.reason == whole.reason
    with pytest.raises(KeyError, match="missing keys"):
        resumed.load_state_dict({"epoch": 1})


def test_state_without_best_weights_is_refused_by_a_restoring_stopper():
    plain = fastreg.EarlyStopping(_model())
    plain.step(1.0)
    restoring = fastreg.EarlyStopping(_model(), restore_best=True)
    with pytest.raises(ValueError, match="has a best epoch but not its weights"):
        restoring.load_state_dict(plain.state_dict())
    assert restoring.epoch == 0  # nothing loaded
    restoring.load_state_dict(fastreg.EarlyStopping(_model()).state_dict())  # no best epoch yet: fine


def test_reset_forgets_the_history():
    stopper = fastreg.EarlyStopping(patience=1)
    assert _run(stopper, [1.0, 2.0]) == 2
    stopper.reset()
    assert not stopper.should_stop and stopper.epoch == 0 and stopper.best == math.inf
    assert _run(stopper, [5.0, 4.0, 4.0]) == 3
