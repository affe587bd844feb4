"""Detection through the CLI: prune, export (IR verified by mAP, NCS2 check, deploy self-test, hashes)."""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _cli(*args: str, cwd=ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "core", *args], cwd=cwd, capture_output=True, text=True, timeout=600,
                          env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    root = tmp_path_factory.mktemp("detcli")
    run, out = root / "run", root / "bundle"
    pruned = _cli("prune", "--task", "detection", "--model", "sample:ssd_counting", "--data", "sample:counting",
                  "--out", str(run), "--criterion", "l1", "--score-images", "32", "--map-images", "64",
                  "--finetune-steps", "3", "--max-steps", "1", "--max-drop", "5", "--no-latency", "--json")
    exported = _cli("export", "--run", str(run), "--out", str(out), "--json")
    return pruned, exported, out


def test_cli_prune_and_export_detection_exit_zero(bundle):
    pruned, exported, _ = bundle
    assert pruned.returncode == 0, pruned.stderr
    summary = json.loads(pruned.stdout)
    assert summary["steps"] == 1 and summary["final_macs"] < summary["baseline_macs"]
    assert exported.returncode == 0, exported.stderr


def test_export_is_verified_by_map_and_ncs2_compatible(bundle):
    _, exported, out = bundle
    result = json.loads(exported.stdout)
    assert result["verified"] and result["ncs_compatible"] and result["step"] == 1
    v = result["verification"]
    assert v["n_images"] == 300 and abs(v["map_torch"] - v["map_openvino"]) * 100 <= 0.5
    import openvino as ov

    compiled = ov.Core().compile_model(str(out / "model" / "model.xml"), "CPU")
    manifest = json.loads((out / "manifest.json").read_text())
    assert list(compiled.output(0).get_shape()) == manifest["output"]["shape"] == [1, 1344, 4 + 4]
    assert manifest["task"] == "detection" and manifest["postprocess"]["num_anchors"] == 1344


def test_manifest_hashes_match_every_file(bundle):
    _, _, out = bundle
    manifest = json.loads((out / "manifest.json").read_text())
    listed = dict(manifest["files"])
    for entry in manifest["models"].values():
        listed.update(entry["files"])
    on_disk = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()} - {"manifest.json"}
    assert set(listed) == on_disk
    for rel, digest in listed.items():
        assert hashlib.sha256((out / rel).read_bytes()).hexdigest() == digest, rel


def test_deploy_self_test_passes_and_prints_detections(bundle, tmp_path):
    _, _, out = bundle
    res = subprocess.run([sys.executable, "deploy.py", "--json"], cwd=out, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    info = json.loads(res.stdout)
    assert info["which"] == "pruned" and "self-test inputs within tolerance" in info["reason"]
    import numpy as np
    from PIL import Image

    from core.tasks.detection.sample import make_sample_scenes

    images, boxes, labels = make_sample_scenes("counting", "val", 1)
    Image.fromarray(images[0]).save(tmp_path / "scene.png")
    res = subprocess.run([sys.executable, "deploy.py", "--json", "--image", str(tmp_path / "scene.png"), "--score", "0.5"],
                         cwd=out, capture_output=True, text=True, timeout=300)
    dets = json.loads(res.stdout)["results"][0]["detections"]
    assert len(dets) >= len(boxes[0])
    best = np.asarray(dets[0]["box_normalised"])
    assert np.abs(boxes[0] - best).max(axis=1).min() < 0.05  # the top detection lies on a real object


def test_bad_voc_zip_is_a_one_line_error(tmp_path):
    bad = tmp_path / "broken.zip"
    bad.write_bytes(b"PK\x03\x04 not really a zip")
    res = _cli("prune", "--task", "detection", "--model", "sample:ssd_counting", "--data", str(bad),
               "--out", str(tmp_path / "run"))
    assert res.returncode == 2
    assert res.stderr.strip().startswith("error:") and "Traceback" not in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
