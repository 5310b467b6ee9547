"""fastreg::weight_penalty_value, fastreg::weight_penalty_backward, fastreg::weight_penalty_grad_.

All three take the parameters of one device (any mix of float64/32/16/bfloat16) and run as
one multi-tensor pass. ``weight_penalty_value`` is differentiable (its backward is
``weight_penalty_backward``); ``weight_penalty_grad_`` is the training-loop form that adds the
penalty's gradient into existing gradients and returns the value, without autograd.

Each has a ``*_tensor_coefficients`` twin that takes ``l1`` and ``l2`` as one-element CPU
tensors: the same kernels, for torch.compile, which makes a new graph for each value of a
custom op's ``float`` argument but takes a tensor as an input (docs/weight_penalty.md).
"""

from __future__ import annotations

import torch

from .._library import LIBRARY, define, register_autograd
from ..memory_format import memory_dense
from ..reference import weight_penalty as ref

define("weight_penalty_value", "(Tensor[] params, float l1, float l2) -> Tensor", ref.weight_penalty_value)
define(
    "weight_penalty_backward",
    "(Tensor grad_output, Tensor[] params, float l1, float l2) -> Tensor[]",
    ref.weight_penalty_backward,
)
define(
    "weight_penalty_grad_",
    "(Tensor(a!)[] grads, Tensor[] params, float l1, float l2) -> Tensor",
    ref.weight_penalty_grad_,
)

# The twins read l1 and l2 on the host when they launch, and a CUDA graph's replay does not
# repeat that: a graph captured with one coefficient would keep it when the schedule moves on.
# The tag has Inductor run them outside its CUDA graphs (mode="reduce-overhead"), each call
# reading the values of the moment; torch without the tag falls back to no CUDA graphs for a graph
# that holds CPU tensors, which is safe too.
HOST_READ_TAGS = (torch.Tag.cudagraph_unsafe,) if hasattr(torch.Tag, "cudagraph_unsafe") else ()

define(
    "weight_penalty_value_tensor_coefficients",
    "(Tensor[] params, Tensor l1, Tensor l2) -> Tensor",
    ref.weight_penalty_value_tensor_coefficients,
    tags=HOST_READ_TAGS,
)
define(
    "weight_penalty_backward_tensor_coefficients",
    "(Tensor grad_output, Tensor[] params, Tensor l1, Tensor l2) -> Tensor[]",
    ref.weight_penalty_backward_tensor_coefficients,
    tags=HOST_READ_TAGS,
)
define(
    "weight_penalty_grad_tensor_coefficients_",
    "(Tensor(a!)[] grads, Tensor[] params, Tensor l1, Tensor l2) -> Tensor",
    ref.weight_penalty_grad_tensor_coefficients_,
    tags=HOST_READ_TAGS,
)

# Sparse tensors dispatch to the sparse keys; the reference's checks there reject them with a
# clear message (the compiled kernels only serve strided CPU/CUDA tensors).
for _name, _reference in (
    ("weight_penalty_value", ref.weight_penalty_value),
    ("weight_penalty_backward", ref.weight_penalty_backward),
    ("weight_penalty_grad_", ref.weight_penalty_grad_),
    ("weight_penalty_value_tensor_coefficients", ref.weight_penalty_value_tensor_coefficients),
    ("weight_penalty_backward_tensor_coefficients", ref.weight_penalty_backward_tensor_coefficients),
    ("weight_penalty_grad_tensor_coefficients_", ref.weight_penalty_grad_tensor_coefficients_),
):
    for _key in ("SparseCPU", "SparseCUDA"):
        LIBRARY.impl(_name, _reference, _key)


def _fake_value(params) -> torch.Tensor:
    device = params[0].device if params else torch.device("cpu")
    return torch.empty((), dtype=ref.value_dtype(params), device=device)


# The fakes run the reference's checks that need no data: they are also the Meta kernels, which
# a call mixing meta and CPU tensors reaches, and must refuse it rather than return empty tensors.
@torch.library.register_fake("fastreg::weight_penalty_value")
def _value_fake(params, l1, l2):
    ref.check_coefficients(l1, l2)
    ref.check_params(params)
    return _fake_value(params)


@torch.library.register_fake("fastreg::weight_penalty_backward")
def _backward_fake(grad_output, params, l1, l2):
    ref.check_coefficients(l1, l2)
    ref.check_params(params)
    ref.check_grad_output(grad_output, params)
    return [torch.empty_like(memory_dense(p)) for p in params]


@torch.library.register_fake("fastreg::weight_penalty_grad_")
def _grad_fake(grads, params, l1, l2):
    ref.check_coefficients(l1, l2)
    ref.check_params(params)
    ref.check_grads(grads, params, memory=False)
    return _fake_value(params)


# The coefficient tensors' values are read by the kernels, so only their metadata is checked here.
@torch.library.register_fake("fastreg::weight_penalty_value_tensor_coefficients")
def _value_tensor_coefficients_fake(params, l1, l2):
    ref.check_coefficient_tensors(l1, l2)
    return _value_fake(params, 0.0, 0.0)


@torch.library.register_fake("fastreg::weight_penalty_backward_tensor_coefficients")
def _backward_tensor_coefficients_fake(grad_output, params, l1, l2):
    ref.check_coefficient_tensors(l1, l2)
    return _backward_fake(grad_output, params, 0.0, 0.0)


@torch.library.register_fake("fastreg::weight_penalty_grad_tensor_coefficients_")
def _grad_tensor_coefficients_fake(grads, params, l1, l2):
    ref.check_coefficient_tensors(l1, l2)
    return _grad_fake(grads, params, 0.0, 0.0)


def _value_setup(ctx, inputs, output):
    params, l1, l2 = inputs
    ctx.save_for_backward(*params)
    ctx.l1, ctx.l2 = l1, l2


def _value_grad(ctx, grad_output):
    params = list(ctx.saved_tensors)
    return torch.ops.fastreg.weight_penalty_backward(grad_output, params, ctx.l1, ctx.l2), None, None


def _backward_setup(ctx, inputs, output):
    grad_output, params, l1, l2 = inputs
    ctx.save_for_backward(grad_output, *params)
    ctx.l1, ctx.l2 = l1, l2


def _backward_grad(ctx, grads_of_outputs):
    # d out_i / d go = l1 * sign(w_i) + 2 * l2 * w_i;  d out_i / d w_i = 2 * l2 * go (sign is flat).
    # Only reached by double backward (e.g. gradient penalties), so plain PyTorch is enough.
    grad_output, *params = ctx.saved_tensors
    go = grad_output.reshape(())
    grad_go = torch.zeros((), dtype=torch.float64, device=grad_output.device)
    grad_params = []
    for gg, w in zip(grads_of_outputs, params):
        if gg is None:
            grad_params.append(None)
            continue
        wc = w.to(ref.compute_dtype(w.dtype))
        # A tensor coefficient in wc's dtype, as a float one is cast (else a 0-dim float64 tensor
        # would promote the 0-dim go to float64)
        l1, l2 = (c.to(wc.dtype) if isinstance(c, torch.Tensor) else c for c in (ctx.l1, ctx.l2))
        grad_go = grad_go + (gg.to(wc.dtype) * (l1 * torch.sign(wc) + 2 * l2 * wc)).sum().to(torch.float64)
        grad_params.append((gg.to(wc.dtype) * (2 * l2 * go.to(wc.dtype))).to(w.dtype))
    return grad_go.to(grad_output.dtype).reshape(grad_output.shape), grad_params, None, None


# The *_tensor_coefficients ops (used under torch.compile) keep their coefficients as tensors
# through autograd too; _backward_grad's formula takes either.


def _value_tensor_coefficients_setup(ctx, inputs, output):
    params, l1, l2 = inputs
    ctx.save_for_backward(l1, l2, *params)


def _value_tensor_coefficients_grad(ctx, grad_output):
    l1, l2, *params = ctx.saved_tensors
    return torch.ops.fastreg.weight_penalty_backward_tensor_coefficients(grad_output, params, l1, l2), None, None


def _backward_tensor_coefficients_setup(ctx, inputs, output):
    grad_output, params, l1, l2 = inputs
    ctx.save_for_backward(grad_output, *params)
    ctx.l1, ctx.l2 = l1.detach(), l2.detach()


register_autograd("weight_penalty_value", _value_grad, setup_context=_value_setup)
register_autograd("weight_penalty_backward", _backward_grad, setup_context=_backward_setup)
register_autograd(
    "weight_penalty_value_tensor_coefficients",
    _value_tensor_coefficients_grad,
    setup_context=_value_tensor_coefficients_setup,
)
register_autograd(
    "weight_penalty_backward_tensor_coefficients",
    _backward_grad,
    setup_context=_backward_tensor_coefficients_setup,
)
