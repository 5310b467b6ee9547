"""What bench/conftest.py and bench/test_*.py share: pytest-benchmark on top of the case registry.

Each pytest item is one (case, implementation). It gates the implementation first (a mismatch
fails the item with the reason; nothing is timed), then, with timing on, hands a target to
pytest-benchmark. On CUDA the benchmark's timer synchronises the device before reading the
clock, so a round of ``iterations`` launches is synchronised once and its time divided by the
launches. Without --benchmark, pytest-benchmark is disabled and runs each target once.
"""

from __future__ import annotations

import math
import time

import pytest
import torch

from .cases import BuiltCase, Case
from .runner import OK, Row, Unavailable, _base_row, derive, gate_impl
from .sets import TimingPolicy
from .timing import is_cuda, plan, time_calls

#: rows of the items timed in this session, for the summary table at the end
TIMED_ROWS: list[Row] = []

_built: dict[str, BuiltCase] = {}  # one case at a time: items are ordered case by case


def built_case(case: Case) -> BuiltCase:
    if is_cuda(case.device) and not torch.cuda.is_available():
        pytest.skip(f"{case.device} requested but torch.cuda.is_available() is False")
    if case.id not in _built:
        _built.clear()  # free the previous case's tensors before allocating this one's
        try:
            _built[case.id] = case.build()
        except Unavailable as why:
            pytest.skip(str(why))
    return _built[case.id]


def synchronized_perf_counter() -> float:
    torch.cuda.synchronize()
    return time.perf_counter()


def run_item(benchmark, case: Case, impl_name: str, policy: TimingPolicy, timed: bool) -> Row:
    built = built_case(case)
    impl = built.impls.get(impl_name)
    if impl is None:
        pytest.skip(f"{impl_name} is not available for {case.id}")
    benchmark.group = case.id
    status, message = gate_impl(impl)
    if status != OK:
        pytest.fail(f"{case.id} / {impl_name}: {message}", pytrace=False)
    row = _base_row(case, built, impl_name, impl)
    if not timed:
        benchmark(impl.run)  # disabled benchmark: one untimed call, still after the gate
        return row
    if is_cuda(case.device):
        benchmark._timer = synchronized_perf_counter  # see the module docstring
    estimate = time_calls(impl.run, 1, case.device)
    calls, rounds = plan(estimate, policy)
    slow = estimate >= policy.max_time_s  # already warm from the gate; do not spend more
    benchmark.pedantic(impl.run, rounds=rounds, iterations=calls, warmup_rounds=0 if slow else 1)
    samples = list(benchmark.stats.stats.data)
    row.samples_ms = [s * 1e3 for s in samples]
    ordered = sorted(row.samples_ms)
    row.median_ms, row.min_ms = benchmark.stats.stats.median * 1e3, ordered[0]
    row.q25_ms, row.q75_ms = benchmark.stats.stats.q1 * 1e3, benchmark.stats.stats.q3 * 1e3
    row.rounds, row.calls_per_round = len(samples), calls
    row.gbps = row.bytes_moved / (row.median_ms / 1e3) / 1e9 if row.bytes_moved else math.nan
    if impl.saved_bytes is not None:
        saved = impl.saved_bytes()
        row.saved_bytes = math.nan if saved is None else saved
    benchmark.extra_info.update(
        impl=impl_name,
        case=case.id,
        bytes_moved=row.bytes_moved,
        gbps=row.gbps,
        saved_bytes=row.saved_bytes,
        calls_per_round=calls,
        gate="passed",
    )
    TIMED_ROWS.append(row)
    return row


def finished_rows() -> list[Row]:
    """The timed rows with the cross-row metrics (speedups, % of copy) filled in per case."""
    by_case: dict[str, list[Row]] = {}
    for row in TIMED_ROWS:
        by_case.setdefault(row.case, []).append(row)
    for rows in by_case.values():
        derive(_CaseView(rows[0].eager), rows)
    return TIMED_ROWS


class _CaseView:
    """derive() needs only the eager implementation's name."""

    def __init__(self, eager: str) -> None:
        self.eager = eager
