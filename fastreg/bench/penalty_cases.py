"""Weight-penalty cases: L1 + L2 value and gradient over a model's parameter list.

Every implementation does the training-loop job: after backward, add the penalty's gradient
into each ``.grad`` and return the penalty value. PyTorch's ways: autograd on the naive
formula (what users write), the best ``torch._foreach_*`` pipeline, and torch.compile of it;
fastreg eagerly and under torch.compile (where it runs the same kernel through the ops'
tensor-coefficient twins). Ideal bytes: read w, read g, write g: 12 bytes per fp32 parameter.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import torch

from ..reference import weight_penalty as ref
from . import gate, penalty_inputs
from .baselines import COPY_IMPLS, copy_impls
from .cases import BuiltCase, Case, Impl, register_op
from .penalty_baselines import foreach_penalty_, naive_autograd_penalty
from .runner import Unavailable
from .sets import BenchSet

#: list name -> (shapes function, params function) of .penalty_inputs
PARAM_LISTS = {
    "small": (penalty_inputs.small_cpu_shapes, penalty_inputs.small_cpu_params),
    "resnet50": (penalty_inputs.resnet50_shapes, penalty_inputs.resnet50_like_params),
    "resnet50_host": (penalty_inputs.resnet50_host_shapes, penalty_inputs.resnet50_host_params),  # host cost per step
    "gpt2_small": (penalty_inputs.gpt2_small_shapes, penalty_inputs.gpt2_small_like_params),
}
IMPLS = ("torch_autograd", "torch_foreach", "torch_compile", "fastreg", "fastreg_compile", "reference")
COMPILED_IMPLS = ("torch_compile", "fastreg_compile")


def _penalty_module() -> Any:
    try:
        from .. import penalty
    except Exception as error:  # noqa: BLE001 - any reason it cannot load is a reason to skip
        raise Unavailable(f"fastreg.penalty cannot be imported: {type(error).__name__}: {error}") from error
    return penalty


def _numel(list_name: str) -> int:
    return sum(math.prod(s) for s in PARAM_LISTS[list_name][0]())


def _autograd(params, l1, l2) -> Callable[[], torch.Tensor]:
    def run():
        value = naive_autograd_penalty(params, l1, l2)
        value.backward()  # accumulates into .grad, as a training step does
        return value.detach()

    return run


def _compiled_foreach(params, l1, l2) -> Callable[[], torch.Tensor]:
    torch._dynamo.reset()  # its own dynamo cache, like every compiled row (see dropout_cases)
    compiled = torch.compile(foreach_penalty_)
    return lambda: compiled(params, l1, l2)


def _compiled_fastreg(fastreg_penalty) -> Callable[[], torch.Tensor]:
    torch._dynamo.reset()
    return torch.compile(fastreg_penalty.add_grad_, fullgraph=True)


def implementations(penalty, params, l1: float, l2: float, names) -> dict[str, Callable[[], torch.Tensor]]:
    fastreg_penalty = penalty.WeightPenalty(params, l1=l1, l2=l2)
    makers = {
        "torch_autograd": lambda: _autograd(params, l1, l2),
        "torch_foreach": lambda: lambda: foreach_penalty_(params, l1, l2),
        "torch_compile": lambda: _compiled_foreach(params, l1, l2),
        "fastreg": lambda: fastreg_penalty.add_grad_,
        "fastreg_compile": lambda: _compiled_fastreg(fastreg_penalty),
        "reference": lambda: lambda: ref.weight_penalty_grad_([p.grad for p in params], params, l1, l2),
    }
    return {name: makers[name]() for name in names if name in makers}


def penalty_impl(inputs: dict, name: str, fn: Callable[[], torch.Tensor]) -> Impl:
    """An Impl over the case's parameters: ``fn`` adds the gradient into .grad, returns the value.
    The gate restores the starting gradients, runs fn once and compares value and gradients
    with the reference within the per-dtype tolerances."""
    params, start = inputs["params"], inputs["start_grads"]

    def check() -> str | None:
        for p, g in zip(params, start):
            p.grad.copy_(g)
        value = fn()
        expected_value, expected_grads = inputs["expected"]
        value = value.detach().reshape(()).to(expected_value.dtype) if isinstance(value, torch.Tensor) else value
        if not isinstance(value, torch.Tensor):
            return f"{name} returned {type(value).__name__}, not the penalty value"
        return gate.first_problem(
            gate.close(f"{name} penalty value vs reference", value, expected_value),
            gate.close(f"{name} gradients vs reference", [p.grad for p in params], expected_grads),
        )

    element_size = params[0].element_size() if params else 4
    return Impl(name, run=fn, check=check, bytes_moved=3 * inputs["numel"] * element_size)


def build(case: Case) -> BuiltCase:
    penalty = _penalty_module()
    l1, l2 = case.param("l1"), case.param("l2")
    params = PARAM_LISTS[case.size][1](case.device, case.dtype, grads=True)
    start = [p.grad.clone() for p in params]
    expected_grads = [g.clone() for g in start]
    expected_value = ref.weight_penalty_grad_(expected_grads, params, l1, l2)
    numel = sum(p.numel() for p in params)
    inputs = {"params": params, "start_grads": start, "expected": (expected_value, expected_grads), "numel": numel}
    impls = {
        name: penalty_impl(inputs, name, fn)
        for name, fn in implementations(penalty, params, l1, l2, case.impl_names).items()
    }
    # the yardstick: one flat tensor as big as all the parameters together
    impls.update(copy_impls(torch.randn(numel, dtype=case.dtype, device=case.device)))
    return BuiltCase(case, inputs, {name: impls[name] for name in case.impl_names if name in impls})


def cases(bench_set: BenchSet, device: str, with_compile: Callable[[str], bool]) -> list[Case]:
    found = []
    params = (("l1", bench_set.penalty_l1), ("l2", bench_set.penalty_l2))
    for list_name in bench_set.penalty_lists[torch.device(device).type]:
        numel = _numel(list_name)
        case = Case(
            "penalty", "value_grad", torch.float32, list_name, numel, device, (), "torch_autograd", build, params
        )
        names = tuple(n for n in IMPLS if n not in COMPILED_IMPLS or with_compile(case.id)) + COPY_IMPLS
        found.append(dataclasses.replace(case, impl_names=names))
    return found


register_op("penalty", cases)
