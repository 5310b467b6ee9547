"""What an op that overwrites a tensor owes autograd, which torch gives its own in-place ops.

The kernels of fastreg's mutating ops (``dropout_``, ``weight_penalty_grad_``) record no
backward: ``dropout_``'s autograd kernels (``InplaceDropout``, and its C++ twin) call them with
grad mode off, and ``weight_penalty_grad_`` has none by design. Reached with grad mode on, they
must refuse a tensor whose backward they would lose, and they bump the version counter of what
they overwrite, so that autograd refuses a backward that needs the old values instead of
reading the new ones. The C++ glue does the same (csrc/common/tensor_glue.h), with the same
messages.
"""

from __future__ import annotations

import torch


def check_overwritable(t: torch.Tensor, op: str, name: str, differentiable_form: str) -> None:
    if t.requires_grad and torch.is_grad_enabled():
        raise RuntimeError(
            f"{op}: overwrites {name}, which requires grad here, and records no backward; "
            f"use {differentiable_form}, or call it under torch.no_grad()"
        )


def bump_version(t: torch.Tensor) -> None:
    torch.autograd.graph.increment_version(t)
