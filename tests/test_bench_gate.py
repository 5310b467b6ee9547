"""The benchmark's correctness gate: a wrong implementation fails its case with a clear
message, and no speed is reported for it, in the CLI, the report and the pytest wrappers."""

from __future__ import annotations

import csv
import json
import math

import pytest
import torch

import fastreg
from fastreg.bench import batch_norm_cases, dropout_cases, penalty_baselines, penalty_cases, pytest_glue, report
from fastreg.bench.__main__ import main
from fastreg.bench.cases import _OPS, BuiltCase, Case, register_op
from fastreg.bench.dropout_cases import dropout_impl
from fastreg.bench.runner import MISMATCH, OK, run_case
from fastreg.bench.sets import TimingPolicy

P = 0.1
TINY = TimingPolicy(warmup=1, min_rounds=2, max_rounds=3, max_time_s=0.05, slow_cap_s=0.5, min_round_s=0.0)
DROPOUT_IMPLS = ("torch_eager", "fastreg", "reference", "copy_inplace")


def tiny_dropout_case(kind: str = "fwd_bwd", impls=DROPOUT_IMPLS, builder=dropout_cases.build) -> Case:
    return Case("dropout", kind, torch.float32, "4K", 4096, "cpu", tuple(impls), "torch_eager", builder, (("p", P),))


def fastreg_dropout(x):
    return fastreg.functional.dropout(x, P)


def wrong_scale(x):
    return fastreg_dropout(x) * 1.01


def shifted_stream(x, generator):
    """Right-looking dropout whose reported rng_state is not the one it used."""
    out, _mask, rng_state = torch.ops.fastreg.dropout(x, P, 0, generator)
    return out, rng_state + torch.tensor([0, 1])


class MasklessBackward(torch.autograd.Function):
    """Correct forward; backward forgets the mask."""

    @staticmethod
    def forward(ctx, x):
        return fastreg.functional.dropout(x, P)

    @staticmethod
    def backward(ctx, grad):
        return grad / (1 - P)


def with_impl(name: str, forward, seeded=None):
    def build(case: Case) -> BuiltCase:
        built = dropout_cases.build(case)
        built.impls[name] = dropout_impl(built.inputs, name, forward, seeded)
        return built

    return build


def rows_by_impl(rows):
    return {row.impl: row for row in rows}


def test_correct_implementations_pass_and_are_timed():
    rows = rows_by_impl(run_case(tiny_dropout_case(), TINY, progress=lambda _: None))
    for name in DROPOUT_IMPLS:
        assert rows[name].status == OK, rows[name].message
        assert rows[name].median_ms > 0
    assert rows["fastreg"].speedup_vs_eager > 0
    assert rows["fastreg"].saved_bytes < rows["torch_eager"].saved_bytes


@pytest.mark.parametrize(
    "forward, seeded, expected",
    [
        (wrong_scale, None, "kept elements are scaled by"),
        (fastreg_dropout, shifted_stream, "output vs reference (same rng_state): not bit-identical"),
        (lambda x: MasklessBackward.apply(x), None, "gradient does not follow the forward mask"),
        (lambda x: x * 1.0, None, "kept elements are scaled by 1,"),
        (lambda x: torch.nn.functional.dropout(x, 0.5) * (0.5 / (1 - P)), None, "is not 1-p = 0.90000"),
    ],
    ids=["wrong-scale", "wrong-rng-state", "maskless-backward", "no-dropout", "wrong-p"],
)
def test_wrong_dropout_fails_its_row_and_is_not_timed(forward, seeded, expected):
    case = tiny_dropout_case(builder=with_impl("fastreg", forward, seeded))
    rows = rows_by_impl(run_case(case, TINY, progress=lambda _: None))
    broken = rows["fastreg"]
    assert broken.status == MISMATCH
    assert broken.message.startswith("correctness gate failed: fastreg")
    assert expected in broken.message
    assert math.isnan(broken.median_ms) and math.isnan(broken.gbps) and math.isnan(broken.speedup_vs_eager)
    assert not broken.samples_ms
    assert rows["torch_eager"].status == OK and rows["torch_eager"].median_ms > 0  # the others still run


def with_inplace_impl(forward, seeded=None):
    def build(case: Case) -> BuiltCase:
        built = dropout_cases.build(case)
        built.impls["fastreg"] = dropout_cases.inplace_impl(built.inputs, "fastreg", forward, seeded)
        return built

    return build


def fastreg_inplace(t):
    return fastreg.functional.dropout(t, P, inplace=True)


def test_inplace_case_passes_and_times_both():
    rows = rows_by_impl(
        run_case(tiny_dropout_case("fwd_inplace", ("torch_eager", "fastreg")), TINY, progress=lambda _: None)
    )
    assert rows["fastreg"].status == OK and rows["torch_eager"].status == OK, rows["fastreg"].message
    assert rows["fastreg"].median_ms > 0


@pytest.mark.parametrize(
    "forward, seeded, expected",
    [
        (lambda t: fastreg.functional.dropout(t, P), None, "returned a new tensor, not its input"),
        (lambda t: fastreg_inplace(t).mul_(1.01), None, "kept elements are scaled by"),
        (fastreg_inplace, lambda t, g: torch.ops.fastreg.dropout_(t, P, 0, g)[1] + 1, "not bit-identical"),
    ],
    ids=["out-of-place", "wrong-scale", "wrong-rng-state"],
)
def test_wrong_inplace_dropout_fails_its_row(forward, seeded, expected):
    case = tiny_dropout_case("fwd_inplace", ("torch_eager", "fastreg"), builder=with_inplace_impl(forward, seeded))
    broken = rows_by_impl(run_case(case, TINY, progress=lambda _: None))["fastreg"]
    assert broken.status == MISMATCH and expected in broken.message, broken.message
    assert math.isnan(broken.median_ms)


def test_report_shows_mismatch_instead_of_a_speed():
    case = tiny_dropout_case(builder=with_impl("fastreg", wrong_scale))
    rows = [row.as_dict() for row in run_case(case, TINY, progress=lambda _: None)]
    text = report.markdown({"set": "test", "device_name": "cpu"}, rows)
    assert "FAILED the gate and were not timed" in text
    assert "`dropout-fwd_bwd-fp32-4K` / `fastreg`: correctness gate failed" in text
    fastreg_cells = [line for line in text.splitlines() if line.startswith("| fwd_bwd | fp32 | 4K |")]
    assert fastreg_cells and all("**MISMATCH**" in line for line in fastreg_cells)


class NeverCalledBenchmark:
    """Stands in for pytest-benchmark's fixture: the gate must stop the item before timing."""

    group = None
    extra_info: dict = {}

    def __call__(self, *args, **kwargs):
        raise AssertionError("a failing implementation was benchmarked")

    pedantic = __call__


@pytest.mark.parametrize("timed", [False, True])
def test_pytest_item_fails_with_the_gate_message(timed):
    case = tiny_dropout_case(builder=with_impl("fastreg", wrong_scale))
    pytest_glue._built.clear()
    with pytest.raises(
        pytest.fail.Exception, match=r"dropout-fwd_bwd-fp32-4K / fastreg: correctness gate failed: .*scaled by"
    ):
        pytest_glue.run_item(NeverCalledBenchmark(), case, "fastreg", TINY, timed)
    pytest_glue._built.clear()


@pytest.fixture
def broken_op():
    """A registered op whose fastreg implementation is wrong, for the CLI end to end."""

    def cases(bench_set, device, with_compile):
        return [tiny_dropout_case("fwd", builder=with_impl("fastreg", wrong_scale))]

    register_op("broken_dropout", cases)
    yield "broken_dropout"
    _OPS.pop("broken_dropout")


def test_cli_exits_nonzero_and_reports_the_failure(tmp_path, broken_op, capsys):
    out = tmp_path / "run"
    assert main(["--device", "cpu", "--ops", broken_op, "--out", str(out)]) == 1
    assert "FAILED the correctness gate" in capsys.readouterr().err
    assert "**MISMATCH**" in (out / "report.md").read_text()
    with open(out / "results.csv") as handle:
        rows = {row["impl"]: row for row in csv.DictReader(handle)}
    assert rows["fastreg"]["status"] == MISMATCH and rows["fastreg"]["median_ms"] == "nan"
    assert "scaled by" in rows["fastreg"]["message"]
    assert rows["torch_eager"]["status"] == OK and float(rows["torch_eager"]["median_ms"]) > 0
    raw = json.loads((out / "raw.json").read_text())
    assert raw["info"]["torch_version"] == torch.__version__ and raw["info"]["fastreg_commit"]
    assert raw["info"]["command"] == f"python -m fastreg.bench --device cpu --ops {broken_op} --out {out}"


def test_cli_never_overwrites_a_run_unless_asked(tmp_path, broken_op):
    out = tmp_path / "run"
    main(["--device", "cpu", "--ops", broken_op, "--out", str(out)])
    with pytest.raises(SystemExit, match="--overwrite"):
        main(["--device", "cpu", "--ops", broken_op, "--out", str(out)])
    assert main(["--device", "cpu", "--ops", broken_op, "--out", str(out), "--overwrite"]) == 1
    assert main(["compare", str(out), str(out)]) == 0


def test_wrong_penalty_gradient_fails_its_row():
    def build(case):
        built = penalty_cases.build(case)
        params = built.inputs["params"]

        def forgets_l1():  # the L2 half only
            return penalty_baselines.foreach_penalty_(params, 0.0, case.param("l2"))

        built.impls["fastreg"] = penalty_cases.penalty_impl(built.inputs, "fastreg", forgets_l1)
        return built

    case = Case(
        "penalty",
        "value_grad",
        torch.float32,
        "small",
        0,
        "cpu",
        ("torch_foreach", "fastreg"),
        "torch_foreach",
        build,
        (("l1", 1e-3), ("l2", 1e-4)),
    )
    rows = rows_by_impl(run_case(case, TINY, progress=lambda _: None))
    assert rows["torch_foreach"].status == OK, rows["torch_foreach"].message
    assert rows["fastreg"].status == MISMATCH
    assert "fastreg penalty value vs reference" in rows["fastreg"].message
    assert math.isnan(rows["fastreg"].median_ms)


# ---------------------------------------------------------------- batch norm

BN_SHAPE = (4, 8, 6, 6)  # 144 values per channel: a biased variance is 0.35% off, well past the tolerance
BN_IMPLS = ("torch_eager", "fastreg", "reference", "copy_inplace")


def tiny_batch_norm_case(kind="train_fwd_bwd", layout="nchw", dtype=torch.float32, builder=batch_norm_cases.build):
    return Case(
        "batch_norm",
        kind,
        dtype,
        batch_norm_cases.size_label(BN_SHAPE, layout),
        math.prod(BN_SHAPE),
        "cpu",
        BN_IMPLS,
        "torch_eager",
        builder,
        (("shape", BN_SHAPE), ("layout", layout)),
    )


def with_batch_norm(fn):
    def build(case: Case) -> BuiltCase:
        built = batch_norm_cases.build(case)
        built.impls["fastreg"] = batch_norm_cases.batch_norm_impl(built.inputs, "fastreg", fn)
        return built

    return build


def unbiased_normalisation(x, running_mean, running_var, weight, bias, training, momentum, eps):
    """Normalises with the unbiased batch variance (the one the running variance takes)."""
    var, mean = torch.var_mean(x, (0, 2, 3), correction=1, keepdim=True)
    fastreg.functional.update_running_stats(running_mean, running_var, mean.flatten(), var.flatten(), momentum)
    return (x - mean) * torch.rsqrt(var + eps) * weight.view(1, -1, 1, 1) + bias.view(1, -1, 1, 1)


class UnnormalisedGradWeight(torch.autograd.Function):
    """Right forward, right input and bias gradients; the weight's gradient uses x, not x-hat."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps):
        out, mean, invstd, _var = torch.ops.fastreg.batch_norm_train(x, weight, bias, eps)
        ctx.save_for_backward(x, weight, mean, invstd)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, mean, invstd = ctx.saved_tensors
        grad_x, _grad_weight, grad_bias = torch.ops.fastreg.batch_norm_backward(grad_out, x, mean, invstd, weight, True)
        return grad_x, (grad_out * x).sum((0, 2, 3)), grad_bias, None


def unnormalised_grad_weight(x, running_mean, running_var, weight, bias, training, momentum, eps):
    count = x.numel() // x.shape[1]
    _out, mean, _invstd, var = torch.ops.fastreg.batch_norm_train(x.detach(), None, None, eps)
    fastreg.functional.update_running_stats(running_mean, running_var, mean, var * count / (count - 1), momentum)
    return UnnormalisedGradWeight.apply(x, weight, bias, eps)


def biased_running_var(x, running_mean, running_var, weight, bias, training, momentum, eps):
    out, mean, _invstd, var = torch.ops.fastreg.batch_norm_train(x, weight, bias, eps)
    fastreg.functional.update_running_stats(running_mean, running_var, mean, var, momentum)  # not n/(n-1)
    return out


def eval_updates_running_stats(x, running_mean, running_var, weight, bias, training, momentum, eps):
    fastreg.functional.batch_norm(x, running_mean, running_var, weight, bias, True, momentum, eps)
    return fastreg.functional.batch_norm(x, running_mean, running_var, weight, bias, False, momentum, eps)


def contiguous_output(*args):
    return fastreg.functional.batch_norm(*args).contiguous()


@pytest.mark.parametrize("kind", batch_norm_cases.KINDS)
@pytest.mark.parametrize("layout", ["nchw", "cl"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_correct_batch_norm_passes_and_is_timed(kind, layout, dtype):
    case = tiny_batch_norm_case(kind, layout, dtype)
    rows = rows_by_impl(run_case(case, TINY, progress=lambda _: None))
    for name in BN_IMPLS:
        assert rows[name].status == OK, rows[name].message
        assert rows[name].median_ms > 0
    n_bytes = math.prod(BN_SHAPE) * (4 if dtype == torch.float32 else 2)
    assert rows["fastreg"].bytes_moved == (5 if kind == "train_fwd_bwd" else 2) * n_bytes
    assert rows["fastreg"].speedup_vs_eager > 0
    if kind == "eval_fwd":
        assert math.isnan(rows["fastreg"].saved_bytes)  # not measured: inference saves nothing
    else:
        assert rows["fastreg"].saved_bytes >= 0


@pytest.mark.parametrize(
    "kind, layout, fn, expected",
    [
        ("train_fwd", "nchw", unbiased_normalisation, "fastreg output vs reference: Tensor-likes are not close!"),
        ("train_fwd_bwd", "cl", unnormalised_grad_weight, "fastreg gradient of weight vs reference: Tensor-likes"),
        ("train_fwd", "cl", biased_running_var, "fastreg running_var after one training forward vs reference:"),
        ("eval_fwd", "nchw", eval_updates_running_stats, "fastreg output vs reference"),
        (
            "train_fwd_bwd",
            "cl",
            contiguous_output,
            "fastreg output is contiguous (NCHW) with strides (288, 36, 6, 1), but the input is channels_last",
        ),
    ],
    ids=["wrong-variance", "wrong-grad-weight", "biased-running-var", "eval-updates-stats", "loses-channels-last"],
)
def test_wrong_batch_norm_fails_its_row_and_is_not_timed(kind, layout, fn, expected):
    case = tiny_batch_norm_case(kind, layout, builder=with_batch_norm(fn))
    rows = rows_by_impl(run_case(case, TINY, progress=lambda _: None))
    broken = rows["fastreg"]
    assert broken.status == MISMATCH, broken.message
    assert broken.message.startswith("correctness gate failed: " + expected), broken.message
    assert math.isnan(broken.median_ms) and math.isnan(broken.gbps) and math.isnan(broken.speedup_vs_eager)
    assert not broken.samples_ms
    assert rows["torch_eager"].status == OK and rows["torch_eager"].median_ms > 0  # the others still run
    assert rows["reference"].status == OK, rows["reference"].message


def test_eval_must_leave_the_running_stats_alone():
    def stats_drift(x, running_mean, running_var, weight, bias, training, momentum, eps):
        out = fastreg.functional.batch_norm(x, running_mean, running_var, weight, bias, False, momentum, eps)
        running_var.add_(1e-3)
        return out

    case = tiny_batch_norm_case("eval_fwd", builder=with_batch_norm(stats_drift))
    broken = rows_by_impl(run_case(case, TINY, progress=lambda _: None))["fastreg"]
    assert broken.status == MISMATCH
    assert "fastreg running_var after eval: not bit-identical" in broken.message, broken.message


@pytest.mark.parametrize("timed", [False, True])
def test_batch_norm_pytest_item_fails_with_the_gate_message(timed):
    case = tiny_batch_norm_case(builder=with_batch_norm(unnormalised_grad_weight))
    pytest_glue._built.clear()
    with pytest.raises(
        pytest.fail.Exception,
        match=r"batch_norm-train_fwd_bwd-fp32-4x8x6x6-nchw / fastreg: correctness gate failed: "
        r"fastreg gradient of weight vs reference",
    ):
        pytest_glue.run_item(NeverCalledBenchmark(), case, "fastreg", TINY, timed)
    pytest_glue._built.clear()
