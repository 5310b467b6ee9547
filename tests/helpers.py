"""Shared test parameters."""

import os

import pytest
import torch

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
