"""What a run was measured on: device, versions, fastreg commit and which backend served it."""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
from pathlib import Path

import torch

PACKAGE_DIR = Path(__file__).resolve().parents[1]


def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(["git", "-C", str(PACKAGE_DIR), *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def fastreg_commit() -> str:
    """The git commit of the fastreg source being measured, '+dirty' when tracked files are
    edited (results under bench/results/ do not count: a run writing there would mark itself);
    the package version when fastreg is installed outside a checkout (a wheel)."""
    top = _git("rev-parse", "--show-toplevel")
    if top and (Path(top) / "fastreg" / "__init__.py").resolve() == PACKAGE_DIR / "__init__.py":
        commit = _git("rev-parse", "--short=12", "HEAD")
        if commit:
            dirty = _git("status", "--porcelain", "--untracked-files=no", "--", ":/", ":(top,exclude)bench/results")
            return commit + ("+dirty" if dirty else "")
    from .. import __version__

    return f"v{__version__}"


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: str) -> str:
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name(torch.device(device))
    return f"{cpu_name()} ({torch.get_num_threads()} threads)"


def device_tag(device: str) -> str:
    """Short folder-friendly name: cpu-2core, cuda-NVIDIA-H100-80GB-HBM3."""
    if torch.device(device).type == "cuda":
        return "cuda-" + "-".join(torch.cuda.get_device_name(torch.device(device)).split())
    return f"cpu-{os.cpu_count()}core"


def fastreg_backends(device: str) -> str:
    """'kernel (jit)' or 'reference (why)' per op, for the device type, loading kernels if needed."""
    from .._backends import backends

    device_type = torch.device(device).type
    found = {}
    for row in backends(load=True):
        if row["device"] == device_type:
            found.setdefault(row["backend"] + (f" ({row['why']})" if row["why"] else ""), []).append(row["op"])
    return "; ".join(f"{backend}: {', '.join(ops)}" for backend, ops in found.items())


def load_average() -> str:
    """1-minute load average: on a shared machine, say how busy it was while we measured."""
    try:
        return f"{os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs"
    except OSError:
        return "unknown"


def run_info(device: str, set_name: str) -> dict[str, str]:
    return {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "set": set_name,
        "device": device,
        "device_name": device_name(device),
        "torch_version": torch.__version__,
        "cuda_version": str(torch.version.cuda or ""),
        "python": platform.python_version(),
        "fastreg_commit": fastreg_commit(),
        "fastreg_backend": fastreg_backends(device),
        "threads": str(torch.get_num_threads()),
        "load_average_start": load_average(),
    }
