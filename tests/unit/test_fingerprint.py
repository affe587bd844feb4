"""Fingerprints change with any weight, image or setting, and only then."""
from __future__ import annotations

import copy

import torch

from core.architectures import SampleVGG
from core.fingerprint import model_fingerprint, settings_fingerprint, tensors_fingerprint


def test_model_fingerprint_follows_weights_and_buffers():
    torch.manual_seed(0)
    a = SampleVGG().eval()
    b = copy.deepcopy(a)
    assert model_fingerprint(a) == model_fingerprint(b)
    with torch.no_grad():
        b.features[0].weight[0, 0, 0, 0] += 1e-6
    assert model_fingerprint(a) != model_fingerprint(b)
    c = copy.deepcopy(a)
    c.features[1].running_mean[0] += 1.0
    assert model_fingerprint(a) != model_fingerprint(c)


def test_tensor_and_settings_fingerprints():
    x = torch.arange(12, dtype=torch.uint8).reshape(3, 4)
    y = torch.tensor([0, 1, 2])
    assert tensors_fingerprint(x, y) == tensors_fingerprint(x.clone(), y.clone())
    assert tensors_fingerprint(x, y) != tensors_fingerprint(x, torch.tensor([0, 1, 1]))
    assert tensors_fingerprint(x) != tensors_fingerprint(x.float())
    assert settings_fingerprint({"a": 1, "b": 2}) == settings_fingerprint({"b": 2, "a": 1})
    assert settings_fingerprint({"a": 1}) != settings_fingerprint({"a": 2})


def _akamaster_resnet20():
    """The public CIFAR ResNet-20 (akamaster's resnet.py: option-A shortcuts through a ``LambdaLayer``)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "fixtures" / "cifar_resnet.py"
    spec = importlib.util.spec_from_file_location("cifar_resnet_fp", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    torch.manual_seed(0)
    return module.resnet20().eval()


def test_option_a_fingerprint_survives_building_the_pruning_graph():
    """Building a PruningGraph swaps each zero-padding shortcut (a LambdaLayer) for an equal frozen 1x1 conv:
    the model computes the same thing, so its fingerprint must not change (issue 27: a finished analysis of
    the converted copy was never reused for the model as loaded)."""
    from core.groups import PruningGraph

    shape = (1, 3, 32, 32)
    original = _akamaster_resnet20()
    converted = copy.deepcopy(original)
    graph = PruningGraph(converted, shape)
    assert len(graph.notes) == 2, "both option-A shortcuts were converted"
    assert type(converted.layer2[0].shortcut).__name__ == "Conv2d" != type(original.layer2[0].shortcut).__name__
    assert torch.equal(original(torch.ones(2, 3, 32, 32)), converted(torch.ones(2, 3, 32, 32)))
    assert model_fingerprint(original, shape) == model_fingerprint(converted, shape)
    # what the model computes still decides: another weight, another input size, another operation
    changed = copy.deepcopy(converted)
    with torch.no_grad():
        changed.conv1.weight[0, 0, 0, 0] += 1e-6
    assert model_fingerprint(changed, shape) != model_fingerprint(converted, shape)
    assert model_fingerprint(original, (1, 3, 64, 64)) != model_fingerprint(original, shape)
    other = copy.deepcopy(original)
    other.layer2[0].shortcut = type(original.layer2[0].shortcut)(
        lambda x: torch.nn.functional.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, 0, 16)))  # pads on one side only
    assert model_fingerprint(other, shape) != model_fingerprint(original, shape)


def test_fingerprint_leaves_the_model_as_it_was():
    model = SampleVGG().train()
    model.features[1].eval()  # a frozen BatchNorm inside a training model stays frozen
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model_fingerprint(model, (1, 3, 32, 32))
    assert model.training and not model.features[1].training and model.features[0].training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    swapped = copy.deepcopy(model)
    swapped.features[2] = torch.nn.LeakyReLU()
    assert model_fingerprint(swapped, (1, 3, 32, 32)) != model_fingerprint(model, (1, 3, 32, 32))
