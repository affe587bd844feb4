"""Export honesty (issue 13, items 9 and 10): FP16 overflow of hidden activations fails the NCS2 check and the
verification, naming the layer; nn.Upsample is written as Interpolate-4, which the NCS2 table accepts, and
agrees with PyTorch; a bundle that is not NCS2-ready and verified makes the CLI exit non-zero."""
from __future__ import annotations

import re

import torch
from torch import nn

from core.cli_common import export_exit_code
from core.export import EXIT_NOT_READY, build_bundle
from core.fp16 import FP16_MAX, measure_fp16_range
from core.ncs2_compiler import compiler_status
from tests.tasks.test_export import fitted_toy, synthetic_images, toy_spec


class Overflowing(nn.Module):
    """The toy classifier with its features scaled by 1e5 and back by 1e-5: the FP32 output is unchanged,
    the hidden activations of 'up' exceed FP16's maximum."""

    def __init__(self, toy: nn.Module):
        super().__init__()
        self.toy = toy
        c = toy.classifier.in_features
        self.up, self.down = nn.Conv2d(c, c, 1, bias=False), nn.Conv2d(c, c, 1, bias=False)
        with torch.no_grad():
            self.up.weight.copy_(torch.eye(c).view(c, c, 1, 1) * 1e5)
            self.down.weight.copy_(torch.eye(c).view(c, c, 1, 1) * 1e-5)

    def forward(self, x):
        h = self.down(self.up(self.toy.features(x)))
        return self.toy.classifier(torch.flatten(self.toy.pool(h), 1))


class Upsampling(nn.Module):
    def __init__(self, toy: nn.Module, mode: str):
        super().__init__()
        self.up = nn.Upsample(scale_factor=2, mode=mode)
        self.toy = toy

    def forward(self, x):
        return self.toy(self.up(x))


def test_activation_overflow_is_measured_on_the_layer():
    toy = fitted_toy()
    model = Overflowing(toy).eval()
    val = synthetic_images(64, seed=99)
    fp16 = measure_fp16_range(model, val, toy_spec().input)
    assert fp16.overflows and max(fp16.overflows, key=fp16.overflows.get) == "up"
    assert fp16.peaks["up"] > FP16_MAX > fp16.peaks["down"]
    assert fp16.fp16_finite is False
    assert measure_fp16_range(toy, val, toy_spec().input).ok


def test_fp16_overflow_fails_the_ncs2_check_and_verification(tmp_path):
    toy = fitted_toy()
    model = Overflowing(toy).eval()
    val = synthetic_images(240, seed=99)
    with torch.no_grad():  # FP32 is fine: same predictions as the toy
        assert torch.equal(model(val.images[:8].float() / 255).argmax(1), toy(val.images[:8].float() / 255).argmax(1))
    result = build_bundle(model, model, toy_spec(), val, tmp_path / "bundle", latency_runs=2)
    assert not result.ncs2.compatible and not result.verification.verified
    fp16_problems = [p for p in result.ncs2.problems if p.type == "FP16 range"]
    assert fp16_problems and fp16_problems[0].layer == "up" and "65,504" in fp16_problems[0].reason
    assert export_exit_code(result.to_dict() | {"ncs2_problems": [str(p) for p in result.ncs2.problems]}) == EXIT_NOT_READY
    assert export_exit_code(result.to_dict()) == EXIT_NOT_READY
    if compiler_status()[0]:  # re-judged by the MYRIAD compiler: it compiles the model, it checks no value ranges,
        target = result.target  # so the FP16 range check still decides
        assert target.proven and target.details["compiler"]["compiled"]
        assert (tmp_path / "bundle" / "model" / "model.blob").is_file()
        assert not target.ready and target.verdict.startswith("NOT NCS2-ready: compiled for NCS2 (Myriad X)")
        assert "activations of 'up'" in target.verdict and "disagreement" not in target.details


def test_upsample_exports_as_interpolate4_and_passes(tmp_path):
    toy = fitted_toy()
    val = synthetic_images(240, seed=99)
    for mode in ("nearest", "bilinear"):
        model = Upsampling(toy, mode).eval()
        result = build_bundle(model, model, toy_spec(), val, tmp_path / mode, latency_runs=2)
        xml = (tmp_path / mode / "model" / "model.xml").read_text()
        assert set(re.findall(r'type="Interpolate" version="(\w+)"', xml)) == {"opset4"}
        assert result.ncs2.compatible, [str(p) for p in result.ncs2.problems]
        assert result.verification.verified and result.verification.agreement >= 0.99
        assert result.manifest["models"]["pruned"]["ir_rewrites"]
        if compiler_status()[0]:  # re-judged by the MYRIAD compiler (from the ONNX Resize): compiled
            assert result.target.ready and result.target.proven, result.target.verdict
            assert result.target.details["compiler"]["stages"] > 0
        assert export_exit_code(result.to_dict() | {"ncs2_problems": []}) == 0
