"""``torch.func.vmap`` of ``batch_norm_update_stats_``, the in-place update of running statistics.

vmap's fallback takes no mutating op ("the fallback path doesn't work on out= or view ops"), so
a training-mode batch norm under vmap failed with that message whatever the case. With batched
running statistics (an ensemble's stacked buffers) each sample now updates its own slice; with
unbatched ones under a batched input the update cannot be expressed, and the error says what to
do instead, as torch's batch norm does.
"""

from __future__ import annotations

import torch

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
