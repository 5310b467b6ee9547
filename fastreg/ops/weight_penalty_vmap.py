"""``torch.func.vmap`` of ``weight_penalty_value`` and ``weight_penalty_backward``.

vmap's generic fallback takes no ``Tensor[]`` argument ("could not generate a fallback"), so a
penalty over an ensemble's stacked parameters (``vmap`` over ``functional_call``) had no vmap.
These rules run the op once per sample on that sample's tensors (one multi-tensor pass each)
and stack the results: the value of sample i is the op's value on the parameters of sample i,
bit for bit. ``weight_penalty_grad_`` writes ``.grad``-like buffers in place and has no rule.
"""

from __future__ import annotations

import torch


def _sample(params, dims, i: int) -> list[torch.Tensor]:
    return [p if d is None else p.select(d, i) for p, d in zip(params, dims)]


@torch.library.register_vmap("fastreg::weight_penalty_value")
def _value_vmap(info, in_dims, params, l1, l2):
    dims = in_dims[0]
    values = [torch.ops.fastreg.weight_penalty_value(_sample(params, dims, i), l1, l2) for i in range(info.batch_size)]
    return torch.stack(values), 0


@torch.library.register_vmap("fastreg::weight_penalty_backward")
def _backward_vmap(info, in_dims, grad_output, params, l1, l2):
    go_dim, dims = in_dims[0], in_dims[1]
    per_sample = [
        torch.ops.fastreg.weight_penalty_backward(
            grad_output if go_dim is None else grad_output.select(go_dim, i), _sample(params, dims, i), l1, l2
        )
        for i in range(info.batch_size)
    ]
    grads = [torch.stack(list(parts)) for parts in zip(*per_sample)]
    return grads, [0] * len(grads)
