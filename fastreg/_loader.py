"""Finds, builds and loads the compiled kernels; falls back to the reference with one warning.

Order: ``FASTREG_BACKEND=reference`` forces the reference; else the ahead-of-time library
shipped in the package (``fastreg/_C*.so``) if it was built for this torch; else a JIT build
with ninja into a cache folder keyed by torch, CUDA, Python and a hash of the sources. Any
failure leaves the ops on the reference and says why, once per process.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import shlex
import shutil
import sys
import threading
import time
import warnings
from pathlib import Path

import torch

from . import _build

BUILD_INFO_FILE = _build.PACKAGE_DIR / "_build_info.json"


class KernelState:
    """What happened when the kernels were looked for; fastreg.info prints it."""

    def __init__(self) -> None:
        self.attempted = False
        self.mode = "reference"  # "aot", "jit" or "reference"
        self.library: str | None = None
        self.cuda_built = False
        self.reason = ""  # why the reference is in use, or why CUDA kernels are missing
        self.build_dir: str | None = None


STATE = KernelState()
_LOCK = threading.Lock()


class FastregFallbackWarning(UserWarning):
    """The compiled kernels are not in use; ops run on the pure-PyTorch reference."""


def requested_backend() -> str:
    # Set but empty (`FASTREG_BACKEND= cmd`, a CI matrix's blank entry) means the default.
    value = os.environ.get("FASTREG_BACKEND", "").strip().lower() or "auto"
    if value not in {"auto", "reference"}:
        raise ValueError(f"FASTREG_BACKEND must be 'auto' or 'reference', got {value!r}")
    return value


def lock_timeout_s() -> float:
    """How long a JIT build waits for another process's build (read when a build starts, so that
    a bad value is an error there, not at ``import fastreg``)."""
    value = os.environ.get("FASTREG_BUILD_LOCK_TIMEOUT", "").strip() or "1800"
    try:
        seconds = float(value)
    except ValueError:
        seconds = math.nan
    if not seconds >= 0:  # NaN too
        raise ValueError(f"FASTREG_BUILD_LOCK_TIMEOUT must be a number of seconds >= 0, got {value!r}")
    return seconds


# Settings read as they are by C++ (std::getenv) or by the build, where a value they do not know
# would be taken silently as the default (FASTREG_CPU_ISA=AVX2 caps nothing; strtol reads
# FASTREG_CPU_POOL_MB=1G as 1): checked here, before the library loads and reads them.
_SETTING_CHOICES = {
    "FASTREG_CPU_ISA": ("avx512", "avx2", "base"),
    "FASTREG_CUDA_LARGE_KERNEL_ARGS": ("0", "1"),
    "FASTREG_FORCE_CUDA": ("0", "1"),
    "FASTREG_VERBOSE_BUILD": ("0", "1"),
}
_SETTING_MEGABYTES = ("FASTREG_CPU_POOL_MB", "FASTREG_CPU_CACHE_MB")


def check_settings() -> None:
    """Raises ValueError naming the first FASTREG_* setting that fastreg cannot use as given.
    Set but empty means unset, for each of them."""
    requested_backend()
    lock_timeout_s()
    for name, choices in _SETTING_CHOICES.items():
        value = os.environ.get(name, "")
        if value and value not in choices:
            raise ValueError(f"{name} must be {' or '.join(repr(c) for c in choices)} (or unset), got {value!r}")
    for name in _SETTING_MEGABYTES:
        value = os.environ.get(name, "")
        if value and not (value.isascii() and value.isdigit()):
            raise ValueError(f"{name} must be a whole number of megabytes (or unset), got {value!r}")


def aot_build_info() -> dict | None:
    try:
        return json.loads(BUILD_INFO_FILE.read_text())
    except (OSError, ValueError):
        return None


def aot_mismatch(info: dict) -> str | None:
    """Why an ahead-of-time build cannot be used with the torch now installed, or None."""
    if info.get("torch") != torch.__version__ or info.get("cuda") != torch.version.cuda:
        return (
            f"fastreg's ahead-of-time kernels were built for torch {info.get('torch')} (CUDA {info.get('cuda')}), "
            f"but torch {torch.__version__} (CUDA {torch.version.cuda}) is installed. Rebuild them with "
            "'pip install --no-build-isolation --force-reinstall --no-deps fastreg' (or from the source folder), "
            "or uninstall and reinstall fastreg; until then fastreg compiles its kernels at first use (JIT)."
        )
    return None


def aot_sources_changed(info: dict) -> bool:
    """True when csrc/ was edited after an in-place (editable) ahead-of-time build: expected while
    developing, so the loader quietly JIT-builds the current sources instead of warning."""
    return info.get("source_hash") not in (None, _build.source_hash())


def load_kernels(device_type: str = "cpu") -> bool:
    """Loads the compiled kernels once per process; True when a library is loaded."""
    if not STATE.attempted:
        with _LOCK:
            if not STATE.attempted:
                _load_once()
                STATE.attempted = True
    if device_type == "cuda" and STATE.library and not STATE.cuda_built:
        _warn_once(
            "cuda", f"fastreg: no CUDA kernels in {STATE.library} ({STATE.reason}); CUDA ops run on the reference."
        )
    return STATE.library is not None


def load_before_dispatch(input: torch.Tensor) -> None:
    """Loads the compiled kernels before an op's first call on ``input`` dispatches, so that the
    call records their C++ autograd node (less host time; dropout's forward-mode AD) and not the
    reference's Python one. Not while torch.compile traces: the compiled graph is what runs.
    Called on every call: after the first, a call of is_compiling (0.15 us) and one attribute
    read (not ``input.device``, 0.3 us). is_compiling comes first: Dynamo folds it to a constant,
    whereas reading ``STATE.attempted`` while tracing would guard the graph on it, and the first
    eager load after that recompiled the whole model."""
    if not torch.compiler.is_compiling() and not STATE.attempted:
        load_kernels(input.device.type)


def _load_once() -> None:
    check_settings()  # a bad setting is an error even where no build needs it
    if requested_backend() == "reference":
        STATE.reason = "FASTREG_BACKEND=reference"
        return
    info = aot_build_info()
    if info is not None and aot_mismatch(info) is None and not aot_sources_changed(info):
        library = _aot_library()
        if library is not None:
            try:
                torch.ops.load_library(str(library))
            except OSError as error:
                _warn_once("aot", f"fastreg: could not load {library} ({error}); trying a JIT build.")
            else:
                STATE.mode, STATE.library, STATE.cuda_built = "aot", str(library), bool(info.get("cuda_kernels"))
                STATE.reason = "" if STATE.cuda_built else "the ahead-of-time build has no CUDA kernels"
                return
    try:
        _jit_build_and_load()
    except Exception as error:  # noqa: BLE001 - every failure must leave the reference working
        STATE.reason = f"{type(error).__name__}: {_failure_summary(str(error))}"
        _warn_once(
            "fallback",
            f"fastreg: the C++ kernels could not be built, so every fastreg op runs on the pure-PyTorch reference "
            f"(correct but slower). Cause: {STATE.reason}. Fix: install a C++ compiler (g++) and ninja "
            "('pip install ninja'), or set CXX to one; then run 'python -m fastreg.info'. "
            "Set FASTREG_BACKEND=reference to use the reference without this warning.",
        )


def _aot_library() -> Path | None:
    candidates = sorted(_build.PACKAGE_DIR.glob("_C*.so"))
    return candidates[0] if candidates else None


cuda_wanted = _build.cuda_wanted  # shared with setup.py's ahead-of-time build


def cache_root() -> Path:
    base = os.environ.get("FASTREG_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "fastreg"
    )
    return Path(base)


def jit_build_dir(with_cuda: bool) -> Path:
    cuda = (
        f"cu{torch.version.cuda}-{_build.cuda_arch_list().replace(';', '_').replace(' ', '_')}" if with_cuda else "cpu"
    )
    py = f"py{sys.version_info.major}{sys.version_info.minor}"
    return cache_root() / f"torch{torch.__version__}-{cuda}-{py}-{_build.source_hash()}"


def _check_toolchain() -> None:
    compiler = os.environ.get("CXX", "c++")
    program = (shlex.split(compiler) or [""])[0]  # CXX may carry a launcher or flags ("ccache g++")
    if shutil.which(program) is None:
        raise RuntimeError(f"no C++ compiler: '{compiler}' (from CXX, default c++) was not found on PATH")
    from torch.utils.cpp_extension import is_ninja_available

    if not (_build.ensure_ninja_on_path() and is_ninja_available()):
        raise RuntimeError("ninja was not found ('pip install ninja')")


def _jit_build_and_load() -> None:
    from torch.utils.cpp_extension import load

    with_cuda, why_not_cuda = cuda_wanted()
    build_dir = jit_build_dir(with_cuda)
    build_dir.mkdir(parents=True, exist_ok=True)
    name = "fastreg_kernels"
    library = build_dir / f"{name}.so"
    srcs = _build.sources()
    with build_lock(build_dir):
        if not library.exists():
            _check_toolchain()
            stale = build_dir / "lock"  # torch's own lock; under our lock it can only be stale
            if stale.exists():
                _warn_once("stale", f"fastreg: removed the stale build lock {stale} left by an interrupted build.")
                stale.unlink()
            what = "CPU+CUDA" if with_cuda else "CPU"
            print(
                f"fastreg: compiling {what} kernels into {build_dir} (about a minute, once)...",
                file=sys.stderr,
                flush=True,
            )
            start = time.perf_counter()
            if with_cuda:
                os.environ.setdefault("TORCH_CUDA_ARCH_LIST", _build.cuda_arch_list())
            load(
                name=name,
                sources=srcs["cpu"] + (srcs["cuda"] if with_cuda else []),
                build_directory=str(build_dir),
                extra_cflags=_build.CXX_FLAGS + (["-DFASTREG_WITH_CUDA"] if with_cuda else []),
                extra_cuda_cflags=_build.NVCC_FLAGS,
                extra_ldflags=_build.link_flags(),
                with_cuda=with_cuda,
                is_python_module=False,
                verbose=os.environ.get("FASTREG_VERBOSE_BUILD") == "1",
            )
            print(f"fastreg: kernels compiled in {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
        else:
            torch.ops.load_library(str(library))
    STATE.mode, STATE.library, STATE.cuda_built, STATE.build_dir = "jit", str(library), with_cuda, str(build_dir)
    STATE.reason = why_not_cuda


@contextlib.contextmanager
def build_lock(build_dir: Path):
    """An flock held while building: a killed holder releases it, so it is never stale."""
    path = build_dir / ".fastreg-build.lock"
    with open(path, "a+") as handle:
        timeout = lock_timeout_s()
        deadline = time.monotonic() + timeout
        told = False
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if not told:
                    handle.seek(0)
                    holder = handle.read().strip() or "unknown"
                    print(
                        f"fastreg: waiting for another build (pid {holder}) holding {path}", file=sys.stderr, flush=True
                    )
                    told = True
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"gave up after {timeout:.0f} s waiting for the build lock {path}; if no fastreg build "
                        "is running, delete that folder"
                    ) from None
                time.sleep(0.2)
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


_WARNED: set[str] = set()


def _warn_once(key: str, message: str) -> None:
    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(message, FastregFallbackWarning, stacklevel=4)


def _failure_summary(text: str, count: int = 6) -> str:
    """The first compiler error and the lines after it, else the last lines. A failed build's
    log ends with notes and ninja's summary, which say nothing about the cause."""
    lines = [line for line in text.strip().splitlines() if line.strip()]
    errors = [i for i, line in enumerate(lines) if "error:" in line and "subcommand failed" not in line]
    if errors:
        return " | ".join(lines[errors[0] : errors[0] + 3])
    return " | ".join(lines[-count:]) if lines else "unknown error"


def check_aot_build_at_import() -> None:
    info = aot_build_info()
    if info is not None and requested_backend() != "reference":
        message = aot_mismatch(info)
        if message:
            _warn_once("aot-mismatch", message)
