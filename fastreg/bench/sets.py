"""The one place that says what the benchmark runs: sizes, dtypes and timing effort per set.

``quick`` fits a 2-core CPU in a few minutes; ``full`` is meant for a GPU.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

K, M = 1 << 10, 1 << 20


@dataclass(frozen=True)
class TimingPolicy:
    warmup: int  # calls (GPU: rounds) after the gate's own call, which is the first warm-up
    min_rounds: int
    max_rounds: int
    max_time_s: float  # time budget per implementation; min_rounds may exceed it
    slow_cap_s: float  # past this, a slow implementation gets fewer than min_rounds (at least 1)
    min_round_s: float  # calls are batched so one round lasts at least this long


@dataclass(frozen=True)
class BenchSet:
    name: str
    description: str
    dropout_sizes: tuple[int, ...]
    #: per device type; fp16 only where it is a training dtype people use (GPU)
    dropout_dtypes: dict[str, tuple[torch.dtype, ...]]
    dropout_p: float
    #: weight-penalty parameter lists (bench/penalty_cases.PARAM_LISTS), per device type;
    #: "resnet50_host" (one element per tensor) times the host's share of a step
    penalty_lists: dict[str, tuple[str, ...]]
    penalty_l1: float
    penalty_l2: float
    #: batch-norm activations (N, C, H, W), per device type; each runs in every variant below
    batch_norm_shapes: dict[str, tuple[tuple[int, int, int, int], ...]]
    #: per device type: (dtype, layout) pairs, layout "nchw" or "cl" (channels_last)
    batch_norm_variants: dict[str, tuple[tuple[torch.dtype, str], ...]]
    #: which case ids get a torch.compile row. Each is its own compile (20-60 s per graph on
    #: 2 CPU cores, several seconds on a GPU host), so sets choose a few; --compile means all.
    compile_cases: Callable[[str], bool]
    timing: TimingPolicy = field(default_factory=lambda: QUICK_TIMING)


QUICK_TIMING = TimingPolicy(warmup=2, min_rounds=5, max_rounds=50, max_time_s=0.6, slow_cap_s=3.0, min_round_s=0.005)
FULL_TIMING = TimingPolicy(warmup=3, min_rounds=10, max_rounds=100, max_time_s=1.0, slow_cap_s=10.0, min_round_s=0.002)


def _bn_variants(*dtypes: torch.dtype) -> tuple[tuple[torch.dtype, str], ...]:
    return tuple((dtype, layout) for dtype in dtypes for layout in ("nchw", "cl"))


#: batch norm: the shapes of DESIGN.md's anchors (ResNet activations), and the first of them at
#: batch 8, whose input and output fit in a CPU's last-level cache together
CPU_BN_SHAPES = ((32, 64, 56, 56), (64, 256, 14, 14), (8, 64, 56, 56))
#: the quick set adds a layer whose time is mostly host time (autograd, dispatch), as a GPU
#: spends it on every small layer
QUICK_BN_SHAPES = (*CPU_BN_SHAPES, (4, 64, 8, 8))
#: quick CPU: fp32 in both layouts (the CPU target is fp32 NCHW); bf16 channels_last only, the
#: layout CPU bf16 training uses: bf16 NCHW would add 15-20 s to the 2-core run
CPU_BN_VARIANTS = ((torch.float32, "nchw"), (torch.float32, "cl"), (torch.bfloat16, "cl"))
GPU_BN_SHAPES = (
    (256, 64, 56, 56),  # the H100 target shape (DESIGN.md section 10)
    (32, 64, 112, 112),
    (64, 128, 56, 56),
    (256, 256, 14, 14),
    (128, 512, 7, 7),
    (8, 32, 224, 224),
)


def _full_compile_cases(case_id: str) -> bool:
    if case_id.startswith("dropout"):
        return case_id.endswith(("-1M", "-16M", "-128M"))
    if case_id.startswith("batch_norm"):  # the training step only: 36 cases, a few seconds each on a GPU host
        return case_id.startswith("batch_norm-train_fwd_bwd-")
    return True


SETS: dict[str, BenchSet] = {
    "quick": BenchSet(
        name="quick",
        description="2-core CPU in a few minutes: dropout at 4K (host time), 1M and 16M elements, fp32 and bf16; "
        "batch norm at ResNet shapes and one small layer (host time)",
        dropout_sizes=(4 * K, 1 * M, 16 * M),
        dropout_dtypes={"cpu": (torch.float32, torch.bfloat16), "cuda": (torch.float32, torch.bfloat16)},
        dropout_p=0.1,
        penalty_lists={"cpu": ("small", "resnet50_host"), "cuda": ("resnet50", "resnet50_host")},
        penalty_l1=1e-5,
        penalty_l2=1e-4,
        batch_norm_shapes={"cpu": QUICK_BN_SHAPES, "cuda": QUICK_BN_SHAPES},
        batch_norm_variants={"cpu": CPU_BN_VARIANTS, "cuda": _bn_variants(torch.float32, torch.bfloat16)},
        compile_cases=lambda case_id: case_id == "dropout-fwd-fp32-1M",
        timing=QUICK_TIMING,
    ),
    "full": BenchSet(
        name="full",
        description="GPU: dropout from 64K to 128M elements in fp32, bf16, fp16; ResNet-50 and GPT-2 small penalties",
        dropout_sizes=(64 * K, 1 * M, 4 * M, 16 * M, 64 * M, 128 * M),
        dropout_dtypes={"cpu": (torch.float32, torch.bfloat16), "cuda": (torch.float32, torch.bfloat16, torch.float16)},
        dropout_p=0.1,
        penalty_lists={
            "cpu": ("small", "resnet50", "resnet50_host"),
            "cuda": ("resnet50", "gpt2_small", "resnet50_host"),
        },
        penalty_l1=1e-5,
        penalty_l2=1e-4,
        batch_norm_shapes={"cpu": CPU_BN_SHAPES, "cuda": GPU_BN_SHAPES},
        batch_norm_variants={
            "cpu": _bn_variants(torch.float32, torch.bfloat16),
            "cuda": _bn_variants(torch.float32, torch.bfloat16, torch.float16),
        },
        compile_cases=_full_compile_cases,
        timing=FULL_TIMING,
    ),
}

DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64"}


def size_label(n: int) -> str:
    for unit, scale in (("M", M), ("K", K)):
        if n >= scale and n % scale == 0:
            return f"{n // scale}{unit}"
    return str(n)


def default_set(device: str) -> str:
    return "full" if device.startswith("cuda") else "quick"
