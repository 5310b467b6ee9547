"""What the weight penalty refuses, and how it says so: the ops' errors (compiled and reference
alike) for bad coefficients, dtypes, layouts, shapes, mixed devices, meta tensors, overlapping
or grad-requiring in-place gradients, and from the fake kernels; the user API's for bad groups,
non-leaf tensors, sets, items that are not tensors and coefficients that are not numbers; and
forward-mode AD (torch.func.hessian), refused rather than silently dropped."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from fastreg import penalty
from fastreg.reference import weight_penalty as ref
from fastreg.testing import mismatch

from .helpers import DEVICES
from .weight_penalty_helpers import (
    CUDA_ONLY,
    OPS,
    kernels,  # noqa: F401 (autouse: the CPU kernels, loaded once per module)
    make,
    use_kernels,
)

# --- errors from the ops (compiled and reference alike) -------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", ["op", "reference"])
def test_op_errors_name_the_problem(impl, device):
    if impl == "op":
        use_kernels(device)
    value = OPS.weight_penalty_value if impl == "op" else ref.weight_penalty_value
    grad_ = OPS.weight_penalty_grad_ if impl == "op" else ref.weight_penalty_grad_
    w = make([(4, 6), (5,)], device=device)
    g = make([(4, 6), (5,)], device=device, seed=1)
    with pytest.raises(ValueError, match="l1 must be a finite number >= 0, got -1"):
        value(w, -1.0, 0.0)
    with pytest.raises(ValueError, match="l2 must be a finite number >= 0"):
        grad_(g, w, 0.0, float("inf"))
    with pytest.raises(TypeError, match=r"params\[1\] has dtype .*[Ii]nt"):
        value([w[0], torch.ones(3, dtype=torch.int32, device=device)], 0.1, 0.1)
    # sparse tensors (SparseCPU / SparseCUDA keys) reach the reference, which names them
    with pytest.raises(RuntimeError, match=r"params\[0\] has layout .*[Ss]parse"):
        value([w[0].to_sparse()], 0.1, 0.1)
    with pytest.raises(RuntimeError, match=r"grads\[1\] is a sparse gradient"):
        grad_([g[0], g[1].to_sparse()], w, 0.1, 0.1)
    with pytest.raises(RuntimeError, match=r"grads\[0\] is a view with gaps"):
        grad_([torch.zeros(4, 12, device=device)[:, ::2], g[1]], w, 0.1, 0.1)
    with pytest.raises(RuntimeError, match=r"grads\[0\] is a view with gaps"):
        grad_([torch.zeros(1, 6, device=device).expand(4, 6), g[1]], w, 0.1, 0.1)
    with pytest.raises(RuntimeError, match=r"grads\[1\] has shape"):
        grad_([g[0], torch.zeros(6, device=device)], w, 0.1, 0.1)
    with pytest.raises(TypeError, match=r"grads\[1\] has dtype"):
        grad_([g[0], g[1].double()], w, 0.1, 0.1)
    with pytest.raises(RuntimeError, match="got 1 gradients for 2 parameters"):
        grad_(g[:1], w, 0.1, 0.1)
    with pytest.raises(RuntimeError, match="share memory"):
        shared = torch.zeros(5, device=device)
        grad_([shared, shared], [torch.ones(5, device=device), torch.ones(5, device=device)], 0.1, 0.1)
    with pytest.raises(RuntimeError, match=r"grads\[0\] is the memory of params\[0\]"):
        grad_([w[0]], [w[0]], 0.1, 0.1)


@CUDA_ONLY
@pytest.mark.parametrize("impl", ["op", "reference"])
def test_mixed_devices_name_the_problem(impl):
    # A list holding any CUDA tensor dispatches to the CUDA kernel, even when its first tensor is
    # on the CPU: the kernel must check every tensor before it takes a device guard.
    if impl == "op":
        use_kernels("cuda")
    value = OPS.weight_penalty_value if impl == "op" else ref.weight_penalty_value
    grad_ = OPS.weight_penalty_grad_ if impl == "op" else ref.weight_penalty_grad_
    cpu = make([(4, 6), (5,)])
    cuda = [t.cuda() for t in cpu]
    cpu_grads = make([(4, 6), (5,)], seed=1)
    cuda_grads = [g.cuda() for g in cpu_grads]
    one_device = "; pass the tensors of one device per call"
    with pytest.raises(RuntimeError, match=r"params\[1\] is on cuda:\d+ but params\[0\] is on cpu" + one_device):
        value([cpu[0], cuda[1]], 0.1, 0.2)
    with pytest.raises(RuntimeError, match=r"params\[1\] is on cpu but params\[0\] is on cuda:\d+" + one_device):
        value([cuda[0], cpu[1]], 0.1, 0.2)
    with pytest.raises(RuntimeError, match=r"params\[1\] is on cpu but params\[0\] is on cuda:\d+"):
        grad_(cuda_grads, [cuda[0], cpu[1]], 0.1, 0.2)
    with pytest.raises(RuntimeError, match=r"params\[1\] is on cuda:\d+ but params\[0\] is on cpu"):
        grad_(cpu_grads, [cpu[0], cuda[1]], 0.1, 0.2)
    grads = [cuda_grads[0], cpu_grads[1].clone()]
    with pytest.raises(RuntimeError, match=r"grads\[1\] is on cpu but params\[1\] is on cuda:\d+"):
        grad_(grads, cuda, 0.1, 0.2)
    grads = [cpu_grads[0].cuda(), cpu_grads[1].cuda()]
    with pytest.raises(RuntimeError, match=r"grads\[0\] is on cuda:\d+ but params\[0\] is on cpu"):
        grad_(grads, cpu, 0.1, 0.2)  # only the gradients on CUDA: the CUDA kernel still runs
    # nothing was written before the errors
    assert mismatch(cuda_grads, make([(4, 6), (5,)], device="cuda", seed=1), exact=True) is None
    assert mismatch(grads, cpu_grads, exact=True) is None
    backward = OPS.weight_penalty_backward if impl == "op" else ref.weight_penalty_backward
    # both backends check grad_output's device: a 0-dim CPU tensor would otherwise mix in silently
    with pytest.raises(RuntimeError, match=r"grad_output is on cpu but the parameters are on cuda:\d+"):
        backward(torch.tensor(1.0), cuda, 0.1, 0.2)
    with pytest.raises(RuntimeError, match=r"grad_output is on cuda:\d+ but the parameters are on cpu"):
        backward(torch.tensor(1.0, device="cuda"), cpu, 0.1, 0.2)
    with pytest.raises(RuntimeError, match=r"grad_output is on cuda:\d+ but the parameters are on cpu"):
        backward(torch.tensor(1.0, device="cuda"), [], 0.1, 0.2)  # no parameters count as CPU ones
    with pytest.raises(RuntimeError, match=r"params\[1\] is on cuda:\d+ but params\[0\] is on cpu"):
        backward(torch.tensor(1.0), [cpu[0], cuda[1]], 0.1, 0.2)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", ["op", "reference"])
def test_tensor_coefficient_errors_name_the_problem(impl, device):
    if impl == "op":
        use_kernels(device)
    lib = OPS if impl == "op" else ref
    value, grad_ = lib.weight_penalty_value_tensor_coefficients, lib.weight_penalty_grad_tensor_coefficients_
    w = make([(4, 6), (5,)], device=device)
    good = torch.tensor(0.1, dtype=torch.float64)
    with pytest.raises(ValueError, match="l1 must be a finite number >= 0, got -1"):
        value(w, torch.tensor(-1.0), good)
    with pytest.raises(ValueError, match="l2 must be a finite number >= 0, got nan"):
        grad_(make([(4, 6), (5,)], device=device, seed=1), w, good, torch.tensor(math.nan))
    with pytest.raises(TypeError, match=r"the l2 tensor has dtype (torch\.int64|Long); expected a floating-point"):
        value(w, good, torch.tensor(1))
    with pytest.raises(ValueError, match="the l1 tensor must have one element, got 2"):
        value(w, torch.tensor([0.1, 0.2]), good)
    with pytest.raises(RuntimeError, match=r"the l1 tensor is on cpu with layout \S*[Ss]parse\S*; coefficient tensors"):
        value(w, torch.tensor([0.1]).to_sparse(), good)
    if device == "cuda":
        with pytest.raises(RuntimeError, match=r"the l2 tensor is on cuda:0 with layout \S*[Ss]trided; coefficient"):
            value(w, good, good.cuda())
        with pytest.raises(RuntimeError, match="the l1 tensor is on cuda:0 .* must be dense CPU tensors"):
            value([p.cpu() for p in w], good.cuda(), good)  # CPU parameters: the CUDA kernel refuses it too


def _grad_calls(grads, params):
    return OPS.weight_penalty_grad_(grads, params, 0.3, 0.7)


@pytest.mark.parametrize(
    "case",
    ["partial_overlap", "shifted_own_param", "grad_is_another_param"],
)
def test_in_place_gradients_that_overlap_memory_they_touch_raise(case):
    # They used to run: one gradient updated twice, or a parameter changed while it was read.
    buf = torch.zeros(20)
    if case == "partial_overlap":
        grads, params, match = [buf[0:10], buf[5:15]], make([(10,), (10,)]), r"grads\[1\] and grads\[0\] overlap"
    elif case == "shifted_own_param":
        grads, params, match = [buf[1:11]], [buf[0:10]], r"grads\[0\] overlaps params\[0\]"
    else:
        grads, params = [buf[10:20], torch.zeros(10)], [buf[0:10], buf[10:20]]
        match = r"grads\[0\] overlaps params\[1\]"
    before = [g.clone() for g in grads]
    with pytest.raises(RuntimeError, match=match):
        _grad_calls(grads, params)
    assert all(torch.equal(g, b) for g, b in zip(grads, before))  # refused before writing anything


def test_in_place_gradients_in_one_flat_buffer_are_fine():
    flat_w, flat_g = torch.randn(30), torch.zeros(30)
    params = [flat_w[0:10], flat_w[10:30].view(4, 5)]
    grads = [flat_g[0:10], flat_g[10:30].view(4, 5)]
    value = _grad_calls(grads, params)
    torch.testing.assert_close(value, ref.naive_penalty(params, 0.3, 0.7))
    torch.testing.assert_close(flat_g, 0.3 * flat_w.sign() + 1.4 * flat_w, rtol=0, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_in_place_op_refuses_gradients_that_require_grad_and_bumps_versions(device):
    params = make([(3,), (2, 2)], device=device)
    grads = [torch.zeros(3, device=device, requires_grad=True), torch.zeros(2, 2, device=device)]
    message = r"weight_penalty_grad_: overwrites grads\[0\], which requires grad.*weight_penalty\(params"
    with pytest.raises(RuntimeError, match=message):
        OPS.weight_penalty_grad_(grads, params, 0.3, 0.7)
    assert not grads[0].detach().any() and not grads[1].any()  # refused before writing
    with torch.no_grad():
        OPS.weight_penalty_grad_(grads, params, 0.3, 0.7)
    assert all(g._version > 0 for g in grads)  # so autograd refuses values saved before


def test_meta_tensors_mixed_with_cpu_ones_raise():
    # A meta tensor among CPU ones dispatches to the Meta kernel (the fake): it used to return
    # uninitialised CPU tensors (value and gradients) instead of saying that the devices differ.
    p = make([(3,), (2, 2)])
    meta = torch.zeros(3, device="meta")
    with pytest.raises(RuntimeError, match=r"params\[1\] is on meta but params\[0\] is on cpu"):
        OPS.weight_penalty_value([p[0], meta], 0.3, 0.7)
    with pytest.raises(RuntimeError, match="grad_output is on meta but the parameters are on cpu"):
        OPS.weight_penalty_backward(torch.ones((), device="meta"), p, 0.3, 0.7)
    with pytest.raises(RuntimeError, match=r"grads\[0\] is on meta but params\[0\] is on cpu"):
        OPS.weight_penalty_grad_([meta, torch.zeros(2, 2)], p, 0.3, 0.7)


def test_fake_kernels_raise_like_the_kernels():
    from torch._subclasses.fake_tensor import FakeTensorMode

    mode = FakeTensorMode()
    p = [mode.from_tensor(t) for t in make([(3,), (2, 2)])]
    ints = [mode.from_tensor(torch.arange(3))]
    two, g3, g4 = (mode.from_tensor(t) for t in (torch.ones(2), torch.zeros(3), torch.zeros(4)))
    with mode:
        with pytest.raises(TypeError, match=r"params\[0\] has dtype"):
            OPS.weight_penalty_value(ints, 0.3, 0.7)
        with pytest.raises(RuntimeError, match="grad_output must have one element"):
            OPS.weight_penalty_backward(two, p, 0.3, 0.7)
        with pytest.raises(RuntimeError, match=r"grads\[1\] has shape"):
            OPS.weight_penalty_grad_([g3, g4], p, 0.3, 0.7)


# --- inputs the user API must take like the formula, or name --------------------------------------


def test_weight_penalty_rejects_bad_input():
    p = torch.randn(3, requires_grad=True)
    with pytest.raises(ValueError, match="more than once"):
        penalty.WeightPenalty([{"params": [p]}, {"params": [p]}], l2=0.1)
    with pytest.raises(ValueError, match="l2 must be a finite number >= 0"):
        penalty.WeightPenalty([p], l2=-0.1)
    with pytest.raises(ValueError, match="l1 must be a finite number >= 0"):
        penalty.WeightPenalty([{"params": [p], "l1": float("nan")}])
    with pytest.raises(TypeError, match="dtype torch.int64"):
        penalty.WeightPenalty([torch.ones(3, dtype=torch.int64)], l2=0.1)
    wp = penalty.WeightPenalty([p], l2=0.1)
    p.grad = torch.randn(3).to_sparse()
    with pytest.raises(RuntimeError, match="sparse gradient"):
        wp.add_grad_()


def test_weight_penalty_rejects_non_leaf_tensors():
    # was accepted: add_grad_ wrote the .grad of the view or product, the leaf's gradient got nothing
    w = torch.randn(6, 4, requires_grad=True)
    for non_leaf in (w[:, ::2], w.t(), w * 2):
        with pytest.raises(ValueError, match=r"params\[0\] is not a leaf tensor"):
            penalty.WeightPenalty([non_leaf], l2=0.1)
    penalty.WeightPenalty([torch.randn(6, 4)[:, ::2]], l2=0.1)  # a view of a tensor without grad is a leaf


def test_functional_names_items_that_are_not_tensors():
    # was AttributeError: 'str' object has no attribute 'device'
    net = nn.Linear(3, 2)
    with pytest.raises(TypeError, match=r"params\[0\] is a str, not a tensor"):
        penalty.weight_penalty(dict(net.named_parameters()), l2=0.1)
    with pytest.raises(TypeError, match=r"params\[0\] is a tuple, not a tensor"):
        penalty.weight_penalty(net.named_parameters(), l2=0.1)


def test_sets_of_parameters_are_rejected():
    # a set's order changes from run to run, and with it the order of the sums (torch.optim rejects sets too)
    params = {p.requires_grad_() for p in make([(3,), (4,)])}
    with pytest.raises(TypeError, match="set"):
        penalty.weight_penalty(params, l2=0.1)
    with pytest.raises(TypeError, match="set"):
        penalty.WeightPenalty(params, l2=0.1)
    with pytest.raises(TypeError, match="set"):
        penalty.WeightPenalty([{"params": params}], l2=0.1)


def test_coefficients_given_as_tensors_or_not_numbers():
    use_kernels("cpu")
    w = make([(5, 4)])[0].requires_grad_()
    expected = penalty.weight_penalty([w], l1=0.25, l2=0.5)
    assert torch.equal(penalty.weight_penalty([w], l1=torch.tensor(0.25), l2=torch.tensor(0.5)), expected)
    # the penalty has no gradient for its coefficients: one that requires grad would be cut off silently
    learned = torch.tensor(0.25, requires_grad=True)
    with pytest.raises(TypeError, match="l1 is a tensor that requires grad"):
        penalty.weight_penalty([w], l1=learned)
    with pytest.raises(TypeError, match="l2 is a tensor that requires grad"):
        penalty.WeightPenalty([{"params": [w], "l2": learned}])
    with pytest.raises(TypeError, match="l1 must be a number, got NoneType"):
        penalty.WeightPenalty([{"params": [w], "l1": None}])
    wp = penalty.WeightPenalty([w], l1=torch.tensor(0.25), l2=1)
    assert wp.param_groups[0]["l1"] == 0.25 and type(wp.param_groups[0]["l1"]) is float
    assert "l1=0.25, l2=1.0" in repr(wp)


# --- forward-mode AD is refused, not dropped ------------------------------------------------------


@pytest.mark.parametrize("requires_grad", [False, True])
def test_forward_mode_ad_is_refused_not_dropped(requires_grad):
    import torch.autograd.forward_ad as fwAD

    w = torch.randn(5, requires_grad=requires_grad)
    with fwAD.dual_level(), pytest.raises(NotImplementedError, match=r"forward.mode AD"):
        penalty.weight_penalty([fwAD.make_dual(w, torch.ones_like(w))], l1=0.1, l2=0.2)


def test_torch_func_hessian_is_refused_and_jacrev_of_jacrev_works():
    """torch.func.hessian is forward-over-reverse: forward-mode AD, which the ops refuse rather
    than drop; reverse-over-reverse (jacrev(jacrev(f))) works (docs/weight_penalty.md)."""
    from torch.func import hessian, jacrev

    x = torch.randn(4, dtype=torch.float64)

    def f(q):
        return penalty.weight_penalty([q], l1=0.3, l2=0.7)

    with pytest.raises(NotImplementedError, match=r"forward.mode AD"):
        hessian(f)(x)
    torch.testing.assert_close(jacrev(jacrev(f))(x), 1.4 * torch.eye(4, dtype=torch.float64))
