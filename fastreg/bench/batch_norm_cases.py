"""Batch-norm cases: training forward, training forward + backward, and eval forward of 4-D
activations (N, C, H, W) in NCHW and channels_last, side by side on the same tensors.

Implementations: PyTorch eager (``F.batch_norm``), torch.compile of it, fastreg
(``fastreg.functional.batch_norm``), the pure-PyTorch reference run as an autograd op, and
the copy yardsticks. Weight, bias and running statistics are float32 for every input dtype
(what mixed-precision training uses: the module's parameters stay float32). Every training
call updates the running statistics in place, as a training step does. ``train_fwd_bwd``
uses torch.autograd.grad for the input, weight and bias gradients, which returns them rather
than accumulating into ``.grad``, so no extra read-modify-write pass is timed (the GPU
anchors in DESIGN.md did accumulate; theirs are upper bounds).

Bytes moved, the one model every row of a case shares (n elements of the input's size; the
per-channel vectors, at most 8 floats per channel, are left out: under 0.2% of the bytes at
every benchmark shape, the worst being fp16 (128,512,7,7)):

- ``train_fwd``:     read x, write y                            2 x n x element size
- ``train_fwd_bwd``: train_fwd + read x, read dy, write dx      5 x n x element size
- ``eval_fwd``:      read x, write y                            2 x n x element size

The training forward needs the statistics before it can normalise, so a kernel that cannot
keep its slice of x on chip reads x twice (3 passes); the model counts the bound, 2 passes,
as the anchors do. The backward must read x and dy for its two sums and again for dx unless
they stay on chip; the model counts them once.

The gate compares with the reference (float64 statistics) within fastreg.testing's tolerance
for the input's dtype: the precision of the data every result is computed from (the weight and
bias gradients and the running statistics are float32 tensors, but with bf16 input they are
sums of bf16 data; torch.compile rounds x-hat to bf16 before summing it). A training result
comes from sums over count = N x H x W values per channel, whose error scales with the size of
the whole sum, not with each element, and a correct float32 sum of that many terms is off by
more than one rounding (a sequential sum's error grows with the number of terms). So training
rows add max(rtol, float32's rtol x log2(count)) x the RMS of the expected tensor to the
table's atol: for fp32 at (32,64,56,56), 1.7e-4 of the tensor's typical magnitude; for bf16,
1%. That is far below what a wrong formula or gradient produces; normalising with the unbiased
variance, a 1/(2 count) change, is below any float32 tolerance at these sizes, which is why
tests/test_bench_gate.py shows the gate catching it on a small fp32 case. Eval rows use the
table as it is. Outputs and the input's gradient must keep the input's memory format, and eval
must leave the running statistics alone.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from .. import functional as fastreg_F
from ..reference import batch_norm as ref
from ..testing import tolerance
from . import gate, memory
from .baselines import COPY_IMPLS, copy_impls
from .cases import BuiltCase, Case, Impl, register_op
from .sets import BenchSet

KINDS = ("train_fwd", "train_fwd_bwd", "eval_fwd")
MEMORY_FORMATS = {"nchw": torch.contiguous_format, "cl": torch.channels_last}
MOMENTUM, EPS = 0.1, 1e-5

#: (x, running_mean, running_var, weight, bias, training) -> y: F.batch_norm's contract
BatchNorm = Callable[..., torch.Tensor]


def passes(kind: str) -> int:
    """Full-size tensor passes an ideal kernel makes (see the module docstring)."""
    return 5 if kind == "train_fwd_bwd" else 2


class ReferenceBatchNorm(torch.autograd.Function):
    """The reference as users would run it as an op: forward saves the batch mean and invstd,
    backward is the reference's backward."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps):
        out, mean, invstd, var = ref.batch_norm_train(x, weight, bias, eps)
        ctx.save_for_backward(x, weight, mean, invstd)
        ctx.mark_non_differentiable(mean, var)
        return out, mean, var

    @staticmethod
    def backward(ctx, grad_out, _grad_mean, _grad_var):
        x, weight, mean, invstd = ctx.saved_tensors
        grad_x, grad_weight, grad_bias = ref.batch_norm_backward(grad_out, x, mean, invstd, weight, True)
        return grad_x, grad_weight, grad_bias, None


def reference_batch_norm(x, running_mean, running_var, weight, bias, training, momentum=MOMENTUM, eps=EPS):
    if not training:
        return ref.batch_norm_eval(x, running_mean, running_var, weight, bias, eps)
    out, mean, var = ReferenceBatchNorm.apply(x, weight, bias, eps)
    count = x.numel() // x.shape[1]
    with torch.no_grad():
        running_mean.mul_(1 - momentum).add_(mean, alpha=momentum)
        running_var.mul_(1 - momentum).add_(var * (count / (count - 1)), alpha=momentum)
    return out


def _torch_compile() -> BatchNorm:
    # a fresh dynamo cache per case (see dropout_cases): each case is its own shape and dtype
    torch._dynamo.reset()
    return torch.compile(F.batch_norm, dynamic=False)


def implementations(case: Case) -> dict[str, BatchNorm]:
    found: dict[str, BatchNorm] = {"torch_eager": F.batch_norm}
    if "torch_compile" in case.impl_names:
        found["torch_compile"] = _torch_compile()
    found["fastreg"] = fastreg_F.batch_norm
    found["reference"] = reference_batch_norm
    return found


# ---------------------------------------------------------------- the gate


def _close(what: str, actual, expected: torch.Tensor, data_dtype: torch.dtype, count: int | None) -> str | None:
    """``actual`` vs the reference's ``expected``: fastreg.testing's tolerance for the dtype of
    the data it is computed from, plus, when it comes from sums over ``count`` values per
    channel, the allowance of the module docstring."""
    if not isinstance(actual, torch.Tensor):
        return f"{what}: got {type(actual).__name__}, expected a tensor"
    if actual.shape != expected.shape or actual.dtype != expected.dtype:
        return f"{what}: shape/dtype {tuple(actual.shape)}/{actual.dtype} != {tuple(expected.shape)}/{expected.dtype}"
    rtol, atol = tolerance(data_dtype)
    if count and count > 1:
        rms = float(expected.detach().double().square().mean().sqrt())
        atol += max(rtol, tolerance(torch.float32)[0] * math.log2(count)) * rms
    try:
        torch.testing.assert_close(actual.detach(), expected, rtol=rtol, atol=atol, equal_nan=True)
    except AssertionError as error:
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        return f"{what}: " + " ".join(lines[:4])
    return None


def _layout_name(t: torch.Tensor) -> str:
    if t.is_contiguous():
        return "contiguous (NCHW)"
    return "channels_last" if t.is_contiguous(memory_format=torch.channels_last) else "strided"


def _same_layout(what: str, actual, expected: torch.Tensor) -> str | None:
    """Outputs keep the input's memory format (``expected`` is the reference's, laid out like x)."""
    if isinstance(actual, torch.Tensor) and actual.dim() > 1 and actual.stride() != expected.stride():
        return (
            f"{what} is {_layout_name(actual)} with strides {actual.stride()}, but the input is "
            f"{_layout_name(expected)} with strides {expected.stride()}"
        )
    return None


def _oracle(x, dy, weight, bias, running_mean, running_var, kind: str) -> dict[str, Any]:
    """The reference's answers for the case's inputs, computed once per case."""
    x, weight, bias = x.detach(), weight.detach(), bias.detach()
    if kind == "eval_fwd":
        out = ref.batch_norm_eval(x, running_mean, running_var, weight, bias, EPS)
        return {"out": out, "running_mean": running_mean.clone(), "running_var": running_var.clone()}
    out, mean, invstd, var = ref.batch_norm_train(x, weight, bias, EPS)
    count = x.numel() // x.shape[1]
    expected = {
        "out": out,
        # float64 update of float32 running statistics, rounded once
        "running_mean": (running_mean.double() * (1 - MOMENTUM) + mean.double() * MOMENTUM).float(),
        "running_var": (
            running_var.double() * (1 - MOMENTUM) + var.double() * (count / (count - 1)) * MOMENTUM
        ).float(),
    }
    if kind == "train_fwd_bwd":
        expected["grads"] = ref.batch_norm_backward(dy, x, mean, invstd, weight, True)
    return expected


def batch_norm_impl(inputs: dict, name: str, fn: BatchNorm) -> Impl:
    """An Impl over the case's tensors with its own running statistics: ``fn`` has
    F.batch_norm's signature. The gate resets the running statistics, makes one call (the
    call that is timed), and compares the output, the gradients of input, weight and bias
    (fwd_bwd) and the running statistics with the reference."""
    x, dy, weight, bias, kind = inputs["x"], inputs["dy"], inputs["weight"], inputs["bias"], inputs["kind"]
    start_mean, start_var = inputs["running_mean"], inputs["running_var"]
    running_mean, running_var = start_mean.clone(), start_var.clone()
    training, backward = kind != "eval_fwd", kind == "train_fwd_bwd"
    count = x.numel() // x.shape[1] if training else None

    def forward() -> torch.Tensor:
        return fn(x, running_mean, running_var, weight, bias, training, MOMENTUM, EPS)

    def run():
        y = forward()
        return (y, *torch.autograd.grad(y, (x, weight, bias), dy)) if backward else y

    def check() -> str | None:
        running_mean.copy_(start_mean)
        running_var.copy_(start_var)
        result = run()
        out, grads = (result[0], result[1:]) if backward else (result, ())
        expected = inputs["expected"]
        problems = [
            _close(f"{name} output vs reference", out, expected["out"], x.dtype, count),
            _same_layout(f"{name} output", out, expected["out"]),
        ]
        if backward:
            for what, got, want in zip(("input", "weight", "bias"), grads, expected["grads"]):
                problems.append(_close(f"{name} gradient of {what} vs reference", got, want, x.dtype, count))
            problems.append(_same_layout(f"{name} gradient of input", grads[0], expected["grads"][0]))
        if training:
            what = f"{name} running_{{}} after one training forward vs reference"
            problems.append(_close(what.format("mean"), running_mean, expected["running_mean"], x.dtype, count))
            problems.append(_close(what.format("var"), running_var, expected["running_var"], x.dtype, count))
        else:
            problems.append(gate.exact(f"{name} running_mean after eval", running_mean, start_mean))
            problems.append(gate.exact(f"{name} running_var after eval", running_var, start_var))
        return gate.first_problem(*problems)

    saved = None
    if training:
        saved = lambda: memory.saved_bytes(forward, (x, weight, bias, running_mean, running_var))  # noqa: E731
    return Impl(name, run=run, check=check, bytes_moved=passes(kind) * x.numel() * x.element_size(), saved_bytes=saved)


def build(case: Case) -> BuiltCase:
    shape, layout, kind = case.param("shape"), case.param("layout"), case.kind
    device, channels = case.device, shape[1]
    generator = torch.Generator(device=device).manual_seed(0)

    def randn(*size: int) -> torch.Tensor:
        return torch.randn(size, dtype=torch.float32, device=device, generator=generator)

    def activation(std: float, mean: float) -> torch.Tensor:
        return (randn(*shape) * std + mean).to(dtype=case.dtype, memory_format=MEMORY_FORMATS[layout])

    training = kind != "eval_fwd"
    x = activation(2.0, 0.5).requires_grad_(training)  # a mean away from 0, as real activations have
    dy = activation(1.0, 0.0) if kind == "train_fwd_bwd" else None
    weight = (1 + 0.1 * randn(channels)).requires_grad_(training)
    bias = (0.1 * randn(channels)).requires_grad_(training)
    running_mean, running_var = 0.1 * randn(channels), 1 + 0.1 * randn(channels).abs()
    inputs = {
        "x": x,
        "dy": dy,
        "weight": weight,
        "bias": bias,
        "running_mean": running_mean,
        "running_var": running_var,
        "kind": kind,
        "numel": x.numel(),
        "expected": _oracle(x, dy, weight, bias, running_mean, running_var, kind),
    }
    impls = {name: batch_norm_impl(inputs, name, fn) for name, fn in implementations(case).items()}
    impls.update(copy_impls(x))
    return BuiltCase(case, inputs, {name: impls[name] for name in case.impl_names if name in impls})


def size_label(shape: tuple[int, ...], layout: str) -> str:
    return "x".join(str(d) for d in shape) + f"-{layout}"


def cases(bench_set: BenchSet, device: str, with_compile: Callable[[str], bool]) -> list[Case]:
    device_type = torch.device(device).type
    found = []
    for kind in KINDS:
        for dtype, layout in bench_set.batch_norm_variants[device_type]:
            for shape in bench_set.batch_norm_shapes[device_type]:
                params = (("shape", tuple(shape)), ("layout", layout))
                case = Case(
                    "batch_norm",
                    kind,
                    dtype,
                    size_label(shape, layout),
                    math.prod(shape),
                    device,
                    (),
                    "torch_eager",
                    build,
                    params,
                )
                names = ["torch_eager"] + (["torch_compile"] if with_compile(case.id) else [])
                names += ["fastreg", "reference", *COPY_IMPLS]
                found.append(dataclasses.replace(case, impl_names=tuple(names)))
    return found


register_op("batch_norm", cases)
