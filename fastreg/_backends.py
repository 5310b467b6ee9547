"""Which implementation serves each op on each device."""

from __future__ import annotations

import torch

from . import _loader
from ._library import SCHEMAS, has_kernel


def devices() -> list[str]:
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def backends(load: bool = True) -> list[dict[str, str]]:
    """One row per op and device: ``backend`` is "kernel (aot)", "kernel (jit)" or "reference",
    with ``why`` for the reference. ``load=True`` loads (or builds) the kernels first."""
    rows = []
    for device in devices():
        if load:
            _loader.load_kernels(device)
        for name in SCHEMAS:
            if has_kernel(name, device):
                rows.append({"op": name, "device": device, "backend": f"kernel ({_loader.STATE.mode})", "why": ""})
            else:
                why = _loader.STATE.reason or (
                    "kernels not loaded yet" if not _loader.STATE.attempted else "no kernel for this device"
                )
                rows.append({"op": name, "device": device, "backend": "reference", "why": why})
    return rows
