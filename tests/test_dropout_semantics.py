"""fastreg dropout behaves like torch.nn's: arguments, values, layouts, modules, errors."""

import decimal
import fractions
import warnings

import numpy as np
import pytest
import torch

import fastreg
import fastreg.functional as F
from fastreg.reference import dropout as ref

from .helpers import DEVICES, FLOAT_DTYPES


@pytest.mark.parametrize("p", [-0.1, 1.1, float("nan")])
def test_bad_p_raises_value_error_like_torch(p):
    with pytest.raises(ValueError, match="between 0 and 1"):
        F.dropout(torch.ones(3), p)
    if p == p:
        with pytest.raises(ValueError, match="between 0 and 1"):
            torch.nn.functional.dropout(torch.ones(3), p)
    else:  # torch's Python check lets NaN through to its C++ one; ours raises an error of both types
        with pytest.raises(RuntimeError, match="between 0 and 1"):
            torch.nn.functional.dropout(torch.ones(3), p)
        with pytest.raises(RuntimeError, match="between 0 and 1"):
            F.dropout(torch.ones(3), p)
    with pytest.raises(ValueError):
        fastreg.Dropout(p)


#: p values as users pass them; torch's argument parser takes a float, an int or bool, a numpy
#: scalar, or a 0-dim tensor that does not require grad, after its Python range check
P_CASES = {
    "float": lambda: 0.5,
    "int": lambda: 1,
    "bool": lambda: True,
    "numpy float32": lambda: np.float32(0.25),
    "numpy int64": lambda: np.int64(0),
    "numpy bool": lambda: np.bool_(False),
    "0-dim tensor": lambda: torch.tensor(0.5),
    "0-dim int tensor": lambda: torch.tensor(1),
    "0-dim tensor requiring grad": lambda: torch.tensor(0.5, requires_grad=True),
    "1-element 1-D tensor": lambda: torch.tensor([0.5]),
    "2-element tensor": lambda: torch.tensor([0.5, 0.5]),
    "0-dim numpy array": lambda: np.array(0.5),
    "Fraction": lambda: fractions.Fraction(1, 2),
    "Fraction above 1": lambda: fractions.Fraction(3, 2),
    "Decimal": lambda: decimal.Decimal("0.5"),
    "str": lambda: "0.5",
    "None": lambda: None,
    "complex": lambda: 0.5 + 0j,
    "nan": lambda: float("nan"),
    "nan tensor": lambda: torch.tensor(float("nan")),
    "negative tensor": lambda: torch.tensor(-0.5),
    "inf": lambda: float("inf"),
}
FEATURE_SHAPES = {"dropout": (2, 3, 4), "dropout1d": (2, 3, 4), "dropout2d": (2, 3, 4, 4), "dropout3d": (2, 3, 2, 2, 2)}


def _outcome(call):
    """The exception a call raises, or None."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a tensor p that requires grad: torch warns as it converts it
            call()
    except Exception as error:  # noqa: BLE001 - what is raised is what is compared
        return error
    return None


def _assert_same_outcome(ours, theirs, what):
    if theirs is None:
        assert ours is None, f"{what}: torch takes it, fastreg raised {ours!r}"
    else:
        assert isinstance(ours, type(theirs)), f"{what}: torch raised {theirs!r}, fastreg {ours!r}"


@pytest.mark.parametrize("case", list(P_CASES))
@pytest.mark.parametrize("fn", list(FEATURE_SHAPES))
def test_p_is_taken_or_refused_like_torch(fn, case):
    # fastreg took anything that compared with 0 and 1 (a 1-D tensor, a Fraction, a Decimal, a
    # tensor that requires grad); torch refuses them with a TypeError from its argument parser.
    x = torch.rand(FEATURE_SHAPES[fn]) + 1
    for inplace in (False, True):
        theirs = _outcome(lambda: getattr(torch.nn.functional, fn)(x.clone(), P_CASES[case](), inplace=inplace))
        ours = _outcome(lambda: getattr(F, fn)(x.clone(), P_CASES[case](), inplace=inplace))
        _assert_same_outcome(ours, theirs, f"{fn}(p={case}, inplace={inplace})")
        if isinstance(theirs, TypeError) and "must be float" in str(theirs):
            assert "must be float" in str(ours) and type(P_CASES[case]()).__name__ in str(ours)


@pytest.mark.parametrize("case", list(P_CASES))
@pytest.mark.parametrize("name", ["Dropout", "Dropout1d", "Dropout2d", "Dropout3d"])
def test_module_p_is_taken_or_refused_like_torch(name, case):
    # torch.nn's modules check only the range when built; a p they keep fails in forward. fastreg's
    # may refuse it as they are built (fastreg.Dropout checks p there), with the same exception.
    x = torch.rand(FEATURE_SHAPES["dropout" + name[7:].lower()]) + 1
    theirs = _outcome(lambda: getattr(torch.nn, name)(P_CASES[case]())(x))
    ours = _outcome(lambda: getattr(fastreg, name)(P_CASES[case]())(x))
    _assert_same_outcome(ours, theirs, f"{name}(p={case})")


@pytest.mark.parametrize("dtype", [torch.int64, torch.uint8, torch.bool, torch.complex64, torch.float8_e4m3fn])
@pytest.mark.parametrize("fn", list(FEATURE_SHAPES))
def test_dtypes_without_a_kernel_are_zeroed_or_refused_like_torch(fn, dtype):
    # torch zeroes any dtype with p = 1 (input * 0, in place too) and fails to draw noise for
    # the others (RuntimeError for integers and bool, NotImplementedError for complex). fastreg
    # raised a TypeError for both; its error is now also torch's type, and names the function.
    x = torch.ones(FEATURE_SHAPES[fn]).to(dtype)
    ours_f, theirs_f = getattr(F, fn), getattr(torch.nn.functional, fn)
    for p in (1.0, 0.5):
        for inplace in (False, True):
            theirs_in, ours_in = x.clone(), x.clone()
            theirs = _outcome(lambda: theirs_f(theirs_in, p, inplace=inplace))
            ours = _outcome(lambda: ours_f(ours_in, p, inplace=inplace))
            _assert_same_outcome(ours, theirs, f"{fn}({dtype}, p={p}, inplace={inplace})")
            if theirs is None:
                expected = theirs_f(x.clone(), p, inplace=inplace)
                result = ours_f(ours_in, p, inplace=inplace)
                assert result.dtype == dtype and torch.equal(result, expected)
                assert (result is ours_in) == inplace
                if inplace:
                    assert torch.equal(ours_in, theirs_in)
            elif dtype != torch.float8_e4m3fn or p != 1.0:  # p = 1 in float8: torch's own mul refuses it
                assert isinstance(ours, TypeError)  # what fastreg raised before: still caught by TypeError
                assert f"fastreg.{fn}:" in str(ours) and "float64, float32, float16 or bfloat16" in str(ours)


def _rng_states(device):
    states = [torch.random.get_rng_state()]
    if device == "cuda":
        states.append(torch.cuda.get_rng_state())
    return states


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("fn", list(FEATURE_SHAPES))
def test_p_zero_keeps_values_and_p_one_zeroes_like_torch_drawing_nothing(device, dtype, fn):
    """p = 1 is torch's input * 0: zeros for finite values, NaN for NaN and inf, in place too,
    with a zero gradient; nothing is drawn (the generators do not move, and vmap's default
    randomness="error" lets it pass)."""
    ours_f, theirs_f = getattr(F, fn), getattr(torch.nn.functional, fn)
    shape = FEATURE_SHAPES.get(fn, (4, 250))
    x = torch.randn(shape, device=device).to(dtype)
    x.view(-1)[:3] = torch.tensor([float("nan"), float("inf"), -1.0])
    assert ours_f(x, 0.0) is x
    before = _rng_states(device)
    for inplace in (False, True):
        ours_in, theirs_in = x.clone(), x.clone()
        ours, theirs = ours_f(ours_in, 1.0, inplace=inplace), theirs_f(theirs_in, 1.0, inplace=inplace)
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0, equal_nan=True)
        assert (ours is ours_in) == inplace
    assert all(torch.equal(a, b) for a, b in zip(_rng_states(device), before)), "p = 1 drew random numbers"
    leaf = x.clone().requires_grad_()
    (grad,) = torch.autograd.grad(ours_f(leaf, 1.0).sum(), leaf)
    assert torch.equal(grad, torch.zeros_like(x))
    batched = torch.func.vmap(lambda sample: ours_f(sample, 1.0))(x.unsqueeze(1))
    torch.testing.assert_close(batched.squeeze(1), theirs_f(x, 1.0), rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("fn", [*FEATURE_SHAPES, "dropout_with_mask"])
def test_arguments_of_the_wrong_type_are_refused_like_torch(fn):
    # training was read as a truth value: None ran eval mode, "no" dropped
    ours = getattr(F, fn)
    x = torch.ones(FEATURE_SHAPES.get(fn, (2, 3, 4)))
    for training in (None, "no", 1, np.bool_(True)):
        with pytest.raises(TypeError, match=f"fastreg.{fn}: argument 'training' must be bool, not"):
            ours(x, 0.5, training)
    if fn != "dropout_with_mask":
        with pytest.raises(TypeError, match="argument 'input' must be Tensor, not list"):
            ours([1.0, 2.0], 0.5)


def test_eval_mode_returns_the_input_unchanged():
    x = torch.randn(10, 10)
    m = fastreg.Dropout(0.5).eval()
    assert m(x) is x
    assert F.dropout(x, 0.5, training=False) is x


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_kept_values_are_scaled_and_dropped_are_zero(device, dtype):
    x = torch.rand(10000, device=device).to(dtype) + 1
    y = F.dropout(x, 0.25)
    scale = ref.keep_scale(ref.keep_threshold(0.25))
    kept = y != 0
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    assert torch.equal(y[kept], (x[kept].to(compute) * scale).to(dtype))
    assert 0.2 < 1 - kept.float().mean() < 0.3


def layouts(device):
    base = torch.randn(4, 6, 5, 7, device=device)
    return {
        "contiguous": base,
        "channels_last": base.contiguous(memory_format=torch.channels_last),
        "permuted": base.permute(2, 0, 3, 1),
        "transposed": base.transpose(0, 3),
        "sliced": base[:, ::2, 1:],
        "sliced_channels_last": base.contiguous(memory_format=torch.channels_last)[:, :, ::2],
        "sliced_transposed": base.transpose(0, 3)[::2],
        "expanded": torch.randn(1, 6, 1, 7, device=device).expand(4, 6, 5, 7),
        "scalar": torch.tensor(3.0, device=device),
    }


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", list(layouts("cpu")))
def test_outputs_and_grads_keep_memory_format(device, layout):
    x = layouts(device)[layout].clone() if layout == "expanded" else layouts(device)[layout]
    x = x.detach().requires_grad_()
    y = F.dropout(x, 0.5)
    assert y.shape == x.shape
    assert y.stride() == torch.empty_like(x).stride()
    dropped = (y == 0) & (x != 0)
    assert torch.allclose(y[~dropped], x[~dropped] * 2)
    grad = torch.randn_like(y).contiguous()  # a differently laid-out grad must still map to the right mask
    y.backward(grad)
    assert torch.equal(x.grad == 0, dropped | (grad == 0))
    assert torch.allclose(x.grad[~dropped], grad[~dropped] * 2)


@pytest.mark.parametrize("device", DEVICES)
def test_expanded_input_is_materialised_not_aliased(device):
    x = torch.randn(1, 1000, device=device).expand(8, 1000)
    y = F.dropout(x, 0.5)
    assert y.is_contiguous()
    assert not torch.equal((y[0] == 0), (y[1] == 0)), "each of the 8 rows must get its own decisions"


@pytest.mark.parametrize("device", DEVICES)
def test_inplace_modifies_the_input(device):
    x = torch.ones(1000, device=device)
    y = F.dropout(x, 0.5, inplace=True)
    assert y is x
    assert set(x.unique().tolist()) <= {0.0, 2.0}
    m = fastreg.Dropout(0.5, inplace=True)
    z = torch.ones(1000, device=device)
    assert m(z) is z


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "permuted", "sliced", "scalar"])
def test_inplace_gives_the_out_of_place_bits_in_the_input_layout(device, dtype, layout):
    x = layouts(device)[layout].to(dtype)
    target = (
        torch.empty_like(x) if layout != "sliced" else torch.zeros(4, 6, 5, 7, device=device, dtype=dtype)[:, ::2, 1:]
    )
    target.copy_(x)
    strides, storage = target.stride(), target.untyped_storage().data_ptr()
    torch.manual_seed(5)
    expected = F.dropout(x, 0.3)
    torch.manual_seed(5)
    assert F.dropout(target, 0.3, inplace=True) is target
    assert target.stride() == strides and target.untyped_storage().data_ptr() == storage
    assert torch.equal(target, expected)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", list(F.MASK_MODES))
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "sliced"])
def test_inplace_gradients_follow_the_mask(device, mode, layout):
    # A non-leaf, as in a network (dropout(inplace=True) after a layer); "sliced" is a view
    # with gaps of one, which the op fills through a copy.
    if layout == "sliced":
        leaf = torch.randn(4, 12, 6, 7, device=device, requires_grad=True)
        hidden = (leaf * 1.0)[:, ::2, 1:]
    else:
        leaf = layouts(device)[layout].detach().clone().requires_grad_()
        hidden = leaf * 1.0
    out = F.dropout(hidden, 0.4, inplace=True, mask_mode=mode)
    assert out is hidden
    grad = torch.randn_like(out).contiguous()
    out.backward(grad)
    kept = out != 0
    scale = ref.keep_scale(ref.keep_threshold(0.4))
    expected = torch.where(kept, grad * scale, torch.zeros_like(grad))
    if layout == "sliced":
        assert torch.allclose(leaf.grad[:, ::2, 1:], expected)
        leaf.grad[:, ::2, 1:] = 0
        assert not leaf.grad.any(), "elements outside the view get no gradient"
    else:
        assert torch.allclose(leaf.grad, expected)


@pytest.mark.parametrize("device", DEVICES)
def test_inplace_on_overlapping_memory_raises_like_torch(device):
    x = torch.ones(1, 8, device=device).expand(4, 8)
    with pytest.raises(RuntimeError, match="single memory location"):
        x.mul_(2)  # what torch's own in-place ops say
    generator = torch.Generator(device=device).manual_seed(0)
    state = generator.get_state()
    with pytest.raises(RuntimeError, match="single memory location"):
        F.dropout(x, 0.5, inplace=True, generator=generator)
    assert torch.equal(generator.get_state(), state), "a refused call draws no random numbers"


def test_inplace_on_leaf_requiring_grad_raises_like_torch():
    x = torch.ones(10, requires_grad=True)
    with pytest.raises(RuntimeError):
        torch.nn.functional.dropout(x, 0.5, inplace=True)
    with pytest.raises(RuntimeError):
        F.dropout(x, 0.5, inplace=True)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", list(F.MASK_MODES))
def test_empty_tensors(device, mode):
    x = torch.empty(0, 3, device=device, requires_grad=True)
    y = F.dropout(x, 0.5, mask_mode=mode)
    assert y.shape == (0, 3)
    y.sum().backward()
    assert x.grad.shape == (0, 3)


@pytest.mark.parametrize("device", DEVICES)
def test_autocast_keeps_dtype_like_torch(device):
    x = torch.randn(64, 64, device=device)
    low = torch.bfloat16 if device == "cpu" else torch.float16
    with torch.autocast(device, dtype=low):
        assert F.dropout(x, 0.5).dtype == torch.nn.functional.dropout(x, 0.5).dtype
        h = torch.nn.functional.linear(x, torch.randn(64, 64, device=device))
        assert F.dropout(h, 0.5).dtype == torch.nn.functional.dropout(h, 0.5).dtype == low


def test_errors_name_the_problem():
    with pytest.raises(TypeError, match="floating-point"):
        F.dropout(torch.ones(3, dtype=torch.int64), 0.5)
    with pytest.raises(RuntimeError, match="strided"):
        F.dropout(torch.eye(3).to_sparse(), 0.5)
    with pytest.raises(ValueError, match="mask_mode"):
        F.dropout(torch.ones(3), 0.5, mask_mode="bytes")
    with pytest.raises(ValueError, match="mask_mode"):
        torch.ops.fastreg.dropout(torch.ones(3), 0.5, 7)
    with pytest.raises(RuntimeError, match="mask"):
        torch.ops.fastreg.dropout_backward(
            torch.ones(16), torch.ones(1, dtype=torch.uint8), torch.zeros(2, dtype=torch.int64), 0.5, 1
        )
    gappy_mask = torch.ones(10, 20, dtype=torch.bool)[:, ::2]  # the right count, not dense
    with pytest.raises(RuntimeError, match=r"mask \(sizes \[10, 10\], strides \[20, 2\]\) is not dense"):
        torch.ops.fastreg.dropout_backward(torch.ones(10, 10), gappy_mask, torch.zeros(2, dtype=torch.int64), 0.5, 2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_mismatched_devices_are_named():
    grad = torch.ones(16, device="cuda")
    state = torch.zeros(2, dtype=torch.int64)
    with pytest.raises(RuntimeError, match="mask.*on cpu"):
        torch.ops.fastreg.dropout_backward(grad, torch.ones(2, dtype=torch.uint8), state, 0.5, 1)
    # even the unused placeholder of the regenerating mode must be on grad's device
    with pytest.raises(RuntimeError, match="mask is on cpu"):
        torch.ops.fastreg.dropout_backward(grad, torch.empty(0, dtype=torch.uint8), state, 0.5, 0)
    # a CPU rng_state is read on the host: allowed, and gives the same mask as on the GPU
    placeholder = torch.empty(0, dtype=torch.uint8, device="cuda")
    on_host = torch.ops.fastreg.dropout_backward(grad, placeholder, state, 0.5, 0)
    on_device = torch.ops.fastreg.dropout_backward(grad, placeholder, state.cuda(), 0.5, 0)
    assert torch.equal(on_host, on_device)


def test_module_is_a_drop_in_for_torch_nn_dropout():
    m = fastreg.Dropout(0.3, inplace=False)
    t = torch.nn.Dropout(0.3)
    assert isinstance(m, torch.nn.Dropout)
    assert m.state_dict().keys() == t.state_dict().keys()
    assert "p=0.3" in repr(m) and "mask_mode='regenerate'" in repr(m)
    with pytest.raises(ValueError):
        fastreg.Dropout(0.3, mask_mode="nope")


@pytest.mark.parametrize(
    "module,shape,channel_dims",
    [
        (fastreg.Dropout1d, (4, 8, 100), 2),
        (fastreg.Dropout1d, (8, 100), 1),
        (fastreg.Dropout2d, (4, 8, 10, 10), 2),
        (fastreg.Dropout3d, (4, 8, 3, 5, 5), 2),
        (fastreg.Dropout3d, (8, 3, 5, 5), 1),
    ],
)
@pytest.mark.parametrize("device", DEVICES)
def test_feature_dropout_zeroes_whole_channels(device, module, shape, channel_dims):
    torch.manual_seed(0)
    x = torch.rand(shape, device=device) + 1
    y = module(0.5)(x)
    per_channel = y.reshape(*shape[:channel_dims], -1)
    zero = (per_channel == 0).all(-1)
    kept = (per_channel != 0).all(-1)
    assert bool((zero | kept).all()), "a channel is either all dropped or all kept"
    assert zero.any() and kept.any()
    assert torch.allclose(per_channel[kept], x.reshape(*shape[:channel_dims], -1)[kept] * 2)


def test_feature_dropout_errors_and_warnings_match_torch():
    with pytest.raises(RuntimeError, match="dropout1d"):
        fastreg.Dropout1d()(torch.ones(2, 3, 4, 5))
    with warnings.catch_warnings(record=True) as ours:
        warnings.simplefilter("always")
        fastreg.Dropout2d()(torch.ones(2, 3, 4))
    with warnings.catch_warnings(record=True) as theirs:
        warnings.simplefilter("always")
        torch.nn.Dropout2d()(torch.ones(2, 3, 4))
    assert [str(w.message) for w in ours] == [str(w.message) for w in theirs]


@pytest.mark.parametrize("device", DEVICES)
def test_dropout_with_mask_returns_the_mask_it_applied(device):
    x = torch.rand(1003, device=device) + 1
    out, keep = F.dropout_with_mask(x, 0.3)
    assert keep.dtype == torch.bool and torch.equal(keep, out != 0)
    out_bits, bits = F.dropout_with_mask(x, 0.3, mask_mode="bits")
    assert bits.dtype == torch.uint8 and bits.numel() == (1003 + 7) // 8
    assert torch.equal(ref.unpack_bits(bits, 1003), out_bits != 0)
    same, all_kept = F.dropout_with_mask(x, 0.3, training=False)
    assert same is x and bool(all_kept.all())
    with pytest.raises(ValueError, match="bool' or 'bits"):
        F.dropout_with_mask(x, 0.3, mask_mode="regenerate")


def rng_states(device):
    return torch.get_rng_state(), torch.cuda.get_rng_state() if device == "cuda" else None


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fn", ["dropout", "dropout2d"])
def test_p_zero_and_empty_inputs_return_the_input_like_torch(device, fn):
    # torch returns the input itself, draws nothing and checks nothing more: p = 0 layers
    # (inplace too, on a leaf) and integer tensors pass through untouched.
    ours, theirs = getattr(F, fn), getattr(torch.nn.functional, fn)
    cases = [
        (torch.randn(2, 3, 4, 5, device=device)[:, :, ::2], 0.0),
        (torch.arange(24, device=device).reshape(2, 3, 2, 2), 0.0),
        (torch.empty(0, 3, 4, 5, device=device), 0.5),
    ]
    for x, p in cases:
        assert theirs(x, p) is x
        before = rng_states(device)
        assert ours(x, p) is x
        assert all(a is b or torch.equal(a, b) for a, b in zip(before, rng_states(device))), "nothing drawn"
    leaf = torch.ones(2, 3, 4, 5, device=device, requires_grad=True)
    assert theirs(leaf, 0.0, inplace=True) is leaf
    assert ours(leaf, 0.0, inplace=True) is leaf


@pytest.mark.parametrize("shape", [(6, 8), (64, 8, 3), (64, 2, 3, 2, 2, 2)])
def test_dropout3d_treats_other_ranks_as_unbatched_like_torch(shape):
    # torch adds a batch dim to anything not 5-D: one decision per index of dim 0.
    x = torch.rand(shape) + 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for fn in (torch.nn.functional.dropout3d, F.dropout3d):
            y = fn(x, 0.5).reshape(shape[0], -1)
            assert bool(((y == 0).all(1) | (y != 0).all(1)).all()), fn


@pytest.mark.parametrize("fn,dim", [("dropout2d", 0), ("dropout2d", 1), ("dropout3d", 0)])
def test_feature_dropout_of_fewer_than_two_dims_raises_like_torch(fn, dim):
    x = torch.ones((5,) * dim)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for f in (getattr(torch.nn.functional, fn), getattr(F, fn)):
            with pytest.raises(RuntimeError, match="at least 2 dimensions"):
                f(x, 0.5)
            assert torch.equal(f(x, 1.0), torch.zeros_like(x)), "p = 1 needs no channels"
            assert f(x, 0.5, training=False).shape == x.shape


def test_feature_dropout_rejects_sparse_input_like_torch():
    x = torch.ones(2, 3, 4, 4).to_sparse()
    with pytest.raises(RuntimeError):
        torch.nn.functional.dropout2d(x, 0.5)
    with pytest.raises(RuntimeError, match="strided"):
        F.dropout2d(x, 0.5)


@pytest.mark.parametrize("fn,shape", [("dropout1d", (8, 10)), ("dropout3d", (8, 2, 3, 3))])
@pytest.mark.parametrize("training", [True, False])
def test_unbatched_inplace_feature_dropout_returns_the_input(fn, shape, training):
    for f in (getattr(torch.nn.functional, fn), getattr(F, fn)):
        x = torch.rand(shape) + 1
        assert f(x, 0.5, training, inplace=True) is x
        assert x.shape == shape
        if training:
            per_channel = x.reshape(shape[0], -1)
            assert bool(((per_channel == 0).all(1) | (per_channel != 0).all(1)).all())
            assert (per_channel == 0).any(), "dropped in place"


def test_feature_dropout_warnings_name_the_callers_line():
    # as recent torch does (torch 2.4 still named its own functional.py)
    for fn, shape in [("dropout2d", (2, 3, 4)), ("dropout2d", (2, 3)), ("dropout3d", (2, 3, 4))]:
        f = getattr(F, fn)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            f(torch.ones(shape), 0.5)
        assert caught and all(w.filename == __file__ for w in caught), (f, [w.filename for w in caught])


@pytest.mark.parametrize("module,shape", [(fastreg.Dropout2d, (4, 8, 8)), (fastreg.Dropout3d, (4, 8, 8))])
@pytest.mark.parametrize("training", [True, False])
def test_feature_dropout_compiles_fullgraph_on_inputs_it_warns_about(module, shape, training):
    # torch's Dropout2d/3d compile with fullgraph=True here and warn while tracing.
    torch._dynamo.reset()
    m = module(0.5).train(training)
    x = torch.rand(shape) + 1
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        y = torch.compile(m, fullgraph=True, backend="aot_eager")(x)
    assert any("deprecated" in str(w.message) or "assuming" in str(w.message) for w in caught)
    assert y.shape == x.shape
    if training:
        assert set(y.unique().tolist()) <= {0.0} | set((x * 2).unique().tolist())
    else:
        assert torch.equal(y, x)
