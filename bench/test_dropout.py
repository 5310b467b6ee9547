"""Dropout cases of fastreg.bench under pytest-benchmark: one item per case x implementation."""

OP = "dropout"


def test_dropout(benchmark, bench_item, bench_policy, bench_timed):
    from fastreg.bench.pytest_glue import run_item

    case, impl = bench_item
    run_item(benchmark, case, impl, bench_policy, bench_timed)
