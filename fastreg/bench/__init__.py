"""fastreg's benchmark: the cases, the correctness gate, the timing and the report.

``python -m fastreg.bench`` (or ``fastreg-bench``) runs the cases and writes a report;
``pytest --benchmark bench/`` runs the same cases under pytest-benchmark. Both import the
case registry from here, so the two never drift apart. Method notes: docs/benchmark.md.
"""

from .cases import BuiltCase, Case, Impl, cases_for, register_op
from .sets import SETS, BenchSet, TimingPolicy

__all__ = ["SETS", "BenchSet", "BuiltCase", "Case", "Impl", "TimingPolicy", "cases_for", "register_op"]
