"""What goes into a build of the kernels: the one list of sources, flags and arches.

Used by setup.py (ahead of time), by the JIT loader, and read by CMakeLists.txt through
csrc/sources.txt, so the three never disagree on what is compiled.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
DEFAULT_CUDA_ARCH_LIST = "8.0;9.0"
CXX_FLAGS = ["-O3"]
NVCC_FLAGS = ["-O3", "--expt-relaxed-constexpr"]


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


def source_hash(root: Path | None = None) -> str:
    """Hash of every file under csrc/: a change of any source or header makes a new build."""
    root = root or source_root()
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in {".h", ".cuh", ".cpp", ".cu", ".txt"}):
        digest.update(path.relative_to(root).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def cuda_arch_list() -> str:
    return os.environ.get("TORCH_CUDA_ARCH_LIST") or DEFAULT_CUDA_ARCH_LIST
