"""torch.fx symbolic tracing of fastreg's modules: each is one ``call_module`` node, as torch.nn's are.

FX's default tracer keeps ``torch.nn`` modules as leaves and traces into every other module's
``forward``. fastreg's forwards branch on the input (its dimensions, its size, ``training``),
which a symbolic input cannot decide, so tracing a converted model failed ("symbolically traced
variables cannot be used as inputs to control flow"): ``torch.fx.symbolic_trace``, torchvision's
feature extraction, FX graph passes. A module that sees a Proxy records itself as a
``call_module`` node instead; the GraphModule then calls it with real tensors.
"""

from __future__ import annotations

import torch
import torch.fx


class TracedAsLeaf:
    """Mixin for a module whose ``forward(input)`` starts with::

    if not torch.jit.is_scripting() and not isinstance(input, torch.Tensor):
        return self._fx_call_module(input)

    (a type check only, in eager mode; TorchScript, whose input is a Tensor, never calls it)."""

    @torch.jit.unused
    def _fx_call_module(self, input: torch.Tensor) -> torch.Tensor:
        if not isinstance(input, torch.fx.Proxy):
            raise TypeError(f"{type(self).__name__}: input must be a tensor, got {type(input).__name__}")
        tracer = input.tracer
        if tracer.root is self:  # traced on its own: there is no parent to hold a call_module node
            return self._fx_trace_as_root(input)
        return tracer.create_proxy("call_module", tracer.path_of_module(self), (input,), {})

    def _fx_trace_as_root(self, input: torch.fx.Proxy) -> torch.fx.Proxy:
        raise RuntimeError(
            f"torch.fx cannot trace a {type(self).__name__} on its own (its forward branches on the input); "
            "trace the model that contains it, where it becomes one call_module node"
        )
