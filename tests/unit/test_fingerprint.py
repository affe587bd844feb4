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
