"""``fastreg.convert(model)``: swap torch.nn's regularization layers for fastreg's in place.

Only the exact torch.nn classes are swapped: a user's subclass may override ``forward`` with
its own meaning, and ``AlphaDropout``/``FeatureAlphaDropout`` are different operations.
"""

from __future__ import annotations

from torch import nn

from .functional import DEFAULT_MASK_MODE, _mask_mode
from .modules import batch_norm as fastreg_batch_norm
from .modules import dropout as fastreg_dropout

#: torch.nn class -> fastreg class taking the same constructor arguments
_REPLACEMENTS: dict[type[nn.Module], type[nn.Module]] = {
    nn.Dropout: fastreg_dropout.Dropout,
    nn.Dropout1d: fastreg_dropout.Dropout1d,
    nn.Dropout2d: fastreg_dropout.Dropout2d,
    nn.Dropout3d: fastreg_dropout.Dropout3d,
}

#: torch.nn class -> fastreg subclass that only overrides forward: swapped in place (same
#: object, parameters, buffers and hooks), since the instance state is exactly torch's.
_CLASS_SWAPS: dict[type[nn.Module], type[nn.Module]] = {
    nn.BatchNorm1d: fastreg_batch_norm.BatchNorm1d,
    nn.BatchNorm2d: fastreg_batch_norm.BatchNorm2d,
    nn.BatchNorm3d: fastreg_batch_norm.BatchNorm3d,
    nn.SyncBatchNorm: fastreg_batch_norm.SyncBatchNorm,
}


def _replacement(module: nn.Module, mask_mode: str) -> nn.Module | None:
    swap = _CLASS_SWAPS.get(type(module))
    if swap is not None:
        module.__class__ = swap
        return module
    cls = _REPLACEMENTS.get(type(module))
    if cls is None:
        return None
    kwargs = {"mask_mode": mask_mode} if cls is fastreg_dropout.Dropout else {}
    new = cls(module.p, module.inplace, **kwargs)
    new.train(module.training)
    # hooks registered on the old module keep working on the new one (with their flags)
    for name in _HOOK_DICTS:
        if hasattr(module, name):
            getattr(new, name).update(getattr(module, name))
    return new


_HOOK_DICTS = (
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_backward_hooks",
    "_backward_pre_hooks",
)


def convert(module: nn.Module, *, mask_mode: str = DEFAULT_MASK_MODE) -> nn.Module:
    """Replace every ``torch.nn.Dropout``/``Dropout1d``/``2d``/``3d`` inside ``module`` with the
    fastreg module of the same arguments and training mode, turn every ``torch.nn.BatchNorm1d``/
    ``2d``/``3d`` and ``SyncBatchNorm`` into fastreg's (the same object, its class swapped), and return ``module``.

    The model is changed in place (its parameters, buffers and ``state_dict`` are untouched);
    when ``module`` itself is a dropout layer, its replacement is returned. ``mask_mode``
    applies to the ``Dropout`` layers (see ``fastreg.Dropout``)."""
    _mask_mode(mask_mode)
    root = _replacement(module, mask_mode)
    if root is not None:
        return root
    replaced: dict[int, nn.Module] = {}  # a layer shared by two parents stays shared
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if id(child) not in replaced:
                new = _replacement(child, mask_mode)
                if new is None:
                    continue
                replaced[id(child)] = new
            setattr(parent, name, replaced[id(child)])
    return module
