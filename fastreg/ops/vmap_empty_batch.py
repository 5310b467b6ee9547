"""What an op gives under ``vmap`` over a batch of no samples, for the per-sample vmap rules.

A per-sample rule stacks one call's outputs per sample; with no samples there is no call to
take the shapes from, and ``torch.stack`` of nothing fails. The shapes come instead from one
call of the op on the meta device (its fake kernel, which checks the arguments as a real call
would), and each output is an empty stack of them on the device of the batched inputs.
"""

from __future__ import annotations

import torch


def sample_on_meta(arg, dim):
    """One sample of a vmap rule's argument, on the meta device: a tensor without its batch dim
    ``dim`` (None: not batched), a list of tensors with a dim each, anything else as it is."""
    if isinstance(arg, torch.Tensor):
        shape = arg.shape if dim is None else arg.shape[:dim] + arg.shape[dim + 1 :]
        return torch.empty(shape, dtype=arg.dtype, device="meta")
    if isinstance(arg, (list, tuple)) and all(isinstance(a, torch.Tensor) for a in arg):
        return [sample_on_meta(a, d) for a, d in zip(arg, dim if dim is not None else [None] * len(arg))]
    return arg


def empty_stack(like: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
    """No samples of ``sample``'s shape and dtype, on ``like``'s device."""
    return like.new_empty((0, *sample.shape), dtype=sample.dtype)


def first_batched(args, in_dims) -> torch.Tensor:
    """A tensor that vmap batched (where a rule's empty outputs get their device)."""
    for arg, dim in zip(args, in_dims):
        if isinstance(arg, torch.Tensor) and dim is not None:
            return arg
        if isinstance(arg, (list, tuple)) and dim is not None:
            for a, d in zip(arg, dim):
                if d is not None:
                    return a
    raise AssertionError("a vmap rule ran with no batched argument")
