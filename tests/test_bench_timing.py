"""fastreg.bench.timing: the implementations of a case take their rounds in turn."""

from __future__ import annotations

import time

from fastreg.bench.sets import TimingPolicy
from fastreg.bench.timing import measure_interleaved

POLICY = TimingPolicy(warmup=2, min_rounds=4, max_rounds=4, max_time_s=0.05, slow_cap_s=0.2, min_round_s=0.0)


def recorder(log: list[str], name: str, seconds: float = 0.0):
    def fn():
        log.append(name)
        if seconds:
            time.sleep(seconds)

    return fn


def test_rounds_alternate_between_implementations():
    log: list[str] = []
    timings = measure_interleaved({"a": recorder(log, "a"), "b": recorder(log, "b")}, "cpu", POLICY)
    assert [t.rounds for t in timings.values()] == [4, 4]
    calls = {name: t.calls_per_round for name, t in timings.items()}
    warmups = {name: t.warmup_calls for name, t in timings.items()}
    # warm-up calls one implementation after the other, then one round of each in turn
    timed = log[warmups["a"] + warmups["b"] :]
    round_of = lambda name: [name] * calls[name]  # noqa: E731
    assert timed == (round_of("a") + round_of("b")) * 4


def test_slow_implementation_is_timed_after_the_others_and_keeps_its_first_call():
    log: list[str] = []
    fns = {"slow": recorder(log, "slow", seconds=0.06), "fast": recorder(log, "fast")}
    timings = measure_interleaved(fns, "cpu", POLICY)
    assert list(timings) == ["slow", "fast"], "rows keep the case's order"
    first_fast_round = log.index("fast")
    assert log[:first_fast_round] == ["slow"], "one call of the slow one, then the others' turns"
    assert log[-1] == "slow" and timings["slow"].calls_per_round == 1 and timings["slow"].warmup_calls == 0
    assert timings["slow"].median_s >= 0.06 > timings["fast"].median_s
