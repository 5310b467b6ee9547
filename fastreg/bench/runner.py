"""Runs cases: gate every implementation, time the ones that pass, derive the metrics.

One row per case x implementation. A row whose gate fails carries the reason and no timing:
a wrong answer never gets a speed next to it.
"""

from __future__ import annotations

import math
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch

from .cases import BuiltCase, Case, Impl
from .sets import DTYPE_NAMES, TimingPolicy
from .timing import Timing, measure_interleaved


class Unavailable(Exception):
    """A case cannot be built here (e.g. its op is not in this fastreg); its rows are skipped."""


OK, MISMATCH, ERROR, SKIPPED = "ok", "mismatch", "error", "skipped"


@dataclass
class Row:
    case: str
    op: str
    kind: str
    dtype: str
    size: str
    numel: int
    device: str
    impl: str
    baseline: bool
    eager: str = ""  # the PyTorch row speedup_vs_eager divides
    status: str = OK
    message: str = ""
    median_ms: float = math.nan
    min_ms: float = math.nan
    q25_ms: float = math.nan
    q75_ms: float = math.nan
    rounds: int = 0
    calls_per_round: int = 0
    bytes_moved: int = 0
    gbps: float = math.nan
    pct_of_copy_inplace: float = math.nan
    pct_of_copy_clone: float = math.nan
    speedup_vs_eager: float = math.nan
    speedup_vs_best_torch: float = math.nan
    saved_bytes: float = math.nan  # NaN: not measured or not measurable
    note: str = ""
    samples_ms: list[float] = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)


def gate_impl(impl: Impl) -> tuple[str, str]:
    """(status, message): runs the implementation's correctness check."""
    try:
        problem = impl.check()
    except Exception as error:  # noqa: BLE001 - any failure of an implementation is reported, not fatal
        last = traceback.format_exception_only(type(error), error)[-1].strip()
        return ERROR, f"raised while checking: {last[:500]}"
    if problem:
        return MISMATCH, f"correctness gate failed: {problem}"
    return OK, ""


def _base_row(case: Case, built: BuiltCase | None, impl_name: str, impl: Impl | None) -> Row:
    numel = built.inputs.get("numel", case.numel) if built else case.numel
    return Row(
        case.id,
        case.op,
        case.kind,
        DTYPE_NAMES.get(case.dtype, str(case.dtype)),
        case.size,
        numel,
        case.device,
        impl_name,
        bool(impl and impl.baseline),
        case.eager,
        bytes_moved=impl.bytes_moved if impl else 0,
        note=impl.note if impl else "",
    )


def _fill_timing(row: Row, timing: Timing) -> None:
    row.median_ms, row.min_ms = timing.median_s * 1e3, timing.min_s * 1e3
    row.q25_ms, row.q75_ms = timing.quantile_s(0.25) * 1e3, timing.quantile_s(0.75) * 1e3
    row.rounds, row.calls_per_round = timing.rounds, timing.calls_per_round
    row.samples_ms = [s * 1e3 for s in timing.per_call_s]
    row.gbps = row.bytes_moved / timing.median_s / 1e9 if row.bytes_moved else math.nan


def derive(case: Case, rows: list[Row]) -> None:
    """Cross-row metrics of one case: % of copy bandwidth, speedups."""
    by_name = {r.impl: r for r in rows if r.status == OK}
    eager = by_name.get(case.eager)
    torch_rows = [r for r in by_name.values() if r.impl.startswith("torch")]
    best_torch = min((r.median_ms for r in torch_rows), default=math.nan)
    for row in rows:
        if row.status != OK:
            continue
        for copy_name, attr in (("copy_inplace", "pct_of_copy_inplace"), ("copy_clone", "pct_of_copy_clone")):
            copy = by_name.get(copy_name)
            if copy and copy.gbps > 0:
                setattr(row, attr, 100.0 * row.gbps / copy.gbps)
        if row.baseline:
            continue
        if eager:
            row.speedup_vs_eager = eager.median_ms / row.median_ms
        row.speedup_vs_best_torch = best_torch / row.median_ms


Progress = Callable[[str], None]


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run_case(
    case: Case,
    policy: TimingPolicy,
    *,
    time_it: bool = True,
    progress: Progress = _stderr,
    built: BuiltCase | None = None,
) -> list[Row]:
    """Gate, then (``time_it``) time, every implementation of one case, on the same inputs."""
    try:
        built = built or case.build()
    except Unavailable as why:
        return [
            Row(
                case.id,
                case.op,
                case.kind,
                DTYPE_NAMES.get(case.dtype, str(case.dtype)),
                case.size,
                case.numel,
                case.device,
                name,
                name.startswith("copy"),
                case.eager,
                SKIPPED,
                str(why),
            )
            for name in case.impl_names
        ]
    rows = []
    passed: dict[str, Row] = {}
    for name in case.impl_names:
        impl = built.impls.get(name)
        row = _base_row(case, built, name, impl)
        rows.append(row)
        if impl is None:
            row.status, row.message = SKIPPED, "not available in this build"
            continue
        row.status, row.message = gate_impl(impl)
        if row.status != OK:
            progress(f"  {name:<14} {row.status.upper()}: {row.message}")
            continue
        if impl.saved_bytes is not None:
            saved = impl.saved_bytes()
            row.saved_bytes = math.nan if saved is None else saved
        passed[name] = row
        if not time_it:
            progress(f"  {name:<14} gate ok")
        if case.device.startswith("cuda"):
            torch.cuda.synchronize()
    if time_it and passed:
        started = time.perf_counter()
        timings = measure_interleaved({name: built.impls[name].run for name in passed}, case.device, policy)
        for name, row in passed.items():
            _fill_timing(row, timings[name])
            progress(f"  {name:<14} {_format_ms(row.median_ms):>10}  {row.gbps:8.2f} GB/s")
        progress(f"  (timed in turns, {time.perf_counter() - started:.1f} s)")
        if case.device.startswith("cuda"):
            torch.cuda.synchronize()
    derive(case, rows)
    return rows


def _format_ms(ms: float) -> str:
    if math.isnan(ms):
        return "-"
    return f"{ms * 1e3:.1f} us" if ms < 1 else f"{ms:.2f} ms"


def run_cases(
    cases: list[Case], policy: TimingPolicy, *, time_it: bool = True, progress: Progress = _stderr
) -> list[Row]:
    rows: list[Row] = []
    for index, case in enumerate(cases, 1):
        progress(f"[{index}/{len(cases)}] {case.id}")
        rows.extend(run_case(case, policy, time_it=time_it, progress=progress))
    return rows
