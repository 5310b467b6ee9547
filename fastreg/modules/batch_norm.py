"""fastreg.BatchNorm1d/2d/3d: subclasses of torch.nn's, so arguments, repr, state_dict,
``reset_running_stats`` and isinstance checks are unchanged; only forward runs fastreg's kernels."""

from __future__ import annotations

import torch
import torch.distributed as dist

from .. import functional as F
from ..sync_batch_norm import SyncBatchNormFunction, update_running_stats_synced
from .fx_leaf import TracedAsLeaf


class _FastBatchNorm(TracedAsLeaf):
    """The forward of ``torch.nn.modules.batchnorm._BatchNorm`` (momentum, cumulative average
    when ``momentum=None``, ``num_batches_tracked``, ``track_running_stats``) on fastreg's ops."""

    def _running_stats_factor(self) -> float:
        """The weight of this batch in the running statistics; counts the batch when tracked."""
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative moving average
                factor = 1.0 / float(self.num_batches_tracked)
        return factor

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting() and not isinstance(input, torch.Tensor):  # torch.fx tracing
            return self._fx_call_module(input)
        self._check_input_dim(input)
        factor = self._running_stats_factor()
        # Batch statistics in training, and in eval when there are no running statistics.
        use_batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        # The running statistics are passed when they are used or updated.
        pass_running = not self.training or self.track_running_stats
        return F.batch_norm(
            input,
            self.running_mean if pass_running else None,
            self.running_var if pass_running else None,
            self.weight,
            self.bias,
            use_batch_stats,
            factor,
            self.eps,
        )


class BatchNorm1d(_FastBatchNorm, torch.nn.BatchNorm1d):
    """``torch.nn.BatchNorm1d`` with fastreg's kernels."""


class BatchNorm2d(_FastBatchNorm, torch.nn.BatchNorm2d):
    """``torch.nn.BatchNorm2d`` with fastreg's kernels."""


class BatchNorm3d(_FastBatchNorm, torch.nn.BatchNorm3d):
    """``torch.nn.BatchNorm3d`` with fastreg's kernels."""


class SyncBatchNorm(_FastBatchNorm, torch.nn.SyncBatchNorm):
    """``torch.nn.SyncBatchNorm`` with fastreg's kernels: in training, statistics over every
    process of ``process_group`` (one all_gather forward, one all_reduce backward; NCCL on GPU,
    gloo on CPU). Without an initialised process group of more than one process, or in eval
    mode, it is ``fastreg.BatchNorm``. Build one from a model with
    ``fastreg.SyncBatchNorm.convert_sync_batchnorm(model)``, or
    ``fastreg.convert(torch.nn.SyncBatchNorm.convert_sync_batchnorm(model))``."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not isinstance(input, torch.Tensor):  # torch.fx tracing (SyncBatchNorm does not script)
            return self._fx_call_module(input)
        self._check_input_dim(input)
        self._check_non_zero_input_channels(input)
        group = self.process_group or (dist.group.WORLD if dist.is_available() and dist.is_initialized() else None)
        world_size = dist.get_world_size(group) if group is not None else 1
        if not self.training or world_size == 1:
            return super().forward(input)
        factor = self._running_stats_factor()
        output, mean, var, total = SyncBatchNormFunction.apply(
            input, self.weight, self.bias, self.eps, group, world_size
        )
        if self.track_running_stats:
            update_running_stats_synced(self.running_mean, self.running_var, mean, var, total, factor)
        return output

    @classmethod
    def convert_sync_batchnorm(cls, module: torch.nn.Module, process_group=None) -> torch.nn.Module:
        """``torch.nn.SyncBatchNorm.convert_sync_batchnorm``, giving fastreg's SyncBatchNorm
        layers (torch's builds ``torch.nn.SyncBatchNorm`` whatever class it is called on)."""
        module = torch.nn.SyncBatchNorm.convert_sync_batchnorm(module, process_group)
        for layer in module.modules():
            if type(layer) is torch.nn.SyncBatchNorm:
                layer.__class__ = SyncBatchNorm
        return module
