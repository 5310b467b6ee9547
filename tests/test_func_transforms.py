"""torch.func transforms over fastreg's ops: grad, vjp, jacrev, and vmap with its randomness option.

Every test runs on both backends (the compiled kernels' C++ autograd, and the reference's Python
autograd registered by fastreg._library.register_autograd) and compares with an independent
oracle: torch.autograd on the same call, or the op called sample by sample.
"""

import pytest
import torch
from torch.func import functional_call, grad, jacrev, vjp, vmap

import fastreg
import fastreg.functional as F
from tests.helpers import DEVICES, REFERENCE_BACKEND

# vmap warns "There is a performance drop" for an op that it runs through its fallback: fastreg's
# ops have their own vmap rules, so that warning is an error here.
pytestmark = pytest.mark.filterwarnings("error:There is a performance drop:UserWarning")


def _gen(device, seed=7):
    return torch.Generator(device=device).manual_seed(seed)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mask_mode", list(F.MASK_MODES))
def test_func_grad_of_dropout_matches_autograd(device, mask_mode):
    x = torch.randn(6, 5, dtype=torch.float64, device=device)
    w = torch.randn(6, 5, dtype=torch.float64, device=device)

    def loss(t):
        return (F.dropout(t, 0.4, generator=_gen(device), mask_mode=mask_mode) * w).sum()

    leaf = x.clone().requires_grad_()
    expected = torch.autograd.grad(loss(leaf), leaf)[0]
    assert torch.equal(grad(loss)(x), expected)
    _, pullback = vjp(lambda t: F.dropout(t, 0.4, generator=_gen(device), mask_mode=mask_mode), x)
    assert torch.equal(pullback(w)[0], expected)
    jac = jacrev(lambda t: F.dropout(t, 0.4, generator=_gen(device), mask_mode=mask_mode))(x)
    assert torch.equal(torch.einsum("ijkl,ij->kl", jac, w), expected)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("training", [True, False])
def test_func_grad_of_batch_norm_matches_autograd(device, training):
    x = torch.randn(4, 3, 2, 2, dtype=torch.float64, device=device)
    weight = torch.randn(3, dtype=torch.float64, device=device)
    bias = torch.randn(3, dtype=torch.float64, device=device)
    mean = torch.randn(3, dtype=torch.float64, device=device)
    var = torch.rand(3, dtype=torch.float64, device=device) + 0.5

    def loss(t, w, b):
        return F.batch_norm(t, mean.clone(), var.clone(), w, b, training=training).pow(2).sum()

    leaves = [t.clone().requires_grad_() for t in (x, weight, bias)]
    expected = torch.autograd.grad(loss(*leaves), leaves)
    got = grad(loss, argnums=(0, 1, 2))(x, weight, bias)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-12)


def test_func_double_grad_of_batch_norm_names_the_limit():
    x = torch.randn(4, 3, dtype=torch.float64)

    def loss(t):
        return F.batch_norm(t, None, None, training=True).pow(3).sum()

    with pytest.raises(RuntimeError, match="double backward is not supported"):
        grad(lambda t: grad(loss)(t).sum())(x)


@pytest.mark.parametrize("device", DEVICES)
def test_func_grad_and_hessian_of_weight_penalty(device):
    params = [torch.randn(3, 4, dtype=torch.float64, device=device), torch.randn(5, dtype=torch.float64, device=device)]

    def penalty(a, b):
        return fastreg.weight_penalty([a, b], l1=0.1, l2=0.3)

    got = grad(penalty, argnums=(0, 1))(*params)
    for g, p in zip(got, params):
        torch.testing.assert_close(g, 0.1 * p.sign() + 0.6 * p, rtol=1e-12, atol=0)
    hessian = jacrev(grad(penalty))(*params)  # double backward: d/da (l1 sign(a) + 2 l2 a) = 2 l2 I
    torch.testing.assert_close(hessian, 0.6 * torch.eye(12, dtype=torch.float64, device=device).reshape(3, 4, 3, 4))


@pytest.mark.parametrize("device", DEVICES)
def test_func_hessian_through_dropout(device):
    # grad of grad: the outer level must see the inner backward (a forward run without grad
    # mode at the inner level once hid it, and the Hessian came out as zeros)
    x = torch.randn(6, dtype=torch.float64, device=device)
    w = torch.randn(6, dtype=torch.float64, device=device)

    def f(t):
        return (F.dropout(t, 0.5, generator=_gen(device)) ** 2 * w).sum()

    scale = F.dropout(torch.ones_like(x), 0.5, generator=_gen(device))
    torch.testing.assert_close(jacrev(grad(f))(x), torch.diag(2 * scale**2 * w))


@pytest.mark.parametrize("device", DEVICES)
def test_func_grad_of_inplace_dropout(device):
    x = torch.randn(6, dtype=torch.float64, device=device)
    w = torch.randn(6, dtype=torch.float64, device=device)
    scale = F.dropout(torch.ones_like(x), 0.5, generator=_gen(device))
    got = grad(lambda t: (F.dropout(t * 1, 0.5, inplace=True, generator=_gen(device)) * w).sum())(x)
    assert torch.equal(got, scale * w)


@pytest.mark.parametrize("device", DEVICES)
def test_func_jvp_propagates_or_refuses_never_drops_tangents(device):
    x = torch.randn(6, dtype=torch.float64, device=device)
    t = torch.randn(6, dtype=torch.float64, device=device)
    scale = F.dropout(torch.ones_like(x), 0.5, generator=_gen(device))
    # in place: a tangent rule on both backends
    _, tangent = torch.func.jvp(lambda v: F.dropout(v * 1, 0.5, inplace=True, generator=_gen(device)), (x,), (t,))
    assert torch.equal(tangent, scale * t)
    out_of_place = lambda v: F.dropout(v, 0.5, generator=_gen(device))  # noqa: E731
    if REFERENCE_BACKEND:  # the reference's Python autograd has no tangent rule: it says so
        with pytest.raises(NotImplementedError, match="forward-mode AD is not supported"):
            torch.func.jvp(out_of_place, (x,), (t,))
    else:
        assert torch.equal(torch.func.jvp(out_of_place, (x,), (t,))[1], scale * t)
    for fn in (
        lambda v: fastreg.weight_penalty([v], l2=1.0),
        lambda v: F.batch_norm(v.view(2, 3), None, None, training=True),
    ):
        with pytest.raises(NotImplementedError, match="forward-mode AD is not supported"):
            torch.func.jvp(fn, (x,), (t,))


# ---- vmap: the randomness option --------------------------------------------------------------


def _per_sample_layouts(device):
    yield "contiguous", torch.randn(4, 6, 7, device=device)
    yield "permuted", torch.randn(4, 7, 6, device=device).transpose(1, 2)  # each sample dense, not contiguous
    yield "batch_dim_inside", torch.randn(6, 4, 7, device=device).transpose(0, 1)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fn", ["dropout", "dropout2d_unbatched_noise"])
def test_vmap_refuses_random_dropout_by_default_like_torch(device, fn):
    x = torch.randn(4, 2, 3, 5, 5, device=device)  # 4 samples of (N, C, H, W)
    f = (lambda t: F.dropout(t, 0.5)) if fn == "dropout" else (lambda t: F.dropout2d(t, 0.5))
    with pytest.raises(RuntimeError, match="randomness error mode"):
        vmap(f)(x)
    with pytest.raises(RuntimeError, match="randomness error mode"):
        vmap(lambda t: torch.nn.functional.dropout(t, 0.5))(x)  # the oracle: torch says the same


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mask_mode", list(F.MASK_MODES))
@pytest.mark.parametrize("layout", ["contiguous", "permuted", "batch_dim_inside"])
def test_vmap_same_randomness_gives_every_sample_one_mask(device, mask_mode, layout):
    x = dict(_per_sample_layouts(device))[layout]
    x = x.abs() + 1  # no zeros: a zero output means dropped
    w = torch.randn(6, 7, device=device)
    out = vmap(lambda t: F.dropout(t, 0.5, mask_mode=mask_mode), randomness="same")(x)
    keep = out != 0
    assert all(torch.equal(keep[0], keep[i]) for i in range(1, x.shape[0]))
    assert 0 < keep[0].sum() < keep[0].numel()
    torch.testing.assert_close(out, x * keep * 2.0, rtol=0, atol=0)
    torch.manual_seed(3)
    fwd = vmap(lambda t: F.dropout(t, 0.5, mask_mode=mask_mode), randomness="same")(x)
    torch.manual_seed(3)
    grads = vmap(grad(lambda t: (F.dropout(t, 0.5, mask_mode=mask_mode) * w).sum()), randomness="same")(x)
    assert torch.equal(grads, (fwd != 0) * 2.0 * w)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mask_mode", list(F.MASK_MODES))
@pytest.mark.parametrize("layout", ["contiguous", "permuted", "batch_dim_inside"])
def test_vmap_different_randomness_draws_per_sample_and_backward_follows(device, mask_mode, layout):
    x = dict(_per_sample_layouts(device))[layout].abs() + 1
    w = torch.randn(6, 7, device=device)
    torch.manual_seed(3)
    fwd = vmap(lambda t: F.dropout(t, 0.5, mask_mode=mask_mode), randomness="different")(x)
    keep = fwd != 0
    assert not all(torch.equal(keep[0], keep[i]) for i in range(1, x.shape[0]))
    torch.testing.assert_close(fwd, x * keep * 2.0, rtol=0, atol=0)
    torch.manual_seed(3)
    # per-sample gradients: a permuted sample layout used to get another mask in backward
    grads = vmap(grad(lambda t: (F.dropout(t, 0.5, mask_mode=mask_mode) * w).sum()), randomness="different")(x)
    assert torch.equal(grads, keep * 2.0 * w)


@pytest.mark.parametrize("device", DEVICES)
def test_vmap_of_dropout_on_an_unbatched_tensor_follows_randomness(device):
    ones = torch.ones(64, device=device)
    x = torch.zeros(5, device=device)
    different = vmap(lambda _: F.dropout(ones, 0.5), randomness="different")(x)
    same = vmap(lambda _: F.dropout(ones, 0.5), randomness="same")(x)
    assert different.shape == same.shape == (5, 64)
    assert not all(torch.equal(different[0], different[i]) for i in range(1, 5))
    assert all(torch.equal(same[0], same[i]) for i in range(1, 5))


@pytest.mark.parametrize("device", DEVICES)
def test_vmap_of_channel_dropout_follows_randomness(device):
    x = torch.rand(6, 2, 8, 3, 3, device=device) + 1  # 6 samples of (N=2, C=8, H, W)
    same = vmap(lambda t: F.dropout2d(t, 0.5), randomness="same")(x)
    different = vmap(lambda t: F.dropout2d(t, 0.5), randomness="different")(x)
    for out in (same, different):
        channel_kept = out[..., 0, 0] != 0
        assert torch.equal(out != 0, channel_kept[..., None, None].expand_as(out))  # whole channels
    assert all(torch.equal(same[0] != 0, same[i] != 0) for i in range(6))
    assert not all(torch.equal(different[0] != 0, different[i] != 0) for i in range(6))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("randomness", ["same", "different"])
def test_vmap_of_inplace_dropout(device, randomness):
    x = torch.rand(4, 32, device=device) + 1
    buffer = x.clone()
    out = vmap(lambda t: F.dropout(t, 0.5, inplace=True), randomness=randomness)(buffer)
    assert torch.equal(out, buffer)  # written in place
    keep = buffer != 0
    torch.testing.assert_close(buffer, x * keep * 2.0, rtol=0, atol=0)
    rows_equal = all(torch.equal(keep[0], keep[i]) for i in range(1, 4))
    assert rows_equal == (randomness == "same")
    with pytest.raises(RuntimeError, match="randomness error mode"):
        vmap(lambda t: F.dropout(t, 0.5, inplace=True))(buffer)


def test_vmap_of_inplace_dropout_on_an_unbatched_tensor_refuses_different():
    shared = torch.ones(8)
    with pytest.raises(RuntimeError, match="different inplace randomness on an unbatched tensor"):
        vmap(lambda _: F.dropout(shared, 0.5, inplace=True), randomness="different")(torch.zeros(3))


# ---- vmap inside vmap: each level's randomness; and a batch of no samples ----------------------

RANDOMNESS_PAIRS = [(inner, outer) for inner in ("same", "different") for outer in ("same", "different")]


def _mask_sharing(out: torch.Tensor) -> tuple[set, set]:
    """Of an (outer, inner, ...) output of nested vmaps: whether each inner sample's mask equals the
    first inner sample's (in every outer sample), and whether each outer sample's masks equal the
    first outer sample's. {True}: shared, {False}: drawn anew (equal by chance: 2^-numel at p=0.5)."""
    keep = out != 0
    inner = {torch.equal(keep[o, 0], keep[o, i]) for o in range(keep.shape[0]) for i in range(1, keep.shape[1])}
    outer = {torch.equal(keep[0], keep[o]) for o in range(1, keep.shape[0])}
    return inner, outer


def _nested(fn, x, inner, outer, batched):
    """fn over x (outer, inner, ...) in vmap(vmap(fn)); batched says which levels batch the input
    (the others see one sample of it, unbatched)."""
    if batched == "both":
        return vmap(vmap(fn, randomness=inner), randomness=outer)(x)
    if batched == "outer_only":
        samples = torch.zeros(x.shape[1], device=x.device)
        return vmap(lambda xo: vmap(lambda _: fn(xo), randomness=inner)(samples), randomness=outer)(x[:, 0])
    samples = torch.zeros(x.shape[0], device=x.device)
    return vmap(lambda _: vmap(fn, randomness=inner)(x[0]), randomness=outer)(samples)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("batched", ["both", "outer_only", "inner_only"])
def test_nested_vmap_of_dropout_follows_each_levels_randomness(device, batched):
    x = torch.rand(3, 4, 200, device=device) + 1  # no zeros: a zero output means dropped
    seen = x if batched == "both" else (x[:, :1] if batched == "outer_only" else x[:1])
    for inner, outer in RANDOMNESS_PAIRS:
        out = _nested(lambda t: F.dropout(t, 0.5), x, inner, outer, batched)
        assert out.shape == x.shape
        torch.testing.assert_close(out, seen * (out != 0) * 2.0, rtol=0, atol=0)
        assert _mask_sharing(out) == ({inner == "same"}, {outer == "same"}), (inner, outer)
        # the oracle: torch's dropout shares masks in the same pattern
        oracle = _nested(lambda t: torch.nn.functional.dropout(t, 0.5), x, inner, outer, batched)
        assert _mask_sharing(oracle) == _mask_sharing(out)
        for randomness in ((inner, "error"), ("error", outer)):  # "error" at either level refuses, as torch's
            with pytest.raises(RuntimeError, match="randomness error mode"):
                _nested(lambda t: F.dropout(t, 0.5), x, *randomness, batched)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mask_mode", list(F.MASK_MODES))
@pytest.mark.parametrize("layout", ["contiguous", "permuted"])
@pytest.mark.parametrize(("inner", "outer"), RANDOMNESS_PAIRS)
def test_per_sample_gradients_through_nested_vmap_follow_the_forward_masks(device, mask_mode, layout, inner, outer):
    if layout == "contiguous":
        x = torch.randn(3, 4, 6, 7, device=device)
    else:  # each sample dense, not contiguous: backward must read the masks in forward's order
        x = torch.randn(3, 4, 7, 6, device=device).transpose(2, 3)
    x = x.abs() + 1
    w = torch.randn(6, 7, device=device)

    def nested(fn):
        return vmap(vmap(fn, randomness=inner), randomness=outer)

    torch.manual_seed(3)
    fwd = nested(lambda t: F.dropout(t, 0.5, mask_mode=mask_mode))(x)
    keep = fwd != 0
    assert _mask_sharing(fwd) == ({inner == "same"}, {outer == "same"})
    torch.testing.assert_close(fwd, x * keep * 2.0, rtol=0, atol=0)
    torch.manual_seed(3)
    grads = nested(grad(lambda t: (F.dropout(t, 0.5, mask_mode=mask_mode) * w).sum()))(x)
    assert torch.equal(grads, keep * 2.0 * w)
    torch.manual_seed(3)  # and with the transform outside the vmaps
    _, pullback = vjp(nested(lambda t: F.dropout(t, 0.5, mask_mode=mask_mode)), x)
    assert torch.equal(pullback(w.expand_as(x))[0], keep * 2.0 * w)


@pytest.mark.parametrize("device", DEVICES)
def test_nested_vmap_of_inplace_dropout(device):
    x = torch.rand(3, 4, 200, device=device) + 1
    w = torch.randn(200, device=device)
    inplace = lambda t: F.dropout(t, 0.5, inplace=True)  # noqa: E731
    for inner, outer in RANDOMNESS_PAIRS:
        nested = lambda fn: vmap(vmap(fn, randomness=inner), randomness=outer)  # noqa: E731
        buffer = x.clone()
        out = nested(inplace)(buffer)
        assert torch.equal(out, buffer)  # written in place
        torch.testing.assert_close(buffer, x * (buffer != 0) * 2.0, rtol=0, atol=0)
        assert _mask_sharing(buffer) == ({inner == "same"}, {outer == "same"}), (inner, outer)
        torch.manual_seed(5)
        keep = nested(lambda t: inplace(t * 1))(x) != 0
        torch.manual_seed(5)
        grads = nested(grad(lambda t: (inplace(t * 1) * w).sum()))(x)
        assert torch.equal(grads, keep * 2.0 * w), (inner, outer)
        # a level that asks for different masks cannot write them into a tensor it does not batch
        for batched, level in (("outer_only", inner), ("inner_only", outer)):
            if level == "different":
                with pytest.raises(RuntimeError, match="different inplace randomness on an unbatched tensor"):
                    _nested(inplace, x.clone(), inner, outer, batched)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("randomness", ["same", "different"])
@pytest.mark.parametrize("mask_mode", list(F.MASK_MODES))
def test_vmap_over_an_empty_batch_gives_empty_outputs_like_torch(device, randomness, mask_mode):
    mode = F.MASK_MODES[mask_mode]
    empty, two = torch.ones(0, 5, 6, device=device), torch.ones(2, 5, 6, device=device)
    rng_state = torch.tensor([7, 0], device=device)
    for op in (
        lambda t: torch.ops.fastreg.dropout(t, 0.5, mode),
        lambda t: torch.ops.fastreg.dropout_(t, 0.5, mode),
        lambda t: torch.ops.fastreg.dropout_seeded(t, 0.5, rng_state, mode),  # the fallback refused 0 samples
    ):
        # the outputs (mask and rng_state among them): each sample's shaped as over a batch of samples
        per_sample = [t.shape[1:] for t in vmap(op, randomness=randomness)(two.clone())]
        assert [t.shape for t in vmap(op, randomness=randomness)(empty.clone())] == [(0, *s) for s in per_sample]
    w = torch.randn(5, 6, device=device)

    def fastreg_dropout(t, p, inplace=False):
        return F.dropout(t, p, inplace=inplace, mask_mode=mask_mode)

    for dropout in (fastreg_dropout, torch.nn.functional.dropout):  # torch's: the oracle
        assert vmap(lambda t: dropout(t, 0.5), randomness=randomness)(empty).shape == empty.shape
        assert vmap(lambda t: dropout(t, 0.5, inplace=True), randomness=randomness)(empty.clone()).shape == empty.shape
        nested = vmap(vmap(lambda t: dropout(t, 0.5), randomness=randomness), randomness=randomness)
        for shape in ((0, 4, 6), (3, 0, 6)):
            assert nested(torch.ones(shape, device=device)).shape == shape
        # backward, per-sample (torch gives empty gradients) and through the vmap
        per_sample_grads = vmap(grad(lambda t: (dropout(t, 0.5) * w).sum()), randomness=randomness)(empty)
        assert per_sample_grads.shape == empty.shape
        _, pullback = vjp(vmap(lambda t: dropout(t, 0.5), randomness=randomness), empty)
        assert pullback(empty)[0].shape == empty.shape


@pytest.mark.parametrize("device", DEVICES)
def test_vmap_of_weight_penalty_is_the_per_sample_penalty(device):
    stacked = [torch.randn(4, 3, 5, device=device), torch.randn(4, 7, device=device)]
    shared = torch.randn(6, device=device)

    def penalty(a, b):
        return fastreg.weight_penalty([a, b, shared], l1=0.1, l2=0.2)

    values = vmap(penalty)(*stacked)
    expected = torch.stack([penalty(stacked[0][i], stacked[1][i]) for i in range(4)])
    assert torch.equal(values, expected)  # the same op per sample: the same bits
    grads = vmap(grad(penalty, argnums=(0, 1)))(*stacked)
    for g, p in zip(grads, stacked):
        torch.testing.assert_close(g, 0.1 * p.sign() + 0.4 * p)


@pytest.mark.parametrize("coefficients", ["floats", "tensors"])
@pytest.mark.parametrize("device", DEVICES)
def test_vmap_of_weight_penalty_over_an_empty_ensemble_gives_empty_outputs(device, coefficients):
    # A loop over no models stacks nothing: values of shape (0,) in the value's dtype (float64
    # when a parameter is), gradients shaped as the parameters.
    stacked = [torch.randn(0, 3, 5, device=device), torch.randn(0, 7, device=device, dtype=torch.float64)]
    shared = torch.randn(6, device=device)
    l1, l2 = (0.1, 0.2) if coefficients == "floats" else (torch.tensor(0.1), torch.tensor(0.2))
    value_op = (
        torch.ops.fastreg.weight_penalty_value
        if coefficients == "floats"
        else torch.ops.fastreg.weight_penalty_value_tensor_coefficients
    )

    def penalty(a, b):
        return value_op([a, b, shared], l1, l2)

    values = vmap(penalty)(*stacked)
    assert values.shape == (0,) and values.dtype == torch.float64 and values.device == stacked[0].device
    grads = vmap(grad(penalty, argnums=(0, 1)))(*stacked)
    assert [(g.shape, g.dtype) for g in grads] == [(p.shape, p.dtype) for p in stacked]


@pytest.mark.parametrize("device", DEVICES)
def test_per_sample_gradients_of_a_model_with_fastreg_layers(device):
    # The torch.func recipe for per-sample gradients (as in DP-SGD), over fastreg's modules.
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(5, 8), fastreg.BatchNorm1d(8), torch.nn.ReLU(), fastreg.Dropout(0.3), torch.nn.Linear(8, 1)
    ).to(device)
    model.eval()  # per-sample batch statistics make no sense; dropout stays random below
    model[3].train()
    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = {k: v.detach() for k, v in model.named_buffers()}
    x, y = torch.randn(6, 5, device=device), torch.randn(6, 1, device=device)

    def loss(p, xi, yi):
        out = functional_call(model, (p, buffers), (xi.unsqueeze(0),))
        return torch.nn.functional.mse_loss(out, yi.unsqueeze(0))

    torch.manual_seed(11)
    per_sample = vmap(grad(loss), in_dims=(None, 0, 0), randomness="different")(params, x, y)
    # The oracle: each sample alone through torch.autograd, with the mask vmap drew for it
    # (the same generator draws, sample by sample, in the same order).
    torch.manual_seed(11)
    for i in range(6):
        model.zero_grad()
        loss({k: v for k, v in model.named_parameters()}, x[i], y[i]).backward()
        for name, p in model.named_parameters():
            torch.testing.assert_close(per_sample[name][i], p.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_vmap_of_training_batch_norm_over_an_ensemble_updates_each_models_stats(device):
    torch.manual_seed(0)
    models = [fastreg.BatchNorm2d(3).to(device) for _ in range(4)]
    for m in models:
        torch.nn.init.normal_(m.weight)
    params, buffers = torch.func.stack_module_state(models)
    template = fastreg.BatchNorm2d(3).to("meta")
    x = torch.randn(4, 2, 3, 5, 5, device=device)
    out = vmap(lambda p, b, xi: functional_call(template, (p, b), (xi,)))(params, buffers, x)
    # the oracle: torch's BatchNorm2d, one model per sample
    oracles = [torch.nn.BatchNorm2d(3).to(device) for _ in range(4)]
    for oracle, m in zip(oracles, models):
        oracle.weight.data.copy_(m.weight.data)
    expected = torch.stack([oracle(x[i]) for i, oracle in enumerate(oracles)])
    torch.testing.assert_close(out, expected)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(buffers[name], torch.stack([getattr(o, name) for o in oracles]))


def test_vmap_of_training_batch_norm_with_shared_running_stats_says_what_to_do():
    bn = fastreg.BatchNorm2d(3)
    x = torch.randn(4, 2, 3, 5, 5)
    with pytest.raises(RuntimeError, match="replace_all_batch_norm_modules_"):
        vmap(bn)(x)
    torch.func.replace_all_batch_norm_modules_(bn)  # the remedy the message names
    expected = torch.stack([torch.nn.functional.batch_norm(x[i], None, None, training=True) for i in range(4)])
    torch.testing.assert_close(vmap(bn)(x), expected)


def _batch_norm_sample_fn(training: bool, device: str):
    generator = torch.Generator().manual_seed(3)
    weight, bias = (torch.rand(4, generator=generator) + 0.5).to(device), torch.randn(4, generator=generator).to(device)
    running_mean = torch.randn(4, generator=generator).to(device)
    running_var = (torch.rand(4, generator=generator) + 0.5).to(device)

    def fn(x, w=weight):
        stats = (None, None) if training else (running_mean, running_var)
        return F.batch_norm(x, *stats, w, bias, training=training)

    return fn, weight


@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("device", DEVICES)
def test_vmap_of_batch_norm_is_one_call_per_sample_bitwise(device, training):
    # Each sample's output and per-sample gradients are those of the op on that sample alone (the
    # module's pytestmark also makes vmap's "no batching rule" warning an error).
    fn, weight = _batch_norm_sample_fn(training, device)
    x = torch.randn(3, 6, 4, 5, device=device) * 2 + 1
    loss = lambda xi, w: (fn(xi, w) * torch.linspace(-1, 1, 5, device=device)).square().sum()  # noqa: E731
    out = vmap(fn)(x)
    grads_x, grads_w = vmap(grad(loss, argnums=(0, 1)), in_dims=(0, None))(x, weight)
    for i in range(3):
        assert torch.equal(out[i], fn(x[i]))
        xi, wi = x[i].clone().requires_grad_(), weight.clone().requires_grad_()
        gx, gw = torch.autograd.grad(loss(xi, wi), (xi, wi))
        assert torch.equal(grads_x[i], gx) and torch.equal(grads_w[i], gw)


@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("device", DEVICES)
def test_vmap_of_batch_norm_over_an_empty_batch_gives_empty_outputs(device, training):
    # torch's own batch norm fails here (with a message about sizes); fastreg's gives what a loop
    # over no samples would stack: nothing, each sample shaped as one call's output.
    fn, weight = _batch_norm_sample_fn(training, device)
    x = torch.randn(0, 6, 4, 5, device=device)
    out = vmap(fn)(x)
    assert out.shape == x.shape and out.dtype == x.dtype and out.device == x.device
    grads_x, grads_w = vmap(grad(lambda xi, w: fn(xi, w).sum(), argnums=(0, 1)), in_dims=(0, None))(x, weight)
    assert grads_x.shape == x.shape and grads_w.shape == (0, *weight.shape)
