"""Reference batch norm in plain PyTorch: the fallback and the oracle of the kernels.

The formulas are those of csrc/batch_norm/batch_norm_kernels.h. Statistics are computed in
float64 (``torch.var_mean``, which is stable for inputs with a large mean) and stored in the
compute dtype: float32 for float32/float16/bfloat16 inputs, float64 for float64 inputs.
Element-wise results are computed in the compute dtype and rounded once to the input's dtype.
Outputs keep the input's memory layout (fastreg/memory_format.py).
"""

from __future__ import annotations

import math

import torch

from ..memory_format import memory_dense
from .in_place import bump_version

SUPPORTED_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_input(input: torch.Tensor, op: str) -> None:
    if input.layout != torch.strided:
        raise RuntimeError(f"{op}: input must be a strided (dense) tensor, got layout {input.layout}")
    if input.dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"{op}: expected a floating-point tensor (float64, float32, float16 or bfloat16), got {input.dtype}"
        )
    if input.dim() < 2:
        raise ValueError(
            f"{op}: expected an input of shape (N, C, ...) with at least 2 dimensions, got {input.dim()}-D"
        )


def check_channel(t: torch.Tensor | None, input: torch.Tensor, op: str, name: str) -> None:
    """A per-channel tensor: 1-D, C elements, input's device, input's dtype or the compute dtype."""
    if t is None:
        return
    if t.layout != torch.strided:
        raise RuntimeError(f"{op}: {name} must be a strided (dense) tensor, got layout {t.layout}")
    channels = input.shape[1]
    if t.dim() != 1 or t.shape[0] != channels:
        raise RuntimeError(
            f"{op}: {name} must be 1-D with {channels} elements (the input's channels), got shape {list(t.shape)}"
        )
    if t.device != input.device:
        raise RuntimeError(f"{op}: {name} is on {t.device} but input is on {input.device}")
    compute = compute_dtype(input.dtype)
    if t.dtype not in (input.dtype, compute):
        also = "" if compute == input.dtype else f" or {compute}"
        raise TypeError(f"{op}: {name} has dtype {t.dtype}; expected {input.dtype} (the input's){also}")


def check_eps(eps: float, op: str) -> None:
    if not (math.isfinite(eps) and eps >= 0.0):
        raise ValueError(f"{op}: eps must be a finite number >= 0, got {eps}")


def check_grad_output(grad_output: torch.Tensor, input: torch.Tensor, op: str) -> None:
    if grad_output.layout != torch.strided:
        raise RuntimeError(f"{op}: grad_output must be a strided (dense) tensor, got layout {grad_output.layout}")
    if grad_output.device != input.device:
        raise RuntimeError(f"{op}: grad_output is on {grad_output.device} but input is on {input.device}")
    if grad_output.dtype != input.dtype:
        raise TypeError(f"{op}: grad_output has dtype {grad_output.dtype} but input has dtype {input.dtype}")
    if grad_output.shape != input.shape:
        raise RuntimeError(
            f"{op}: grad_output has shape {list(grad_output.shape)} but input has shape {list(input.shape)}"
        )


def check_count(count: int, input: torch.Tensor, op: str) -> None:
    if count <= 0 and input.numel() > 0:
        raise ValueError(f"{op}: count must be > 0, got {count}")


def reduced_dims(input: torch.Tensor) -> list[int]:
    return [0, *range(2, input.dim())]


def channel_view(t: torch.Tensor, input: torch.Tensor) -> torch.Tensor:
    """A per-channel vector shaped to broadcast against ``input`` (C on dimension 1)."""
    return t.reshape([1, -1] + [1] * (input.dim() - 2))


def count_per_channel(input: torch.Tensor) -> int:
    return input.numel() // input.shape[1] if input.shape[1] else 0


def _as_compute(t: torch.Tensor | None, compute: torch.dtype) -> torch.Tensor | None:
    return None if t is None else t.to(compute)


def _new_like(input: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """``values`` rounded to the input's dtype, laid out like the (dense) input."""
    return torch.empty_like(memory_dense(input)).copy_(values)


def _stats(input: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    compute = compute_dtype(input.dtype)
    channels = input.shape[1]
    if input.numel() == 0:
        zeros = torch.zeros(channels, dtype=compute, device=input.device)
        return zeros, zeros.clone()
    var, mean = torch.var_mean(input.to(torch.float64), reduced_dims(input), correction=0)
    return mean.to(compute), var.to(compute)


def _elemt(input, mean, invstd, weight, bias) -> torch.Tensor:
    compute = compute_dtype(input.dtype)
    scale = invstd if weight is None else invstd * weight.to(compute)
    y = (input.to(compute) - channel_view(mean, input)) * channel_view(scale, input)
    if bias is not None:
        y = y + channel_view(bias.to(compute), input)
    return _new_like(input, y)


def batch_norm_stats(input: torch.Tensor):
    op = "fastreg.batch_norm_stats"
    check_input(input, op)
    return _stats(input)


def batch_norm_train(input, weight, bias, eps: float):
    op = "fastreg.batch_norm"
    check_input(input, op)
    check_channel(weight, input, op, "weight")
    check_channel(bias, input, op, "bias")
    check_eps(eps, op)
    mean, var = _stats(input)
    invstd = 1.0 / torch.sqrt(var + eps)
    return _elemt(input, mean, invstd, weight, bias), mean, invstd, var


def batch_norm_eval(input, running_mean, running_var, weight, bias, eps: float):
    op = "fastreg.batch_norm"
    check_input(input, op)
    check_channel(running_mean, input, op, "running_mean")
    check_channel(running_var, input, op, "running_var")
    check_channel(weight, input, op, "weight")
    check_channel(bias, input, op, "bias")
    check_eps(eps, op)
    compute = compute_dtype(input.dtype)
    invstd = 1.0 / torch.sqrt(running_var.to(compute) + eps)
    return _elemt(input, running_mean.to(compute), invstd, weight, bias)


def batch_norm_elemt(input, mean, invstd, weight, bias):
    op = "fastreg.batch_norm_elemt"
    check_input(input, op)
    for name, t in (("mean", mean), ("invstd", invstd), ("weight", weight), ("bias", bias)):
        check_channel(t, input, op, name)
    compute = compute_dtype(input.dtype)
    return _elemt(input, mean.to(compute), invstd.to(compute), weight, bias)


def batch_norm_backward_reduce(grad_output, input, mean):
    op = "fastreg.batch_norm_backward_reduce"
    check_input(input, op)
    check_grad_output(grad_output, input, op)
    check_channel(mean, input, op, "mean")
    compute = compute_dtype(input.dtype)
    dims = reduced_dims(input)
    dy = grad_output.to(torch.float64)
    xmu = input.to(torch.float64) - channel_view(mean.to(compute).to(torch.float64), input)
    sum_dy = dy.sum(dims)
    sum_dy_xmu = (dy * xmu).sum(dims)
    return sum_dy.to(compute), sum_dy_xmu.to(compute)


def _backward_elemt(grad_output, input, mean, invstd, weight, sum_dy, sum_dy_xmu, count: int) -> torch.Tensor:
    compute = compute_dtype(input.dtype)
    scale = invstd if weight is None else invstd * weight.to(compute)
    dy = grad_output.to(compute)
    if sum_dy is None:
        return _new_like(input, dy * channel_view(scale, input))
    mean_dy = channel_view(sum_dy / count, input)
    proj = channel_view(invstd * invstd * sum_dy_xmu / count, input)
    xmu = input.to(compute) - channel_view(mean, input)
    return _new_like(input, (dy - mean_dy - xmu * proj) * channel_view(scale, input))


def batch_norm_backward_elemt(grad_output, input, mean, invstd, weight, sum_dy, sum_dy_xmu, count: int):
    op = "fastreg.batch_norm_backward_elemt"
    check_input(input, op)
    check_grad_output(grad_output, input, op)
    for name, t in (
        ("mean", mean),
        ("invstd", invstd),
        ("weight", weight),
        ("sum_dy", sum_dy),
        ("sum_dy_xmu", sum_dy_xmu),
    ):
        check_channel(t, input, op, name)
    check_count(count, input, op)
    compute = compute_dtype(input.dtype)
    return _backward_elemt(
        grad_output,
        input,
        mean.to(compute),
        invstd.to(compute),
        weight,
        sum_dy.to(compute),
        sum_dy_xmu.to(compute),
        count,
    )


def batch_norm_backward(grad_output, input, mean, invstd, weight, training: bool):
    op = "fastreg.batch_norm_backward"
    check_input(input, op)
    check_grad_output(grad_output, input, op)
    for name, t in (("mean", mean), ("invstd", invstd), ("weight", weight)):
        check_channel(t, input, op, name)
    compute = compute_dtype(input.dtype)
    mean, invstd = mean.to(compute), invstd.to(compute)
    sum_dy, sum_dy_xmu = batch_norm_backward_reduce(grad_output, input, mean)
    if input.numel() == 0:
        grad_input = _new_like(input, grad_output)
    elif training:
        grad_input = _backward_elemt(
            grad_output, input, mean, invstd, weight, sum_dy, sum_dy_xmu, count_per_channel(input)
        )
    else:
        grad_input = _backward_elemt(grad_output, input, mean, invstd, weight, None, None, 0)
    out_dtype = compute if weight is None else weight.dtype
    return grad_input, (sum_dy_xmu * invstd).to(out_dtype), sum_dy.to(out_dtype)


def check_running_stat(running: torch.Tensor, batch: torch.Tensor, name: str, sizes: bool = True) -> None:
    """``sizes=False`` leaves out the comparison of sizes: under torch.jit.trace sizes are traced
    values, and a comparison in Python would be frozen into the trace, with a TracerWarning."""
    op = "fastreg.batch_norm_update_stats_"
    if running.layout != torch.strided or running.dim() != 1 or (sizes and running.shape != batch.shape):
        raise RuntimeError(f"{op}: {name} has shape {list(running.shape)}, the batch statistic {list(batch.shape)}")
    if running.device != batch.device:
        raise RuntimeError(f"{op}: {name} is on {running.device} but the batch statistic on {batch.device}")
    if not running.is_floating_point():
        raise TypeError(f"{op}: {name} has dtype {running.dtype}; expected a floating-point dtype")
    if running.stride(0) == 0 and running.numel() > 1:  # updated in place: each element once
        raise RuntimeError(
            f"{op}: {name} has stride 0 (an expanded tensor), so its elements share memory; pass a tensor of its own"
        )


def check_update_stats(running_mean, running_var, mean, var) -> None:
    check_running_stat(running_mean, mean, "running_mean")
    check_running_stat(running_var, var, "running_var")
    if running_var.device != running_mean.device:
        raise RuntimeError(
            f"fastreg.batch_norm_update_stats_: running_var is on {running_var.device} but running_mean on "
            f"{running_mean.device}"
        )
    if running_var.numel() != running_mean.numel():
        raise RuntimeError(
            f"fastreg.batch_norm_update_stats_: running_var has {running_var.numel()} elements but running_mean "
            f"{running_mean.numel()}; both hold one value per channel"
        )


def blended_running(
    running: torch.Tensor, batch: torch.Tensor, momentum: float, batch_scale: float | torch.Tensor
) -> torch.Tensor:
    """``(1 - momentum) * running + momentum * batch_scale * batch`` in the batch statistic's
    dtype: each product and their sum rounded in it (separate ops: no fused multiply-add), the
    kernels' formula, bit for bit."""
    return running.to(batch.dtype) * (1.0 - momentum) + batch * (momentum * batch_scale)


def _blend_running(running: torch.Tensor, batch: torch.Tensor, momentum: float, batch_scale: float) -> None:
    running.copy_(blended_running(running, batch, momentum, batch_scale))


def var_scale(count: int | None) -> float:
    """The factor that makes the biased variance of ``count`` values unbiased; 1 for None."""
    if count is None:
        return 1.0
    if count < 2:
        raise RuntimeError(
            f"fastreg.batch_norm_update_stats_: count is {count}; the variance of fewer than 2 values "
            "per channel has no unbiased estimate"
        )
    return count / (count - 1)


def batch_norm_update_stats_(running_mean, running_var, mean, var, momentum: float, count: int | None) -> None:
    """``running = (1 - momentum) * running + momentum * batch`` in place, computed in the batch
    statistics' dtype and stored in the running statistics'. ``var`` is the biased variance of
    ``count`` values per channel, made unbiased with ``count / (count - 1)``; with ``count=None``
    it is unbiased already. Bumps both version counters."""
    check_update_stats(running_mean, running_var, mean, var)
    scale = var_scale(count)
    with torch.no_grad():
        _blend_running(running_mean, mean, momentum, 1.0)
        _blend_running(running_var, var, momentum, scale)
    bump_version(running_mean)
    bump_version(running_var)


def batch_norm_update_stats_traced_(running_mean, running_var, mean, var, momentum: float, count: torch.Tensor) -> None:
    """``batch_norm_update_stats_`` under ``torch.jit.trace``, where ``count``, the values per
    channel, is a traced 0-dim tensor. In tensor ops, so that the recorded graph unbiases each
    batch's variance with that batch's count (the op's ``int`` argument would record the traced
    batch's count as a constant) and leaves the statistics alone for an empty batch, as eager
    batch norm does. Same formula and bits as the op; sizes that do not match fail in the ops."""
    check_running_stat(running_mean, mean, "running_mean", sizes=False)
    check_running_stat(running_var, var, "running_var", sizes=False)
    values = count.to(torch.float64)
    updated = count > 0
    with torch.no_grad():
        for running, batch, scale in ((running_mean, mean, 1.0), (running_var, var, values / (values - 1))):
            kept = running.to(batch.dtype)
            running.copy_(torch.where(updated, blended_running(running, batch, momentum, scale), kept))
