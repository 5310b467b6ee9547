"""Reference dropout: the spec of docs/rng.md written in plain PyTorch.

Same schema and results, bit for bit, as the CPU and CUDA kernels.
"""

from __future__ import annotations

import sys

import torch

from ..memory_format import from_memory_order, is_non_overlapping_and_dense, memory_dense
from .in_place import bump_version, check_overwritable
from .philox import philox4x32_10

#: what the error for a direct call of fastreg::dropout_ on a tensor requiring grad recommends
INPLACE_DIFFERENTIABLE_FORM = "fastreg.functional.dropout(input, p, inplace=True)"

GROUP = 8  # keep decisions per Philox call
RESOLUTION = 65536  # p is resolved to 2^-16
REGENERATE, BITS, BOOL = 0, 1, 2
CUDA_OFFSET_INCREMENT = 4  # what one call advances a CUDA generator's philox offset by
#: xored into the seed's two words to make the Philox key (ASCII "fastreg\0"): keeps fastreg's
#: counters apart from PyTorch's own CUDA random ops, which use key = seed (docs/rng.md)
KEY_TAG = (0x74736166, 0x00676572)


def philox_key(seed: int) -> tuple[int, int]:
    return (seed & 0xFFFFFFFF) ^ KEY_TAG[0], ((seed >> 32) & 0xFFFFFFFF) ^ KEY_TAG[1]


def keep_threshold(p: float) -> int:
    return min(max(round((1.0 - p) * RESOLUTION), 0), RESOLUTION)


def keep_scale(threshold: int) -> float:
    return 0.0 if threshold == 0 else RESOLUTION / threshold


class DropoutProbabilityError(ValueError, RuntimeError):
    """A NaN p. fastreg has always refused it with a ValueError; torch's range check in Python
    lets NaN through to its C++ one, which raises a RuntimeError: this is both."""


def check_p(p: float) -> None:
    """p as torch's dropout takes it: one test on the common path (a float in [0, 1])."""
    if type(p) is not float or not 0.0 <= p <= 1.0:
        _check_p_slowly(p)


def _check_p_slowly(p) -> None:
    # In torch's order: its Python range check (a ValueError; for a p that does not compare
    # with floats, the TypeError of the comparison), its argument parser's types, the C++ check.
    if p < 0.0 or p > 1.0:
        raise ValueError(f"dropout probability has to be between 0 and 1, but got {p}")
    if not _parses_as_float(p):
        hint = " (a tensor p must be 0-dim and not require grad)" if isinstance(p, torch.Tensor) else ""
        raise TypeError(f"dropout(): argument 'p' must be float, not {type(p).__name__}{hint}")
    if p != p:
        raise DropoutProbabilityError(f"dropout probability has to be between 0 and 1, but got {p}")


def _parses_as_float(p) -> bool:
    """What torch's argument parser takes for a float argument: a Python float, int or bool, a
    symbolic one, a numpy scalar, or a 0-dim tensor that does not require grad."""
    if isinstance(p, (float, int, torch.SymFloat, torch.SymInt)):  # bool is an int
        return True
    if isinstance(p, torch.Tensor):
        return p.dim() == 0 and not p.requires_grad
    numpy = sys.modules.get("numpy")  # not imported: p is no numpy scalar
    return numpy is not None and isinstance(p, (numpy.number, numpy.bool_))


def keep_groups(groups: torch.Tensor, p: float, seed: int, offset: int) -> torch.Tensor:
    """Keep decisions of the given groups (int64 indices) as a bool tensor of shape (len, 8):
    column j is element 8 * group + j."""
    counter = [
        groups & 0xFFFFFFFF,
        groups >> 32,
        torch.full_like(groups, offset & 0xFFFFFFFF),
        torch.full_like(groups, (offset >> 32) & 0xFFFFFFFF),
    ]
    words = philox4x32_10(counter, philox_key(seed))
    lanes = torch.stack([half for w in words for half in (w & 0xFFFF, w >> 16)], dim=1)
    return lanes < keep_threshold(p)


def keep_flat(n: int, p: float, seed: int, offset: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Keep decisions of elements 0..n-1 (memory order) as a bool tensor."""
    groups = torch.arange((n + GROUP - 1) // GROUP, dtype=torch.int64, device=device)
    return keep_groups(groups, p, seed, offset).reshape(-1)[:n]


def pack_bits(keep: torch.Tensor) -> torch.Tensor:
    """Bit j of byte g is element 8g + j; bits past the end are 0."""
    padded = torch.zeros(((keep.numel() + GROUP - 1) // GROUP) * GROUP, dtype=torch.int64, device=keep.device)
    padded[: keep.numel()] = keep.to(torch.int64)
    weights = torch.tensor([1 << j for j in range(GROUP)], dtype=torch.int64, device=keep.device)
    return (padded.reshape(-1, GROUP) * weights).sum(dim=1).to(torch.uint8)


def unpack_bits(packed: torch.Tensor, n: int) -> torch.Tensor:
    shifts = torch.arange(GROUP, dtype=torch.int64, device=packed.device)
    return ((packed.to(torch.int64).unsqueeze(1) >> shifts) & 1).reshape(-1)[:n].bool()


def _apply(values: torch.Tensor, keep: torch.Tensor, p: float) -> torch.Tensor:
    """values * (keep ? scale : 0), computed in fp32 (fp64 for fp64) like the kernels."""
    compute = torch.float64 if values.dtype == torch.float64 else torch.float32
    scale = torch.tensor(keep_scale(keep_threshold(p)), dtype=compute, device=values.device)
    multiplier = torch.where(keep, scale, torch.zeros((), dtype=compute, device=values.device))
    out = torch.empty_like(values)
    out.copy_(values.to(compute) * multiplier)
    return out


def _rng_values(rng_state: torch.Tensor) -> tuple[int, int]:
    seed, offset = (int(v) for v in rng_state.tolist())
    return seed & (2**64 - 1), offset & (2**64 - 1)


def _mask_for(keep_in_memory_order: torch.Tensor, dense: torch.Tensor, mask_mode: int) -> torch.Tensor:
    if mask_mode == BITS:
        return pack_bits(keep_in_memory_order)
    if mask_mode == BOOL:
        return from_memory_order(keep_in_memory_order, dense)
    return torch.empty(0, dtype=torch.uint8, device=dense.device)


def check_mode(mask_mode: int) -> None:
    if mask_mode not in (REGENERATE, BITS, BOOL):
        raise ValueError(f"fastreg.dropout: mask_mode must be 0 (regenerate), 1 (bits) or 2 (bool), got {mask_mode}")


class UnsupportedDtypeError(TypeError, NotImplementedError):
    """An input of a dtype the kernels do not take. A TypeError, as fastreg has always raised, and
    a NotImplementedError, so a RuntimeError too: what torch's dropout raises where it cannot draw
    noise in the input's dtype (RuntimeError for integers and bool, NotImplementedError else)."""


def check_input(x: torch.Tensor, op: str = "fastreg.dropout", name: str = "input") -> None:
    if x.layout != torch.strided:
        raise RuntimeError(f"{op}: {name} must be a strided (dense) tensor, got layout {x.layout}")
    if x.dtype not in (torch.float64, torch.float32, torch.float16, torch.bfloat16):  # TorchScript: no global
        raise UnsupportedDtypeError(
            f"{op}: expected a floating-point tensor (float64, float32, float16 or bfloat16), got {x.dtype}"
        )


def check_generator(generator: torch.Generator | None, x: torch.Tensor, op: str = "fastreg.dropout") -> None:
    if generator is not None and generator.device.type != x.device.type:
        raise RuntimeError(
            f"{op}: generator is on {generator.device} but input is on {x.device}; "
            "pass a generator of the input's device"
        )


def check_rng_state(rng_state: torch.Tensor, like: torch.Tensor, op: str) -> None:
    """(seed, offset): two int64s, contiguous, on the input's device or the CPU (as the kernels read it)."""
    if not (
        rng_state.layout == torch.strided
        and rng_state.dtype == torch.int64
        and rng_state.numel() == 2
        and rng_state.is_contiguous()
    ):
        raise RuntimeError(f"{op}: rng_state must be a contiguous int64 tensor of 2 elements (seed, offset)")
    if rng_state.device not in (like.device, torch.device("cpu")):
        raise RuntimeError(f"{op}: rng_state is on {rng_state.device} but the input on {like.device}")


def check_grad_output(grad: torch.Tensor) -> None:
    op = "fastreg.dropout_backward"
    check_input(grad, op, "grad_output")
    if not is_non_overlapping_and_dense(grad):
        raise RuntimeError(f"{op}: grad_output must be dense in the forward output's layout")


def dropout_seeded(
    x: torch.Tensor, p: float, rng_state: torch.Tensor, mask_mode: int
) -> tuple[torch.Tensor, torch.Tensor]:
    check_input(x)
    check_p(p)
    check_mode(mask_mode)
    check_rng_state(rng_state, x, "fastreg.dropout_seeded")
    dense = memory_dense(x)
    seed, offset = _rng_values(rng_state)
    keep = keep_flat(dense.numel(), p, seed, offset, dense.device)
    return _apply(dense, from_memory_order(keep, dense), p), _mask_for(keep, dense, mask_mode)


def draw_rng_state(device: torch.device, generator: torch.Generator | None) -> torch.Tensor:
    """(seed, offset) for one call, drawn from the device's generator exactly as the kernels do."""
    if device.type == "cuda":
        gen = generator if generator is not None else torch.cuda.default_generators[device.index or 0]
        seed, offset = gen.initial_seed(), gen.get_offset()
        gen.set_offset(offset + CUDA_OFFSET_INCREMENT)
        return torch.tensor([seed - 2**64 if seed >= 2**63 else seed, offset], dtype=torch.int64, device=device)
    seed = torch.randint(1 << 62, (1,), generator=generator, dtype=torch.int64)
    return torch.cat([seed, torch.zeros(1, dtype=torch.int64)]).to(device)


def dropout(x: torch.Tensor, p: float, mask_mode: int, generator: torch.Generator | None = None):
    check_input(x)
    check_p(p)
    check_mode(mask_mode)
    check_generator(generator, x)
    rng_state = draw_rng_state(x.device, generator)
    out, mask = dropout_seeded(x, p, rng_state, mask_mode)
    return out, mask, rng_state


def dropout_(x: torch.Tensor, p: float, mask_mode: int, generator: torch.Generator | None = None):
    """In place: x is overwritten with its dropout; returns (mask, rng_state)."""
    check_input(x, "fastreg.dropout_")  # a sparse input has no strides to look at
    check_overwritable(x, "fastreg.dropout_", "input", INPLACE_DIFFERENTIABLE_FORM)
    check_generator(generator, x, "fastreg.dropout_")
    # Refuse before the generator advances, where ATen's overlap check would refuse the write.
    if any(stride == 0 and size > 1 for size, stride in zip(x.shape, x.stride())):
        raise RuntimeError(
            "unsupported operation: some elements of the input tensor and the written-to tensor refer to a single "
            "memory location. Please clone() the tensor before performing the operation."
        )
    out, mask, rng_state = dropout(x, p, mask_mode, generator)
    # One version bump, as the kernels make (and torch's in-place ops): the copy, a write below
    # this op, bumps none.
    with torch._C._AutoDispatchBelowADInplaceOrView():
        x.copy_(out)
    bump_version(x)
    return mask, rng_state


def check_saved_mask(mask: torch.Tensor, grad: torch.Tensor, mask_mode: int) -> None:
    if mask.device != grad.device:  # in every mode, as the kernels do: even an unused mask
        raise RuntimeError(f"fastreg.dropout_backward: mask is on {mask.device} but grad_output on {grad.device}")
    if mask_mode == REGENERATE:
        return
    expected = (grad.numel() + GROUP - 1) // GROUP if mask_mode == BITS else grad.numel()
    dtype = torch.uint8 if mask_mode == BITS else torch.bool
    if mask.layout != torch.strided or mask.numel() != expected or mask.dtype != dtype:
        raise RuntimeError(
            f"fastreg.dropout_backward: mask ({mask.numel()} x {mask.dtype} on {mask.device}, layout {mask.layout}) "
            f"does not fit mask_mode {mask_mode}: expected {expected} x {dtype} on {grad.device}, dense"
        )
    if not is_non_overlapping_and_dense(mask):
        raise RuntimeError(
            f"fastreg.dropout_backward: mask (sizes {list(mask.shape)}, strides {list(mask.stride())}) is not "
            "dense; pass the mask the forward returned"
        )
    if mask_mode == BOOL and tuple(mask.stride()) != tuple(grad.stride()):
        raise RuntimeError("fastreg.dropout_backward: a bool mask must have grad_output's strides")


def dropout_backward(
    grad: torch.Tensor, mask: torch.Tensor, rng_state: torch.Tensor, p: float, mask_mode: int
) -> torch.Tensor:
    check_grad_output(grad)
    check_p(p)
    check_rng_state(rng_state, grad, "fastreg.dropout_backward")
    check_mode(mask_mode)
    check_saved_mask(mask, grad, mask_mode)
    if mask_mode == BOOL:
        keep = mask
    else:
        n = grad.numel()
        flat = unpack_bits(mask, n) if mask_mode == BITS else keep_flat(n, p, *_rng_values(rng_state), grad.device)
        keep = from_memory_order(flat, grad)
    return _apply(grad, keep, p)
