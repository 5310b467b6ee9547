"""``torch.onnx.export`` of a model with fastreg's layers, by both of torch's exporters.

ONNX's translators know torch's ops, not fastreg's: under export, fastreg's dropout and batch
norm hand each call to torch's function, so a model converted with ``fastreg.convert`` for
training exports as the torch model it came from (the same ONNX ops), and the exported graph
computes what the model computes eagerly.
"""

import io

import pytest
import torch

import fastreg
import fastreg.functional as F

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxscript")  # the torch.export-based exporter (dynamo=True) needs it
from onnx.reference import ReferenceEvaluator  # noqa: E402

pytestmark = pytest.mark.filterwarnings(
    "ignore::DeprecationWarning",  # the TorchScript-based exporter (dynamo=False) is deprecated
    "ignore::FutureWarning",
    "ignore:Exporting a model while it is in training mode:UserWarning",
)


def _torch_model() -> torch.nn.Module:
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3),
        torch.nn.BatchNorm2d(8),
        torch.nn.ReLU(),
        torch.nn.Dropout2d(0.2),
        torch.nn.Flatten(),
        torch.nn.Dropout(0.3),
        torch.nn.Linear(8 * 6 * 6, 16),
        torch.nn.BatchNorm1d(16),
        torch.nn.Linear(16, 4),
    )
    with torch.no_grad():  # running statistics that are not the identity
        for bn in (model[1], model[7]):
            bn.running_mean.normal_()
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.normal_()
    return model


def _export(model: torch.nn.Module, x: torch.Tensor, dynamo: bool) -> "onnx.ModelProto":
    if dynamo:
        return torch.onnx.export(model, (x,), dynamo=True, verbose=False).model_proto
    buffer = io.BytesIO()
    torch.onnx.export(model, (x,), buffer, dynamo=False)
    return onnx.load_from_string(buffer.getvalue())


def _op_types(proto) -> list[str]:
    return [node.op_type for node in proto.graph.node]


@pytest.mark.parametrize("dynamo", [True, False], ids=["torch_export", "torchscript"])
def test_eval_model_exports_and_the_graph_computes_the_eager_output(dynamo):
    model = fastreg.convert(_torch_model()).eval()
    assert isinstance(model[1], fastreg.BatchNorm2d) and isinstance(model[5], fastreg.Dropout)
    x = torch.randn(2, 3, 8, 8)
    proto = _export(model, x, dynamo)
    assert not [n for n in proto.graph.node if n.domain.startswith("fastreg")]
    (onnx_out,) = ReferenceEvaluator(proto).run(None, {proto.graph.input[0].name: x.numpy()})
    with torch.no_grad():
        expected = model(x)
    torch.testing.assert_close(torch.from_numpy(onnx_out), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("dynamo", [True, False], ids=["torch_export", "torchscript"])
def test_converted_model_exports_as_the_torch_model_it_came_from(dynamo, training):
    x = torch.randn(2, 3, 8, 8)
    expected = _op_types(_export(_torch_model().train(training), x, dynamo))
    converted = fastreg.convert(_torch_model()).train(training)
    assert _op_types(_export(converted, x, dynamo)) == expected


def test_functional_calls_export_and_eager_calls_still_run_the_kernels():
    class Net(torch.nn.Module):
        def forward(self, x, running_mean, running_var):
            x = F.batch_norm(x, running_mean, running_var, training=False)
            return F.dropout(x, 0.5, training=False) * 2

    x, mean, var = torch.randn(4, 3), torch.randn(3), torch.rand(3) + 0.5
    proto = torch.onnx.export(Net(), (x, mean, var), dynamo=True, verbose=False).model_proto
    assert not [n for n in proto.graph.node if n.domain.startswith("fastreg")]
    feeds = {i.name: t.numpy() for i, t in zip(proto.graph.input, (x, mean, var))}
    (onnx_out,) = ReferenceEvaluator(proto).run(None, feeds)
    torch.testing.assert_close(torch.from_numpy(onnx_out), Net()(x, mean, var), rtol=1e-5, atol=1e-6)
    # outside the export, the same calls reach fastreg's ops again
    from tests.helpers import DispatchedOps

    with DispatchedOps() as ops:
        F.dropout(x, 0.5, training=True)
        F.batch_norm(x, mean.clone(), var.clone(), training=False)
    assert "fastreg.dropout.default" in ops.names and "fastreg.batch_norm_eval.default" in ops.names
