"""Training-loop helpers that go with the regularizers: early stopping on a validation metric.

:class:`EarlyStopping` decides "better" exactly as ``torch.optim.lr_scheduler.ReduceLROnPlateau``
does (``mode``, ``threshold``, ``threshold_mode``), so one validation metric can drive both
the learning-rate reduction and the stop::

    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, patience=2)
    stopper = fastreg.EarlyStopping(model, patience=6, restore_best=True)
    for epoch in range(max_epochs):
        train_one_epoch()
        val_loss = evaluate()
        scheduler.step(val_loss)
        if stopper.step(val_loss):
            break
    stopper.restore_best_weights()     # the weights of the best epoch, not the last one

``patience`` counts as in Keras and Lightning: training stops after ``patience`` epochs in a
row without improvement (``ReduceLROnPlateau`` acts one epoch later, after ``patience + 1``).
"""

from __future__ import annotations

import math
import numbers

import torch
from torch import nn

__all__ = ["EarlyStopping"]

_MODES = ("min", "max")
_THRESHOLD_MODES = ("rel", "abs")


def _metric_value(metric, where: str) -> float:
    if isinstance(metric, torch.Tensor):
        if metric.numel() != 1:
            raise ValueError(
                f"{where} must be a number or a one-element tensor, got a tensor of shape {tuple(metric.shape)}"
            )
        if metric.is_complex():
            raise TypeError(f"{where} is a complex tensor; pass a real number")
        return float(metric.detach().item())
    if hasattr(metric, "__array__") and getattr(metric, "size", None) == 1 and hasattr(metric, "item"):
        metric = metric.item()  # a one-element NumPy array, which ReduceLROnPlateau takes too
    if isinstance(metric, bool) or not isinstance(metric, numbers.Real):
        raise TypeError(f"{where} must be a real number or a one-element tensor, got {type(metric).__name__}")
    return float(metric)


class EarlyStopping:
    """Stop training when a monitored metric has stopped improving.

    Args:
        module: the model whose best weights to keep (needed for ``restore_best=True``).
        mode: ``"min"`` (a loss) or ``"max"`` (an accuracy).
        patience: epochs in a row without improvement after which :meth:`step` returns True.
        threshold: how much better than the best a value must be to count as an improvement.
        threshold_mode: ``"abs"``: better than ``best -/+ threshold`` (Keras' ``min_delta``);
            ``"rel"``: better than ``best * (1 -/+ threshold)``, as in ``ReduceLROnPlateau``.
        min_epochs: never stop for lack of improvement before this many calls of :meth:`step`
            (a non-finite metric still stops at once with ``stop_on_nonfinite``: the run diverged).
        baseline: a value the metric must beat to count as an improvement at all; training
            stops after ``patience`` epochs that do not beat it.
        restore_best: keep a copy of ``module.state_dict()`` from the best epoch for
            :meth:`restore_best_weights`.
        snapshot_device: where that copy lives; the CPU by default, so that it costs no
            accelerator memory. ``None`` keeps each tensor on its own device.
        stop_on_nonfinite: stop at once when the metric is NaN or infinite (a diverged run)
            instead of counting it as an epoch without improvement.
    """

    def __init__(
        self,
        module: nn.Module | None = None,
        *,
        mode: str = "min",
        patience: int = 10,
        threshold: float = 0.0,
        threshold_mode: str = "abs",
        min_epochs: int = 0,
        baseline: float | None = None,
        restore_best: bool = False,
        snapshot_device: torch.device | str | None = "cpu",
        stop_on_nonfinite: bool = True,
    ) -> None:
        if mode not in _MODES:
            raise ValueError(f"EarlyStopping: mode must be 'min' or 'max', got {mode!r}")
        if threshold_mode not in _THRESHOLD_MODES:
            raise ValueError(f"EarlyStopping: threshold_mode must be 'rel' or 'abs', got {threshold_mode!r}")
        for name, value in (("patience", patience), ("min_epochs", min_epochs)):
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
                raise ValueError(f"EarlyStopping: {name} must be an integer >= 0, got {value!r}")
        if isinstance(threshold, bool) or not isinstance(threshold, numbers.Real) or not threshold >= 0:
            raise ValueError(f"EarlyStopping: threshold must be a number >= 0, got {threshold!r}")
        if threshold_mode == "rel" and mode == "min" and threshold >= 1:
            # best * (1 - threshold) <= 0: only a metric below 0 (or no finite one) would ever count
            raise ValueError(
                f"EarlyStopping: threshold must be < 1 with threshold_mode='rel' and mode='min', got {threshold!r}"
            )
        if baseline is not None and not math.isfinite(_metric_value(baseline, "EarlyStopping: baseline")):
            raise ValueError(f"EarlyStopping: baseline must be finite, got {baseline!r}")
        if module is not None and not isinstance(module, nn.Module):
            raise TypeError(f"EarlyStopping: module must be an nn.Module, got {type(module).__name__}")
        if restore_best and module is None:
            raise ValueError("EarlyStopping: restore_best=True needs the module whose weights to keep")
        self.module = module
        self.mode = mode
        self.patience = int(patience)
        self.threshold = float(threshold)
        self.threshold_mode = threshold_mode
        self.min_epochs = int(min_epochs)
        self.baseline = None if baseline is None else _metric_value(baseline, "EarlyStopping: baseline")
        self.restore_best = bool(restore_best)
        self.snapshot_device = None if snapshot_device is None else torch.device(snapshot_device)
        self.stop_on_nonfinite = bool(stop_on_nonfinite)
        self.reset()

    def reset(self) -> None:
        """Forget the history: the next :meth:`step` is epoch 1 again."""
        self.epoch = 0
        self.best = self._worst() if self.baseline is None else self.baseline
        self.best_epoch: int | None = None
        self.num_bad_epochs = 0
        self.stopped_epoch: int | None = None
        self.reason: str | None = None
        self._best_state: dict[str, torch.Tensor] | None = None

    def _worst(self) -> float:
        return math.inf if self.mode == "min" else -math.inf

    def is_better(self, value: float, best: float) -> bool:
        """Whether ``value`` improves on ``best`` (ReduceLROnPlateau's rule)."""
        if self.threshold_mode == "rel":
            factor = 1.0 - self.threshold if self.mode == "min" else 1.0 + self.threshold
            return value < best * factor if self.mode == "min" else value > best * factor
        return value < best - self.threshold if self.mode == "min" else value > best + self.threshold

    @property
    def should_stop(self) -> bool:
        return self.stopped_epoch is not None

    def step(self, metric) -> bool:
        """Record one epoch's metric; returns True once training should stop (and after)."""
        value = _metric_value(metric, "EarlyStopping.step: metric")
        if self.should_stop:
            return True
        self.epoch += 1
        if not math.isfinite(value) and self.stop_on_nonfinite:
            self._stop(f"the metric is {value} at epoch {self.epoch}")
            return True
        if self.is_better(value, self.best):
            self.best = value
            self.best_epoch = self.epoch
            self.num_bad_epochs = 0
            if self.restore_best:
                self._best_state = self._snapshot()
        else:
            self.num_bad_epochs += 1
        if self.num_bad_epochs >= max(1, self.patience) and self.epoch >= self.min_epochs:
            if self.best_epoch is not None:
                since = f"since epoch {self.best_epoch} (best {self.best:g})"
            elif self.baseline is not None:
                since = f"on the baseline {self.baseline:g}"
            else:
                since = "and no finite value yet"
            self._stop(f"no improvement in {self.num_bad_epochs} epochs {since}")
        return self.should_stop

    def _stop(self, reason: str) -> None:
        self.stopped_epoch = self.epoch
        self.reason = reason

    def _snapshot(self) -> dict[str, torch.Tensor]:
        # Copies, not references: the optimizer goes on changing the live tensors in place.
        out = {}
        for name, value in self.module.state_dict().items():
            if isinstance(value, torch.Tensor):
                value = value.detach()
                value = value.to(self.snapshot_device, copy=True) if self.snapshot_device is not None else value.clone()
            out[name] = value
        return out

    def restore_best_weights(self) -> None:
        """Load the best epoch's weights into the module (``restore_best=True`` needed)."""
        if not self.restore_best:
            raise RuntimeError("EarlyStopping.restore_best_weights: construct it with restore_best=True")
        if self._best_state is None:
            raise RuntimeError("EarlyStopping.restore_best_weights: no epoch has improved on the start value yet")
        self.module.load_state_dict(self._best_state)

    @property
    def best_state(self) -> dict[str, torch.Tensor] | None:
        """The best epoch's ``state_dict`` copy (``restore_best=True``), or None before any improvement."""
        return self._best_state

    _STATE_KEYS = ("epoch", "best", "best_epoch", "num_bad_epochs", "stopped_epoch", "reason")

    def state_dict(self) -> dict:
        """The progress, for checkpoints (with the best weights when ``restore_best``)."""
        state = {key: getattr(self, key) for key in self._STATE_KEYS}
        state["best_state"] = self._best_state
        return state

    def load_state_dict(self, state: dict) -> None:
        missing = [key for key in (*self._STATE_KEYS, "best_state") if key not in state]
        if missing:
            raise KeyError(f"EarlyStopping.load_state_dict: missing keys {missing}")
        if self.restore_best and state["best_state"] is None and state["best_epoch"] is not None:
            # restore_best_weights would say no epoch had improved, which is not what happened
            raise ValueError(
                "EarlyStopping.load_state_dict: the state has a best epoch but not its weights (it comes from "
                "an EarlyStopping without restore_best=True); this one was built with restore_best=True"
            )
        for key in self._STATE_KEYS:
            setattr(self, key, state[key])
        self._best_state = state["best_state"]

    def __repr__(self) -> str:
        return (
            f"EarlyStopping(mode={self.mode!r}, patience={self.patience}, threshold={self.threshold}, "
            f"threshold_mode={self.threshold_mode!r}, epoch={self.epoch}, best={self.best}, "
            f"num_bad_epochs={self.num_bad_epochs}, stopped={self.should_stop})"
        )
