"""Bytes an implementation keeps alive for backward, measured, not assumed.

torch.autograd.graph.saved_tensors_hooks sees every tensor autograd saves. Tensors sharing
storage with the inputs or the outputs are not counted: they exist anyway. What is left (a
mask, a noise tensor, an rng state) is the extra activation memory a training step pays.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch


def _storages(values: Any) -> Iterable[int]:
    if isinstance(values, torch.Tensor):
        yield values.untyped_storage().data_ptr()
    elif isinstance(values, (list, tuple)):
        for v in values:
            yield from _storages(v)


def saved_bytes(forward: Callable[[], Any], inputs: Any) -> int | None:
    """Runs ``forward()`` once and returns the bytes of the saved tensors it added, or None
    when they cannot be seen (some torch.compile graphs keep them out of reach of the hooks)."""
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        saved[storage.data_ptr()] = storage.nbytes()
        return t

    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            outputs = forward()
    except Exception:  # noqa: BLE001 - unmeasurable is an answer, not a failure of the case
        return None
    alive = set(_storages(inputs)) | set(_storages(outputs))
    return sum(nbytes for ptr, nbytes in saved.items() if ptr not in alive and ptr != 0)
