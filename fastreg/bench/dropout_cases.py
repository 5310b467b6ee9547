"""Dropout cases: forward, and forward + backward, side by side on the same tensor.

Implementations: PyTorch eager (F.dropout), torch.compile of it, fastreg in each mask mode
(regenerate is the default: no mask stored), the pure-PyTorch reference run as an autograd
op, and the copy yardsticks. fwd_bwd uses torch.autograd.grad, which returns the gradient
rather than accumulating into .grad, so no extra read-modify-write pass is timed.
fwd_inplace times ``dropout(x, inplace=True)`` (PyTorch eager against fastreg's default mode)
on a buffer that each call overwrites again; the gate runs on fresh copies of the input.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch

from .. import functional as fastreg_F
from ..reference import dropout as ref
from . import gate, memory
from .baselines import COPY_IMPLS, copy_impls
from .cases import BuiltCase, Case, Impl, register_op
from .sets import BenchSet, size_label

GATE_SEED = 20240611  # every gated seeded call draws from a generator seeded with this

Forward = Callable[[torch.Tensor], torch.Tensor]
#: (x, generator) -> (output, rng_state): a path whose random stream the reference can replay
Seeded = Callable[[torch.Tensor, torch.Generator], tuple[torch.Tensor, torch.Tensor]]


class ReferenceDropout(torch.autograd.Function):
    """The reference as users would run it as an op: forward saves the rng_state, backward
    regenerates the mask, the same contract as fastreg's default mode."""

    @staticmethod
    def forward(ctx, x, p, mask_mode, generator):
        out, mask, rng_state = ref.dropout(x, p, mask_mode, generator)
        ctx.save_for_backward(mask, rng_state)
        ctx.p, ctx.mask_mode = p, mask_mode
        ctx.mark_non_differentiable(rng_state)
        return out, rng_state

    @staticmethod
    def backward(ctx, grad_out, _grad_state):
        mask, rng_state = ctx.saved_tensors
        return ref.dropout_backward(grad_out, mask, rng_state, ctx.p, ctx.mask_mode), None, None, None


def _fastreg(p: float, mode: str) -> tuple[Forward, Seeded]:
    mode_int = fastreg_F.MASK_MODES[mode]

    def forward(x):
        return fastreg_F.dropout(x, p, True, mask_mode=mode)

    def seeded(x, generator):
        out, _mask, rng_state = torch.ops.fastreg.dropout(x, p, mode_int, generator)
        return out, rng_state

    return forward, seeded


def _reference(p: float) -> tuple[Forward, Seeded]:
    return (
        lambda x: ReferenceDropout.apply(x, p, ref.REGENERATE, None)[0],
        lambda x, generator: ReferenceDropout.apply(x, p, ref.REGENERATE, generator),
    )


def _torch_compile(p: float) -> Forward:
    # a fresh dynamo cache per case: each case is its own shape and dtype, and the recompile
    # limit would otherwise silently fall back to eager after a few cases
    torch._dynamo.reset()
    return torch.compile(lambda x: torch.nn.functional.dropout(x, p, True), dynamic=False)


def implementations(case: Case) -> dict[str, tuple[Forward, Seeded | None]]:
    p = case.param("p")
    impls: dict[str, tuple[Forward, Seeded | None]] = {
        "torch_eager": (lambda x: torch.nn.functional.dropout(x, p, True), None)
    }
    if "torch_compile" in case.impl_names:
        impls["torch_compile"] = (_torch_compile(p), None)
    impls["fastreg"] = _fastreg(p, "regenerate")
    impls["fastreg_bits"] = _fastreg(p, "bits")
    impls["fastreg_bool"] = _fastreg(p, "bool")
    impls["reference"] = _reference(p)
    return impls


def _oracle(inputs: dict, rng_state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Reference output and gradient for this rng_state, computed once per case and state.
    Every mask mode makes the same keep decisions by spec, so one bool-mask replay serves all."""
    key = tuple(int(v) for v in rng_state.tolist())
    cache = inputs["oracle"]
    if key not in cache:
        x, g, p = inputs["x"].detach(), inputs["grad"], inputs["p"]
        out, keep = ref.dropout_seeded(x, p, rng_state, ref.BOOL)
        grad = ref.dropout_backward(g, keep, rng_state, p, ref.BOOL) if inputs["backward"] else None
        cache.clear()  # one entry is all a case needs; do not hoard full-size tensors
        cache[key] = (out, grad)
    return cache[key]


def dropout_impl(inputs: dict, name: str, forward: Forward, seeded: Seeded | None, *, check_timed: bool = True) -> Impl:
    """An Impl over the case's tensors: ``forward`` is what is timed; ``seeded``, when given,
    is compared bit for bit to the reference for the rng_state it reports. ``check_timed=False``
    skips the semantic check of ``forward`` where it is the seeded path itself (the reference)."""
    x, g, p, backward = inputs["x"], inputs["grad"], inputs["p"], inputs["backward"]
    n_bytes = x.numel() * x.element_size()

    def call(fn: Forward):
        y = fn(x)
        return (y, torch.autograd.grad(y, x, g)[0]) if backward else (y, None)

    def run():
        return call(forward)

    def check() -> str | None:
        if check_timed or seeded is None:
            out, grad = call(forward)
            problem = gate.dropout_semantics(x, out, p, g, grad)
            if problem:
                return f"{name} (the timed call): {problem}"
        if seeded is None:
            return None
        generator = torch.Generator(device=x.device).manual_seed(GATE_SEED)
        out, rng_state = seeded(x, generator)
        expected_out, expected_grad = _oracle(inputs, rng_state)
        grad = torch.autograd.grad(out, x, g)[0] if backward else None
        return gate.first_problem(
            gate.exact(f"{name} output vs reference (same rng_state)", out, expected_out),
            gate.exact(f"{name} gradient vs reference (same rng_state)", grad, expected_grad) if backward else None,
        )

    return Impl(
        name,
        run=run,
        check=check,
        bytes_moved=(4 if backward else 2) * n_bytes,
        saved_bytes=lambda: memory.saved_bytes(lambda: forward(x), (x, g)),
    )


def inplace_impl(inputs: dict, name: str, forward: Forward, seeded: Seeded | None) -> Impl:
    """In place: ``forward(buffer)`` must return the buffer, overwritten with its dropout."""
    x, p = inputs["x"].detach(), inputs["p"]
    buffer = x.clone()

    def check() -> str | None:
        target = x.clone()
        out = forward(target)
        if out is not target:
            return f"{name}: inplace=True returned a new tensor, not its input"
        problem = gate.dropout_semantics(x, out, p)
        if problem or seeded is None:
            return problem and f"{name}: {problem}"
        target = x.clone()
        rng_state = seeded(target, torch.Generator(device=x.device).manual_seed(GATE_SEED))
        expected_out, _ = _oracle(inputs, rng_state)
        return gate.exact(f"{name} in-place output vs reference (same rng_state)", target, expected_out)

    return Impl(name, run=lambda: forward(buffer), check=check, bytes_moved=2 * x.numel() * x.element_size())


def _inplace_implementations(p: float) -> dict[str, tuple[Forward, Seeded | None]]:
    def seeded(buffer, generator):
        return torch.ops.fastreg.dropout_(buffer, p, ref.REGENERATE, generator)[1]

    return {
        "torch_eager": (lambda t: torch.nn.functional.dropout(t, p, True, inplace=True), None),
        "fastreg": (lambda t: fastreg_F.dropout(t, p, True, inplace=True), seeded),
    }


def build(case: Case) -> BuiltCase:
    generator = torch.Generator(device=case.device).manual_seed(0)
    x = torch.randn(case.numel, dtype=case.dtype, device=case.device, generator=generator).requires_grad_()
    grad = torch.randn(case.numel, dtype=case.dtype, device=case.device, generator=generator)
    inputs = {"x": x, "grad": grad, "p": case.param("p"), "backward": case.kind == "fwd_bwd", "oracle": {}}
    if case.kind == "fwd_inplace":
        impls = {
            name: inplace_impl(inputs, name, *fns) for name, fns in _inplace_implementations(case.param("p")).items()
        }
    else:
        impls = {
            name: dropout_impl(inputs, name, fwd, seeded, check_timed=name != "reference")
            for name, (fwd, seeded) in implementations(case).items()
        }
    impls.update(copy_impls(x))
    return BuiltCase(case, inputs, {name: impls[name] for name in case.impl_names})


def cases(bench_set: BenchSet, device: str, with_compile: Callable[[str], bool]) -> list[Case]:
    found = []
    params = (("p", bench_set.dropout_p),)
    for kind in ("fwd", "fwd_bwd"):
        for dtype in bench_set.dropout_dtypes[torch.device(device).type]:
            for n in bench_set.dropout_sizes:
                case = Case("dropout", kind, dtype, size_label(n), n, device, (), "torch_eager", build, params)
                names = ["torch_eager"] + (["torch_compile"] if with_compile(case.id) else [])
                names += ["fastreg", "fastreg_bits", "fastreg_bool", "reference", *COPY_IMPLS]
                found.append(dataclasses.replace(case, impl_names=tuple(names)))
    # In place matters for memory at the largest size, and for host time at the smallest.
    inplace_sizes = sorted({min(bench_set.dropout_sizes), max(bench_set.dropout_sizes)})
    for dtype in bench_set.dropout_dtypes[torch.device(device).type]:
        for n in inplace_sizes:
            found.append(
                Case(
                    "dropout",
                    "fwd_inplace",
                    dtype,
                    size_label(n),
                    n,
                    device,
                    ("torch_eager", "fastreg", *COPY_IMPLS),
                    "torch_eager",
                    build,
                    params,
                )
            )
    return found


register_op("dropout", cases)
