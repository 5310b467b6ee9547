"""``torch.func.vmap`` of the ``fastreg::batch_norm*`` ops.

The functional ops (forward, eval, statistics, backward pieces) take each sample's tensors in one
call of the op, and their outputs are stacked along a new dim 0. vmap's generic fallback computes
the same, but warns on every call that a batching rule is missing (e.g. in per-sample gradients
through an eval-mode batch norm), and it refuses a batch of no samples, whose outputs come here
from the op's fake on the meta device.

``batch_norm_update_stats_`` is the in-place update of running statistics. vmap's fallback
takes no mutating op ("the fallback path doesn't work on out= or view ops"), so a training-mode
batch norm under vmap failed with that message whatever the case. With batched
running statistics (an ensemble's stacked buffers) each sample now updates its own slice; with
unbatched ones under a batched input the update cannot be expressed, and the error says what to
do instead, as torch's batch norm does.
"""

from __future__ import annotations

import torch

from .vmap_empty_batch import empty_stack, first_batched, sample_on_meta

_FUNCTIONAL_OPS = (
    "batch_norm_train",
    "batch_norm_eval",
    "batch_norm_stats",
    "batch_norm_elemt",
    "batch_norm_backward",
    "batch_norm_backward_reduce",
    "batch_norm_backward_elemt",
)

UNBATCHED_RUNNING_STATS = (
    "fastreg.batch_norm under vmap: the input is batched but running_mean / running_var, which "
    "training mode updates in place, are not. Batch the running statistics too (e.g. stacked "
    "buffers through torch.func.functional_call), build the module with track_running_stats=False, "
    "or call torch.func.replace_all_batch_norm_modules_(model), which works on fastreg's modules too"
)


@torch.library.register_vmap("fastreg::batch_norm_update_stats_")
def _update_stats_vmap(info, in_dims, running_mean, running_var, mean, var, momentum, count):
    mean_dim, var_dim, batch_mean_dim, batch_var_dim = in_dims[:4]
    if mean_dim is None or var_dim is None:
        raise RuntimeError(UNBATCHED_RUNNING_STATS)

    def sample(t, dim, i):
        return t if dim is None else t.select(dim, i)

    for i in range(info.batch_size):
        torch.ops.fastreg.batch_norm_update_stats_(
            sample(running_mean, mean_dim, i),
            sample(running_var, var_dim, i),
            sample(mean, batch_mean_dim, i),
            sample(var, batch_var_dim, i),
            momentum,
            count,
        )
    return None, None


def _register_per_sample_rule(name: str) -> None:
    op = getattr(torch.ops.fastreg, name).default
    single_output = len(op._schema.returns) == 1

    def rule(info, in_dims, *args):
        batch_size = info.batch_size
        if batch_size:
            # each argument's samples in one unbind (B views), an unbatched one repeated
            columns = [(a,) * batch_size if d is None else a.unbind(d) for a, d in zip(args, in_dims)]
            if single_output:
                return torch.stack([op(*sample) for sample in zip(*columns)]), 0
            stacked = tuple(torch.stack(parts) for parts in zip(*(op(*sample) for sample in zip(*columns))))
        else:
            like = first_batched(args, in_dims)
            shapes = op(*map(sample_on_meta, args, in_dims))
            stacked = tuple(empty_stack(like, t) for t in ((shapes,) if single_output else shapes))
            if single_output:
                return stacked[0], 0
        return stacked, (0,) * len(stacked)

    torch.library.register_vmap(f"fastreg::{name}", rule)


for _name in _FUNCTIONAL_OPS:
    _register_per_sample_rule(_name)
