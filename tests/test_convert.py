"""fastreg.convert: torch.nn's dropout layers swapped for fastreg's, nothing else changed."""

import pytest
import torch
from torch import nn

import fastreg
import fastreg.functional as F


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(8, 8)
        self.drop = nn.Dropout(0.3, inplace=True)
        self.channel_drop = nn.ModuleDict({"a": nn.Dropout1d(0.2), "b": nn.Dropout2d(0.4), "c": nn.Dropout3d(0.1)})

    def forward(self, x):
        return self.drop(torch.relu(self.linear(x)))


class MyDropout(nn.Dropout):  # a user's subclass: its forward may mean something else
    pass


def model():
    torch.manual_seed(0)
    shared = nn.Dropout(0.5)
    return nn.Sequential(
        nn.Linear(8, 8), shared, Block(), nn.ModuleList([shared, nn.AlphaDropout(0.2), MyDropout(0.1)])
    )


def test_swaps_exact_torch_classes_and_keeps_their_arguments():
    m = model()
    m[2].channel_drop["b"].eval()
    state = {k: v.clone() for k, v in m.state_dict().items()}
    assert fastreg.convert(m, mask_mode="bits") is m
    assert type(m[1]) is fastreg.Dropout and m[1].p == 0.5 and m[1].mask_mode == "bits"
    assert m[3][0] is m[1], "a layer shared by two parents stays one layer"
    block = m[2]
    assert type(block.drop) is fastreg.Dropout and block.drop.inplace and block.drop.p == 0.3
    assert type(block.channel_drop["a"]) is fastreg.Dropout1d and block.channel_drop["a"].p == 0.2
    assert type(block.channel_drop["b"]) is fastreg.Dropout2d and not block.channel_drop["b"].training
    assert type(block.channel_drop["c"]) is fastreg.Dropout3d
    assert type(m[3][1]) is nn.AlphaDropout and type(m[3][2]) is MyDropout, "other classes are left alone"
    assert m.state_dict().keys() == state.keys()
    assert all(torch.equal(m.state_dict()[k], v) for k, v in state.items())
    assert fastreg.convert(m) is m and type(m[1]) is fastreg.Dropout  # idempotent


def test_converted_model_runs_fastreg_dropout():
    m = model()[:3]
    torch.manual_seed(1)
    x = torch.randn(4, 8)
    fastreg.convert(m)
    torch.manual_seed(2)
    y = m(x)
    torch.manual_seed(2)
    h = F.dropout(m[0](x), 0.5)
    expected = F.dropout(torch.relu(m[2].linear(h)), 0.3, inplace=True)
    assert torch.equal(y, expected)
    m.eval()
    assert torch.equal(m(x), torch.relu(m[2].linear(m[0](x))))


def test_root_dropout_is_converted_in_place():
    root = nn.Dropout(0.2)
    assert fastreg.convert(root, mask_mode="bool") is root
    assert type(root) is fastreg.Dropout and root.p == 0.2 and root.mask_mode == "bool"
    assert "mask_mode='bool'" in repr(root)


@pytest.mark.parametrize("cls", [nn.Dropout, nn.Dropout2d])
def test_hooks_handles_and_attributes_survive_the_swap(cls):
    """Each layer keeps its identity: every kind of hook still fires (a full backward hook
    included), a handle taken before the swap still removes its hook, and state-dict hooks and
    the user's own attributes stay."""
    calls = []
    layer = cls(0.5)
    layer.note = "mine"
    fwd = layer.register_forward_hook(lambda module, args, output: calls.append("fwd"))
    layer.register_forward_hook(lambda module, args, kwargs, output: calls.append("fwd kwargs"), with_kwargs=True)
    layer.register_forward_pre_hook(lambda module, args: calls.append("pre"))
    layer.register_full_backward_hook(lambda module, grad_input, grad_output: calls.append("bwd"))
    layer.register_full_backward_pre_hook(lambda module, grad_output: calls.append("bwd pre"))
    layer._register_state_dict_hook(lambda module, state, prefix, local_metadata: state.update({prefix + "extra": 1}))
    model = nn.Sequential(nn.Linear(4, 4), layer)
    fastreg.convert(model)
    assert model[1] is layer and isinstance(layer, fastreg_class(cls)) and layer.note == "mine"
    model(torch.randn(2, 3, 4, 4, requires_grad=True)).sum().backward()
    assert calls == ["pre", "fwd", "fwd kwargs", "bwd pre", "bwd"]
    assert model.state_dict()["1.extra"] == 1
    calls.clear()
    fwd.remove()
    model(torch.randn(2, 3, 4, 4))
    assert calls == ["pre", "fwd kwargs"], "a handle from before the swap removes its hook"


def fastreg_class(cls):
    return {nn.Dropout: fastreg.Dropout, nn.Dropout2d: fastreg.Dropout2d}[cls]


def test_a_layer_under_two_names_of_one_parent_is_converted_once():
    # named_children() yields a module once, so a second name under the same parent was missed
    shared = nn.Dropout(0.5)
    m = nn.Sequential(nn.Linear(4, 4), shared, nn.ReLU(), shared)
    m.alias = shared
    fastreg.convert(m)
    assert type(m[1]) is fastreg.Dropout and m[3] is m[1] and m.alias is m[1]


def test_bad_mask_mode_is_rejected_before_anything_changes():
    m = model()
    with pytest.raises(ValueError, match="mask_mode"):
        fastreg.convert(m, mask_mode="bytes")
    assert type(m[1]) is nn.Dropout


def test_sync_batch_norm_convert_sync_batchnorm_gives_fastregs():
    """fastreg.SyncBatchNorm.convert_sync_batchnorm, like torch's, but with fastreg's layers."""
    bn = nn.BatchNorm2d(4)
    bn.running_mean.fill_(0.5)
    model = nn.Sequential(nn.Conv2d(3, 4, 1), bn, nn.Sequential(fastreg.BatchNorm1d(4), nn.Dropout(0.1)))
    converted = fastreg.SyncBatchNorm.convert_sync_batchnorm(model)
    assert converted is model
    assert type(model[1]) is fastreg.SyncBatchNorm and torch.equal(model[1].running_mean, bn.running_mean)
    assert type(model[2][0]) is fastreg.SyncBatchNorm
    assert type(model[2][1]) is nn.Dropout, "only batch norm is converted"
    assert type(fastreg.SyncBatchNorm.convert_sync_batchnorm(nn.BatchNorm1d(4))) is fastreg.SyncBatchNorm
