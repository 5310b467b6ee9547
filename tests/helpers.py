"""Shared test parameters."""

import contextlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from fastreg._library import has_kernel
from fastreg._loader import load_kernels

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
FLOAT_DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]


def kernel_available(device: str) -> bool:
    return load_kernels(device) and has_kernel("dropout", device)


def require_kernel(device: str) -> None:
    """Kernel-vs-reference tests mean nothing on the reference: fail unless it was asked for."""
    if os.environ.get("FASTREG_BACKEND", "auto") == "reference":
        pytest.skip("FASTREG_BACKEND=reference: no compiled kernel to compare")
    from fastreg import _loader

    assert kernel_available(device), f"the {device} kernels are not active: {_loader.STATE.reason}"


REFERENCE_BACKEND = os.environ.get("FASTREG_BACKEND", "auto").strip().lower() == "reference"


class DispatchedOps(TorchDispatchMode):
    """Records the name of every op dispatched while active (``aten.zeros.default``, ...);
    ops that a recorded op runs inside its own kernel are not seen."""

    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func))
        return func(*args, **(kwargs or {}))


def result_in_child(tmp_path: Path, module: str, function: str, **environment: str):
    """``function()`` of the test module ``module`` (e.g. "tests.test_cpu_streaming"), run in a
    fresh Python with these environment variables set: for settings that fastreg reads once
    per process. The result comes back through torch.save."""
    out = tmp_path / f"{function}.pt"
    tests_parent = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = (
        f"import sys, torch\nsys.path.insert(0, {tests_parent!r})\n"
        f"from {module} import {function}\ntorch.save({function}(), {str(out)!r})\n"
    )
    env = dict(os.environ, **environment)
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"child failed:\n{result.stderr[-4000:]}"
    return torch.load(out)


def use_kernels(device: str, ops) -> None:
    """A test on ``device`` must run that device's compiled kernels of ``ops``, not the reference
    they fall back to: fail when they are not active. Like require_kernel, but under
    FASTREG_BACKEND=reference it lets the test run (on the reference) instead of skipping, for
    tests that compare with an independent oracle (torch, the naive formula) the reference must match too."""
    if REFERENCE_BACKEND:
        return
    from fastreg import _loader

    loaded = load_kernels(device)
    missing = [name for name in ops if not has_kernel(name, device)]
    assert loaded and not missing, f"no {device} kernel for {missing or list(ops)}: {_loader.STATE.reason}"


@contextlib.contextmanager
def compiled_autograd():
    """Backward calls inside run on compiled autograd (``torch._dynamo.config.compiled_autograd``):
    the backward graph is captured, then compiled with ``fullgraph=True``, so a node that Dynamo
    cannot trace (one run eagerly behind a graph break) fails the test. fastreg's nodes support
    it from torch 2.7, whose functional interface they use (csrc/common/autograd_node.h)."""
    if tuple(int(v) for v in torch.__version__.split(".")[:2]) < (2, 7):
        pytest.skip("compiled autograd of fastreg's nodes needs torch >= 2.7")
    torch._dynamo.reset()
    compiler = torch.compile(backend="aot_eager", fullgraph=True)
    try:
        with torch._dynamo.compiled_autograd._enable(compiler):
            yield
    finally:
        torch._dynamo.reset()
