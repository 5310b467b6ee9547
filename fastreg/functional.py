"""Functional API, signature-compatible with ``torch.nn.functional`` where it replaces it."""

from __future__ import annotations

import numbers
import sys
import warnings

import torch

from . import _loader
from .ops import dropout as _dropout_ops  # noqa: F401  (defines the dropout ops and their autograd)
from .penalty import weight_penalty  # noqa: F401  (fastreg.functional.weight_penalty)
from .reference import batch_norm as _batch_norm_ref
from .reference.dropout import check_input, check_p

#: mask storage for backward -> the op's mask_mode
MASK_MODES = {"regenerate": 0, "bits": 1, "bool": 2}
DEFAULT_MASK_MODE = "regenerate"

# torch.jit.is_scripting by a global name: TorchScript still reads it as the constant True, and
# an eager call (every dropout call makes one) looks up one name instead of two attributes.
_is_scripting = torch.jit.is_scripting
_tracing_state = torch._C._get_tracing_state  # not None under torch.jit.trace


def _mask_mode(mask_mode: str) -> int:
    # An if-chain, which torch.jit.script compiles (a dict lookup in a try it does not).
    if mask_mode == "regenerate":
        return 0
    if mask_mode == "bits":
        return 1
    if mask_mode == "bool":
        return 2
    if _is_scripting():
        raise ValueError(f"mask_mode must be one of ['bits', 'bool', 'regenerate'], got '{mask_mode}'")
    raise _mask_mode_error(mask_mode)


def _mask_mode_error(mask_mode) -> ValueError:
    return ValueError(f"mask_mode must be one of {sorted(MASK_MODES)}, got {mask_mode!r}")


def _check_p(p: float) -> None:
    """check_p, where torch.jit.script may compile it: p is a float there, only its range is left."""
    if _is_scripting():
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"dropout probability has to be between 0 and 1, but got {p}")
    else:
        check_p(p)


def dropout_with_mask(
    input: torch.Tensor,
    p: float = 0.5,
    training: bool = True,
    generator: torch.Generator | None = None,
    *,
    mask_mode: str = "bool",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dropout that also returns its mask: bool (shaped like the output) or bits (packed, 1 bit per element)."""
    check_p(p)
    mode = _mask_mode(mask_mode)
    if mode == MASK_MODES["regenerate"]:
        raise ValueError("dropout_with_mask needs mask_mode 'bool' or 'bits'")
    _check_training(training, "fastreg.dropout_with_mask")
    check_input(input)
    _loader.load_before_dispatch(input)
    if not training:
        keep = torch.ones_like(input, dtype=torch.bool)
        return input, keep if mode == MASK_MODES["bool"] else _ones_bits(input)
    output, mask, _ = torch.ops.fastreg.dropout(input, p, mode, generator)
    return output, mask


def _ones_bits(input: torch.Tensor) -> torch.Tensor:
    from .reference.dropout import pack_bits

    return pack_bits(torch.ones(input.numel(), dtype=torch.bool, device=input.device))


def dropout(
    input: torch.Tensor,
    p: float = 0.5,
    training: bool = True,
    inplace: bool = False,
    generator: torch.Generator | None = None,
    *,
    mask_mode: str = DEFAULT_MASK_MODE,
) -> torch.Tensor:
    """Drop-in for ``torch.nn.functional.dropout``; masks come from fastreg's Philox stream.

    ``mask_mode`` says what backward gets: ``"regenerate"`` (default: no mask stored, it is
    recomputed from a 16-byte seed), ``"bits"`` (1 bit per element) or ``"bool"`` (1 byte).
    """
    return _dropout(input, p, training, inplace, generator, mask_mode)


def _dropout(
    input: torch.Tensor,
    p: float,
    training: bool,
    inplace: bool,
    generator: torch.Generator | None,
    mask_mode: str,
) -> torch.Tensor:
    """dropout with positional arguments only, which torch.jit.script compiles (it takes no
    keyword-only ones): what fastreg.Dropout calls. What TorchScript cannot compile sits in the
    branch it leaves out, so eager calls pay one test for it."""
    mode = _mask_mode(mask_mode)
    if _is_scripting():
        if not 0.0 <= p <= 1.0:  # p is a float here
            raise ValueError(f"dropout probability has to be between 0 and 1, but got {p}")
        if not training or p == 0 or input.numel() == 0:
            return input
        if p == 1:
            return _zeroed(input, inplace)
        check_input(input)
    else:  # the same steps, and what TorchScript cannot compile
        check_p(p)
        tracing = _tracing_state()
        # _maybe_served_by_torch, inlined: every call comes here
        if (type(input) is not torch.Tensor or tracing is not None) and _served_by_torch(
            input, generator, "fastreg.dropout"
        ):
            return torch.nn.functional.dropout(input, p, training, inplace)
        if training is not True and training is not False:
            _check_training(training, "fastreg.dropout")
        # As torch: the input itself, nothing drawn or checked (_is_empty, inlined).
        if not training or p == 0 or (tracing is None and input.numel() == 0):
            return input
        if p == 1:
            return _zeroed(input, inplace)
        if input.dtype not in _KERNEL_DTYPES or input.layout != torch.strided:  # check_input's test, faster
            check_input(input)
        _loader.load_before_dispatch(input)
    if inplace:
        if torch.compiler.is_compiling():  # functional form; the compiler plans the memory
            return input.copy_(torch.ops.fastreg.dropout(input, p, mode, generator)[0])
        torch.ops.fastreg.dropout_(input, p, mode, generator)
        return input
    return torch.ops.fastreg.dropout(input, p, mode, generator)[0]


def _check_training(training, op: str) -> None:
    """torch's dropout takes only a bool: None or a string would be read as a truth value here."""
    if not isinstance(training, bool):  # numpy's bool_ is no bool: torch refuses it too
        kind = type(training)
        name = kind.__name__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__name__}"
        raise TypeError(f"{op}: argument 'training' must be bool, not {name}")


def _maybe_served_by_torch(input) -> bool:
    """Whether to ask _served_by_torch: for tensors of a subclass (and non-tensors, which it
    refuses), and under torch.jit.trace (the TorchScript ONNX exporter traces plain tensors). An
    eager call with a plain tensor pays two cheap tests."""
    return type(input) is not torch.Tensor or _tracing_state() is not None


def _exporting_to_onnx() -> bool:
    """Under ``torch.onnx.export``, whose translators know torch's ops and not fastreg's: the
    callers hand the call to torch's function, which exports as ONNX's Dropout and
    BatchNormalization. Nobody exports before importing ``torch.onnx`` (torch does not import it)."""
    onnx = sys.modules.get("torch.onnx")
    return onnx is not None and onnx.is_in_onnx_export()


def _served_by_torch(input: torch.Tensor, generator: torch.Generator | None = None, op: str = "") -> bool:
    """Inputs the kernels cannot take, which torch's dropout serves: jagged nested tensors, and
    DTensors (whose masks torch draws through DTensor's RNG tracker, one consistent mask across
    shards); and any input under ONNX export (an ONNX graph has its own random numbers: a
    generator has no meaning there). Asked only when _maybe_served_by_torch says so."""
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"{op}: argument 'input' must be Tensor, not {type(input).__name__}")
    if _exporting_to_onnx():
        return True
    if input.is_nested:
        kind = "nested tensor"
    else:
        dtensor = sys.modules.get("torch.distributed.tensor")  # not imported: there is no DTensor
        if dtensor is None or not isinstance(input, dtensor.DTensor):
            return False
        kind = "DTensor"
    if generator is not None:
        raise RuntimeError(f"{op}: a {kind} input is served by torch's dropout, which takes no generator")
    return True


def _is_empty(input: torch.Tensor) -> bool:
    """numel() == 0, except under torch.jit.trace: numel() is a traced tensor there, which an
    if would convert ("Converting a tensor to a Python boolean", and the example's size baked
    into the graph). torch's traced dropout records the op, whatever the size: so does fastreg's."""
    if _is_scripting():
        return input.numel() == 0
    return _tracing_state() is None and input.numel() == 0


_KERNEL_DTYPES = frozenset((torch.float64, torch.float32, torch.float16, torch.bfloat16))


def _zeroed(input: torch.Tensor, inplace: bool) -> torch.Tensor:
    """torch's dropout with p = 1: the input times a zero of its dtype (in place: the input
    zeroed), in any dtype and layout. Nothing is drawn, so the generator does not move (and
    vmap's randomness="error" lets it pass), and NaN and inf stay NaN, as torch's do."""
    zero = torch.zeros((), dtype=input.dtype, device=input.device)
    return input.mul_(zero) if inplace else input * zero


def _feature_dropout(input: torch.Tensor, p: float, training: bool, inplace: bool, op: str) -> torch.Tensor:
    """Zeroes whole channels: one decision per (N, C), broadcast over the remaining dims."""
    _check_p(p)
    if not _is_scripting():
        if training is not True and training is not False:
            _check_training(training, op)
    if not training or p == 0 or _is_empty(input):
        return input
    if p == 1:
        return _zeroed(input, inplace)
    check_input(input, op)
    if input.dim() < 2 and p < 1:  # torch's message; p = 1 zeroes everything without channels
        raise RuntimeError("Feature dropout requires at least 2 dimensions in the input")
    noise_shape = list(input.shape[:2]) + [1] * (input.dim() - 2)  # a list: TorchScript sizes no tuple built so
    ones = torch.ones(noise_shape, dtype=input.dtype, device=input.device)
    noise = torch.ops.fastreg.dropout(ones, p, 0, None)[0]  # mask_mode "regenerate"
    return input.mul_(noise) if inplace else input * noise


def _unbatched(input: torch.Tensor, batched_dim: int, p: float, training: bool, inplace: bool, op: str) -> torch.Tensor:
    """torch's rule for dropout1d/3d: an input without the batched rank gets a batch dim of 1."""
    if input.dim() == batched_dim:
        return _feature_dropout(input, p, training, inplace, op)
    output = _feature_dropout(input.unsqueeze(0), p, training, inplace, op)
    return input if inplace else output.squeeze(0)  # inplace: the input object, as torch returns


def _warn(message: str) -> None:
    """Warns at the caller of dropout2d/3d. Dynamo cannot trace warnings.warn (an error under
    fullgraph=True), so a call Dynamo compiles warns while it is traced, as torch's dropout2d/3d
    do. Other tracers (non-strict torch.export, make_fx) run the Python code: a plain warning.
    TorchScript compiles warnings.warn, and no import: that branch is left out of its function."""
    if _is_scripting():
        warnings.warn(message, stacklevel=3)
    elif torch.compiler.is_dynamo_compiling():
        _warn_while_compiling(message)
    else:
        warnings.warn(message, stacklevel=3)


def _warn_while_compiling(message: str) -> None:
    from torch._dynamo.comptime import comptime

    comptime(_warn_while_tracing)


def _warn_while_tracing(ctx) -> None:
    # comptime takes no closures: the message is read from the frame that calls it, which
    # Dynamo is tracing.
    warnings.warn(ctx.get_local("message").as_python_constant())


def dropout1d(input: torch.Tensor, p: float = 0.5, training: bool = True, inplace: bool = False) -> torch.Tensor:
    """Drop-in for ``torch.nn.functional.dropout1d``: zeroes whole channels of (N, C, L) or (C, L)."""
    if not _is_scripting():
        if _maybe_served_by_torch(input) and _served_by_torch(input, None, "fastreg.dropout1d"):
            return torch.nn.functional.dropout1d(input, p, training, inplace)
    _check_p(p)
    if input.dim() not in (2, 3):
        raise RuntimeError(
            f"dropout1d: Expected 2D or 3D input, but received a {input.dim()}D input. "
            "Note that dropout1d exists to provide channel-wise dropout on inputs with 1 spatial dimension, "
            "a channel dimension, and an optional batch dimension (i.e. 2D or 3D inputs)."
        )
    return _unbatched(input, 3, p, training, inplace, "fastreg.dropout1d")


def dropout2d(input: torch.Tensor, p: float = 0.5, training: bool = True, inplace: bool = False) -> torch.Tensor:
    """Drop-in for ``torch.nn.functional.dropout2d``, warnings included."""
    if not _is_scripting():
        if _maybe_served_by_torch(input) and _served_by_torch(input, None, "fastreg.dropout2d"):
            return torch.nn.functional.dropout2d(input, p, training, inplace)
    _check_p(p)
    if input.dim() not in (3, 4):
        _warn(
            f"dropout2d: Received a {input.dim()}-D input to dropout2d, which is deprecated and will result in "
            "an error in a future release. To retain the behavior and silence this warning, please use "
            "dropout instead. Note that dropout2d exists to provide channel-wise dropout on inputs with 2 "
            "spatial dimensions, a channel dimension, and an optional batch dimension (i.e. 3D or 4D inputs)."
        )
    if input.dim() == 3:
        _warn(
            "dropout2d: Received a 3D input to dropout2d and assuming that channel-wise 1D dropout behavior "
            "is desired - input is interpreted as shape (N, C, L), where C is the channel dim. This behavior "
            "will change in a future release to interpret the input as one without a batch dimension, i.e. "
            "shape (C, H, W). To maintain the 1D channel-wise dropout behavior, please switch to using "
            "dropout1d instead."
        )
    return _feature_dropout(input, p, training, inplace, "fastreg.dropout2d")


def dropout3d(input: torch.Tensor, p: float = 0.5, training: bool = True, inplace: bool = False) -> torch.Tensor:
    """Drop-in for ``torch.nn.functional.dropout3d``: zeroes whole channels of (N, C, D, H, W) or (C, D, H, W)."""
    if not _is_scripting():
        if _maybe_served_by_torch(input) and _served_by_torch(input, None, "fastreg.dropout3d"):
            return torch.nn.functional.dropout3d(input, p, training, inplace)
    _check_p(p)
    if input.dim() not in (4, 5):
        _warn(
            f"dropout3d: Received a {input.dim()}-D input to dropout3d, which is deprecated and will result "
            "in an error in a future release. To retain the behavior and silence this warning, please use "
            "dropout instead. Note that dropout3d exists to provide channel-wise dropout on inputs with 3 "
            "spatial dimensions, a channel dimension, and an optional batch dimension (i.e. 4D or 5D inputs)."
        )
    return _unbatched(input, 5, p, training, inplace, "fastreg.dropout3d")


def batch_norm(
    input: torch.Tensor,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> torch.Tensor:
    """``torch.nn.functional.batch_norm`` on fastreg's kernels: same arguments and semantics.

    In training mode the batch statistics normalise the input and, when given, the running
    statistics are updated in place: ``running = (1 - momentum) * running + momentum * batch``
    with the unbiased batch variance. Statistics are float32 (float64 for float64 inputs);
    weight, bias and running statistics may be float32 with float16/bfloat16 inputs."""
    if not torch.jit.is_scripting():  # TorchScript checks the annotation itself
        _check_momentum(momentum)
    if training:
        _verify_batch_size(input)
        if eps <= 0.0:
            raise ValueError(f"batch_norm eps must be positive during training, but got {eps}")
    elif eps < 0.0:
        raise ValueError(f"batch_norm eps must be non-negative, but got {eps}")
    if not torch.jit.is_scripting():  # TorchScript compiles this function with the modules
        # _maybe_served_by_torch, inlined: every call comes here
        if (type(input) is not torch.Tensor or _tracing_state() is not None) and _exporting_to_onnx():
            return torch.nn.functional.batch_norm(
                input, running_mean, running_var, weight, bias, training, momentum, eps
            )
        _loader.load_before_dispatch(input)
    if not training:
        if running_mean is None or running_var is None:
            raise RuntimeError("fastreg.batch_norm: running_mean and running_var must be given in evaluation mode")
        return torch.ops.fastreg.batch_norm_eval(input, running_mean, running_var, weight, bias, eps)
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must either both be None or neither be None")
    # Checked before the op, as torch does: the update after it would fail half-way, or take any dtype.
    # First, as the reference's check_input words it (inline: torch.jit.script compiles this
    # function with the modules and cannot compile that one); the channel checks read shape[1].
    if input.dim() < 2:
        raise ValueError(
            "fastreg.batch_norm: expected an input of shape (N, C, ...) with at least 2 dimensions, "
            f"got {input.dim()}-D"
        )
    if not torch.jit.is_scripting():
        if _tracing_state() is not None:  # torch.jit.trace: sizes are traced values
            return _batch_norm_train_traced(input, running_mean, running_var, weight, bias, momentum, eps)
    _batch_norm_ref.check_channel(running_mean, input, "fastreg.batch_norm", "running_mean")
    _batch_norm_ref.check_channel(running_var, input, "fastreg.batch_norm", "running_var")
    _check_no_grad_running_stat(running_mean, "running_mean")
    _check_no_grad_running_stat(running_var, "running_var")
    output, mean, _invstd, var = torch.ops.fastreg.batch_norm_train(input, weight, bias, eps)
    if input.numel() > 0:  # like torch: an empty batch leaves the running statistics alone
        update_running_stats(running_mean, running_var, mean, var, momentum, count=input.numel() // input.shape[1])
    return output


def _batch_norm_train_traced(input, running_mean, running_var, weight, bias, momentum: float, eps: float):
    """Training batch norm under torch.jit.trace, where sizes are traced values: the count of
    values per channel reaches the running statistics' update as one, so the recorded graph
    updates them right for every batch size (and not at all for an empty batch), as torch's
    traced batch norm does. The Python checks that compare sizes would be frozen into the trace,
    with a TracerWarning each, so the ops check those."""
    output, mean, _invstd, var = torch.ops.fastreg.batch_norm_train(input, weight, bias, eps)
    if running_mean is not None and running_var is not None:
        _check_no_grad_running_stat(running_mean, "running_mean")
        _check_no_grad_running_stat(running_var, "running_var")
        count = input.shape[0]
        for size in input.shape[2:]:
            count = count * size
        _batch_norm_ref.batch_norm_update_stats_traced_(running_mean, running_var, mean, var, momentum, count)
    return output


def _check_momentum(momentum) -> None:
    # torch's argument parser refuses anything but a number or a one-element tensor with a
    # TypeError, in either mode; here the op would fail later with a RuntimeError, and never
    # when there are no running statistics to update.
    if type(momentum) is float or isinstance(momentum, (numbers.Real, torch.Tensor)):
        return  # float first: an ABC's isinstance costs about half a microsecond
    if torch.compiler.is_compiling():
        return  # a symbolic float; the op's schema checks the type of what it is given
    raise TypeError(f"fastreg.batch_norm: argument 'momentum' must be float, not {type(momentum).__name__}")


def _check_no_grad_running_stat(running: torch.Tensor | None, name: str) -> None:
    # Updated in place without autograd: a running statistic that requires grad would be changed
    # behind autograd's back (a leaf silently, a non-leaf's graph made stale). torch refuses it too.
    if running is not None and running.requires_grad:
        raise RuntimeError(
            f"fastreg.batch_norm: {name} requires grad, but the running statistics are updated in place "
            "and are not differentiable; pass a tensor that does not require grad (a buffer)"
        )


def _verify_batch_size(input: torch.Tensor) -> None:
    if input.dim() >= 2 and input.numel() == input.shape[1] and input.shape[1] > 0:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {input.size()}")


# Annotated for torch.jit.script (it scripts torch's BatchNorm, so fastreg's must script too): to
# it an unannotated argument is a Tensor, never None.
def update_running_stats(
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    mean: torch.Tensor,
    var: torch.Tensor,
    momentum: float,
    count: int | None = None,
) -> None:
    """``running = (1 - momentum) * running + momentum * batch``, in place, in the statistics'
    precision. With ``count``, ``var`` is the biased variance of ``count`` values per channel,
    made unbiased here (``count / (count - 1)``); without, it is unbiased already."""
    if running_mean is None or running_var is None:
        if running_mean is not None or running_var is not None:
            raise ValueError("running_mean and running_var must either both be None or neither be None")
        return
    # One op (C++ where the kernels are loaded; the formulas are the reference's): four in-place
    # calls from Python cost more host time than torch's whole batch norm on a small layer.
    torch.ops.fastreg.batch_norm_update_stats_(running_mean, running_var, mean, var, momentum, count)
