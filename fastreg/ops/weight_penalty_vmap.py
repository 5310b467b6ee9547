"""``torch.func.vmap`` of ``weight_penalty_value`` and ``weight_penalty_backward``.

vmap's generic fallback takes no ``Tensor[]`` argument ("could not generate a fallback"), so a
penalty over an ensemble's stacked parameters (``vmap`` over ``functional_call``) had no vmap.
These rules run the op once per sample on that sample's tensors (one multi-tensor pass each)
and stack the results: the value of sample i is the op's value on the parameters of sample i,
bit for bit; over a batch of no samples, the outputs are empty (``vmap_empty_batch``). The
``*_tensor_coefficients`` twins (torch.compile's form) have the same rules.
``weight_penalty_grad_`` writes ``.grad``-like buffers in place and has no rule.
"""

from __future__ import annotations

import torch

from .vmap_empty_batch import empty_stack, first_batched, sample_on_meta


def _sample(params, dims, i: int) -> list[torch.Tensor]:
    return [p if d is None else p.select(d, i) for p, d in zip(params, dims)]


def _value_vmap(name: str):
    op = getattr(torch.ops.fastreg, name)

    def rule(info, in_dims, params, l1, l2):
        # l1 and l2 as given: a coefficient tensor batched by vmap has more than one element,
        # which the tensor-coefficient op refuses
        dims = in_dims[0]
        if not info.batch_size:
            return empty_stack(first_batched([params], [dims]), op(sample_on_meta(params, dims), l1, l2)), 0
        values = [op(_sample(params, dims, i), l1, l2) for i in range(info.batch_size)]
        return torch.stack(values), 0

    torch.library.register_vmap(f"fastreg::{name}", rule)


def _backward_vmap(name: str):
    op = getattr(torch.ops.fastreg, name)

    def rule(info, in_dims, grad_output, params, l1, l2):
        go_dim, dims = in_dims[0], in_dims[1]
        if not info.batch_size:
            like = first_batched((grad_output, params), in_dims)
            shapes = op(sample_on_meta(grad_output, go_dim), sample_on_meta(params, dims), l1, l2)
            return [empty_stack(like, t) for t in shapes], [0] * len(shapes)
        per_sample = [
            op(grad_output if go_dim is None else grad_output.select(go_dim, i), _sample(params, dims, i), l1, l2)
            for i in range(info.batch_size)
        ]
        grads = [torch.stack(list(parts)) for parts in zip(*per_sample)]
        return grads, [0] * len(grads)

    torch.library.register_vmap(f"fastreg::{name}", rule)


_value_vmap("weight_penalty_value")
_value_vmap("weight_penalty_value_tensor_coefficients")
_backward_vmap("weight_penalty_backward")
_backward_vmap("weight_penalty_backward_tensor_coefficients")
