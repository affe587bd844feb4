"""A near-chance baseline is said, with its likely causes, and the common normalisations and the class order
the confusion matrix suggests are tried; the best is offered as a fix (issue 13 item 5)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from core.sources import load_dataset
from core.evaluate import evaluate_accuracy
from core.models import IMAGENET_MEAN, IMAGENET_STD, InputSpec
from core.plausibility import apply_fix, check_plausibility

ROOT = Path(__file__).resolve().parent.parent


class Brightness(nn.Module):
    """Output 'bright' when the normalised image's mean is above 0: right only with the normalisation it was
    made for (ImageNet's puts the threshold at pixel value 114.5; CIFAR-10's at 121, [-1, 1] at 127.5)."""

    def __init__(self, bright_first: bool = False):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)
        self.fc = nn.Linear(3, 2)
        sign = torch.tensor([[1.0], [-1.0]] if bright_first else [[-1.0], [1.0]])
        with torch.no_grad():
            self.conv.weight.copy_(torch.eye(3).view(3, 3, 1, 1))
            self.conv.bias.zero_()
            self.fc.weight.copy_(sign * torch.full((2, 3), 10 / 3))
            self.fc.bias.zero_()

    def forward(self, x):
        return self.fc(self.conv(x).mean((2, 3)))


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("bright")
    rng = np.random.default_rng(0)
    for cls, level in (("a_dark", 105), ("b_bright", 118)):
        (root / cls).mkdir()
        for i in range(60):
            img = np.clip(level + rng.integers(-2, 3, (16, 16)), 0, 255).astype(np.uint8)
            Image.fromarray(np.stack([img] * 3, -1)).save(root / cls / f"{i}.png")
    return root


def _baseline(model, data):
    return evaluate_accuracy(model, data.val, data.input).accuracy


def test_wrong_normalisation_is_found(folder):
    spec = InputSpec(height=16, width=16, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    data = load_dataset(folder, spec)
    model = Brightness().eval()
    acc = _baseline(model, data)
    result = check_plausibility(model, data, spec, acc)
    assert result.near_chance and acc == pytest.approx(0.5)
    assert any("normalisation" in c for c in result.causes) and any("class order" in c for c in result.causes)
    assert result.fix is not None and result.fix.label == "ImageNet mean/std" and result.fix.class_order is None
    assert result.fix.accuracy == 1.0
    fixed_spec, fixed = apply_fix(result.fix, spec, data)
    assert fixed_spec.mean == IMAGENET_MEAN and fixed_spec.std == IMAGENET_STD
    assert _baseline(model, fixed) == 1.0


def test_swapped_class_order_is_found(folder):
    spec = InputSpec(height=16, width=16)
    data = load_dataset(folder, spec)
    model = Brightness(bright_first=True).eval()
    acc = _baseline(model, data)
    assert acc == 0.0
    result = check_plausibility(model, data, spec, acc)
    assert result.fix is not None and result.fix.class_order == ["b_bright", "a_dark"]
    _, fixed = apply_fix(result.fix, spec, data)
    assert _baseline(model, fixed) == 1.0
    # the same order given when loading (the CLI's --class-order) gives the same labels
    reloaded = load_dataset(folder, spec, class_order=["b_bright", "a_dark"])
    assert torch.equal(reloaded.val.labels, fixed.val.labels)


def test_a_plausible_baseline_is_left_alone(folder):
    spec = InputSpec(height=16, width=16)
    data = load_dataset(folder, spec)
    result = check_plausibility(Brightness().eval(), data, spec, _baseline(Brightness().eval(), data))
    assert not result.near_chance and result.fix is None and result.message() == ""


def test_cli_says_near_chance_and_suggests_the_flags(folder, tmp_path):
    code = tmp_path / "bright.py"
    code.write_text(Path(__file__).read_text())
    weights = tmp_path / "w.pt"
    torch.save(Brightness(bright_first=True).state_dict(), weights)
    proc = subprocess.run([sys.executable, "-m", "core", "evaluate", "--model", str(weights), "--model-code", str(code),
                           "--model-class", "Brightness", "--model-args", '{"bright_first": true}', "--trusted",
                           "--data", str(folder), "--no-latency"], capture_output=True, text=True, cwd=ROOT,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "near chance" in proc.stderr and "--class-order b_bright,a_dark" in proc.stderr
