"""Batch-norm cases of fastreg.bench under pytest-benchmark: one item per case x implementation
(training forward, training forward + backward, eval forward; NCHW and channels_last)."""

OP = "batch_norm"


def test_batch_norm(benchmark, bench_item, bench_policy, bench_timed):
    from fastreg.bench.pytest_glue import run_item

    case, impl = bench_item
    run_item(benchmark, case, impl, bench_policy, bench_timed)
