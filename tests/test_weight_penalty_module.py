"""fastreg.penalty's training-loop API: select_decay_parameters (Linear, conv, attention, recurrent,
bilinear and parametrized weights) and WeightPenalty (groups and their coefficients, add_grad_
against the naive formula, parameters on several devices, frozen parameters, the C++ loop against
the Python one, changes to the groups, pickling and copies, tensor subclasses, swap_tensors and
load_state_dict), and the recipes of docs/weight_penalty.md (GradScaler, gradient accumulation)."""

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
    KERNELS_ONLY,
    assert_value_close,
    kernels,  # noqa: F401 (autouse: the CPU kernels, loaded once per module)
    make,
    naive_fp64,
    use_kernels,
)


class SmallNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.bn = nn.BatchNorm2d(8)
        self.embed = nn.Embedding(10, 4)
        self.head = nn.Linear(8, 5)
        self.norm = nn.LayerNorm(5)
        self.frozen = nn.Linear(5, 5)
        self.frozen.requires_grad_(False)


# --- select_decay_parameters ----------------------------------------------------------------------


def test_select_decay_parameters_takes_linear_and_conv_weights_only():
    net = SmallNet()
    selected = penalty.select_decay_parameters(net)
    assert [id(p) for p in selected] == [id(net.conv.weight), id(net.head.weight)]
    widened = penalty.select_decay_parameters(net, decay_types=(nn.Linear, nn.Embedding))
    assert {id(p) for p in widened} == {id(net.embed.weight), id(net.head.weight)}


def test_select_decay_parameters_takes_the_tensors_of_parametrized_weights():
    # a parametrized weight (weight_norm, spectral_norm, ...) is computed from the originals the optimizer updates
    linear = nn.utils.parametrizations.weight_norm(nn.Linear(4, 3))
    conv = nn.utils.parametrizations.spectral_norm(nn.Conv2d(2, 3, 3))
    net = nn.Sequential(linear, conv, nn.BatchNorm2d(3))
    selected = penalty.select_decay_parameters(net)
    originals = linear.parametrizations.weight
    assert [id(p) for p in selected] == [
        id(originals.original0),
        id(originals.original1),
        id(conv.parametrizations.weight.original),
    ]


def _selected_names(module, **kwargs) -> list[str]:
    names = {id(p): name for name, p in module.named_parameters()}
    return [names[id(p)] for p in penalty.select_decay_parameters(module, **kwargs)]


def test_select_decay_parameters_takes_attention_projections():
    # in_proj_weight (or q/k/v_proj_weight) were left out: a Transformer's attention was half decayed
    packed = nn.MultiheadAttention(8, 2)
    assert _selected_names(packed) == ["in_proj_weight", "out_proj.weight"]
    separate = nn.MultiheadAttention(8, 2, kdim=4, vdim=6, bias=True, add_bias_kv=True)
    assert _selected_names(separate) == ["q_proj_weight", "k_proj_weight", "v_proj_weight", "out_proj.weight"]
    layer = nn.TransformerEncoderLayer(8, 2, 16)
    assert _selected_names(layer) == [
        "self_attn.in_proj_weight",
        "self_attn.out_proj.weight",
        "linear1.weight",
        "linear2.weight",
    ]
    # narrowed to Linear: out_proj only
    assert _selected_names(layer, decay_types=(nn.Linear,)) == [
        "self_attn.out_proj.weight",
        "linear1.weight",
        "linear2.weight",
    ]


def test_select_decay_parameters_takes_recurrent_weights():
    lstm = nn.LSTM(4, 6, num_layers=2, bidirectional=True, proj_size=3)
    expected = [
        f"weight_{kind}_l{layer}{direction}"
        for layer in (0, 1)
        for direction in ("", "_reverse")
        for kind in ("ih", "hh", "hr")
    ]
    assert _selected_names(lstm) == expected
    assert _selected_names(nn.GRU(3, 5)) == ["weight_ih_l0", "weight_hh_l0"]
    assert _selected_names(nn.RNN(3, 5, num_layers=2)) == [
        "weight_ih_l0",
        "weight_hh_l0",
        "weight_ih_l1",
        "weight_hh_l1",
    ]
    for cell in (nn.RNNCell(3, 4), nn.LSTMCell(3, 4), nn.GRUCell(3, 4)):
        assert _selected_names(cell) == ["weight_ih", "weight_hh"]


def test_select_decay_parameters_takes_bilinear_weights_and_leaves_the_rest():
    net = nn.Sequential(nn.Bilinear(3, 4, 5), nn.Embedding(10, 5), nn.LayerNorm(5), nn.GroupNorm(1, 5), nn.PReLU())
    assert _selected_names(net) == ["0.weight"]
    widened = _selected_names(net, decay_types=(*penalty.DECAY_TYPES, nn.Embedding))
    assert widened == ["0.weight", "1.weight"]


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_select_decay_parameters_takes_the_parameters_of_old_weight_and_spectral_norm():
    # torch.nn.utils.weight_norm / spectral_norm make 'weight' a plain tensor computed from
    # weight_g and weight_v, or weight_orig: those, which the optimizer updates, were left out
    net = nn.Sequential(
        nn.utils.weight_norm(nn.Linear(4, 4)),
        nn.utils.spectral_norm(nn.Conv2d(2, 3, 3)),
        nn.utils.weight_norm(nn.GRU(3, 3), name="weight_hh_l0"),
    )
    assert _selected_names(net) == [
        "0.weight_g",
        "0.weight_v",
        "1.weight_orig",
        "2.weight_ih_l0",
        "2.weight_hh_l0_g",
        "2.weight_hh_l0_v",
    ]
    assert not isinstance(net[0].weight, nn.Parameter) and not isinstance(net[1].weight, nn.Parameter)


# --- WeightPenalty --------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
def test_weight_penalty_add_grad_matches_naive_and_allocates_grads(device):
    use_kernels(device)
    torch.manual_seed(0)
    net = SmallNet().to(device)
    decay = penalty.select_decay_parameters(net)
    wp = penalty.WeightPenalty(decay, l1=1e-3, l2=1e-2)
    clone = SmallNet().to(device)
    clone.load_state_dict(net.state_dict())
    x = torch.randn(2, 3, 6, 6).to(device)

    def loss_of(model):
        h = model.bn(model.conv(x)).mean(dim=(2, 3))
        return model.norm(model.head(h)).square().sum()

    loss_of(net).backward()
    net.conv.weight.grad = None  # a parameter without a gradient gets one allocated
    bias_grad = net.head.bias.grad.clone()
    value = wp.add_grad_()
    assert value.device.type == device and net.conv.weight.grad.device == net.conv.weight.device
    clone_decay = penalty.select_decay_parameters(clone)
    (loss_of(clone) + ref.naive_penalty(clone_decay, 1e-3, 1e-2)).backward()
    assert_value_close(value, decay, 1e-3, 1e-2)
    assert mismatch(net.head.weight.grad, clone.head.weight.grad) is None
    expected_conv = 1e-3 * torch.sign(net.conv.weight) + 2e-2 * net.conv.weight
    assert mismatch(net.conv.weight.grad, expected_conv.detach()) is None
    assert mismatch(net.head.bias.grad, bias_grad, exact=True) is None  # not penalised: untouched
    # The two networks' own gradients agree bit for bit on the CPU; on CUDA, cuDNN may pick
    # different (or non-deterministic) algorithms for them, which has nothing to do with the penalty.
    assert mismatch(net.head.bias.grad, clone.head.bias.grad, exact=device == "cpu") is None


def test_weight_penalty_groups_have_their_own_coefficients():
    a, b, c = (p.requires_grad_() for p in make([(50, 4), (33,), (7, 7)]))
    for p in (a, b, c):
        p.grad = torch.zeros_like(p)
    wp = penalty.WeightPenalty([{"params": [a], "l2": 0.5}, {"params": [b], "l1": 0.25}, {"params": c}], l1=0.1)
    value = wp.add_grad_()
    expected = naive_fp64([a], 0.1, 0.5) + naive_fp64([b], 0.25, 0.0) + naive_fp64([c], 0.1, 0.0)
    assert math.isclose(float(value), expected, rel_tol=1e-6)
    assert mismatch(a.grad, (0.1 * torch.sign(a) + 1.0 * a).detach()) is None
    assert mismatch(b.grad, (0.25 * torch.sign(b)).detach()) is None
    assert math.isclose(float(wp().detach()), expected, rel_tol=1e-6) and math.isclose(
        float(wp.value()), expected, rel_tol=1e-6
    )


def test_weight_penalty_skips_zero_groups_and_takes_modules():
    net = SmallNet()
    wp = penalty.WeightPenalty(
        [
            {"params": penalty.select_decay_parameters(net), "l2": 0.1},
            {"params": [net.bn.weight, net.bn.bias], "l2": 0.0},
        ]
    )
    wp.add_grad_()
    assert net.bn.weight.grad is None and net.conv.weight.grad is not None
    whole = penalty.WeightPenalty(net, l2=0.1)  # a module: its trainable parameters
    assert sum(len(g["params"]) for g in whole.param_groups) == sum(1 for p in net.parameters() if p.requires_grad)


def test_add_grad_leaves_frozen_parameters_alone():
    # The formula gives no gradient to a tensor that does not require grad (a frozen layer), but
    # still counts its value; a .grad written there would make the optimizer move the frozen weight.
    use_kernels("cpu")
    a, b, c = (p.requires_grad_() for p in make([(20, 3), (7,), (4, 4)]))
    wp = penalty.WeightPenalty([a, b, c], l1=0.1, l2=0.2)
    b.requires_grad_(False)  # frozen after the penalty was built
    c.requires_grad_(False)
    c.grad = torch.ones(4, 4)  # left from before it was frozen
    value = wp.add_grad_()
    assert b.grad is None and torch.equal(c.grad, torch.ones(4, 4))
    assert mismatch(a.grad, (0.1 * torch.sign(a) + 0.4 * a).detach(), exact=True) is None
    assert_value_close(value, [a, b, c], 0.1, 0.2)


def test_add_grad_follows_changes_to_the_group():
    use_kernels("cpu")
    a, b, c = (p.requires_grad_() for p in make([(20, 3), (7,), (4, 4)]))
    wp = penalty.WeightPenalty([a, b], l2=0.5)
    wp.add_grad_()
    b_grad = b.grad.clone()
    wp.param_groups[0]["params"][1] = c  # the same length, another tensor
    wp.param_groups[0]["l2"] = 0.25  # coefficients are read at each call, as optimizers read lr
    value = wp.add_grad_()
    assert torch.equal(b.grad, b_grad)  # out of the group: untouched
    assert_value_close(value, [a, c], 0.0, 0.25)
    assert mismatch(c.grad, (0.5 * c).detach(), exact=True) is None


def _mixed_group(device="cpu"):
    """Parameters that take every branch of add_grad_'s loop: a .grad to allocate, a frozen one,
    channels_last, several dtypes, and odd sizes."""
    params = make([(6, 3, 5, 5), (40,), (13, 7), (3,), (257,)], device=device, seed=3)
    params[0] = params[0].to(memory_format=torch.channels_last)
    params[2] = params[2].to(torch.bfloat16)
    params[4] = params[4].double()
    generator = torch.Generator().manual_seed(4)
    for p in params:
        p.requires_grad_()
        p.grad = torch.empty_like(p).copy_(torch.randn(p.shape, generator=generator))  # p's layout
    params[1].grad = params[3].grad = None
    params[3].requires_grad_(False)
    return params


@KERNELS_ONLY
@pytest.mark.parametrize("device", DEVICES)
def test_compiled_add_grad_loop_matches_the_python_loop(device):
    """WeightPenalty.add_grad_ runs its per-step loop in C++ (WeightPenaltyGroup) where the kernels
    are loaded; the Python loop serves the reference backend and torch.compile. Same bits."""
    use_kernels(device)
    values, grads = [], []
    for native in (True, False):
        params = _mixed_group(device)
        wp = penalty.WeightPenalty([{"params": params[:3], "l1": 0.3}, {"params": params[3:]}], l2=0.7)
        if not native:
            wp._native_loop = lambda group_params: None
        values.append(wp.add_grad_())
        grads.append([p.grad for p in params])
        assert (wp._native_loop(params[:3]) is not None) == native
    assert values[0].dtype == values[1].dtype == torch.float64
    assert mismatch(values[0], values[1], exact=True) is None
    assert grads[0][3] is None and grads[1][3] is None  # frozen: counted, not touched
    for native_grad, python_grad in zip(grads[0], grads[1]):
        if native_grad is not None:
            assert native_grad.stride() == python_grad.stride()
            assert mismatch(native_grad, python_grad, exact=True) is None


def test_tensor_subclass_parameters_take_the_python_loop():
    class Tagged(torch.Tensor):
        pass

    use_kernels("cpu")
    p = torch.randn(5).as_subclass(Tagged).requires_grad_()
    wp = penalty.WeightPenalty([p], l2=0.5)
    wp.add_grad_()
    assert wp._native_loop([p]) is None
    assert mismatch(p.grad.as_subclass(torch.Tensor), p.detach().as_subclass(torch.Tensor)) is None


# --- devices --------------------------------------------------------------------------------------


def test_parameters_are_grouped_by_device_in_order_of_first_appearance():
    # weight_penalty and WeightPenalty make one op call per device; "meta" stands in for a second
    # device where there is no GPU (the CUDA test below runs the whole path).
    a, b, c = torch.zeros(2), torch.zeros(3), torch.zeros(4)
    m1, m2 = torch.empty(5, device="meta"), torch.empty(6, device="meta")
    groups = penalty._by_device([a, m1, b, m2, c])
    assert [[id(t) for t in group] for group in groups] == [[id(a), id(b), id(c)], [id(m1), id(m2)]]


@CUDA_ONLY
def test_weight_penalty_and_add_grad_take_parameters_on_several_devices():
    use_kernels("cpu")
    use_kernels("cuda")
    on_cpu = make([(30, 4), (17,)])
    on_cuda = make([(50,), (6, 7)], device="cuda", seed=1)
    params = [p.requires_grad_() for p in (on_cpu[0], on_cuda[0], on_cpu[1], on_cuda[1])]
    naive = [p.detach().cpu().requires_grad_() for p in params]
    ref.naive_penalty(naive, 0.1, 0.2).backward()
    expected = naive_fp64(naive, 0.1, 0.2)

    value = penalty.weight_penalty(params, l1=0.1, l2=0.2)  # on the first parameter's device
    assert value.device == params[0].device and math.isclose(float(value), expected, rel_tol=1e-6)
    value.backward()
    for p, n in zip(params, naive):
        assert p.grad.device == p.device and mismatch(p.grad, n.grad, exact=True) is None

    for p in params:
        p.grad = None
    wp = penalty.WeightPenalty([params[1], params[0], params[2], params[3]], l1=0.1, l2=0.2)
    value = wp.add_grad_()
    assert value.device == params[1].device and math.isclose(float(value), expected, rel_tol=1e-6)
    for p, n in zip(params, naive):
        assert p.grad.device == p.device and mismatch(p.grad, n.grad, exact=True) is None
    assert math.isclose(float(wp.value()), expected, rel_tol=1e-6)


# --- pickling, copies and swapped tensors ---------------------------------------------------------


def test_weight_penalty_pickles_and_copies_after_a_step():
    import copy
    import pickle

    use_kernels("cpu")
    params = [p.requires_grad_() for p in make([(5, 3), (4,)])]
    wp = penalty.WeightPenalty(params, l1=0.1, l2=0.2)
    wp.add_grad_()
    for clone in (pickle.loads(pickle.dumps(wp)), copy.deepcopy(wp)):
        twin = clone.param_groups[0]["params"]
        grads = [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in twin]  # pickle drops .grad
        clone.add_grad_()
        for p, g in zip(twin, grads):
            assert mismatch(p.grad, (g + 0.1 * torch.sign(p) + 0.4 * p).detach()) is None


@pytest.mark.parametrize("device", DEVICES)
def test_add_grad_follows_parameters_swapped_by_swap_tensors(device):
    """torch.utils.swap_tensors keeps a parameter's Python object and puts another tensor under
    it. It refused parameters whose penalty had run ("Expected use_count ... 1 or 2": the compiled
    loop held every tensor), and add_grad_ must then update the new tensor, not the old one."""
    use_kernels(device)
    torch.manual_seed(0)
    linear = nn.Linear(4, 3).to(device)
    wp = penalty.WeightPenalty(linear, l1=0.01, l2=0.1)
    wp.add_grad_()
    linear.zero_grad(set_to_none=True)
    other = nn.Parameter(torch.full((3, 4), 5.0, device=device))
    torch.utils.swap_tensors(linear.weight, other)
    assert float(linear.weight[0, 0].detach()) == 5.0
    wp.add_grad_()
    for p in (linear.weight, linear.bias):
        assert mismatch(p.grad, (0.01 * torch.sign(p) + 0.2 * p).detach(), exact=True) is None
    assert other.grad is None  # the old tensor, now under `other`, is left alone


@pytest.mark.parametrize("assign", [False, True])
def test_swap_module_conversion_and_load_state_dict_after_add_grad(assign):
    """With torch.__future__.set_swap_module_params_on_conversion(True), module.double() and
    load_state_dict swap each parameter's tensor: that failed ("Couldn't swap Linear.weight") once
    add_grad_ had run; afterwards add_grad_ updates the converted and the loaded tensors."""
    use_kernels("cpu")
    torch.manual_seed(0)
    previous = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)
    try:
        linear = nn.Linear(4, 3)
        wp = penalty.WeightPenalty(linear, l2=0.1)
        linear(torch.randn(2, 4)).sum().backward()
        wp.add_grad_()
        linear.double()
        assert linear.weight.dtype == linear.weight.grad.dtype == torch.float64
        state = {k: v * 2 for k, v in linear.state_dict().items()}
        linear.load_state_dict(state, assign=assign)
        assert torch.equal(linear.weight.detach(), state["weight"])
    finally:
        torch.__future__.set_swap_module_params_on_conversion(previous)
    linear.zero_grad(set_to_none=True)
    value = wp.add_grad_()
    assert value.dtype == torch.float64
    assert_value_close(value, list(linear.parameters()), 0.0, 0.1)
    for p in linear.parameters():
        assert mismatch(p.grad, (0.2 * p).detach(), exact=True) is None


# --- training-loop recipes (docs/weight_penalty.md) -----------------------------------------------


def _sgd_model(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3))
    return model, torch.optim.SGD(model.parameters(), lr=0.5)


def test_add_grad_after_grad_scaler_unscale_matches_the_naive_formula():
    """With a GradScaler, add_grad_ goes after scaler.unscale_(optimizer): before it, the
    penalty's gradient would be added, unscaled, to scaled gradients (65536x too weak here)."""
    use_kernels("cpu")
    x, y = torch.randn(8, 5, generator=torch.Generator().manual_seed(1)), torch.randn(8, 3)
    results = {}
    for recipe in ("naive", "fastreg", "fastreg_before_unscale"):
        model, optimizer = _sgd_model()
        decay = penalty.select_decay_parameters(model)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
        wp = penalty.WeightPenalty(decay, l1=1e-3, l2=1e-2)
        loss = (model(x) - y).square().mean()
        if recipe == "naive":
            scaler.scale(loss + ref.naive_penalty(decay, 1e-3, 1e-2)).backward()
        else:
            scaler.scale(loss).backward()
            if recipe == "fastreg":
                scaler.unscale_(optimizer)
                wp.add_grad_()
            else:
                wp.add_grad_()
        scaler.step(optimizer)
        scaler.update()
        results[recipe] = [p.detach().clone() for p in model.parameters()]
    assert mismatch(results["fastreg"], results["naive"]) is None
    assert mismatch(results["fastreg_before_unscale"], results["naive"]) is not None


def test_add_grad_once_per_step_with_gradient_accumulation_matches_the_naive_formula():
    """With gradient accumulation, add_grad_ runs once per optimizer step, after the last micro-batch
    (once per micro-batch would add the penalty's gradient that many times)."""
    use_kernels("cpu")
    micro = [(torch.randn(4, 5), torch.randn(4, 3)) for _ in range(4)]
    results = {}
    for recipe in ("naive", "fastreg", "fastreg_per_micro_batch"):
        model, optimizer = _sgd_model()
        decay = penalty.select_decay_parameters(model)
        wp = penalty.WeightPenalty(decay, l2=1e-2)
        for x, y in micro:
            loss = (model(x) - y).square().mean() / len(micro)
            if recipe == "naive":  # the formula in every micro-batch's loss, scaled like it
                loss = loss + ref.naive_penalty(decay, 0.0, 1e-2) / len(micro)
            loss.backward()
            if recipe == "fastreg_per_micro_batch":
                wp.add_grad_()
        if recipe == "fastreg":
            wp.add_grad_()
        optimizer.step()
        results[recipe] = [p.detach().clone() for p in model.parameters()]
    assert mismatch(results["fastreg"], results["naive"]) is None
    assert mismatch(results["fastreg_per_micro_batch"], results["naive"]) is not None
