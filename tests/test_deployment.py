"""A model trained with fastreg's layers, then saved, shipped and deployed: whole-model pickles,
state dicts into and out of torch.nn models, torch.export (.pt2) and TorchScript archives
loaded in a fresh process, torch.compile across train/eval switches, AOTInductor packages.
Each is compared with the same model built from torch.nn's layers. (ONNX: test_onnx_export.py.)"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch._dynamo.testing import CompileCounter

import fastreg

from .helpers import use_kernels


def torch_model(seed: int = 0) -> nn.Sequential:
    """A conv/linear model with every layer kind fastreg converts, with running statistics that
    are not the defaults (three training batches)."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Dropout2d(0.2),
        nn.Flatten(),
        nn.Linear(8 * 6 * 6, 16),
        nn.BatchNorm1d(16),
        nn.ReLU(),
        nn.Dropout(0.3),
        nn.Linear(16, 4),
    )
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(8, 3, 6, 6))
    return model.eval()


def fastreg_model(seed: int = 0) -> nn.Sequential:
    return fastreg.convert(torch_model(seed))


def inputs(batch: int = 5, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, 6, 6, generator=torch.Generator().manual_seed(seed))


# --- dynamic batch sizes once the compiled kernels have run ------------------------------------


def _train_one_eager_step(model: nn.Module) -> None:
    """What every training script does before it exports or compiles: an eager step, which
    loads the compiled library (and with it dropout's C++ autograd kernel)."""
    model.train()
    model(inputs(4)).sum().backward()
    model.zero_grad()


@pytest.mark.parametrize("strict", [False, True], ids=["nonstrict", "strict"])
def test_training_exports_with_a_dynamic_batch_after_an_eager_step(strict):
    """The C++ autograd kernel of fastreg::dropout read the output's concrete sizes (Dynamo's
    and export's fake tensors have symbolic ones), which specialised the batch dimension:
    "Constraints violated (batch)! ... specialized it to be a constant (5)". Export of the
    training model with a Dim worked only in a process that had not run the kernels yet."""
    use_kernels("cpu", ["dropout", "batch_norm_train"])
    model = fastreg_model()
    _train_one_eager_step(model)
    batch = torch.export.Dim("batch", min=2, max=64)
    program = torch.export.export(model, (inputs(5),), dynamic_shapes=({0: batch},), strict=strict)
    for n in (2, 7, 33):
        assert program.module()(inputs(n)).shape == (n, 4)


def test_compiled_training_makes_one_graph_for_every_batch_size_after_an_eager_step():
    """The same specialisation under torch.compile: one graph per batch size, up to Dynamo's
    recompile limit (8), after which the model ran eagerly. torch's model makes one graph."""
    use_kernels("cpu", ["dropout", "batch_norm_train"])
    for convert in (False, True):
        torch._dynamo.reset()
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 2))
        if convert:
            fastreg.convert(model)
        model(torch.randn(4, 8)).sum().backward()  # an eager step (it loads the kernels)
        graphs = CompileCounter()
        compiled = torch.compile(model, backend=graphs, dynamic=True, fullgraph=True)
        for n in (3, 5, 9, 17):
            compiled(torch.randn(n, 8)).sum().backward()
        assert graphs.frame_count == 1, "fastreg" if convert else "torch"
