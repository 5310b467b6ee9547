"""Case registry: what a case is, and how each op contributes its cases.

A ``Case`` is a cheap description (its id names it in pytest and in the report); ``build()``
allocates the inputs and returns a ``BuiltCase`` holding one ``Impl`` per implementation,
all closed over the same inputs, so they run side by side on identical data.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from .sets import SETS, BenchSet


@dataclass
class Impl:
    name: str
    run: Callable[[], Any]  # one timed call, made the way users make it
    check: Callable[[], str | None]  # the correctness gate: None when right, else why not
    bytes_moved: int  # bytes an ideal kernel moves for this row: the basis of its GB/s
    baseline: bool = False  # a copy row: not an implementation of the op, the yardstick
    saved_bytes: Callable[[], int | None] | None = None  # bytes kept alive for backward
    note: str = ""


@dataclass
class BuiltCase:
    case: Case
    inputs: dict[str, Any]
    impls: dict[str, Impl]


@dataclass(frozen=True)
class Case:
    op: str  # "dropout", "penalty", "batch_norm"
    kind: str  # "fwd", "fwd_bwd", "value_grad", "train_fwd", "train_fwd_bwd", "eval_fwd"
    dtype: torch.dtype
    size: str  # label: "16M", "resnet50"
    numel: int  # elements (parameters) per call: the x axis of the plots
    device: str
    impl_names: tuple[str, ...]
    eager: str  # the PyTorch row that speedups are measured against
    builder: Callable[[Case], BuiltCase] = field(compare=False, repr=False)
    params: tuple[tuple[str, Any], ...] = ()

    @property
    def id(self) -> str:
        from .sets import DTYPE_NAMES

        return f"{self.op}-{self.kind}-{DTYPE_NAMES.get(self.dtype, str(self.dtype))}-{self.size}"

    def param(self, name: str) -> Any:
        return dict(self.params)[name]

    def build(self) -> BuiltCase:
        return self.builder(self)


#: op name -> function(bench_set, device, with_compile) -> list of cases
_OPS: dict[str, Callable[[BenchSet, str, Callable[[str], bool]], list[Case]]] = {}


def register_op(name: str, cases_fn: Callable[[BenchSet, str, Callable[[str], bool]], list[Case]]) -> None:
    _OPS[name] = cases_fn


def op_names() -> list[str]:
    _load_builtin_ops()
    return list(_OPS)


def _load_builtin_ops() -> None:
    # imported here, not at module top, so a broken op module cannot break the registry itself
    # in this order: a run goes through the ops in the order they registered
    for module in ("dropout_cases", "penalty_cases", "batch_norm_cases"):
        importlib.import_module(f".{module}", __package__)


def compile_rule(bench_set: BenchSet, compile: str = "auto") -> Callable[[str], bool]:
    """Which case ids get a torch.compile row: 'auto' follows the set, 'on' all, 'off' none."""
    if compile == "on":
        return lambda case_id: True
    if compile == "off":
        return lambda case_id: False
    return bench_set.compile_cases


def cases_for(
    set_name: str = "quick", device: str = "cpu", ops: list[str] | None = None, compile: str = "auto"
) -> list[Case]:
    """Every case of the set on the device, for the named ops (all registered ops by default)."""
    _load_builtin_ops()
    bench_set = SETS[set_name]
    unknown = [op for op in ops or [] if op not in _OPS]
    if unknown:
        raise ValueError(f"unknown op(s) {unknown}; known: {sorted(_OPS)}")
    with_compile = compile_rule(bench_set, compile)
    found: list[Case] = []
    for name in ops or list(_OPS):
        found.extend(_OPS[name](bench_set, device, with_compile))
    return found
