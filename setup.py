"""Packaging of fastreg: ships csrc/ inside the package, and builds the kernels ahead of time
when torch is importable at build time (``pip install --no-build-isolation .``).

Plain ``pip install .`` builds in an isolated environment without torch: nothing is compiled
and the kernels are built at first use (JIT, fastreg/_loader.py). Metadata is in pyproject.toml.

Environment: FASTREG_BUILD_OPS (unset: build if torch is importable; 1: must build; 0: never),
FASTREG_FORCE_CUDA=1 (CUDA kernels without a GPU), TORCH_CUDA_ARCH_LIST, MAX_JOBS, CUDA_HOME.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
CSRC = ROOT / "csrc"
PYTHON_MODULE_STUB = CSRC / "python_module.cpp"  # PyInit__C only; packaging glue, not in sources.txt


def load_build_module():
    """fastreg/_build.py without importing the fastreg package (which needs torch)."""
    spec = importlib.util.spec_from_file_location("_fastreg_build", ROOT / "fastreg" / "_build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_build = load_build_module()


def say(message: str) -> None:
    print(f"fastreg setup: {message}", file=sys.stderr, flush=True)


def check_install_settings() -> None:
    """The settings read here take 0 or 1: anything else ("yes", "true") would be read as unset."""
    for name in ("FASTREG_BUILD_OPS", "FASTREG_FORCE_CUDA"):
        value = os.environ.get(name, "").strip()
        if value not in ("", "0", "1"):
            raise SystemExit(f"fastreg setup: {name} must be 0 or 1 (or unset), got {value!r}")


def aot_requested() -> bool:
    """Whether to compile now: FASTREG_BUILD_OPS=1 insists, =0 refuses, unset means 'if torch is here'."""
    setting = os.environ.get("FASTREG_BUILD_OPS", "").strip()
    if setting == "0":
        say("FASTREG_BUILD_OPS=0: not compiling; the kernels are built at first use (JIT)")
        return False
    if importlib.util.find_spec("torch") is None:
        if setting == "1":
            raise SystemExit(
                "fastreg setup: FASTREG_BUILD_OPS=1 needs torch at build time: install torch first, then "
                "'pip install --no-build-isolation .'"
            )
        say("torch is not importable at build time (isolated build): shipping sources; kernels compile at first use")
        return False
    return True


class BuildPyWithSources(build_py):
    """Copies the kernel sources into the package as fastreg/_csrc, so a non-editable install
    can JIT-build them, and drops build products of an earlier run from the build folder."""

    def run(self) -> None:
        super().run()
        package = Path(self.build_lib) / "fastreg"
        for stale in [*package.glob("_C*.so"), package / "_build_info.json"]:
            stale.unlink(missing_ok=True)  # build_ext writes them again if this build compiles
        target = package / "_csrc"
        shutil.rmtree(target, ignore_errors=True)
        for path in _build.kernel_files(CSRC):
            destination = target / path.relative_to(CSRC)
            destination.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, destination)


def aot_extension_setup() -> dict:
    """ext_modules and cmdclass for the ahead-of-time build of fastreg._C."""
    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    with_cuda, why_not = _build.cuda_wanted()
    if os.environ.get("FASTREG_FORCE_CUDA") == "1" and not with_cuda:
        raise SystemExit(f"fastreg setup: FASTREG_FORCE_CUDA=1 but the CUDA kernels cannot be built: {why_not}")
    arches = _build.cuda_arch_list() if with_cuda else ""
    if with_cuda:
        os.environ["TORCH_CUDA_ARCH_LIST"] = arches  # torch turns it into -gencode flags
    if not _build.ensure_ninja_on_path():
        say("ninja not found: compiling without it, one file at a time ('pip install ninja' is faster)")
    sources = _build.sources(CSRC)
    all_sources = sources["cpu"] + [str(PYTHON_MODULE_STUB)] + (sources["cuda"] if with_cuda else [])
    relative = [os.path.relpath(s, ROOT) for s in all_sources]  # setuptools wants paths relative to setup.py
    extension_type = CUDAExtension if with_cuda else CppExtension
    extension = extension_type(
        name="fastreg._C",
        sources=relative,
        extra_compile_args={
            # -g0: no debug info, like the JIT build (Python's default CFLAGS carry -g): smaller, quicker to build
            "cxx": _build.CXX_FLAGS + ["-g0"] + (["-DFASTREG_WITH_CUDA"] if with_cuda else []),
            "nvcc": _build.NVCC_FLAGS,
        },
        extra_link_args=_build.link_flags(),
    )
    say(
        f"compiling {'CPU+CUDA' if with_cuda else 'CPU'} kernels ahead of time for torch {torch.__version__}"
        + (f", CUDA arches {arches}" if with_cuda else f" ({why_not})")
        + f", MAX_JOBS={os.environ.get('MAX_JOBS', 'all cores')}"
    )
    build_info = {
        "mode": "aot",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "arches": arches.replace(" ", ";").split(";") if arches else [],
        "cuda_kernels": with_cuda,
        "source_hash": _build.source_hash(CSRC),
    }

    class BuildExtensionWithInfo(BuildExtension):
        """Writes fastreg/_build_info.json beside the built library; the loader checks it at import."""

        def run(self) -> None:
            super().run()
            library = Path(self.get_ext_fullpath("fastreg._C"))
            (library.parent / "_build_info.json").write_text(json.dumps(build_info, indent=2) + "\n")
            say(f"built {library.name}; build facts in {library.parent / '_build_info.json'}")

    return {
        "ext_modules": [extension],
        "cmdclass": {"build_py": BuildPyWithSources, "build_ext": BuildExtensionWithInfo},
    }


check_install_settings()
setup(**(aot_extension_setup() if aot_requested() else {"cmdclass": {"build_py": BuildPyWithSources}}))
