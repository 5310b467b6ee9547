"""L1/L2 weight penalties over many parameters in one multi-tensor pass.

Two forms of the penalty users write as
``l1 * sum(p.abs().sum() for p in params) + l2 * sum((p ** 2).sum() for p in params)``:

* :func:`weight_penalty` returns it as a differentiable scalar (same value and gradient as the
  formula, with ``sign(0) = 0`` as in PyTorch): ``loss = loss + weight_penalty(params, l2=1e-4)``.
* :class:`WeightPenalty` is the training-loop form. After ``loss.backward()``, its
  :meth:`~WeightPenalty.add_grad_` adds the penalty's gradient into every ``.grad`` and returns
  the penalty value, reading each weight and gradient once::

      penalty = fastreg.WeightPenalty(fastreg.select_decay_parameters(model), l1=1e-5, l2=1e-4)
      for batch in data:
          optimizer.zero_grad()
          loss = criterion(model(batch.x), batch.y)
          loss.backward()
          penalty_value = penalty.add_grad_()   # .grad += l1 * sign(w) + 2 * l2 * w
          optimizer.step()

  Per-group coefficients work like optimizer parameter groups:
  ``WeightPenalty([{"params": convs, "l2": 1e-4}, {"params": heads, "l1": 1e-5}])``.

Values are float32 (float64 when a parameter is float64), accumulated in a fixed order: the
same inputs give the same bits, run after run. The benchmark's baselines and model-shaped
parameter lists are in ``fastreg.bench.penalty_baselines`` and ``fastreg.bench.penalty_inputs``.
"""

from __future__ import annotations

import numbers
from collections.abc import Iterable

import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.spectral_norm import SpectralNorm
from torch.nn.utils.weight_norm import WeightNorm

from . import _loader
from .ops import weight_penalty as _ops  # noqa: F401  (defines the ops)
from .reference.weight_penalty import SUPPORTED_DTYPES, check_coefficients

__all__ = [
    "DECAY_TYPES",
    "WeightPenalty",
    "select_decay_parameters",
    "weight_penalty",
]


_PLAIN_TENSOR_TYPES = frozenset((torch.Tensor, nn.Parameter))
_NATIVE_LOOP = None  # torch.classes.fastreg.WeightPenaltyGroup, made at the first WeightPenalty.add_grad_


def _check_ordered(params, where: str) -> None:
    # The order of the tensors is the order of the sums: a set's changes from run to run.
    if isinstance(params, (set, frozenset)):
        raise TypeError(
            f"{where}: params is a set, whose order (and so the value's last bits) changes from run to run; pass a list"
        )


def _coefficients(l1, l2) -> tuple[float, float]:
    """The coefficients as checked floats; one-element tensors are taken by value (not under torch.compile)."""
    out = []
    for name, c in (("l1", l1), ("l2", l2)):
        if isinstance(c, torch.Tensor):
            # The ops take numbers: the penalty has no gradient for its coefficients.
            if c.requires_grad:
                raise TypeError(
                    f"fastreg.weight_penalty: {name} is a tensor that requires grad; the penalty is not "
                    "differentiable with respect to its coefficients, pass a number"
                )
            if c.numel() != 1:
                raise ValueError(
                    f"fastreg.weight_penalty: {name} must be one number, got a tensor of shape {list(c.shape)}"
                )
            if torch.compiler.is_compiling():
                # Its value would be read on the host inside the graph (a data-dependent float), and
                # could not be checked there.
                raise TypeError(
                    "fastreg.weight_penalty: under torch.compile pass l1 and l2 as Python floats, not tensors"
                )
        elif not isinstance(c, numbers.Real):
            raise TypeError(f"fastreg.weight_penalty: {name} must be a number, got {type(c).__name__}")
        out.append(float(c))
    check_coefficients(*out)
    return out[0], out[1]


def _by_device(params: Iterable[torch.Tensor]) -> list[list[torch.Tensor]]:
    """The tensors grouped by device, in order of first appearance (one op call per device)."""
    groups: dict[torch.device, list[torch.Tensor]] = {}
    for i, p in enumerate(params):
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"fastreg.weight_penalty: params[{i}] is a {type(p).__name__}, not a tensor")
        if p.device not in groups:  # not setdefault: Dynamo before torch 2.5 cannot trace it
            groups[p.device] = []
        groups[p.device].append(p)
    return list(groups.values())


def _sum_values(values: list[torch.Tensor]) -> torch.Tensor:
    total = values[0]
    for v in values[1:]:
        total = total + v.to(total.device)
    return total


def weight_penalty(params: Iterable[torch.Tensor], l1: float = 0.0, l2: float = 0.0) -> torch.Tensor:
    """``l1 * sum(|p|) + l2 * sum(p ** 2)`` over all ``params``, differentiable.

    ``params`` is an iterable of tensors (a list, ``model.parameters()``) or one tensor.
    ``l1`` and ``l2`` are numbers; a one-element tensor is taken by value, but not one that
    requires grad (the penalty has no gradient for its coefficients).

    Parameters may mix dtypes (float64/32/16, bfloat16) and devices; each device's tensors
    take one multi-tensor pass. Returns a 0-dim float32 tensor (float64 when a parameter is
    float64) on the first parameter's device; its gradient with respect to each ``p`` is
    ``l1 * sign(p) + 2 * l2 * p``.
    """
    l1, l2 = _coefficients(l1, l2)
    if isinstance(params, torch.Tensor):
        params = [params]  # not its rows
    _check_ordered(params, "fastreg.weight_penalty")
    groups = _by_device(params)
    if not groups:
        return torch.zeros((), dtype=torch.float32)
    _loader.load_before_dispatch(groups[0][0])
    if torch.compiler.is_compiling():
        return _sum_values([_traced_value(group, l1, l2) for group in groups])
    return _sum_values([torch.ops.fastreg.weight_penalty_value(group, l1, l2) for group in groups])


# Under torch.compile a custom op's float argument is specialised: every new value of a
# coefficient (a schedule) would be a new graph, until Dynamo's recompile limit. So there the
# ops' *_tensor_coefficients twins take each coefficient as a 0-dim CPU tensor, made from it by
# a tensor operation: Dynamo makes a coefficient that changes into a symbolic input of one graph,
# as it does for the naive formula, and the kernels are the eager ones.


def _coefficient_tensor(c: float) -> torch.Tensor:
    # ones * c, not torch.tensor(c): Dynamo turns a symbolic float in a multiplication into a
    # tensor operation (it would specialise it elsewhere). On the CPU: the kernels read it on the host.
    return torch.ones((), dtype=torch.float64) * c


def _traced_value(params: list[torch.Tensor], l1: float, l2: float) -> torch.Tensor:
    """weight_penalty_value(params, l1, l2) under torch.compile."""
    return torch.ops.fastreg.weight_penalty_value_tensor_coefficients(
        params, _coefficient_tensor(l1), _coefficient_tensor(l2)
    )


def _traced_grad_(grads: list[torch.Tensor], params: list[torch.Tensor], l1: float, l2: float) -> torch.Tensor:
    """weight_penalty_grad_(grads, params, l1, l2) under torch.compile."""
    return torch.ops.fastreg.weight_penalty_grad_tensor_coefficients_(
        grads, params, _coefficient_tensor(l1), _coefficient_tensor(l2)
    )


#: The layers whose weights :func:`select_decay_parameters` takes by default: those whose weights
#: are the matrices of linear maps.
DECAY_TYPES: tuple[type[nn.Module], ...] = (
    nn.Linear,
    nn.Bilinear,
    nn.modules.conv._ConvNd,
    nn.MultiheadAttention,
    nn.RNNBase,
    nn.RNNCellBase,
)


def _weight_names(module: nn.Module) -> list[str]:
    """The names of a layer's linear-map weights (whether or not they are Parameters now)."""
    if isinstance(module, nn.MultiheadAttention):
        # one packed q/k/v matrix, or three when kdim or vdim differ from embed_dim (the others
        # are None); out_proj is a Linear of its own
        return ["in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight"]
    if isinstance(module, nn.RNNBase):
        directions = ["", "_reverse"] if module.bidirectional else [""]
        kinds = ["ih", "hh", "hr"] if getattr(module, "proj_size", 0) > 0 else ["ih", "hh"]
        return [f"weight_{k}_l{layer}{d}" for layer in range(module.num_layers) for d in directions for k in kinds]
    if isinstance(module, nn.RNNCellBase):
        return ["weight_ih", "weight_hh"]
    return ["weight"]


def _trained_tensors(module: nn.Module, name: str) -> list[torch.Tensor]:
    """The parameters the optimizer updates for the weight ``module.<name>``: the weight itself,
    or, where it is computed from others, those. New-style parametrizations
    (``torch.nn.utils.parametrizations.weight_norm``, ``spectral_norm``, ...) keep them in
    ``module.parametrizations.<name>``; the old hooks ``torch.nn.utils.weight_norm`` and
    ``torch.nn.utils.spectral_norm`` make ``<name>`` a plain tensor computed from the parameters
    ``<name>_g`` and ``<name>_v``, or ``<name>_orig``."""
    if parametrize.is_parametrized(module, name):
        return list(module.parametrizations[name].parameters(recurse=False))
    weight = module._parameters.get(name)
    if weight is not None:
        return [weight]
    for hook in module._forward_pre_hooks.values():
        if isinstance(hook, WeightNorm) and hook.name == name:
            return [module._parameters[name + "_g"], module._parameters[name + "_v"]]
        if isinstance(hook, SpectralNorm) and hook.name == name:
            return [module._parameters[name + "_orig"]]
    return []


def select_decay_parameters(
    module: nn.Module, decay_types: tuple[type[nn.Module], ...] = DECAY_TYPES
) -> list[nn.Parameter]:
    """The parameters usually penalised: the matrices of linear maps, not biases, the scales
    and shifts of norm layers, or embeddings.

    By default (``DECAY_TYPES``) that is, for each layer of these types:

    * ``nn.Linear`` (also ``LazyLinear`` and the ``out_proj`` of attention), ``nn.Bilinear`` and
      every convolution (``Conv1d/2d/3d``, transposed, lazy): ``weight``;
    * ``nn.MultiheadAttention`` (so also the attention of ``TransformerEncoderLayer`` and
      ``TransformerDecoderLayer``): ``in_proj_weight``, or ``q_proj_weight``,
      ``k_proj_weight`` and ``v_proj_weight`` when ``kdim`` or ``vdim`` differ from
      ``embed_dim``; its ``out_proj`` is a Linear. Not ``in_proj_bias``, ``bias_k``, ``bias_v``;
    * ``nn.RNN``, ``nn.LSTM``, ``nn.GRU``: ``weight_ih_l<k>`` and ``weight_hh_l<k>`` of every
      layer, the ``_reverse`` ones of a bidirectional module, and an LSTM's projections
      ``weight_hr_l<k>``; ``nn.RNNCell``, ``nn.LSTMCell``, ``nn.GRUCell``: ``weight_ih``, ``weight_hh``.

    Never taken by default: ``bias`` and ``bias_*`` tensors, ``nn.Embedding``, norm layers
    (``BatchNorm``, ``LayerNorm``, ``GroupNorm``, ...), ``nn.PReLU``. Pass other
    ``decay_types`` to widen or narrow the choice: a layer of a type in it contributes the
    tensors above, or its ``weight`` for other types (``decay_types=(*fastreg.penalty.DECAY_TYPES,
    nn.Embedding)`` adds embeddings).

    Shared weights appear once; frozen ones (``requires_grad=False``) are left out. A weight
    computed from other tensors contributes those, which are what the optimizer updates:
    ``original`` (``original0`` and ``original1`` for weight norm) of a parametrized weight
    (``torch.nn.utils.parametrizations``), ``weight_g`` and ``weight_v`` of the old
    ``torch.nn.utils.weight_norm``, ``weight_orig`` of the old ``torch.nn.utils.spectral_norm``.
    Typical use::

        decay = fastreg.select_decay_parameters(model)
        penalty = fastreg.WeightPenalty(decay, l2=1e-4)
    """
    selected: list[nn.Parameter] = []
    seen: set[int] = set()
    for child in module.modules():
        if not isinstance(child, decay_types):
            continue
        for name in _weight_names(child):
            for weight in _trained_tensors(child, name):
                if isinstance(weight, nn.Parameter) and weight.requires_grad and id(weight) not in seen:
                    seen.add(id(weight))
                    selected.append(weight)
    return selected


class WeightPenalty:
    """An L1/L2 penalty on fixed parameters, applied to their gradients in place.

    ``params`` is a module (its parameters that require grad), an iterable of tensors, or a
    list of dicts like optimizer parameter groups: ``{"params": [...], "l1": ..., "l2": ...}``
    where a missing coefficient takes the constructor's. A parameter may appear only once, and
    must be a leaf tensor (a view of a parameter or a product of one has no ``.grad`` of its own
    that an optimizer reads).

    * :meth:`add_grad_` (after ``loss.backward()``): ``p.grad += l1 * sign(p) + 2 * l2 * p``
      for every parameter that requires grad, allocating a zero ``.grad`` where it is None, and
      returns the penalty value; one pass per group and device. As in the formula, a parameter
      that does not require grad (frozen, also after the penalty was built) counts in the value
      but gets no gradient: its ``.grad`` is left as it is. Groups whose coefficients are both 0
      are skipped (their gradient is 0), so their ``.grad`` stays as it is, None included.
    * calling the object returns the penalty as a differentiable scalar (to add to the loss).
    * :meth:`value` returns it without building a graph.

    Where :meth:`add_grad_` goes in a training step:

    * with ``torch.amp.GradScaler``, after ``scaler.unscale_(optimizer)`` and before
      ``scaler.step(optimizer)``: the gradients are then unscaled, as the penalty's gradient is.
      Before ``unscale_`` it would be added, unscaled, to scaled gradients, and then divided by
      the scale (65536 at first): a penalty that many times too weak;
    * with gradient accumulation, once per optimizer step, after the last micro-batch's
      backward: once per micro-batch would add the penalty's gradient that many times.

    Coefficients are read from ``param_groups`` at each call, as optimizers read ``lr``: a
    scheduler may change them. Under ``torch.compile`` a coefficient that changes from call to
    call becomes a symbolic input of one graph (docs/weight_penalty.md, "torch.compile").
    """

    def __init__(self, params, l1: float = 0.0, l2: float = 0.0) -> None:
        l1, l2 = _coefficients(l1, l2)
        if isinstance(params, nn.Module):
            params = [p for p in params.parameters() if p.requires_grad]
        elif isinstance(params, torch.Tensor):
            raise TypeError(
                "WeightPenalty: params must be an iterable of tensors, a module or a list of groups, got a tensor"
            )
        _check_ordered(params, "WeightPenalty")
        raw_groups = list(params)
        if not raw_groups or not all(isinstance(g, dict) for g in raw_groups):
            raw_groups = [{"params": raw_groups}]
        self.param_groups: list[dict] = []
        seen: dict[int, int] = {}
        for index, raw in enumerate(raw_groups):
            group = dict(raw)
            tensors = group.get("params")
            if tensors is None:
                raise ValueError(f"WeightPenalty: parameter group {index} has no 'params'")
            _check_ordered(tensors, f"WeightPenalty: parameter group {index}")
            tensors = [tensors] if isinstance(tensors, torch.Tensor) else list(tensors)
            group["params"] = tensors
            group["l1"], group["l2"] = _coefficients(group.get("l1", l1), group.get("l2", l2))
            for i, p in enumerate(tensors):
                self._check_param(p, index, i)
                if id(p) in seen:
                    raise ValueError(
                        f"WeightPenalty: a parameter appears more than once (group {seen[id(p)]} and group {index}); "
                        "list each parameter once"
                    )
                seen[id(p)] = index
            self.param_groups.append(group)

    @staticmethod
    def _check_param(p, group: int, i: int) -> None:
        where = f"WeightPenalty: group {group}, params[{i}]"
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"{where} is a {type(p).__name__}, not a tensor")
        if p.layout != torch.strided:
            raise RuntimeError(f"{where} has layout {p.layout}; only strided (dense) parameters are supported")
        if p.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{where} has dtype {p.dtype}; expected float64, float32, float16 or bfloat16")
        if not p.is_leaf:
            raise ValueError(
                f"{where} is not a leaf tensor (a view of a parameter or the result of an operation): "
                "its .grad is not the gradient an optimizer reads; pass the parameter itself"
            )

    def __call__(self) -> torch.Tensor:
        values = [weight_penalty(g["params"], g["l1"], g["l2"]) for g in self.param_groups if g["params"]]
        return _sum_values(values) if values else torch.zeros((), dtype=torch.float32)

    @torch.no_grad()
    def value(self) -> torch.Tensor:
        return self()

    @torch.no_grad()
    def add_grad_(self) -> torch.Tensor:
        """Adds the penalty's gradient into every ``.grad`` in place and returns the penalty value."""
        values = []
        compiling = torch.compiler.is_compiling()
        for group in self.param_groups:
            l1, l2 = group["l1"], group["l2"]
            if compiling:
                # Checked as the graph's guards and asserts (reference.check_coefficients)
                l1, l2 = _coefficients(l1, l2)
            if l1 == 0.0 and l2 == 0.0:
                continue
            native = None if compiling else self._native_loop(group["params"])
            if native is not None:
                values.extend(native.add_grad_(group["params"], l1, l2))
                continue
            # The same loop as WeightPenaltyGroup.add_grad_ (csrc/weight_penalty/weight_penalty_group.cpp),
            # for the reference backend and for torch.compile. One pass, each attribute read once
            # (the __init__ checks hold: the parameter objects are fixed; their device,
            # requires_grad and .grad are not).
            by_device: dict[torch.device, tuple[list, list, list]] = {}
            for p in group["params"]:
                device = p.device
                lists = by_device.get(device)
                if lists is None:
                    lists = by_device[device] = ([], [], [])
                if p.requires_grad:
                    grad = p.grad
                    if grad is None:
                        grad = p.grad = torch.zeros_like(p)
                    lists[0].append(p)
                    lists[1].append(grad)
                else:
                    lists[2].append(p)
            for trainable, grads, frozen in by_device.values():
                if trainable:
                    if compiling:
                        values.append(_traced_grad_(grads, trainable, l1, l2))
                    else:
                        values.append(torch.ops.fastreg.weight_penalty_grad_(grads, trainable, l1, l2))
                if frozen:
                    if compiling:
                        values.append(_traced_value(frozen, l1, l2))
                    else:
                        values.append(torch.ops.fastreg.weight_penalty_value(frozen, l1, l2))
        return _sum_values(values) if values else torch.zeros((), dtype=torch.float32)

    @staticmethod
    def _native_loop(params: list[torch.Tensor]):
        """The compiled loop (``torch.classes.fastreg.WeightPenaltyGroup``), or None where the
        Python loop must run: no compiled library (the reference backend), or a parameter of a
        tensor subclass, whose attribute overrides only Python honours. It takes the group's list
        at each call and keeps nothing: ``torch.utils.swap_tensors`` (``module.to()`` with
        ``swap_module_params_on_conversion``, ``load_state_dict(assign=True)``) refuses tensors
        referenced elsewhere, and puts another tensor, and maybe another class, under the same
        Python object, so nothing may be decided once for a group's objects."""
        global _NATIVE_LOOP
        if not _PLAIN_TENSOR_TYPES.issuperset(map(type, params)):
            return None
        if _NATIVE_LOOP is None and _loader.load_kernels("cpu"):
            _NATIVE_LOOP = torch.classes.fastreg.WeightPenaltyGroup()
        return _NATIVE_LOOP

    def __repr__(self) -> str:
        groups = ", ".join(f"({len(g['params'])} tensors, l1={g['l1']}, l2={g['l2']})" for g in self.param_groups)
        return f"WeightPenalty({groups})"
