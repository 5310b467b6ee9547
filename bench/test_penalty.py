"""Weight-penalty cases of fastreg.bench under pytest-benchmark (skipped, with the reason, if
fastreg.penalty cannot be imported)."""

OP = "penalty"


def test_penalty(benchmark, bench_item, bench_policy, bench_timed):
    from fastreg.bench.pytest_glue import run_item

    case, impl = bench_item
    run_item(benchmark, case, impl, bench_policy, bench_timed)
