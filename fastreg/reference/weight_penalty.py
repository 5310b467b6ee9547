"""Reference L1/L2 weight penalty: the naive formula in plain PyTorch.

    value = l1 * sum(p.abs().sum() for p in params) + l2 * sum((p ** 2).sum() for p in params)

accumulated in float32 (float64 when any parameter is float64). The gradient expressions are
autograd's on that formula, written in the same order, so for float32 parameters the kernels,
this reference and autograd give the same gradient bits; float16/bfloat16 gradients are
computed in float32 and rounded once (autograd rounds after each step).
"""

from __future__ import annotations

import math
import sys

import torch

from ..memory_format import is_non_overlapping_and_dense, memory_dense
from .in_place import bump_version, check_overwritable

#: what the error for a direct call of fastreg::weight_penalty_grad_ on gradients requiring grad recommends
GRAD_DIFFERENTIABLE_FORM = "fastreg.functional.weight_penalty(params, l1, l2), which is differentiable"

SUPPORTED_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)

_FLOAT_MAX = sys.float_info.max


def check_coefficients(l1: float, l2: float) -> None:
    if torch.compiler.is_compiling():
        # A coefficient that changes between calls is a symbolic float there, which math.isfinite
        # cannot take, and a message cannot format. 0 <= c <= the largest float is the same test
        # (nan and inf fail it); Dynamo keeps a torch._check as a guard and an assert of the graph,
        # so each new value is checked too.
        torch._check(l1 >= 0.0, lambda: "fastreg.weight_penalty: l1 must be a finite number >= 0")
        torch._check(l1 <= _FLOAT_MAX, lambda: "fastreg.weight_penalty: l1 must be a finite number >= 0")
        torch._check(l2 >= 0.0, lambda: "fastreg.weight_penalty: l2 must be a finite number >= 0")
        torch._check(l2 <= _FLOAT_MAX, lambda: "fastreg.weight_penalty: l2 must be a finite number >= 0")
        return
    for name, value in (("l1", l1), ("l2", l2)):
        if not (math.isfinite(value) and value >= 0.0):
            raise ValueError(f"fastreg.weight_penalty: {name} must be a finite number >= 0, got {value}")


def check_coefficient_tensors(l1: torch.Tensor, l2: torch.Tensor) -> None:
    """The checks of the ``*_tensor_coefficients`` ops' coefficients that need no values (also the fakes')."""
    for name, c in (("l1", l1), ("l2", l2)):
        if c.layout != torch.strided or c.device.type != "cpu":
            raise RuntimeError(
                f"fastreg.weight_penalty: the {name} tensor is on {c.device} with layout {c.layout}; "
                "coefficient tensors must be dense CPU tensors (their values are read on the host)"
            )
        if not c.is_floating_point():
            raise TypeError(
                f"fastreg.weight_penalty: the {name} tensor has dtype {c.dtype}; expected a floating-point tensor"
            )
        if c.numel() != 1:
            raise ValueError(f"fastreg.weight_penalty: the {name} tensor must have one element, got {c.numel()}")


def coefficient_values(l1: torch.Tensor, l2: torch.Tensor) -> tuple[float, float]:
    """The checked values of the ``*_tensor_coefficients`` ops' coefficients."""
    check_coefficient_tensors(l1, l2)
    values = float(l1), float(l2)
    check_coefficients(*values)
    return values


def check_params(params) -> None:
    for i, p in enumerate(params):
        if p.layout != torch.strided:
            raise RuntimeError(
                f"fastreg.weight_penalty: params[{i}] has layout {p.layout}; "
                "only strided (dense) parameters are supported"
            )
        if p.dtype not in SUPPORTED_DTYPES:
            raise TypeError(
                f"fastreg.weight_penalty: params[{i}] has dtype {p.dtype}; "
                "expected a floating-point tensor (float64, float32, float16 or bfloat16)"
            )
        if p.device != params[0].device:
            raise RuntimeError(
                f"fastreg.weight_penalty: params[{i}] is on {p.device} but params[0] is on {params[0].device}; "
                "pass the tensors of one device per call"
            )


def check_grads(grads, params, *, memory: bool = True) -> None:
    """The gradients' checks; ``memory=False`` leaves out those that need storage (fake tensors)."""
    if len(grads) != len(params):
        raise RuntimeError(f"fastreg.weight_penalty: got {len(grads)} gradients for {len(params)} parameters")
    for i, (g, p) in enumerate(zip(grads, params)):
        if g.layout != torch.strided:
            raise RuntimeError(
                f"fastreg.weight_penalty: grads[{i}] is a sparse gradient (layout {g.layout}); the in-place penalty "
                "needs dense gradients (e.g. an nn.Embedding with sparse=False)"
            )
        if g.device != p.device:
            raise RuntimeError(f"fastreg.weight_penalty: grads[{i}] is on {g.device} but params[{i}] is on {p.device}")
        if g.dtype != p.dtype:
            raise TypeError(
                f"fastreg.weight_penalty: grads[{i}] has dtype {g.dtype} but params[{i}] has dtype {p.dtype}"
            )
        if g.shape != p.shape:
            raise RuntimeError(
                f"fastreg.weight_penalty: grads[{i}] has shape {list(g.shape)} "
                f"but params[{i}] has shape {list(p.shape)}"
            )
        check_overwritable(g, "fastreg.weight_penalty_grad_", f"grads[{i}]", GRAD_DIFFERENTIABLE_FORM)
        if g.numel() == 0:
            continue
        if not is_non_overlapping_and_dense(g):
            raise RuntimeError(
                f"fastreg.weight_penalty: grads[{i}] is a view with gaps or overlapping elements "
                f"(strides {list(g.stride())}); "
                "the in-place update needs a dense gradient, e.g. torch.zeros_like(param)"
            )
        if not memory:
            continue
        if g.data_ptr() == p.data_ptr():
            raise RuntimeError(f"fastreg.weight_penalty: grads[{i}] is the memory of params[{i}]")
    if memory:
        _check_grads_overlap(grads, params)


def _extent(t: torch.Tensor) -> tuple[int, int]:
    """The bytes [begin, end) a non-empty tensor's elements lie in (exactly its elements when dense)."""
    last = sum((size - 1) * stride for size, stride in zip(t.shape, t.stride()))
    return t.data_ptr(), t.data_ptr() + (last + 1) * t.element_size()


def _check_grads_overlap(grads, params) -> None:
    # As the C++ glue: the in-place update must not write a gradient twice, nor a parameter it reads.
    ranges = sorted((*_extent(g), i) for i, g in enumerate(grads) if g.numel() > 0)
    for (a_begin, a_end, a), (b_begin, _, b) in zip(ranges, ranges[1:]):
        if b_begin == a_begin:
            raise RuntimeError(
                f"fastreg.weight_penalty: grads[{max(a, b)}] and grads[{min(a, b)}] share memory; "
                "list each parameter once"
            )
        if b_begin < a_end:
            raise RuntimeError(
                f"fastreg.weight_penalty: grads[{max(a, b)}] and grads[{min(a, b)}] overlap in memory; "
                "each gradient needs memory of its own"
            )
    for j, p in enumerate(params):
        if p.numel() == 0:
            continue
        begin, end = _extent(p)
        for g_begin, g_end, i in ranges:
            if g_end > begin:
                if g_begin < end:
                    raise RuntimeError(
                        f"fastreg.weight_penalty: grads[{i}] overlaps params[{j}] in memory; "
                        "the in-place update would change a parameter while it is read"
                    )
                break


def value_dtype(params) -> torch.dtype:
    """float64 when any parameter is float64, else float32: the value's dtype and accumulation."""
    return torch.float64 if any(p.dtype == torch.float64 for p in params) else torch.float32


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _value(params, l1: float, l2: float) -> torch.Tensor:
    dtype = value_dtype(params)
    device = params[0].device if params else torch.device("cpu")
    s1 = torch.zeros((), dtype=torch.float64, device=device)
    s2 = torch.zeros((), dtype=torch.float64, device=device)
    for p in params:
        x = p.detach().to(compute_dtype(p.dtype))
        s1 = s1 + x.abs().sum()
        s2 = s2 + (x * x).sum()
    return (l1 * s1 + l2 * s2).to(dtype)


def weight_penalty_value(params: list[torch.Tensor], l1: float, l2: float) -> torch.Tensor:
    check_coefficients(l1, l2)
    check_params(params)
    return _value(params, l1, l2)


def _sign_term(x: torch.Tensor, c1: torch.Tensor, c2x2: torch.Tensor) -> torch.Tensor:
    # c1 * sign(x) + c2x2 * x, in x's (compute) dtype; torch.sign(0) == 0.
    return c1 * torch.sign(x) + c2x2 * x


def weight_penalty_grad_(grads: list[torch.Tensor], params: list[torch.Tensor], l1: float, l2: float) -> torch.Tensor:
    """grads[i] += l1 * sign(params[i]) + 2 * l2 * params[i] (in place); returns the value."""
    check_coefficients(l1, l2)
    check_params(params)
    check_grads(grads, params)
    value = _value(params, l1, l2)
    for g, p in zip(grads, params):
        if g.numel() == 0:
            continue
        dtype = compute_dtype(p.dtype)
        c1 = torch.tensor(l1, dtype=dtype, device=p.device)
        c2x2 = 2 * torch.tensor(l2, dtype=dtype, device=p.device)
        x = p.detach().to(dtype)
        g.copy_(g.to(dtype) + _sign_term(x, c1, c2x2))
    for g in grads:
        bump_version(g)
    return value


def check_grad_output(grad_output: torch.Tensor, params) -> None:
    if grad_output.numel() != 1:
        raise RuntimeError(
            f"fastreg.weight_penalty_backward: grad_output must have one element, got {grad_output.numel()}"
        )
    device = params[0].device if params else torch.device("cpu")
    if grad_output.device != device:
        raise RuntimeError(
            f"fastreg.weight_penalty_backward: grad_output is on {grad_output.device} "
            f"but the parameters are on {device}"
        )


def weight_penalty_backward(
    grad_output: torch.Tensor, params: list[torch.Tensor], l1: float, l2: float
) -> list[torch.Tensor]:
    """[(go * l1) * sign(p) + 2 * (go * l2) * p for p in params], laid out like memory_dense(p).

    go * l1 and go * l2 are formed in the value's dtype and then cast to each parameter's compute
    dtype, as autograd forms them on the naive formula (csrc/weight_penalty/weight_penalty_coefficients.h):
    with a float64 parameter in the list, a float32 one gets float(double(go) * l1)."""
    check_coefficients(l1, l2)
    check_params(params)
    check_grad_output(grad_output, params)
    go = grad_output.detach().reshape(()).to(value_dtype(params))
    go_l1 = go * torch.tensor(l1, dtype=go.dtype, device=go.device)
    go_l2 = go * torch.tensor(l2, dtype=go.dtype, device=go.device)
    outputs = []
    for p in params:
        dense = memory_dense(p.detach())
        dtype = compute_dtype(p.dtype)
        c1 = go_l1.to(dtype)
        c2x2 = 2 * go_l2.to(dtype)
        out = torch.empty_like(dense)
        out.copy_(_sign_term(dense.to(dtype), c1, c2x2))
        outputs.append(out)
    return outputs


# The same ops with l1 and l2 as one-element CPU tensors, which torch.compile does not specialise
# (fastreg/penalty.py calls them under torch.compile; docs/weight_penalty.md).


def weight_penalty_value_tensor_coefficients(params, l1: torch.Tensor, l2: torch.Tensor) -> torch.Tensor:
    return weight_penalty_value(params, *coefficient_values(l1, l2))


def weight_penalty_grad_tensor_coefficients_(grads, params, l1: torch.Tensor, l2: torch.Tensor) -> torch.Tensor:
    return weight_penalty_grad_(grads, params, *coefficient_values(l1, l2))


def weight_penalty_backward_tensor_coefficients(
    grad_output: torch.Tensor, params, l1: torch.Tensor, l2: torch.Tensor
) -> list[torch.Tensor]:
    return weight_penalty_backward(grad_output, params, *coefficient_values(l1, l2))


def naive_penalty(params, l1: float, l2: float) -> torch.Tensor:
    """The formula users write, differentiable, in the parameters' own dtypes (the test oracle)."""
    return l1 * sum(p.abs().sum() for p in params) + l2 * sum((p**2).sum() for p in params)
