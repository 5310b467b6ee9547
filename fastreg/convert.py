"""``fastreg.convert(model)``: swap torch.nn's regularization layers for fastreg's in place.

Only the exact torch.nn classes are swapped: a user's subclass may override ``forward`` with
its own meaning, and ``AlphaDropout``/``FeatureAlphaDropout`` are different operations.
"""

from __future__ import annotations

from torch import nn

from .functional import DEFAULT_MASK_MODE, _mask_mode
from .modules import batch_norm as fastreg_batch_norm
from .modules import dropout as fastreg_dropout

#: torch.nn class -> fastreg subclass that only overrides forward (and, for Dropout, adds
#: mask_mode): swapped in place, so the layer stays the same object with the same parameters,
#: buffers, hooks (and their removal handles), state-dict hooks and attributes.
_CLASS_SWAPS: dict[type[nn.Module], type[nn.Module]] = {
    nn.Dropout: fastreg_dropout.Dropout,
    nn.Dropout1d: fastreg_dropout.Dropout1d,
    nn.Dropout2d: fastreg_dropout.Dropout2d,
    nn.Dropout3d: fastreg_dropout.Dropout3d,
    nn.BatchNorm1d: fastreg_batch_norm.BatchNorm1d,
    nn.BatchNorm2d: fastreg_batch_norm.BatchNorm2d,
    nn.BatchNorm3d: fastreg_batch_norm.BatchNorm3d,
    nn.SyncBatchNorm: fastreg_batch_norm.SyncBatchNorm,
}


def _swap_class(module: nn.Module, mask_mode: str) -> None:
    swap = _CLASS_SWAPS.get(type(module))
    if swap is None:
        return
    if swap is fastreg_dropout.Dropout:
        module.mask_mode = mask_mode
    module.__class__ = swap


def convert(module: nn.Module, *, mask_mode: str = DEFAULT_MASK_MODE) -> nn.Module:
    """Turn every ``torch.nn.Dropout``/``Dropout1d``/``2d``/``3d``, ``BatchNorm1d``/``2d``/``3d``
    and ``SyncBatchNorm`` inside ``module`` (``module`` itself included) into fastreg's layer
    of the same arguments, and return ``module``.

    Each layer stays the same object, its class swapped: parameters, buffers, ``state_dict``,
    training mode, hooks (and the handles that remove them) and attributes are untouched, and
    a layer shared by two parents stays shared. ``mask_mode`` applies to the ``Dropout``
    layers (see ``fastreg.Dropout``)."""
    _mask_mode(mask_mode)
    for layer in list(module.modules()):  # modules() yields a layer shared by two parents once
        _swap_class(layer, mask_mode)
    return module
