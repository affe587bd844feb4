"""NCS2 (MYRIAD, OpenVINO 2022.3) static check: supported models pass, unsupported ops and version drift are named."""
from __future__ import annotations

import io
import json
import re

import numpy as np
import openvino as ov
import pytest
import torch
from torch import nn

from core.architectures import SampleResNet, SampleVGG
from core.export import export_model
from core.models import InputSpec, ModelSpec
from core.ncs2 import TABLE_PATH, Ncs2CheckError, check_ncs2, load_support_table, op_support
from core.ov_runtime import export_onnx_bytes

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.jit.trace inside ov.convert_model
SPEC = ModelSpec(arch="test", num_classes=4, input=InputSpec(height=32, width=32))


class _Head(nn.Module):
    """conv -> <block> -> global pool -> linear: a classifier around one op under test."""

    def __init__(self, block: nn.Module, channels_after: int):
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.block = block
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels_after, 4)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.block(self.conv(x))), 1))


def _ir_from_onnx(model: nn.Module, path, fp16: bool = True, shape=(1, 3, 32, 32)) -> str:
    ov_model = ov.convert_model(io.BytesIO(export_onnx_bytes(model.eval(), shape)))
    xml = str(path / "m.xml")
    ov.save_model(ov_model, xml, compress_to_fp16=fp16)
    return xml


@pytest.mark.parametrize("arch", [SampleVGG, SampleResNet])
def test_sample_architectures_exported_through_onnx_are_compatible(tmp_path, arch):
    info = export_model(arch(num_classes=4).eval(), SPEC, tmp_path)
    report = check_ncs2(info["xml"])
    assert report.compatible, report.summary()
    assert report.problems == []
    assert all(int(k.rsplit("opset", 1)[1]) <= 10 for k in report.ops)
    assert report.inputs == {"input": ["1", "3", "32", "32"]}
    assert report.constant_types.get("f16", 0) > 0 and "f32" not in report.constant_types
    d = report.to_dict()
    assert d["compatible"] is True and json.dumps(d)
    assert "compatible" in report.summary()


def test_maxpool14_from_direct_torch_conversion_is_caught(tmp_path):
    """ov.convert_model(torch module) writes MaxPool-14, which OpenVINO 2022.3 cannot read."""
    model = SampleVGG(num_classes=4).eval()
    ov_model = ov.convert_model(model, example_input=torch.zeros(1, 3, 32, 32), input=[(1, 3, 32, 32)])
    xml = tmp_path / "direct.xml"
    ov.save_model(ov_model, str(xml), compress_to_fp16=True)
    report = check_ncs2(xml)
    assert not report.compatible
    bad = [p for p in report.problems if p.type == "MaxPool"]
    assert bad and all(p.version == "opset14" for p in bad)
    names = re.findall(r'name="([^"]+)" type="MaxPool"', xml.read_text())
    assert {p.layer for p in bad} == set(names)
    assert "opset14" in bad[0].reason and "2022.3" in bad[0].reason
    # the ONNX route of the same model gives MaxPool-8, which MYRIAD runs as MaxPool-1
    ok = check_ncs2(_ir_from_onnx(model, tmp_path))
    assert ok.compatible and any(k.startswith("MaxPool-opset8") for k in ok.ops)


def test_hardsigmoid_is_not_compatible_and_named(tmp_path):
    report = check_ncs2(_ir_from_onnx(_Head(nn.Hardsigmoid(), 16), tmp_path))
    assert not report.compatible
    [p] = report.problems
    assert p.type == "HardSigmoid" and p.version == "opset1" and p.severity == "error"
    assert "HardSigmoid" in p.layer and "not supported" in p.reason
    assert "HardSigmoid" in report.summary()


def test_pixelshuffle_depth_to_space_is_unconfirmed(tmp_path):
    xml = _ir_from_onnx(_Head(nn.PixelShuffle(2), 4), tmp_path)
    strict = check_ncs2(xml)
    assert not strict.compatible
    [p] = strict.problems
    assert p.type == "DepthToSpace" and p.severity == "unconfirmed" and "Not Supported" in p.reason
    lenient = check_ncs2(xml, strict=False)
    assert lenient.compatible and [w.type for w in lenient.warnings] == ["DepthToSpace"]


def test_fp32_weights_dynamic_shape_and_batch_are_reported(tmp_path):
    model = _Head(nn.ReLU(), 16)
    (tmp_path / "a").mkdir()
    fp32 = check_ncs2(_ir_from_onnx(model, tmp_path / "a", fp16=False))
    assert not fp32.compatible
    assert {p.type for p in fp32.problems} == {"Const"} and all("FP16" in p.reason for p in fp32.problems)
    (tmp_path / "b").mkdir()
    batch2 = check_ncs2(_ir_from_onnx(model, tmp_path / "b", shape=(2, 3, 32, 32)))
    assert [p.type for p in batch2.problems] == ["Parameter"] and "batch is 2" in batch2.problems[0].reason
    dyn = ov.convert_model(model.eval(), example_input=torch.zeros(1, 3, 32, 32))  # dynamic by default
    ov.save_model(dyn, str(tmp_path / "dyn.xml"))
    report = check_ncs2(tmp_path / "dyn.xml")
    assert not report.compatible
    assert any(p.type == "Parameter" and "not static" in p.reason for p in report.problems)
    assert len(report.problems) <= 3  # dynamic shapes downstream are summarised, not listed layer by layer


def test_opset11_ops_and_maxpool8_with_indices_are_caught(tmp_path):
    from openvino import opset8, opset11

    x = opset8.parameter([1, 4, 8, 8], np.float32, name="input")
    pool = opset8.max_pool(x, [2, 2], [1, 1], [0, 0], [0, 0], [2, 2], name="pool_with_indices")
    used_indices = opset8.add(pool.output(0), opset8.convert(pool.output(1), "f32"))
    flat = opset8.reshape(used_indices, opset8.constant(np.array([1, 64], np.int64)), False)
    topk = opset11.topk(flat, opset8.constant(np.int64(3)), 1, "max", "value", name="top3")
    model = ov.Model([topk.output(0)], [x])
    ov.save_model(model, str(tmp_path / "m.xml"))
    report = check_ncs2(tmp_path / "m.xml")
    by_layer = {p.layer: p for p in report.problems}
    assert "indices output is used" in by_layer["pool_with_indices"].reason
    assert by_layer["top3"].version == "opset11" and "opset11" in by_layer["top3"].reason


def test_unreadable_files_raise_user_errors(tmp_path):
    with pytest.raises(Ncs2CheckError):
        check_ncs2(tmp_path / "missing.xml")
    (tmp_path / "bad.xml").write_text("<net><layers>")
    with pytest.raises(Ncs2CheckError):
        check_ncs2(tmp_path / "bad.xml")
    (tmp_path / "other.xml").write_text("<html></html>")
    with pytest.raises(Ncs2CheckError):
        check_ncs2(tmp_path / "other.xml")


def test_support_table_is_self_contained_and_consistent():
    table = load_support_table()
    text = TABLE_PATH.read_text()
    assert "shared/" not in text and "reference/" not in text  # the product never points at ../shared
    assert table["target"]["max_opset"] == 10
    statuses = set(table["status_meanings"])
    for name, entry in table["ops"].items():
        for src in entry["sources"]:
            assert src in table["sources"], (name, src)
        for v in entry["versions"]:
            lo, hi = v["opsets"]
            assert 1 <= lo <= hi <= 10, name
            assert v["status"] in statuses, name
    for src in table["sources"].values():
        assert src.get("commit") or src.get("url") or src.get("what")
    assert op_support("MaxPool", 8)[0] == "partial" and op_support("MaxPool", 1)[0] == "yes"
    assert op_support("ReLU", 1)[0] == "yes" and op_support("SoftMax", 8)[0] == "yes"  # IR spellings
    assert op_support("HardSigmoid", 1)[0] == "no"
    assert op_support("Gelu", 1)[0] == "not_in_opset"
    assert op_support("NoSuchOp", 1) is None
