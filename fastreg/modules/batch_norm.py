"""fastreg.BatchNorm1d/2d/3d: subclasses of torch.nn's, so arguments, repr, state_dict,
``reset_running_stats`` and isinstance checks are unchanged; only forward runs fastreg's kernels."""

from __future__ import annotations

import torch

from .. import functional as F


class _FastBatchNorm:
    """The forward of ``torch.nn.modules.batchnorm._BatchNorm`` (momentum, cumulative average
    when ``momentum=None``, ``num_batches_tracked``, ``track_running_stats``) on fastreg's ops."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(input)
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative moving average
                factor = 1.0 / float(self.num_batches_tracked)
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
