"""Issue 24: every bundled sample exports with blobs compiled by Intel's MYRIAD compiler, through the one bundle
builder for both tasks; a layer the NCS2 cannot run is named and the CLI exits 3; a second target exports through
the same interface; without the compiler the verdict says "static check only"; deploy.py imports the blob."""
from __future__ import annotations

import copy
import hashlib
import importlib.util
import io
import json
import subprocess
import sys
import xml.etree.ElementTree as ET
import zipfile
from pathlib import Path

import pytest
import torch
from torch import nn

from core.bundle import build_into
from core.tasks.detection.export import build_detection_bundle
from core.tasks.detection.prune import detection_spec
from core.tasks.detection.sample_model import load_sample_detector
from core.cli_common import export_exit_code
from core.export import TEMPLATE, build_bundle
from core.models import InputSpec, ModelSpec, load_model, sample_entry
from core.ncs2_compiler import STATIC_ONLY, read_blob_header
from core.runs import Run, RunWriter
from core.sources import load_dataset, load_voc_dataset
from core.workspace import workspace_root
from tests.helpers import needs_myriad, random_dataset

ROOT = Path(__file__).resolve().parents[2]
COMPILER = "OpenVINO 2021.4.2 MYRIAD compiler"
DIGITS = sample_entry("vgg_digits")
DIGITS_SPEC = InputSpec(height=32, width=32, mean=tuple(DIGITS["mean"]), std=tuple(DIGITS["std"]))


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def assert_compiled_ncs2_bundle(bundle: Path, manifest: dict, summary: dict) -> None:
    """model/ and fallback/ each hold a blob the compiler wrote: header checked, hashed in the manifest, its
    stage count in the verdict, the manifest, the summary the CLI prints, and the zip."""
    assert manifest["target"]["name"] == "ncs2" and manifest["target"]["ready"] and manifest["target"]["proven"]
    stages = {}
    for key, folder in (("pruned", "model"), ("original", "fallback")):
        entry = manifest["models"][key]
        data = (bundle / folder / "model.blob").read_bytes()
        header = read_blob_header(data)
        stages[key] = header.stages
        assert entry["blob"] == f"{folder}/model.blob"
        assert entry["files"][f"{folder}/model.blob"] == hashlib.sha256(data).hexdigest()
        target = entry["target"]
        assert target["ready"] and target["proven"] and target["files"] == {f"{folder}/model.blob": "blob"}
        compiled = target["details"]["compiler"]
        assert compiled["compiled"] and compiled["stages"] == header.stages and compiled["blob_bytes"] == len(data)
        assert target["verdict"].startswith(f"compiled for NCS2 (Myriad X) by the {COMPILER}: ")
        assert target["verdict"].endswith(f", {header.stages} stages")
        assert entry["ncs2"]["compatible"] and entry["ncs2"]["stages"] == header.stages
        cross = target["details"]["cross_check_2021"]
        assert cross["ok"] and cross["max_abs_diff"] <= 1e-3 * max(1.0, cross["max_abs_reference"]), cross
    assert summary["target"] == "ncs2" and summary["target_ready"] and summary["ncs_compatible"]
    assert summary["ncs2_stages"] == stages["pruned"] and f"{stages['pruned']} stages" in summary["target_verdict"]
    assert summary["targets"]["ncs2"]["original"]["stages"] == stages["original"]
    with zipfile.ZipFile(bundle.parent / f"{bundle.name}.zip") as zf:
        names = set(zf.namelist())
    assert {f"{bundle.name}/model/model.blob", f"{bundle.name}/fallback/model.blob"} <= names


@needs_myriad
@pytest.mark.parametrize("name", ["vgg_digits", "cifar10", "resnet_shapes"])
def test_each_classification_sample_exports_with_blobs_compiled_by_the_myriad_compiler(name, tmp_path):
    loaded = load_model(f"sample:{name}")
    data = load_dataset(f"sample:{name}", loaded.spec.input)
    result = build_bundle(loaded.model, copy.deepcopy(loaded.model), loaded.spec, data.val, tmp_path / name,
                          {"step": 0}, latency_runs=2, with_zip=True)
    assert result.verified, result.verification.message
    assert_compiled_ncs2_bundle(tmp_path / name, result.manifest, result.summary)
    assert export_exit_code(result.to_dict()) == 0


@needs_myriad
def test_the_detection_sample_exports_with_blobs_through_the_same_builder(tmp_path, monkeypatch):
    import core.tasks.detection.export
    import core.export

    assert core.tasks.detection.export.build_into is core.export.build_into is build_into  # one builder for both tasks
    calls = []
    monkeypatch.setattr(core.tasks.detection.export, "build_into", lambda *a, **k: calls.append(a[1]) or build_into(*a, **k))
    model, entry = load_sample_detector("ssd_counting")
    spec = detection_spec(model, entry)
    data = load_voc_dataset("sample:counting", tuple(model.input_size))
    out = tmp_path / "ssd"
    result = build_detection_bundle(model, copy.deepcopy(model), spec, data.val, out, {"step": 0}, latency_runs=2)
    assert [type(task).__name__ for task in calls] == ["DetectionBundle"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["task"] == "detection" and result["verified"]
    assert_compiled_ncs2_bundle(out, manifest, result)
    assert set(manifest["files"]) == {"deploy.py", "selftest.npz", "README.txt", "anchors.npy", "postprocess.py"}
    fp16 = manifest["models"]["pruned"]["fp16_range"]  # the FP16 range is measured for detectors too
    assert fp16["n_images"] > 0 and not fp16["overflows"] and 0 < max(fp16["peaks"].values()) < 65504


def _atan_run(tmp_path: Path) -> Run:
    """A run (step 0) of a user's model with torch.atan in its forward, loaded from trusted model code."""
    code = tmp_path / "atan_net.py"
    code.write_text("import torch\nimport torch.nn as nn\n\n\nclass AtanNet(nn.Module):\n"
                    "    def __init__(self):\n        super().__init__()\n"
                    "        self.conv = nn.Conv2d(3, 8, 3, padding=1)\n        self.fc = nn.Linear(8, 10)\n\n"
                    "    def forward(self, x):\n        x = torch.atan(self.conv(x))\n"
                    "        return self.fc(x.mean((2, 3)))\n")
    from core.custom_code import build_from_code

    torch.manual_seed(0)
    weights = io.BytesIO()
    torch.save(build_from_code(code, "AtanNet", trusted=True).state_dict(), weights)
    loaded = load_model(weights.getvalue(), code_path=code, code_name="AtanNet", trusted=True, input_spec=DIGITS_SPEC)
    writer = RunWriter(workspace_root() / "runs" / "atan")
    writer.start({"data_source": "sample:vgg_digits", "data_options": {"val_fraction": 0.2, "seed": 0},
                  "prune": {"criterion": "l1", "cluster": 8}}, loaded, None)
    writer.add_step({"step": 0, "metric": 0.1, "macs": 1, "params": 1, "latency_ms": None}, None, [])
    writer.status("done", "finished")
    return Run(writer.dir)


@needs_myriad
def test_cli_export_of_a_model_the_ncs2_cannot_run_names_the_layer_and_exits_3(tmp_path):
    run = _atan_run(tmp_path)
    out = tmp_path / "bundle"
    cmd = [sys.executable, "-m", "core", "export", "--run", str(run.dir), "--step", "0", "--out", str(out)]
    res = subprocess.run(cmd + ["--json"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert res.returncode == 3, res.stderr
    result = json.loads(res.stdout)
    assert result["target"] == "ncs2" and result["target_ready"] is False and result["ncs_compatible"] is False
    pruned = result["targets"]["ncs2"]["pruned"]
    assert pruned["layer_type"] == "Atan" and pruned["proven"] and pruned["blob"] is None
    assert f'the {COMPILER} refuses layer "{pruned["layer"]}": unsupported layer type "Atan"' in result["target_verdict"]
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "not NCS2-ready" in errors[0] and '"Atan"' in errors[0], res.stderr
    assert "Traceback" not in res.stderr
    # the bundle (and its fallback) still ships, without a blob the compiler refused to write
    for folder in ("model", "fallback"):
        assert {p.name for p in (out / folder).iterdir()} == {"model.xml", "model.bin", "model.onnx"}
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["target"]["ready"] is False and "Atan" in manifest["models"]["original"]["target"]["verdict"]
    # text mode says the same (the refusal comes from the cache this time)
    text = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert text.returncode == 3, text.stderr
    assert 'ncs2 model/    NOT NCS2-ready: the OpenVINO 2021.4.2 MYRIAD compiler refuses layer' in text.stdout
    assert 'unsupported layer type "Atan"' in text.stdout


class Small(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv, self.bn, self.fc = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x))).mean((2, 3)))


def _small_bundle(tmp_path: Path, target: str | None = None):
    data = random_dataset(4, size=32)
    spec = ModelSpec(arch="small", num_classes=4, input=InputSpec(height=32, width=32, mean=(0.5,) * 3,
                                                                   std=(0.25,) * 3))
    return build_bundle(Small().eval(), Small().eval(), spec, data.val, tmp_path / "b", {"step": 1}, min_images=16,
                        latency_runs=2, target=target)


def test_a_second_target_exports_through_the_same_interface(tmp_path):
    result = _small_bundle(tmp_path, "openvino-cpu")
    m = result.manifest
    assert m["target"]["name"] == "openvino-cpu" and m["target"]["ir_precision"] == "FP32"
    assert m["target"]["ready"] and m["target"]["proven"] and "ncs2" not in m and set(m["targets"]) == {"openvino-cpu"}
    assert m["target"]["verdict"].startswith("runs on the OpenVINO") and "--device CPU" in m["target"]["deploy"]
    for folder in ("model", "fallback"):
        assert not (tmp_path / "b" / folder / "model.blob").exists()
        consts = [layer.find("data").get("element_type") for layer in
                  ET.parse(tmp_path / "b" / folder / "model.xml").getroot().iter("layer") if layer.get("type") == "Const"]
        assert "f16" not in consts and "f32" in consts  # FP32 weights, not compressed
    assert result.ncs2 is None and result.summary["ncs_compatible"] is None
    assert export_exit_code(result.to_dict()) == 0


def test_an_unknown_target_is_one_line(tmp_path, capsys):
    from core import cli
    from core.targets import get_target

    from core.errors import SettingsError
    with pytest.raises(SettingsError, match="Unknown export target 'ncs3'; choose one of: ncs2, openvino-cpu"):
        get_target("ncs3")
    with pytest.raises(SystemExit) as exc:
        cli.main(["export", "--run", str(tmp_path), "--out", str(tmp_path / "b"), "--target", "ncs3"])
    assert exc.value.code == 2 and "invalid choice: 'ncs3'" in capsys.readouterr().err


def test_without_the_compiler_the_verdict_is_static_only_and_never_a_bare_compatible(tmp_path, monkeypatch):
    monkeypatch.setenv("PRUNESCOPE_MYRIAD_VENV", str(tmp_path / "absent"))
    result = _small_bundle(tmp_path)
    target = result.manifest["target"]
    assert target["name"] == "ncs2" and target["proven"] is False and target["ready"] is True
    assert STATIC_ONLY in target["verdict"] and target["verdict"].startswith("NCS2 static check passed")
    assert STATIC_ONLY in (tmp_path / "b" / "README.txt").read_text()
    assert not list((tmp_path / "b").rglob("*.blob"))
    cross = result.manifest["models"]["pruned"]["target"]["details"]["cross_check_2021"]
    assert cross["ok"] is None and "not run on OpenVINO 2021.4 CPU" in cross["message"]


@needs_myriad
def test_deploy_imports_the_blob_on_myriad_and_compiles_the_ir_when_asked(tmp_path):
    """No stick here: a stand-in Core records what deploy.py hands to import_model (must be the blob's bytes) and
    runs the bundle's IR on the CPU for the self-test, so the rest of deploy.load runs as on the device."""
    result = _small_bundle(tmp_path)
    bundle = tmp_path / "b"
    spec = importlib.util.spec_from_file_location("deploy_blob_test", bundle / "deploy.py")
    deploy = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(deploy)
    real = deploy._core()
    calls = []

    class StandIn:
        def import_model(self, data, device):
            calls.append(("import", device, hashlib.sha256(data).hexdigest()))
            return real.compile_model(real.read_model(str(bundle / "model" / "model.xml")), "CPU")

        def read_model(self, path):
            calls.append(("read", path))
            return real.read_model(path)

        def compile_model(self, model, device):
            calls.append(("compile", device))
            return real.compile_model(model, "CPU")

    deploy._core = StandIn
    compiled, which, reason = deploy.load(str(bundle), "MYRIAD")
    assert which == "pruned" and calls == [("import", "MYRIAD", sha256(bundle / "model" / "model.blob"))]
    assert reason.startswith("files match manifest.json, imported model/model.blob for MYRIAD")
    calls.clear()
    deploy.load(str(bundle), "MYRIAD", "ir")
    assert [c[0] for c in calls] == ["read", "compile"]
    # an altered blob is caught by its sha256 before anything is imported: the fallback is used
    (bundle / "model" / "model.blob").write_bytes(b"\x7felf" + bytes(100))
    calls.clear()
    _, which, reason = deploy.load(str(bundle), "MYRIAD")
    assert which == "fallback" and "model/model.blob was altered" in reason
    assert calls[0] == ("import", "MYRIAD", sha256(bundle / "fallback" / "model.blob"))
    assert result.manifest["models"]["original"]["blob"] == "fallback/model.blob"
    assert (bundle / "deploy.py").read_text() == TEMPLATE.read_text()


class GroupNormed(Small):
    """GroupNorm exports as MVN-6, which the static 2022.3 table rejects; the MYRIAD compiler compiles it."""

    def forward(self, x):
        return self.fc(torch.relu(nn.functional.group_norm(self.conv(x), 4)).mean((2, 3)))


@needs_myriad
def test_where_the_static_table_and_the_compiler_disagree_the_compiler_decides_and_it_is_shown(tmp_path):
    data = random_dataset(4, size=32)
    spec = ModelSpec(arch="gn", num_classes=4, input=InputSpec(height=32, width=32, mean=(0.5,) * 3, std=(0.25,) * 3))
    result = build_bundle(GroupNormed().eval(), GroupNormed().eval(), spec, data.val, tmp_path / "b", {"step": 1},
                          min_images=16, latency_runs=2)
    static = result.ncs2  # the static report still explains: MVN-6 is the op it refuses
    assert not static.compatible and any(p.type == "MVN" for p in static.problems)
    target = result.target
    assert target.ready and target.proven and target.verdict.startswith("compiled for NCS2 (Myriad X)")
    assert target.details["disagreement"].startswith("the static check (OpenVINO 2022.3 table, of the IR) found")
    assert target.details["disagreement"].endswith("the MYRIAD compiler compiled the model; the compiler decides")
    assert result.manifest["ncs2"]["compatible"] is True and result.manifest["ncs2"]["static_compatible"] is False
    assert result.summary["targets"]["ncs2"]["pruned"]["disagreement"] == target.details["disagreement"]
    assert export_exit_code(result.to_dict()) == 0
