"""Shared test parameters."""

import torch

from fastreg._library import has_kernel
from fastreg._loader import load_kernels

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
FLOAT_DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]


def kernel_available(device: str) -> bool:
    return load_kernels(device) and has_kernel("dropout", device)
