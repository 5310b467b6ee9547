"""Timing that is honest on both CPU and asynchronous devices.

CPU: time.perf_counter around a batch of back-to-back calls per round. The op's own output
allocation (and its page faults) is part of what is timed, because users pay it too.
CUDA: CUDA events recorded on the current stream around a batch of launches, with one
synchronisation per round, so host launch overhead overlaps the kernels as it does in a
training step, and no per-call sync inflates small ops.
Both: the gate's call comes first (compilation, JIT and caches are warm), then warm-up
calls, then rounds; we keep every round's per-call time and report the median and spread.
The implementations of one case take their rounds in turn (measure_interleaved): a machine
whose speed drifts (a shared VM, a GPU warming up) then shifts them all alike, and the
speedups, which compare them, stay true; timed one after another, a drift of 2x between the
first and the last implementation went straight into the speedup.
"""

from __future__ import annotations

import gc
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from .sets import TimingPolicy


@dataclass
class Timing:
    per_call_s: list[float]  # one value per round: the round's time / calls_per_round
    calls_per_round: int
    warmup_calls: int

    @property
    def rounds(self) -> int:
        return len(self.per_call_s)

    @property
    def median_s(self) -> float:
        return statistics.median(self.per_call_s)

    @property
    def min_s(self) -> float:
        return min(self.per_call_s)

    def quantile_s(self, q: float) -> float:
        ordered = sorted(self.per_call_s)
        position = q * (len(ordered) - 1)
        low, high = math.floor(position), math.ceil(position)
        return ordered[low] + (ordered[high] - ordered[low]) * (position - low)

    @property
    def iqr_s(self) -> float:
        return self.quantile_s(0.75) - self.quantile_s(0.25)


def is_cuda(device: str | torch.device) -> bool:
    return torch.device(device).type == "cuda"


def time_calls(fn: Callable[[], Any], calls: int, device: str | torch.device) -> float:
    """Seconds for ``calls`` back-to-back calls of fn, synchronising once at the end."""
    if is_cuda(device):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize(device)
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    begin = time.perf_counter()
    for _ in range(calls):
        fn()
    return time.perf_counter() - begin


def plan(estimate_s: float, policy: TimingPolicy) -> tuple[int, int]:
    """(calls per round, rounds) for an op that takes about ``estimate_s`` per call."""
    estimate_s = max(estimate_s, 1e-7)
    calls = max(1, min(1000, math.ceil(policy.min_round_s / estimate_s)))
    round_s = calls * estimate_s
    rounds = max(policy.min_rounds, min(policy.max_rounds, int(policy.max_time_s / round_s)))
    if rounds * round_s > policy.slow_cap_s:
        rounds = max(1, int(policy.slow_cap_s / round_s))
    return calls, rounds


def warm_up(fn: Callable[[], Any], device: str | torch.device, policy: TimingPolicy) -> tuple[float, int]:
    """Warm-up calls after the gate's; returns (best seconds per call seen, calls made)."""
    best = time_calls(fn, 1, device)
    calls = 1
    while calls < policy.warmup and best * (calls + 1) < policy.max_time_s:
        best = min(best, time_calls(fn, 1, device))
        calls += 1
    return best, calls


def _rounds_in_turn(
    plans: dict[str, tuple[Callable[[], Any], int, int]], device: str | torch.device, policy: TimingPolicy
) -> dict[str, list[float]]:
    """Per-call seconds of each plan's rounds (name -> (fn, calls per round, rounds)), the
    plans taking one round each in turn. When a plan's rounds run far slower than planned (a
    busy shared machine), it stops once min_rounds are in and twice the slow cap is spent."""
    samples: dict[str, list[float]] = {name: [] for name in plans}
    spent = dict.fromkeys(plans, 0.0)
    budget = 2 * max(policy.max_time_s, policy.slow_cap_s)
    gc_was_enabled = gc.isenabled()
    gc.disable()  # a collection in the middle of a round is noise, not the op's cost
    try:
        for turn in range(max((rounds for _, _, rounds in plans.values()), default=0)):
            for name, (fn, calls, rounds) in plans.items():
                enough = len(samples[name]) >= min(rounds, policy.min_rounds)
                if turn >= rounds or (enough and spent[name] > budget):
                    continue
                seconds = time_calls(fn, calls, device)
                samples[name].append(seconds / calls)
                spent[name] += seconds
        return samples
    finally:
        if gc_was_enabled:
            gc.enable()


def _rounds(
    fn: Callable[[], Any], calls: int, rounds: int, device: str | torch.device, policy: TimingPolicy
) -> list[float]:
    return _rounds_in_turn({"fn": (fn, calls, rounds)}, device, policy)["fn"]


def _slow_timing(fn: Callable[[], Any], first: float, device: str | torch.device, policy: TimingPolicy) -> Timing:
    # A slow implementation (the reference, on big inputs): the gate's call already warmed it,
    # so its first timed call is the first round rather than a warm-up that only spends budget.
    _, rounds = plan(first, policy)
    return Timing([first] + _rounds(fn, 1, rounds - 1, device, policy), 1, 0)


def measure_interleaved(
    fns: dict[str, Callable[[], Any]], device: str | torch.device, policy: TimingPolicy
) -> dict[str, Timing]:
    """Timings of every implementation of a case, their rounds taken in turn. Slow ones
    (a call longer than the per-implementation budget, i.e. the reference on big inputs) are
    measured on their own afterwards: a round of theirs would stretch every turn."""
    plans: dict[str, tuple[Callable[[], Any], int, int]] = {}
    warmups: dict[str, int] = {}
    slow: dict[str, float] = {}  # name -> its first call's seconds
    for name, fn in fns.items():
        first = time_calls(fn, 1, device)
        if first >= policy.max_time_s:
            slow[name] = first
            continue
        estimate, warmup_calls = warm_up(fn, device, policy)
        calls, rounds = plan(min(first, estimate), policy)
        plans[name], warmups[name] = (fn, calls, rounds), warmup_calls + 1
    samples = _rounds_in_turn(plans, device, policy)
    timings = {name: Timing(samples[name], calls, warmups[name]) for name, (_, calls, _) in plans.items()}
    for name, first in slow.items():
        timings[name] = _slow_timing(fns[name], first, device, policy)
    return {name: timings[name] for name in fns}
