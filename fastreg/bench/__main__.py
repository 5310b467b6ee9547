"""``python -m fastreg.bench`` / ``fastreg-bench``: run the benchmark cases and write a report.

    python -m fastreg.bench [--set quick|full] [--device cpu|cuda] [--ops dropout,penalty,batch_norm]
                            [--out FOLDER] [--overwrite] [--compile | --no-compile] [--match TEXT]
    python -m fastreg.bench compare RUN_A RUN_B [--out FILE]
    python -m fastreg.bench report RUN          (re-render report.md, CSV and plots from raw.json)

Exit status 1 when any implementation failed the correctness gate (the report says which), or for an
error of the machine (no CUDA, an --out that cannot be written); 2 for a usage error. docs/benchmark.md.
"""

from __future__ import annotations

import argparse
import datetime
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from .._loader import check_settings
from . import env, report
from .cases import cases_for, op_names
from .runner import ERROR, MISMATCH, run_cases
from .sets import SETS, default_set


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def run_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m fastreg.bench",
        description="Correctness-gated benchmark of fastreg's ops against PyTorch.",
        epilog="Subcommands: 'compare RUN_A RUN_B' and 'report RUN'.",
    )
    parser.add_argument("--set", choices=sorted(SETS), help="case set (default: full on GPU, quick on CPU)")
    parser.add_argument("--device", default=None, help="cpu or cuda[:N] (default: cuda when available)")
    parser.add_argument("--ops", default=None, help="comma-separated ops (default: all registered)")
    parser.add_argument("--match", default=None, help="only cases whose id contains this text")
    parser.add_argument(
        "--out", type=Path, default=None, help="result folder (default: ./fastreg-bench-results/<device>-<set>-<time>)"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace the results already in --out")
    group = parser.add_mutually_exclusive_group()
    group.add_argument(
        "--compile",
        dest="compile",
        action="store_const",
        const="on",
        default="auto",
        help="torch.compile row in every case",
    )
    group.add_argument("--no-compile", dest="compile", action="store_const", const="off", help="no torch.compile rows")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch.set_num_threads for CPU runs (default: torch's)"
    )
    parser.add_argument("--list", action="store_true", help="list the cases and exit")
    return parser


def _prepare_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise SystemExit(f"fastreg.bench: --out {out} is a file, not a folder; choose another --out")
    existing = [name for name in report.OUTPUTS if (out / name).exists()]
    if existing and not overwrite:
        raise SystemExit(
            f"fastreg.bench: {out} already holds a run ({', '.join(existing)}); "
            "pass --overwrite to replace it, or choose another --out"
        )
    try:
        out.mkdir(parents=True, exist_ok=True)
        # now, not after the run: a folder we cannot write to would lose every measurement
        with tempfile.NamedTemporaryFile(dir=out, prefix=".fastreg-bench-write-check-"):
            pass
    except OSError as error:
        raise SystemExit(f"fastreg.bench: cannot write the results to --out {out}: {error.strerror or error}") from None


def _remove_previous_run(out: Path) -> None:
    """The outputs of a run already in ``out`` (--overwrite); anything else in the folder stays."""
    for name in report.OUTPUTS:
        path = out / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def _parse_ops(parser: argparse.ArgumentParser, text: str | None) -> list[str] | None:
    """--ops as a list of registered op names, each once (None: all); a usage error otherwise."""
    if not text:
        return None
    ops = list(dict.fromkeys(op.strip() for op in text.split(",")))
    known = op_names()
    unknown = [op for op in ops if op not in known]
    if unknown:
        parser.error(f"argument --ops: unknown op(s) {', '.join(map(repr, unknown))} (choose from {', '.join(known)})")
    return ops


def _parse_device(parser: argparse.ArgumentParser, text: str | None) -> str:
    """--device checked before anything runs: cpu, or a CUDA device that this process can see."""
    if text is None:
        return _default_device()
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        parser.error(f"argument --device: expected cpu or cuda[:N], got {text!r}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("fastreg.bench: --device cuda asked for, but torch.cuda.is_available() is False")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise SystemExit(f"fastreg.bench: --device {text} asked for, but only {count} CUDA device(s) are visible")
    return text


def main_run(argv: list[str]) -> int:
    parser = run_parser()
    args = parser.parse_args(argv)
    device = _parse_device(parser, args.device)
    try:
        check_settings()
    except ValueError as error:
        raise SystemExit(f"fastreg.bench: {error}") from None
    if args.threads is not None:
        if args.threads < 1:
            parser.error(f"argument --threads: expected a positive number of threads, got {args.threads}")
        torch.set_num_threads(args.threads)
    set_name = args.set or default_set(device)
    ops = _parse_ops(parser, args.ops)
    all_cases = cases_for(set_name, device, ops, args.compile)
    cases = [c for c in all_cases if args.match in c.id] if args.match else all_cases
    if not cases:  # a filter that selects nothing is a mistake, not an empty report
        scope = f"the '{set_name}' set on {device}" + (f" for --ops {args.ops}" if ops else "")
        if args.match and all_cases:
            parser.error(f"argument --match: {args.match!r} selects none of the {len(all_cases)} cases of {scope}")
        parser.error(f"no cases in {scope}")
    if args.list:
        for case in cases:
            print(f"{case.id:<32} {', '.join(case.impl_names)}")
        return 0
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = args.out or Path("fastreg-bench-results") / f"{env.device_tag(device)}-{set_name}-{stamp}"
    _prepare_out(out, args.overwrite)
    print(
        f"fastreg.bench: {len(cases)} cases of the '{set_name}' set on {device}; results go to {out}", file=sys.stderr
    )
    info = env.run_info(device, set_name)  # loads (or JIT-builds) the kernels before anything is timed
    info["command"] = "python -m fastreg.bench " + shlex.join(argv)  # quoted: it can be pasted to run again
    print(
        f"fastreg.bench: {info['device_name']}, torch {info['torch_version']}, fastreg {info['fastreg_commit']}, "
        f"backend {info['fastreg_backend']}",
        file=sys.stderr,
    )
    started = time.perf_counter()
    rows = [row.as_dict() for row in run_cases(cases, SETS[set_name].timing)]
    info["wall_time_s"] = f"{time.perf_counter() - started:.0f}"
    info["load_average_end"] = env.load_average()
    _remove_previous_run(out)  # only now: a run that fails or is interrupted leaves the previous one
    report.write_all(out, info, rows)
    failed = [r for r in rows if r["status"] in (MISMATCH, ERROR)]
    print(f"fastreg.bench: wrote {out / report.REPORT} ({info['wall_time_s']} s)", file=sys.stderr)
    if failed:
        print(
            f"fastreg.bench: {len(failed)} implementation(s) FAILED the correctness gate; see the report",
            file=sys.stderr,
        )
        return 1
    return 0


def main_compare(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fastreg.bench compare", description="Median times of two runs side by side, B/A per row."
    )
    parser.add_argument("run_a", type=Path, help="result folder of a run (holds raw.json)")
    parser.add_argument("run_b", type=Path, help="result folder of another run")
    parser.add_argument("--out", type=Path, default=None, help="also write the comparison to this Markdown file")
    args = parser.parse_args(argv)
    from .compare import compare

    try:
        text = compare(args.run_a, args.run_b)
    except report.NotARun as error:
        parser.error(str(error))
    print(text)
    if args.out:
        try:
            args.out.write_text(text)
        except OSError as error:
            raise SystemExit(f"fastreg.bench: cannot write --out {args.out}: {error.strerror or error}") from None
    return 0


def main_report(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fastreg.bench report", description="Re-render report.md, results.csv and plots from raw.json."
    )
    parser.add_argument("run", type=Path, help="result folder of a run (holds raw.json)")
    folder = parser.parse_args(argv).run
    try:
        info, rows = report.load_raw(folder)
    except report.NotARun as error:
        parser.error(str(error))
    try:
        report.write_all(folder, info, rows)
    except OSError as error:
        raise SystemExit(f"fastreg.bench: cannot write the report into {folder}: {error}") from None
    print(f"fastreg.bench: re-rendered {folder / report.REPORT}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "compare":
        return main_compare(argv[1:])
    if argv and argv[0] == "report":
        return main_report(argv[1:])
    return main_run(argv)


if __name__ == "__main__":
    sys.exit(main())
