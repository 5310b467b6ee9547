"""Wheels: a plain (isolated) build ships the kernel sources and compiles nothing; an
ahead-of-time build adds fastreg/_C*.so and the build facts the loader checks.

Both build a wheel from a copy of the source tree (so the checkout gets no build/ folder);
marked slow: run with `pytest -m slow tests/test_packaging.py`.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from fastreg import _build

REPO = Path(__file__).resolve().parent.parent
PROJECT_FILES = ["setup.py", "pyproject.toml", "README.md", "MANIFEST.in", "CMakeLists.txt"]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (REPO / "setup.py").is_file(), reason="needs the source tree"),
]


def build_wheel(tmp_path: Path, *pip_args: str, **env: str) -> zipfile.ZipFile:
    tree = tmp_path / "src"
    tree.mkdir()
    for name in PROJECT_FILES:
        if (REPO / name).exists():
            shutil.copy2(REPO / name, tree / name)
    skip = shutil.ignore_patterns("__pycache__", "_C*.so", "_build_info.json", "_csrc")
    shutil.copytree(REPO / "fastreg", tree / "fastreg", ignore=skip)
    shutil.copytree(REPO / "csrc", tree / "csrc", ignore=skip)
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", str(tmp_path / "dist"), *pip_args, str(tree)],
        env={**{k: v for k, v in os.environ.items() if not k.startswith("FASTREG_")}, **env},
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("fastreg-*.whl")
    return zipfile.ZipFile(wheel)


def expected_sources() -> set[str]:
    root = _build.source_root()
    return {f"fastreg/_csrc/{path.relative_to(root).as_posix()}" for path in _build.kernel_files(root)}


def test_isolated_wheel_ships_sources_and_compiles_nothing(tmp_path):
    wheel = build_wheel(tmp_path)  # build isolation: torch is not importable in the build env
    names = set(wheel.namelist())
    assert Path(wheel.filename).name.endswith("-py3-none-any.whl")
    assert "fastreg/_csrc/sources.txt" in names
    sections = _build.sources()
    listed = {
        f"fastreg/_csrc/{Path(p).relative_to(_build.source_root()).as_posix()}" for s in sections.values() for p in s
    }
    assert any(name.endswith(".cu") for name in listed)
    assert listed <= names  # every source in sources.txt, the CUDA ones included
    assert expected_sources() <= names  # and every header they include
    assert not any(name.startswith("fastreg/_csrc/tests/") for name in names)
    assert not any(name.startswith("fastreg/_C") or name.endswith("_build_info.json") for name in names)


def test_aot_wheel_holds_library_and_build_info(tmp_path):
    wheel = build_wheel(tmp_path, "--no-build-isolation", FASTREG_BUILD_OPS="1", CUDA_VISIBLE_DEVICES="")
    names = set(wheel.namelist())
    assert any(name.startswith("fastreg/_C") and name.endswith(".so") for name in names)
    info = json.loads(wheel.read("fastreg/_build_info.json"))
    assert info["mode"] == "aot"
    assert info["torch"] == torch.__version__
    assert info["cuda"] == torch.version.cuda
    assert info["cuda_kernels"] is False  # no visible GPU and not forced
    assert info["source_hash"] == _build.source_hash()
    assert "fastreg/_csrc/sources.txt" in names  # a JIT rebuild stays possible after a torch upgrade
