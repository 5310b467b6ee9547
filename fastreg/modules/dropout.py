"""fastreg.Dropout and friends: subclasses of torch.nn's, so arguments, repr, state_dict and
isinstance checks are unchanged; only forward runs fastreg's kernels."""

from __future__ import annotations

import torch

from .. import functional as F
from .fx_leaf import TracedAsLeaf


class Dropout(TracedAsLeaf, torch.nn.Dropout):
    """``torch.nn.Dropout`` with fastreg's kernel. ``mask_mode``: "regenerate" (default, no
    mask kept for backward), "bits" (1 bit per element) or "bool" (1 byte per element)."""

    def __init__(self, p: float = 0.5, inplace: bool = False, mask_mode: str = F.DEFAULT_MASK_MODE) -> None:
        F.check_p(p)  # torch.nn.Dropout lets NaN through
        super().__init__(p, inplace)
        F._mask_mode(mask_mode)
        self.mask_mode = mask_mode

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting() and not isinstance(input, torch.Tensor):  # torch.fx tracing
            return self._fx_call_module(input)
        # F.dropout's body, with positional arguments: what torch.jit.script can compile
        return F._dropout(input, self.p, self.training, self.inplace, None, self.mask_mode)

    def _fx_trace_as_root(self, input):
        # as torch.nn.Dropout traces on its own: one call of the function, the training flag fixed
        return input.tracer.create_proxy(
            "call_function", F.dropout, (input, self.p, self.training, self.inplace), {"mask_mode": self.mask_mode}
        )

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, mask_mode={self.mask_mode!r}"


class Dropout1d(TracedAsLeaf, torch.nn.Dropout1d):
    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting() and not isinstance(input, torch.Tensor):  # torch.fx tracing
            return self._fx_call_module(input)
        return F.dropout1d(input, self.p, self.training, self.inplace)

    def _fx_trace_as_root(self, input):
        return input.tracer.create_proxy("call_function", F.dropout1d, (input, self.p, self.training, self.inplace), {})


class Dropout2d(TracedAsLeaf, torch.nn.Dropout2d):
    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting() and not isinstance(input, torch.Tensor):  # torch.fx tracing
            return self._fx_call_module(input)
        return F.dropout2d(input, self.p, self.training, self.inplace)

    def _fx_trace_as_root(self, input):
        return input.tracer.create_proxy("call_function", F.dropout2d, (input, self.p, self.training, self.inplace), {})


class Dropout3d(TracedAsLeaf, torch.nn.Dropout3d):
    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting() and not isinstance(input, torch.Tensor):  # torch.fx tracing
            return self._fx_call_module(input)
        return F.dropout3d(input, self.p, self.training, self.inplace)

    def _fx_trace_as_root(self, input):
        return input.tracer.create_proxy("call_function", F.dropout3d, (input, self.p, self.training, self.inplace), {})
