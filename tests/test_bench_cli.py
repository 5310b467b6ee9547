"""The command line of ``python -m fastreg.bench``: usage errors are one line and exit 2, other
errors one line and exit 1, never a traceback; nothing is run or written for a command that
cannot do what it was asked."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
import torch

from fastreg import info
from fastreg.bench import __main__ as bench_main
from fastreg.bench import report
from fastreg.bench.__main__ import main
from fastreg.bench.runner import Row


def usage_error(argv: list[str], capsys) -> str:
    """Runs the CLI, expects argparse's exit 2, returns its error line."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err.strip().splitlines()[-1]


@pytest.mark.parametrize("ops", ["nope", "dropout,nope", "dropout,", ","])
def test_unknown_op_is_a_usage_error(ops, capsys):
    line = usage_error(["--ops", ops, "--list"], capsys)
    assert "--ops" in line and "unknown op" in line and "dropout" in line


def test_an_op_named_twice_runs_once(capsys):
    assert main(["--device", "cpu", "--ops", "dropout,dropout", "--list"]) == 0
    listed = [line.split()[0] for line in capsys.readouterr().out.splitlines()]
    assert listed and len(listed) == len(set(listed))


@pytest.mark.parametrize("device", ["gpu", "CPU", "meta", "cuda:x"])
def test_unknown_device_is_a_usage_error(device, capsys):
    line = usage_error(["--device", device, "--list"], capsys)
    assert "--device" in line and repr(device) in line


def test_cuda_without_cuda_is_a_one_line_error(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="is_available"):
        main(["--device", "cuda", "--list"])
    with pytest.raises(SystemExit, match="is_available"):
        main(["--device", "cuda:0", "--ops", "dropout", "--out", str(tmp_path / "run")])
    assert not (tmp_path / "run").exists()


def test_a_cuda_device_that_is_not_there_is_a_one_line_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(SystemExit, match="only 1 CUDA device"):
        main(["--device", "cuda:1", "--list"])


@pytest.mark.parametrize("threads", ["0", "-3"])
def test_threads_below_one_is_a_usage_error(threads, capsys):
    before = torch.get_num_threads()
    line = usage_error(["--threads", threads, "--list"], capsys)
    assert "--threads" in line and "positive" in line
    assert torch.get_num_threads() == before


@pytest.mark.parametrize("listing", [True, False])
def test_match_that_selects_nothing_is_a_usage_error(listing, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["--device", "cpu", "--ops", "dropout", "--match", "zzz", "--out", str(out), "--no-compile"]
    line = usage_error(argv + (["--list"] if listing else []), capsys)
    assert "--match" in line and "'zzz' selects none of the" in line and "dropout" in line
    assert not out.exists()


def no_run(*args, **kwargs):
    raise AssertionError("the benchmark ran before --out was found unusable")


TINY_RUN = ["--device", "cpu", "--ops", "dropout", "--match", "fwd_inplace-fp32-4K", "--no-compile"]


def unwritable_folder(tmp_path):
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    if os.access(folder, os.W_OK):  # root
        pytest.skip("this user can write to a read-only folder")
    return folder


def sysfs(tmp_path):
    """A folder that even root cannot create files in."""
    try:
        tempfile.NamedTemporaryFile(dir="/sys").close()
    except OSError:
        return Path("/sys")
    pytest.skip("/sys is missing or writable here")


@pytest.mark.parametrize(
    "out, reason",
    [
        (lambda tmp: tmp / "a-file", "is a file, not a folder"),
        (lambda tmp: tmp / "a-file" / "run", "cannot write the results"),
        (lambda tmp: unwritable_folder(tmp), "cannot write the results"),
        (lambda tmp: unwritable_folder(tmp) / "run", "cannot write the results"),
        (sysfs, "cannot write the results"),
        (lambda tmp: sysfs(tmp) / "fastreg-bench-run", "cannot write the results"),
    ],
    ids=["file", "under-a-file", "read-only", "under-read-only", "sysfs", "under-sysfs"],
)
def test_unusable_out_is_a_one_line_error_before_the_run(out, reason, tmp_path, monkeypatch, capsys):
    (tmp_path / "a-file").write_text("not a folder\n")
    folder = out(tmp_path)
    monkeypatch.setattr(bench_main, "run_cases", no_run)
    with pytest.raises(SystemExit) as exit_info:
        main([*TINY_RUN, "--out", str(folder)])
    assert isinstance(exit_info.value.code, str) and reason in exit_info.value.code
    assert str(folder) in exit_info.value.code and "\n" not in exit_info.value.code
    assert (tmp_path / "a-file").read_text() == "not a folder\n"


def fake_run(folder: Path, median_ms: float = 1.0, case: str = "dropout-fwd-fp32-4K") -> Path:
    """A minimal raw.json with one row, as a run writes it."""
    folder.mkdir(parents=True)
    row = Row(case, "dropout", "fwd", "fp32", "4K", 4096, "cpu", "fastreg", False, median_ms=median_ms).as_dict()
    info = {"date": "2026-01-01", "set": "quick", "device_name": "cpu"}
    (folder / "raw.json").write_text(json.dumps({"info": info, "rows": [row]}))
    return folder


@pytest.mark.parametrize(
    "raw, reason",
    [
        (None, "cannot read"),
        ("{not json", "not valid JSON"),
        ("[]", "no 'info' and 'rows'"),
        ('{"machines": []}', "no 'info' and 'rows'"),  # e.g. pytest-benchmark's JSON
        ('{"info": {}, "rows": [{"case": "x", "impl": "y"}]}', "a row without status, median_ms"),
    ],
    ids=["missing", "bad-json", "list", "other-json", "missing-columns"],
)
@pytest.mark.parametrize("which", ["a", "b"])
def test_compare_of_something_that_is_not_a_run_is_a_usage_error(raw, reason, which, tmp_path, capsys):
    good = fake_run(tmp_path / "good")
    bad = tmp_path / "bad"
    if raw is not None:
        bad.mkdir()
        (bad / "raw.json").write_text(raw)
    runs = [str(bad), str(good)] if which == "a" else [str(good), str(bad)]
    line = usage_error(["compare", *runs], capsys)
    assert reason in line and str(bad) in line


def test_report_of_something_that_is_not_a_run_is_a_usage_error(tmp_path, capsys):
    line = usage_error(["report", str(tmp_path / "nothing")], capsys)
    assert "is not a fastreg.bench run" in line
    assert not (tmp_path / "nothing").exists()


def test_compare_to_an_unwritable_out_is_a_one_line_error(tmp_path, capsys):
    a, b = fake_run(tmp_path / "a", 2.0), fake_run(tmp_path / "b", 1.0)
    assert main(["compare", str(a), str(b)]) == 0
    assert "| dropout-fwd-fp32-4K | fastreg | 2.00 ms | 1.00 ms | 0.50 |" in capsys.readouterr().out
    for out in (tmp_path, tmp_path / "missing" / "compare.md"):
        with pytest.raises(SystemExit) as exit_info:
            main(["compare", str(a), str(b), "--out", str(out)])
        assert isinstance(exit_info.value.code, str) and f"cannot write --out {out}" in exit_info.value.code


# ---------------------------------------------------------------- python -m fastreg.info


def test_info_help_prints_usage_not_the_report(capsys):
    with pytest.raises(SystemExit) as exit_info:
        info.main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: python -m fastreg.info") and "== environment ==" not in out


def test_info_unknown_argument_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        info.main(["--bogus"])
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    assert "unrecognized arguments: --bogus" in captured.err and "== environment ==" not in captured.out


def test_info_prints_the_report(capsys):
    assert info.main([]) == 0
    out = capsys.readouterr().out
    assert "== environment ==" in out and "== ops ==" in out and "dropout" in out


@pytest.mark.parametrize(
    "setting, value, message",
    [
        ("FASTREG_BACKEND", "bogus", "FASTREG_BACKEND must be 'auto' or 'reference', got 'bogus'"),
        (
            "FASTREG_BUILD_LOCK_TIMEOUT",
            "soon",
            "FASTREG_BUILD_LOCK_TIMEOUT must be a number of seconds >= 0, got 'soon'",
        ),
    ],
)
def test_an_invalid_fastreg_setting_is_a_one_line_error(monkeypatch, tmp_path, setting, value, message):
    monkeypatch.setenv(setting, value)
    with pytest.raises(SystemExit, match=f"^fastreg.info: {message}$"):
        info.main([])
    with pytest.raises(SystemExit, match=f"^fastreg.bench: {message}$"):
        main([*TINY_RUN, "--out", str(tmp_path / "run")])
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------- scripts/bench.sh


@pytest.mark.parametrize("venv", [None, "other-venv"])
def test_bench_sh_runs_in_the_callers_folder(venv, tmp_path):
    """Relative --out and compare paths must mean the caller's folder, not the repository's."""
    repo, elsewhere = tmp_path / "repo", tmp_path / "elsewhere"
    (repo / "scripts").mkdir(parents=True)
    elsewhere.mkdir()
    shutil.copy(Path(__file__).parents[1] / "scripts" / "bench.sh", repo / "scripts" / "bench.sh")
    (repo / "scripts" / "setup.sh").write_text("#!/usr/bin/env bash\nexit 0\n")
    python = repo / (venv or ".venv") / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text('#!/usr/bin/env bash\nprintf "%s\\n" "$PWD" "$@"\n')  # stands in for the venv's python
    for script in (repo / "scripts" / "bench.sh", repo / "scripts" / "setup.sh", python):
        script.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k != "FASTREG_VENV"} | ({"FASTREG_VENV": venv} if venv else {})
    done = subprocess.run(
        ["../repo/scripts/bench.sh", "compare", "run a", "run_b"],
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert done.stdout.splitlines() == [str(elsewhere), "-m", "fastreg.bench", "compare", "run a", "run_b"]


def test_report_into_a_folder_it_cannot_write_is_a_one_line_error(tmp_path, monkeypatch):
    run = fake_run(tmp_path / "run")
    (run / "report.md").mkdir()  # stands in for a folder this user cannot write (root writes anywhere)
    monkeypatch.setattr(report, "plots", lambda folder, rows: ([], ""))
    with pytest.raises(SystemExit) as exit_info:
        main(["report", str(run)])
    message = exit_info.value.code
    assert isinstance(message, str) and message.startswith(f"fastreg.bench: cannot write the report into {run}: ")
    assert "\n" not in message


def test_report_rerenders_a_run(tmp_path, monkeypatch):
    run = fake_run(tmp_path / "run")
    monkeypatch.setattr(report, "plots", lambda folder, rows: ([], ""))
    assert main(["report", str(run)]) == 0
    assert "| fwd | fp32 | 4K | 1.00 ms |" in (run / "report.md").read_text()
    assert (run / "results.csv").read_text().startswith("case,op,kind,")


def test_the_recorded_command_can_be_run_again(tmp_path, monkeypatch):
    """An argument with a space (an --out folder, a --match) keeps its quotes in the run info."""
    out = tmp_path / "my run"
    monkeypatch.setattr(bench_main, "run_cases", lambda cases, policy: [])
    argv = [*TINY_RUN, "--out", str(out)]
    assert main(argv) == 0
    command = json.loads((out / "raw.json").read_text())["info"]["command"]
    assert shlex.split(command) == ["python", "-m", "fastreg.bench", *argv]
    assert f"| command | `{command}` |" in (out / "report.md").read_text()


def test_overwrite_keeps_the_previous_run_until_the_new_one_is_written(monkeypatch, tmp_path):
    out = tmp_path / "run"
    assert main([*TINY_RUN, "--out", str(out)]) == 0
    previous = {name: (out / name).read_bytes() for name in (report.RAW, report.CSV, report.REPORT)}

    def interrupted(cases, policy):
        raise KeyboardInterrupt

    monkeypatch.setattr(bench_main, "run_cases", interrupted)
    with pytest.raises(KeyboardInterrupt):
        main([*TINY_RUN, "--out", str(out), "--overwrite"])
    assert {name: (out / name).read_bytes() for name in previous} == previous
    monkeypatch.undo()
    (out / "notes.txt").write_text("mine")
    assert main([*TINY_RUN, "--out", str(out), "--overwrite"]) == 0
    assert json.loads((out / report.RAW).read_text()) != json.loads(previous[report.RAW].decode())
    assert (out / "notes.txt").read_text() == "mine"  # not an output of a run: left alone


def test_bandwidth_cells_of_host_bound_rows_show_their_figures_not_zero():
    row = {"status": "ok", "baseline": False, "gbps": 0.0031, "pct_of_copy_inplace": 0.12}
    assert report._bandwidth_cell(row) == "0.0031 (0.12%)"
    row = {"status": "ok", "baseline": False, "gbps": 812.34, "pct_of_copy_inplace": 87.4}
    assert report._bandwidth_cell(row) == "812.3 (87%)"
    assert report._bandwidth_cell({**row, "baseline": True}) == "812.3"
    assert report._bandwidth_cell({**row, "gbps": 0.0, "pct_of_copy_inplace": 0.0}) == "0.0 (0%)"
