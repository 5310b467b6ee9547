"""pytest-benchmark wrappers over fastreg.bench's cases (the cases themselves live there).

pytest bench/                 each case x implementation once, untimed: the correctness gate only
pytest --benchmark bench/     gated and timed with pytest-benchmark (add --benchmark-json=FILE for raw data)
--bench-set quick|full  --bench-device cpu|cuda  --bench-compile auto|on|off
"""

from __future__ import annotations

import pytest
import torch

from fastreg.bench import pytest_glue
from fastreg.bench.cases import cases_for
from fastreg.bench.env import run_info
from fastreg.bench.report import op_section
from fastreg.bench.sets import SETS, default_set


def pytest_addoption(parser):
    group = parser.getgroup("fastreg-bench")
    group.addoption(
        "--benchmark",
        action="store_true",
        default=False,
        help="time the bench/ cases; without it each case runs once, untimed, as a correctness check",
    )
    group.addoption(
        "--bench-set", choices=sorted(SETS), default=None, help="case set (default: full on GPU, quick on CPU)"
    )
    group.addoption("--bench-device", default=None, help="cpu or cuda (default: cuda when available)")
    group.addoption(
        "--bench-compile",
        choices=("auto", "on", "off"),
        default="auto",
        help="torch.compile rows (auto: as the set says)",
    )


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config):
    # Runs before pytest-benchmark builds its session: no --benchmark means --benchmark-disable,
    # unless the user forced timing with pytest-benchmark's own --benchmark-enable.
    if not config.getoption("benchmark") and not config.getoption("benchmark_enable", default=False):
        config.option.benchmark_disable = True


def _device(config) -> str:
    return config.getoption("bench_device") or ("cuda" if torch.cuda.is_available() else "cpu")


def _set(config) -> str:
    return config.getoption("bench_set") or default_set(_device(config))


def pytest_generate_tests(metafunc):
    if "bench_item" not in metafunc.fixturenames:
        return
    config = metafunc.config
    cases = cases_for(_set(config), _device(config), [metafunc.module.OP], config.getoption("bench_compile"))
    # Untimed, a torch.compile item is a 20-60 s compile on a small CPU for a correctness pass:
    # mark it slow, so the default `-m 'not slow'` run leaves it to `pytest -m slow bench/`.
    untimed_compile = () if config.getoption("benchmark") else (pytest.mark.slow,)
    params = [
        pytest.param((case, impl), id=f"{case.id}-{impl}", marks=untimed_compile if impl == "torch_compile" else ())
        for case in cases
        for impl in case.impl_names
    ]
    metafunc.parametrize("bench_item", params)


@pytest.fixture
def bench_policy(request):
    return SETS[_set(request.config)].timing


@pytest.fixture
def bench_timed(request):
    # pytest-benchmark's session holds the final word (--benchmark-enable/--benchmark-disable)
    session = getattr(request.config, "_benchmarksession", None)
    return bool(session is not None and not session.disabled)


def pytest_report_header(config):
    device = _device(config)
    if device.startswith("cuda") and not torch.cuda.is_available():
        return f"fastreg bench: {device} requested but not available"
    info = run_info(device, _set(config))
    timed = "timed" if config.getoption("benchmark") else "untimed (pass --benchmark to time)"
    return (
        f"fastreg bench: set {info['set']}, {info['device_name']}, torch {info['torch_version']}, "
        f"fastreg {info['fastreg_commit']} [{info['fastreg_backend']}], {timed}"
    )


def pytest_terminal_summary(terminalreporter):
    rows = [row.as_dict() for row in pytest_glue.finished_rows()]
    if not rows:
        return
    terminalreporter.section("fastreg speedups (median per call; full report: python -m fastreg.bench)")
    for op in dict.fromkeys(r["op"] for r in rows):
        for line in op_section(op, [r for r in rows if r["op"] == op]):
            terminalreporter.write_line(line)


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["fastreg"] = run_info(_device(config), _set(config))


def pytest_benchmark_update_json(config, benchmarks, output_json):
    """Adds the cross-row metrics (known only once every row of a case ran) to --benchmark-json."""
    rows = {(row.case, row.impl): row for row in pytest_glue.finished_rows()}
    for bench in output_json.get("benchmarks", []):
        info = bench.setdefault("extra_info", {})
        row = rows.get((info.get("case"), info.get("impl")))
        if row is not None:
            info.update(
                median_ms_per_call=row.median_ms,
                pct_of_copy_inplace=row.pct_of_copy_inplace,
                pct_of_copy_clone=row.pct_of_copy_clone,
                speedup_vs_eager=row.speedup_vs_eager,
                speedup_vs_best_torch=row.speedup_vs_best_torch,
            )
