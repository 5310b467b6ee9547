"""Op definitions: schema, reference fallback, fake (meta) kernel and autograd, per op family."""

from . import (
    batch_norm,  # noqa: F401  (defines fastreg::batch_norm*)
    dropout,  # noqa: F401  (defines fastreg::dropout*)
    weight_penalty,  # noqa: F401  (defines fastreg::weight_penalty*)
)
