"""fastreg: fused C++/CUDA regularization kernels for PyTorch.

Ops live in ``torch.ops.fastreg``; ``fastreg.functional`` and the modules are the user API.
Kernels are compiled at first use (or ahead of time) and fall back to the pure-PyTorch
reference, with one warning, where they cannot be built.
"""

from __future__ import annotations

from . import _loader, functional, ops, penalty, training  # noqa: F401  (ops defines torch.ops.fastreg.*)
from ._backends import backends
from .convert import convert
from .modules import BatchNorm1d, BatchNorm2d, BatchNorm3d, Dropout, Dropout1d, Dropout2d, Dropout3d, SyncBatchNorm
from .penalty import WeightPenalty, select_decay_parameters, weight_penalty
from .training import EarlyStopping

__version__ = "0.1.0"
__all__ = [
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "Dropout",
    "Dropout1d",
    "Dropout2d",
    "Dropout3d",
    "EarlyStopping",
    "SyncBatchNorm",
    "WeightPenalty",
    "backends",
    "convert",
    "functional",
    "select_decay_parameters",
    "weight_penalty",
]

_loader.check_aot_build_at_import()
