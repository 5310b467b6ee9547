"""``python -m fastreg.info``: versions, build facts and the active backend of every op.

Meant to be pasted into bug reports. Loading the kernels may compile them (JIT), once.
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import shutil
import subprocess
import sys

import torch


def _version_line(command: list[str], containing: str = "") -> str:
    """The first output line of a version command (that contains ``containing``), or why there is none."""
    if shutil.which(command[0]) is None:
        return "not found"
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=20, check=False)
    except (OSError, subprocess.SubprocessError) as error:
        return f"error: {error}"
    lines = [
        line.strip() for line in (result.stdout or result.stderr).splitlines() if line.strip() and containing in line
    ]
    return lines[0] if lines and lines[0] else "no version output"


def _nvcc() -> str:
    """The nvcc a CUDA build would use (torch's CUDA_HOME), else any nvcc there is."""
    from torch.utils.cpp_extension import CUDA_HOME

    candidates = [os.path.join(home, "bin", "nvcc") for home in (CUDA_HOME, os.environ.get("CUDA_HOME")) if home]
    candidates += [shutil.which("nvcc") or "", "/usr/local/cuda/bin/nvcc"]
    for nvcc in candidates:
        if nvcc and os.path.exists(nvcc):
            return f"{_version_line([nvcc, '--version'], containing='release')} ({nvcc})"
    return "not found (set CUDA_HOME to the CUDA toolkit)"


def _ninja() -> str:
    from . import _build

    _build.ensure_ninja_on_path()  # as the JIT build does
    return _version_line(["ninja", "--version"])


def versions() -> list[tuple[str, str]]:
    import fastreg

    compiler = os.environ.get("CXX", "c++")
    gpus = (
        [
            f"{torch.cuda.get_device_name(i)} (sm_{''.join(map(str, torch.cuda.get_device_capability(i)))})"
            for i in range(torch.cuda.device_count())
        ]
        if torch.cuda.is_available()
        else []
    )
    return [
        ("fastreg", f"{fastreg.__version__} ({os.path.dirname(fastreg.__file__)})"),
        ("python", f"{platform.python_version()} ({sys.executable})"),
        ("torch", f"{torch.__version__} ({os.path.dirname(torch.__file__)})"),
        ("torch CUDA", torch.version.cuda or "none (CPU build of torch)"),
        ("GPU", "; ".join(gpus) if gpus else "none visible"),
        ("nvcc", _nvcc()),
        ("ninja", _ninja()),
        (f"C++ compiler ({compiler})", _version_line([*shlex.split(compiler)[:1], "--version"])),
    ]


def build_facts() -> list[tuple[str, str]]:
    from . import _build, _loader

    state = _loader.STATE
    rows = [
        ("FASTREG_BACKEND", _loader.requested_backend()),
        ("build mode", state.mode if state.attempted else "not loaded"),
        ("library", state.library or "none"),
        ("sources", f"{_build.source_root()} (hash {_build.source_hash()})"),
    ]
    info = _loader.aot_build_info()
    if info is not None:
        why_not = _loader.aot_mismatch(info)
        if why_not is None and _loader.aot_sources_changed(info):
            why_not = "csrc/ changed since; the JIT build is used (rebuild: pip install --no-build-isolation -e .)"
        rows.append(("AOT build info", f"{_loader.BUILD_INFO_FILE}"))
        rows += [(f"  {key}", str(value)) for key, value in info.items()]
        rows.append(("  usable", "yes" if why_not is None else f"no: {why_not}"))
    else:
        rows.append(("AOT build", "none (kernels are compiled at first use)"))
    rows.append(("JIT cache root", str(_loader.cache_root())))
    if state.build_dir:
        rows.append(("JIT build dir", state.build_dir))
    if state.reason:
        rows.append(("note", state.reason))
    return rows


def kernel_rows() -> list[tuple[str, ...]]:
    """Per op: whether a compiled kernel is registered for CPU and CUDA, and what serves it."""
    from . import _backends
    from ._library import SCHEMAS, has_kernel

    active = {(row["op"], row["device"]): row for row in _backends.backends(load=True)}
    rows = []
    for name in SCHEMAS:
        compiled = ", ".join(d for d in ("cpu", "cuda") if has_kernel(name, d)) or "none"
        serving = []
        for device in _backends.devices():
            row = active[(name, device)]
            serving.append(f"{device}: {row['backend']}")
        rows.append((name, compiled, "; ".join(serving)))
    return rows


def _table(rows: list[tuple[str, ...]], header: tuple[str, ...] | None = None) -> str:
    rows = ([header] if header else []) + [tuple(str(c) for c in row) for row in rows]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]
    if header:
        lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def report() -> str:
    from ._backends import backends

    kernels = kernel_rows()  # first: loading the kernels fills in the build facts
    reasons = sorted({row["why"] for row in backends(load=False) if row["why"]})
    sections = [
        "== environment ==",
        _table(versions()),
        "",
        "== build ==",
        _table(build_facts()),
        "",
        "== ops ==",
        _table(kernels, header=("op", "compiled for", "active backend")),
    ]
    if reasons:
        sections += ["", "why the reference is used: " + "; ".join(reasons)]
    return "\n".join(sections)


def main(argv: list[str] | None = None) -> int:
    argparse.ArgumentParser(
        prog="python -m fastreg.info",
        description="Prints versions, build facts and which implementation serves each op on each device, "
        "for bug reports. Loading the kernels may compile them (JIT), once.",
    ).parse_args(argv)
    from . import _loader

    try:
        _loader.check_settings()
    except ValueError as error:  # a setting this report is meant to diagnose: say so, not a traceback
        raise SystemExit(f"fastreg.info: {error}") from None
    print(report())
    return 0


if __name__ == "__main__":
    sys.exit(main())
