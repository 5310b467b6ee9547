"""Op definitions: schema, reference fallback, fake (meta) kernel and autograd, per op family."""

from . import (
    batch_norm,  # noqa: F401  (defines fastreg::batch_norm*)
    batch_norm_vmap,  # noqa: F401  (vmap of the running-statistics update)
    dropout,  # noqa: F401  (defines fastreg::dropout*)
    dropout_vmap,  # noqa: F401  (vmap's randomness= for fastreg::dropout and dropout_)
    weight_penalty,  # noqa: F401  (defines fastreg::weight_penalty*)
    weight_penalty_vmap,  # noqa: F401  (vmap of the penalty's tensor-list ops)
)
