"""Issue 4's headline: the sample ResNet, pruned in a run, exported as a verified NCS2-ready bundle."""
from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import openvino as ov
import pytest

from core.sources import load_dataset
from core.export import sha256_file
from core.models import load_model
from core.prune import PruneConfig, run_pruning
from core.runs import Run
from tests.helpers import CLASSIC_LOOP

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def resnet_run(tmp_path_factory):
    loaded = load_model("sample:resnet_shapes")
    data = load_dataset("sample:resnet_shapes", loaded.spec.input)
    out = tmp_path_factory.mktemp("run") / "resnet"
    config = PruneConfig(criterion="l1", cluster=8, max_drop=2.0, finetune_steps=10, max_steps=2, latency=False,
                         analyse_car=False, score_images=100, **CLASSIC_LOOP)
    run_pruning(loaded, data, config, out, data_source="sample:resnet_shapes")
    run = Run(out)
    assert len(run.history) >= 2, "the run pruned at least one cluster"
    return run


def test_cli_export_of_pruned_resnet(resnet_run, tmp_path):
    bundle = tmp_path / "bundle"
    res = subprocess.run([sys.executable, "-m", "core", "export", "--run", str(resnet_run.dir), "--max-drop", "2.0",
                          "--out", str(bundle), "--json"], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["step"] >= 1
    assert out["ncs_compatible"] is True, out["ncs2_problems"]
    assert out["verified"] is True and out["agreement"] >= 0.99
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["max_drop"] == 2.0 and manifest["step"] == out["step"]
    # The IR of the pruned step loads in OpenVINO and really is the smaller model.
    core = ov.Core()
    pruned_ir = core.read_model(str(bundle / "model" / "model.xml"))
    fallback_ir = core.read_model(str(bundle / "fallback" / "model.xml"))
    assert pruned_ir.input(0).get_shape() == [1, 3, 32, 32]
    assert (bundle / "model" / "model.bin").stat().st_size < (bundle / "fallback" / "model.bin").stat().st_size
    assert fallback_ir is not None
    # Every file listed in the manifest has the recorded hash.
    hashed = _hashes(manifest)
    assert hashed, "the manifest lists file hashes"
    for rel, digest in hashed.items():
        assert sha256_file(bundle / rel) == digest, rel
    # deploy.py's self-test passes on the pruned model.
    dep = subprocess.run([sys.executable, "deploy.py", "--json"], cwd=bundle, capture_output=True, text=True, timeout=300)
    assert dep.returncode == 0, dep.stderr
    assert json.loads(dep.stdout.strip().splitlines()[-1])["which"] == "pruned"
    with zipfile.ZipFile(out["zip"]) as zf:
        names = zf.namelist()
    assert any(n.endswith("fallback/model.xml") for n in names) and any(n.endswith("model/model.xml") for n in names)


def _hashes(manifest: dict) -> dict[str, str]:
    found: dict[str, str] = {}

    def walk(node, prefix=""):
        if isinstance(node, dict):
            for k, v in node.items():
                if isinstance(v, str) and len(v) == 64 and all(c in "0123456789abcdef" for c in v) and "." in k:
                    found[k] = v
                else:
                    walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(manifest)
    return found


def test_export_refuses_unknown_step(resnet_run, tmp_path):
    res = subprocess.run([sys.executable, "-m", "core", "export", "--run", str(resnet_run.dir), "--step", "99",
                          "--out", str(tmp_path / "b")], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 2 and "no step 99" in res.stderr
    assert not (tmp_path / "b").exists()


def test_an_explicit_step_is_never_overridden_by_the_threshold(resnet_run):
    from core.export import ExportError, pick_step

    pick = resnet_run.select_step(100.0)
    assert pick != 0
    assert pick_step(resnet_run, None, 100.0)[0] == pick
    step, record = pick_step(resnet_run, 0, 100.0)
    assert step == 0 and record == resnet_run.record(0)
    assert pick_step(resnet_run, None, None)[0] == resnet_run.history[-1]["step"]
    with pytest.raises(ExportError, match="between 0 and 100"):
        pick_step(resnet_run, 0, 101.0)
