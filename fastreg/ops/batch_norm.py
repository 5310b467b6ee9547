"""fastreg::batch_norm_* ops: training and eval forward, backward, and the pieces SyncBatchNorm
puts together around its collectives (stats, elemt, backward_reduce, backward_elemt).

Per-channel results (mean, invstd, var, sums) are 1-D tensors of C elements in the compute
dtype (float32; float64 for float64 inputs). Outputs keep the input's memory layout. The
normalising ops are functional: they leave the running statistics alone, and
fastreg.functional.batch_norm then updates those from the returned mean and var with
batch_norm_update_stats_, the one op that mutates (it has no autograd: the running statistics
are buffers, updated without grad as torch's own batch norm does). It exists for host time:
the same four in-place updates from Python took longer than the whole of torch's batch norm
call on small layers.
"""

from __future__ import annotations

import torch

from .._library import define, register_autograd
from ..memory_format import memory_dense
from ..reference import batch_norm as ref

define(
    "batch_norm_train",
    "(Tensor input, Tensor? weight, Tensor? bias, float eps)"
    " -> (Tensor output, Tensor mean, Tensor invstd, Tensor var)",
    ref.batch_norm_train,
)
define(
    "batch_norm_eval",
    "(Tensor input, Tensor running_mean, Tensor running_var, Tensor? weight, Tensor? bias, float eps) -> Tensor",
    ref.batch_norm_eval,
)
define("batch_norm_stats", "(Tensor input) -> (Tensor mean, Tensor var)", ref.batch_norm_stats)
define(
    "batch_norm_elemt",
    "(Tensor input, Tensor mean, Tensor invstd, Tensor? weight, Tensor? bias) -> Tensor",
    ref.batch_norm_elemt,
)
define(
    "batch_norm_backward",
    "(Tensor grad_output, Tensor input, Tensor mean, Tensor invstd, Tensor? weight, bool training)"
    " -> (Tensor grad_input, Tensor grad_weight, Tensor grad_bias)",
    ref.batch_norm_backward,
)
define(
    "batch_norm_backward_reduce",
    "(Tensor grad_output, Tensor input, Tensor mean) -> (Tensor sum_dy, Tensor sum_dy_xmu)",
    ref.batch_norm_backward_reduce,
)
define(
    "batch_norm_backward_elemt",
    "(Tensor grad_output, Tensor input, Tensor mean, Tensor invstd, Tensor? weight, Tensor sum_dy,"
    " Tensor sum_dy_xmu, int count) -> Tensor",
    ref.batch_norm_backward_elemt,
)

# `count` (values per channel behind the biased `var`; None: `var` is unbiased already) rather
# than the factor count / (count - 1): torch.compile specialises a float argument to its value,
# one graph per batch size, where a SymInt stays symbolic.
define(
    "batch_norm_update_stats_",
    "(Tensor(a!) running_mean, Tensor(b!) running_var, Tensor mean, Tensor var, float momentum, SymInt? count) -> ()",
    ref.batch_norm_update_stats_,
)


def _channels(input: torch.Tensor) -> torch.Tensor:
    return input.new_empty((input.shape[1],), dtype=ref.compute_dtype(input.dtype))


def _like_input(input: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(memory_dense(input))


# The fakes run the reference's checks, which read no data: they are also the Meta kernels, which
# a call mixing meta and CPU tensors reaches, and must refuse it rather than return empty tensors.
def _check_channels(input, op, **tensors) -> None:
    for name, t in tensors.items():
        ref.check_channel(t, input, op, name)


@torch.library.register_fake("fastreg::batch_norm_train")
def _train_fake(input, weight, bias, eps):
    ref.check_input(input, "fastreg.batch_norm")
    _check_channels(input, "fastreg.batch_norm", weight=weight, bias=bias)
    ref.check_eps(eps, "fastreg.batch_norm")
    return _like_input(input), _channels(input), _channels(input), _channels(input)


@torch.library.register_fake("fastreg::batch_norm_eval")
def _eval_fake(input, running_mean, running_var, weight, bias, eps):
    op = "fastreg.batch_norm"
    ref.check_input(input, op)
    _check_channels(input, op, running_mean=running_mean, running_var=running_var, weight=weight, bias=bias)
    ref.check_eps(eps, op)
    return _like_input(input)


@torch.library.register_fake("fastreg::batch_norm_stats")
def _stats_fake(input):
    ref.check_input(input, "fastreg.batch_norm_stats")
    return _channels(input), _channels(input)


@torch.library.register_fake("fastreg::batch_norm_elemt")
def _elemt_fake(input, mean, invstd, weight, bias):
    op = "fastreg.batch_norm_elemt"
    ref.check_input(input, op)
    _check_channels(input, op, mean=mean, invstd=invstd, weight=weight, bias=bias)
    return _like_input(input)


@torch.library.register_fake("fastreg::batch_norm_backward")
def _backward_fake(grad_output, input, mean, invstd, weight, training):
    op = "fastreg.batch_norm_backward"
    ref.check_input(input, op)
    ref.check_grad_output(grad_output, input, op)
    _check_channels(input, op, mean=mean, invstd=invstd, weight=weight)
    dtype = ref.compute_dtype(input.dtype) if weight is None else weight.dtype
    channels = input.new_empty((input.shape[1],), dtype=dtype)
    return _like_input(input), channels, torch.empty_like(channels)


@torch.library.register_fake("fastreg::batch_norm_backward_reduce")
def _backward_reduce_fake(grad_output, input, mean):
    op = "fastreg.batch_norm_backward_reduce"
    ref.check_input(input, op)
    ref.check_grad_output(grad_output, input, op)
    _check_channels(input, op, mean=mean)
    return _channels(input), _channels(input)


@torch.library.register_fake("fastreg::batch_norm_backward_elemt")
def _backward_elemt_fake(grad_output, input, mean, invstd, weight, sum_dy, sum_dy_xmu, count):
    op = "fastreg.batch_norm_backward_elemt"
    ref.check_input(input, op)
    ref.check_grad_output(grad_output, input, op)
    _check_channels(input, op, mean=mean, invstd=invstd, weight=weight, sum_dy=sum_dy, sum_dy_xmu=sum_dy_xmu)
    ref.check_count(count, input, op)
    return _like_input(input)


# Autograd. The mean / invstd / var outputs are statistics, not differentiable outputs:
# torch.native_batch_norm ignores gradients flowing into them; here they have no history.
def _train_setup(ctx, inputs, output):
    input, weight, bias, _eps = inputs
    ctx.save_for_backward(input, weight, output[1], output[2])
    ctx.has_bias = bias is not None
    ctx.mark_non_differentiable(*output[1:])  # as the C++ node: the statistics get no gradient
    ctx.set_materialize_grads(False)  # nor zero-filled ones made for them in every backward


def _train_grad(ctx, grad_output, _grad_mean, _grad_invstd, _grad_var):
    input, weight, mean, invstd = ctx.saved_tensors
    return _grads(ctx, grad_output, input, weight, mean, invstd, training=True) + (None,)


def _grads(ctx, grad_output, input, weight, mean, invstd, *, training):
    needs_input, needs_weight, needs_bias = _needs(ctx, training)
    if grad_output is None or not (needs_input or needs_weight or needs_bias):
        return None, None, None
    grad_input, grad_weight, grad_bias = torch.ops.fastreg.batch_norm_backward(
        grad_output, input, mean, invstd, weight, training
    )
    return (
        grad_input if needs_input else None,
        grad_weight if needs_weight and weight is not None else None,
        grad_bias if needs_bias and ctx.has_bias else None,
    )


def _needs(ctx, training):
    # needs_input_grad follows the op's argument order: (input, weight, bias, ...) for train,
    # (input, running_mean, running_var, weight, bias, eps) for eval.
    n = ctx.needs_input_grad
    return (n[0], n[1], n[2]) if training else (n[0], n[3], n[4])


register_autograd("batch_norm_train", _train_grad, setup_context=_train_setup)


def _eval_setup(ctx, inputs, output):
    input, running_mean, running_var, weight, bias, eps = inputs
    if running_mean.requires_grad or running_var.requires_grad:
        raise RuntimeError("fastreg.batch_norm: gradients with respect to the running statistics are not supported")
    ctx.save_for_backward(input, weight, running_mean, running_var)
    ctx.has_bias = bias is not None
    ctx.eps = eps


def _eval_grad(ctx, grad_output):
    input, weight, running_mean, running_var = ctx.saved_tensors
    compute = ref.compute_dtype(input.dtype)
    # 1 / sqrt as the forward rounds it (torch.rsqrt is approximate on CUDA).
    invstd = 1.0 / torch.sqrt(running_var.to(compute) + ctx.eps)
    grad_input, grad_weight, grad_bias = _grads(
        ctx, grad_output, input, weight, running_mean.to(compute), invstd, training=False
    )
    return grad_input, None, None, grad_weight, grad_bias, None


register_autograd("batch_norm_eval", _eval_grad, setup_context=_eval_setup)


# The backward ops are not differentiable, and the saved statistics carry no gradient: without
# an autograd kernel, double backward would run through them and give zeros, silently.
def _no_double_backward(ctx, *grads):
    raise RuntimeError("fastreg.batch_norm: double backward is not supported")


for _name in ("batch_norm_backward", "batch_norm_backward_reduce", "batch_norm_backward_elemt"):
    register_autograd(_name, _no_double_backward)


@torch.library.register_fake("fastreg::batch_norm_update_stats_")
def _update_stats_fake(running_mean, running_var, mean, var, momentum, count):
    ref.check_update_stats(running_mean, running_var, mean, var)
