"""Intel's MYRIAD compiler (OpenVINO 2021.4.2) really compiles, really refuses, and re-judges the cases the static
NCS2 check was built from (issue 24). Runs wherever `make setup` could build .venv-myriad; skips with its reason
only where no Python <= 3.9 (or g++, libusb) exists."""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from core.export import export_model
from core.models import InputSpec
from core.ncs2 import check_ncs2
from core.ncs2_compiler import compile_many, compile_onnx, read_blob_header, run_on_cpu_2021
from tests.helpers import needs_myriad

pytestmark = needs_myriad
SPEC = InputSpec(height=32, width=32, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))


class Net(nn.Module):
    """conv-bn-relu-pool-conv-relu, global mean, linear; ``extra`` runs one op the NCS2 may not have."""

    def __init__(self, extra: str | None = None, upsample: str | None = None):
        super().__init__()
        torch.manual_seed(0)
        self.c1, self.b1 = nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.c2 = nn.Conv2d(16, 16, 3, padding=1)
        self.up = nn.Upsample(scale_factor=2, mode=upsample) if upsample else None
        self.fc = nn.Linear(16, 5)
        self.extra = extra

    def forward(self, x):
        x = torch.max_pool2d(torch.relu(self.b1(self.c1(x))), 2)
        if self.up is not None:
            x = self.up(x)
        x = torch.relu(self.c2(x))
        if self.extra == "cumsum":
            x = torch.cumsum(x, 1)
        elif self.extra == "atan":
            x = torch.atan(x)
        return self.fc(x.mean((2, 3)))


def exported(tmp_path: Path, model: nn.Module, name: str) -> dict:
    return export_model(model.eval(), SPEC, tmp_path / name)


def test_a_cnn_compiles_into_a_blob_with_a_checked_header_and_the_same_input_gives_the_same_bytes(tmp_path):
    onnx = exported(tmp_path, Net(), "net")["onnx"]
    first, second = compile_many([(onnx, tmp_path / "a.blob"), (onnx, tmp_path / "b.blob")], use_cache=False)
    assert first.compiled and first.available, first.verdict
    data = (tmp_path / "a.blob").read_bytes()
    header = read_blob_header(data)
    assert header.magic == 9709 and header.file_size == len(data) == first.blob_bytes
    assert (header.inputs, header.outputs) == (1, 1) and header.stages == first.stages >= 4
    assert first.verdict == (f"compiled for NCS2 (Myriad X) by the OpenVINO 2021.4.2 MYRIAD compiler: "
                             f"{round(len(data) / 1e3)} KB, {header.stages} stages")
    # compiled again from scratch (nothing cached yet): byte-identical
    again = compile_onnx(onnx, tmp_path / "c.blob")
    assert again.compiled and not again.cached
    assert (tmp_path / "c.blob").read_bytes() == data == (tmp_path / "b.blob").read_bytes()
    # the cache returns the same blob by the ONNX file's hash, without a compile
    cached = compile_onnx(onnx, tmp_path / "d.blob")
    assert cached.cached and cached.blob_sha256 == hashlib.sha256(data).hexdigest()
    assert (tmp_path / "d.blob").read_bytes() == data


def test_layers_the_ncs2_cannot_run_are_refused_by_name_and_leave_no_blob(tmp_path):
    jobs = [(exported(tmp_path, Net(op), op)["onnx"], tmp_path / f"{op}.blob") for op in ("cumsum", "atan")]
    cumsum, atan = compile_many(jobs)
    for result, op_type in ((cumsum, "CumSum"), (atan, "Atan")):
        assert result.available and not result.compiled and result.blob is None
        assert result.layer_type == op_type and result.layer and op_type in result.layer
        assert result.verdict == (f'the OpenVINO 2021.4.2 MYRIAD compiler refuses layer "{result.layer}": '
                                  f'unsupported layer type "{op_type}"')
    assert not list(tmp_path.glob("*.blob")) and not list(tmp_path.glob(".*.tmp"))
    # a refusal is cached too: the same input is judged again without a compile
    assert compile_many(jobs[:1])[0].cached


@pytest.mark.parametrize("mode", ["nearest", "bilinear"])
def test_upsampling_the_static_check_rewrote_is_compiled_by_the_compiler(tmp_path, mode):
    """The static check was built on Interpolate versions (Interpolate-11 unreadable by 2022.3): the export
    writes Interpolate-4 in the IR; the compiler, reading the ONNX Resize, compiles both modes."""
    e = exported(tmp_path, Net(upsample=mode), mode)
    static = check_ncs2(e["xml"])
    assert static.compatible, [str(p) for p in static.problems]
    assert any(op.startswith("Interpolate-opset4") for op in static.ops)
    result = compile_onnx(e["onnx"], tmp_path / f"{mode}.blob")
    assert result.compiled, result.verdict


def test_maxpool14_ir_is_refused_by_both_judges_and_the_onnx_route_compiles(tmp_path):
    """The static check was built on MaxPool-14 (ov.convert_model on a torch module): 2022.3 cannot read it. The
    2021.4 compiler cannot read that IR (v11) at all; the ONNX export of the same model compiles."""
    import openvino as ov

    model = Net().eval()
    direct = tmp_path / "direct.xml"
    ov.save_model(ov.convert_model(model, example_input=torch.zeros(1, 3, 32, 32)), str(direct),
                  compress_to_fp16=True)
    static = check_ncs2(direct)
    assert not static.compatible and any(p.type == "MaxPool" and p.version == "opset14" for p in static.problems)
    read = compile_onnx(direct, tmp_path / "direct.blob")
    assert read.available and not read.compiled and "cannot read it" in read.verdict
    onnx_route = compile_onnx(exported(tmp_path, model, "onnx")["onnx"], tmp_path / "onnx.blob")
    assert onnx_route.compiled, onnx_route.verdict


def test_the_2021_cpu_plugin_runs_the_onnx_as_pytorch_does(tmp_path):
    model = Net().eval()
    onnx = exported(tmp_path, model, "net")["onnx"]
    x = torch.randn(6, 3, 32, 32)
    with torch.no_grad():
        ref = model(x).numpy()
    got = run_on_cpu_2021(onnx, x.numpy())
    assert got.shape == ref.shape == (6, 5)
    assert float(np.max(np.abs(got - ref))) < 1e-4
