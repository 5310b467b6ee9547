"""What goes into a build of the kernels: the one list of sources, flags and arches.

Used by setup.py (ahead of time), by the JIT loader, and read by CMakeLists.txt through
csrc/sources.txt, so the three never disagree on what is compiled.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
DEFAULT_CUDA_ARCH_LIST = "8.0;9.0"
# -fopenmp: ATen's parallel_for is an inline OpenMP template; without the flag its pragma is
# dropped and every "parallel" CPU kernel runs on one thread. The extension then needs
# libgomp.so.1, which resolves to the copy torch has already loaded: one OpenMP runtime.
CXX_FLAGS = ["-O3", "-fopenmp"]
LINK_FLAGS = ["-fopenmp"]
NVCC_FLAGS = ["-O3", "--expt-relaxed-constexpr"]


def link_flags() -> list[str]:
    """LINK_FLAGS, plus the shared libstdc++ this process has loaded (torch's) as a linker input.

    A g++ that links libstdc++ statically by default (the H100 test machine's g++ 13 wrapper)
    otherwise puts a second copy of it inside the extension, and that copy's streams crash on
    the locale state of torch's copy: seen there in the first TORCH_CHECK message formatted and
    in reading sysfs with std::ifstream. Naming the loaded library makes the extension depend on
    it (NEEDED libstdc++.so.6), so nothing is taken from a static one. With an ordinary g++ it
    is the library the driver links anyway."""
    return LINK_FLAGS + _loaded_libstdcxx()


def _loaded_libstdcxx() -> list[str]:
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                path = line.rstrip("\n").split(maxsplit=5)[-1]
                if os.path.basename(path).startswith("libstdc++.so") and os.path.isfile(path):
                    return [path]
    except OSError:  # not Linux
        pass
    return []


def source_root() -> Path:
    """csrc/ of a source checkout, else the copy shipped inside the installed package."""
    checkout = PACKAGE_DIR.parent / "csrc"
    return checkout if (checkout / "sources.txt").is_file() else PACKAGE_DIR / "_csrc"


def sources(root: Path | None = None) -> dict[str, list[str]]:
    """The [cpu] and [cuda] sections of csrc/sources.txt, as absolute paths."""
    root = root or source_root()
    sections: dict[str, list[str]] = {"cpu": [], "cuda": []}
    current = None
    for raw in (root / "sources.txt").read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        if line.startswith("[") and line.endswith("]"):
            current = line[1:-1]
            continue
        if current not in sections:
            raise ValueError(f"{root / 'sources.txt'}: '{line}' is outside a [cpu] or [cuda] section")
        sections[current].append(str(root / line))
    return sections


HASHED_SUFFIXES = {".h", ".cuh", ".cpp", ".cu", ".txt"}
UNSHIPPED_DIRS = {"tests"}  # csrc/tests: C++ tests run by ctest, not part of the kernels


def kernel_files(root: Path | None = None) -> list[Path]:
    """Every source and header the kernels are built from (what the wheel ships as fastreg/_csrc)."""
    root = root or source_root()
    return sorted(
        p
        for p in root.rglob("*")
        if p.is_file() and p.suffix in HASHED_SUFFIXES and p.relative_to(root).parts[0] not in UNSHIPPED_DIRS
    )


def source_hash(root: Path | None = None) -> str:
    """Hash of the kernel sources, headers and compiler flags: a change of any of them makes a
    new build. The C++ tests are left out, so editing them does not invalidate compiled kernels."""
    root = root or source_root()
    digest = hashlib.sha256(" ".join(CXX_FLAGS + LINK_FLAGS + NVCC_FLAGS).encode())
    for path in kernel_files(root):
        digest.update(path.relative_to(root).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def cuda_arch_list() -> str:
    return os.environ.get("TORCH_CUDA_ARCH_LIST") or DEFAULT_CUDA_ARCH_LIST


def ensure_ninja_on_path() -> bool:
    """torch runs ``ninja`` from PATH; the pip package's binary is not on it when a venv's
    python is run without activating the venv. Adds it there; True when ninja is runnable."""
    if shutil.which("ninja"):
        return True
    candidates = [Path(sys.executable).parent]
    try:
        import ninja  # the PyPI package (a fastreg dependency)

        candidates.insert(0, Path(ninja.BIN_DIR))
    except (ImportError, AttributeError):
        pass
    for folder in candidates:
        if (folder / "ninja").is_file():
            os.environ["PATH"] = f"{folder}{os.pathsep}{os.environ.get('PATH', '')}"
            return True
    return False


def cuda_wanted() -> tuple[bool, str]:
    """Whether a build should include the CUDA kernels, and why not if it should not.
    Needs a CUDA build of torch, nvcc, and a visible GPU unless FASTREG_FORCE_CUDA=1."""
    import torch

    if torch.version.cuda is None:
        return False, "torch was built without CUDA"
    if os.environ.get("FASTREG_FORCE_CUDA") != "1" and not torch.cuda.is_available():
        return False, "no CUDA device (set FASTREG_FORCE_CUDA=1 to build them anyway)"
    from torch.utils.cpp_extension import CUDA_HOME

    if CUDA_HOME is None or not Path(CUDA_HOME, "bin", "nvcc").exists():
        return False, "nvcc not found (set CUDA_HOME to the CUDA toolkit)"
    return True, ""
