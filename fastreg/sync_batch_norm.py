"""Batch norm with statistics over every process of a group (``torch.distributed``).

Forward: each process computes its per-channel (mean, biased var, count) with
``fastreg::batch_norm_stats``; one ``all_gather`` brings every process's triple; Chan's merge
(in float64) gives the global mean and variance; ``fastreg::batch_norm_elemt`` normalises.
Backward: ``fastreg::batch_norm_backward_reduce`` gives local (sum dy, sum dy*(x - mean)); one
``all_reduce`` sums them; ``fastreg::batch_norm_backward_elemt`` gives grad_input. The global
count stays a tensor (the sums are divided by it before the call, which then gets count 1),
so nothing waits for the device. Processes may hold different batch sizes, including 0.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .reference.batch_norm import blended_running

OPS = torch.ops.fastreg
# torch 2.13 deprecates all_gather_into_tensor (with a FutureWarning) for this new name.
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def _merge(gathered: torch.Tensor, channels: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Global (mean, biased var, count) from each process's row (mean[C], var[C], count)."""
    rows = gathered.to(torch.float64)
    means, variances, counts = rows[:, :channels], rows[:, channels : 2 * channels], rows[:, 2 * channels :]
    total = counts.sum(0)
    weights = counts / total.clamp_min(1.0)
    mean = (weights * means).sum(0)
    var = (weights * (variances + (means - mean) ** 2)).sum(0)
    return mean, var, total


class SyncBatchNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input, weight, bias, eps, process_group, world_size):
        channels = input.shape[1]
        mean, var = OPS.batch_norm_stats(input)
        count = torch.full((1,), input.numel() // channels if channels else 0, dtype=mean.dtype, device=input.device)
        local = torch.cat([mean, var, count])
        gathered = local.new_empty((world_size * local.numel(),))  # flat: gloo takes no 2-D output
        _all_gather(gathered, local, group=process_group)
        global_mean, global_var, total = _merge(gathered.view(world_size, -1), channels)
        mean = global_mean.to(mean.dtype)
        invstd = torch.rsqrt(global_var + eps).to(mean.dtype)
        output = OPS.batch_norm_elemt(input, mean, invstd, weight, bias)
        ctx.save_for_backward(input, weight, mean, invstd, total)
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.process_group = process_group
        ctx.mark_non_differentiable(mean, global_var, total)
        return output, mean, global_var, total

    @staticmethod
    def backward(ctx, grad_output, _grad_mean, _grad_var, _grad_total):
        input, weight, mean, invstd, total = ctx.saved_tensors
        channels = input.shape[1]
        local_dy, local_dy_xmu = OPS.batch_norm_backward_reduce(grad_output, input, mean)
        sums = torch.cat([local_dy, local_dy_xmu])
        dist.all_reduce(sums, group=ctx.process_group)  # every process takes part, whatever it needs
        grad_input = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            scale = (1.0 / total.clamp_min(1.0)).to(sums.dtype)
            grad_input = OPS.batch_norm_backward_elemt(
                grad_output, input, mean, invstd, weight, sums[:channels] * scale, sums[channels:] * scale, 1
            )
        # Parameter gradients of this process's own loss, as torch's SyncBatchNorm returns them:
        # DDP averages them across processes afterwards.
        if weight is not None and ctx.needs_input_grad[1]:
            grad_weight = (local_dy_xmu * invstd).to(weight.dtype)
        if ctx.bias_dtype is not None and ctx.needs_input_grad[2]:
            grad_bias = local_dy.to(ctx.bias_dtype)
        return grad_input, grad_weight, grad_bias, None, None, None


@torch.no_grad()
def update_running_stats_synced(
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    mean: torch.Tensor,
    var: torch.Tensor,
    total: torch.Tensor,
    momentum: float,
) -> None:
    """The running statistics' update from the global ``mean`` and biased ``var`` of ``total``
    values per channel, by the formula of ``fastreg::batch_norm_update_stats_``. A global batch
    of fewer than 2 values leaves them as they are: none has no statistics (as an empty batch in
    ``fastreg.BatchNorm``), one has no unbiased variance (``fastreg.BatchNorm`` raises there, which
    would make the host wait for the device here). ``total`` stays on the device, so nothing waits."""
    unbiased = (var * total / (total - 1)).to(mean.dtype)
    counted = total >= 2
    for running, batch in ((running_mean, mean), (running_var, unbiased)):
        running.copy_(torch.where(counted, blended_running(running, batch, momentum, 1.0).to(running.dtype), running))
