"""deploy.py in a bundle: happy path, and every reason to fall back to the original model.

Each scenario runs the bundle's own deploy.py with the venv's Python from inside the bundle folder,
as an engineer on the device would.
"""
from __future__ import annotations

import ast
import hashlib
import importlib.util
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.tasks.test_export import CLASSES, shared_bundle, toy_setup

TEMPLATE = Path(__file__).resolve().parents[2] / "core" / "deploy_template.py"


@pytest.fixture
def bundle(tmp_path) -> Path:
    """A private copy of the session's bundle, free to damage."""
    src, _ = shared_bundle()
    dst = tmp_path / "bundle"
    shutil.copytree(src, dst)
    return dst


def run_deploy(bundle: Path, *args: str) -> tuple[int, dict]:
    proc = subprocess.run([sys.executable, "deploy.py", "--json", *args], cwd=bundle, capture_output=True, text=True,
                          timeout=120)
    assert proc.stdout.strip(), proc.stderr
    return proc.returncode, json.loads(proc.stdout.strip().splitlines()[-1])


def rehash(bundle: Path, rel: str) -> None:
    """Write the current sha256 of ``rel`` into manifest.json, as if the damage had been done on purpose."""
    manifest = json.loads((bundle / "manifest.json").read_text())
    digest = hashlib.sha256((bundle / rel).read_bytes()).hexdigest()
    for entry in manifest["models"].values():
        if rel in entry["files"]:
            entry["files"][rel] = digest
    (bundle / "manifest.json").write_text(json.dumps(manifest))


def test_happy_path_uses_pruned_model_and_classifies_an_image(bundle):
    from PIL import Image

    _, _, _, val = toy_setup()
    i = int(np.flatnonzero(val.labels.numpy() == 2)[0])
    Image.fromarray(val.images[i].permute(1, 2, 0).numpy()).save(bundle / "probe.png")
    rc, out = run_deploy(bundle, "--image", "probe.png")
    assert rc == 0
    assert out["which"] == "pruned"
    assert "self-test" in out["reason"] and "within tolerance" in out["reason"]
    [res] = out["results"]
    assert res["top"][0]["class"] in CLASSES and abs(sum(t["probability"] for t in res["top"]) - 1) < 1e-3
    proc = subprocess.run([sys.executable, "deploy.py"], cwd=bundle, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "Using the pruned model (model/) on CPU" in proc.stdout


def test_missing_file_falls_back(bundle):
    (bundle / "model" / "model.bin").unlink()
    rc, out = run_deploy(bundle)
    assert rc == 0 and out["which"] == "fallback"
    assert "model/model.bin is missing" in out["reason"]


def test_altered_file_falls_back(bundle):
    with open(bundle / "model" / "model.onnx", "ab") as f:
        f.write(b"\0")
    rc, out = run_deploy(bundle)
    assert rc == 0 and out["which"] == "fallback"
    assert "model/model.onnx was altered" in out["reason"] and "sha256" in out["reason"]


def test_compile_failure_falls_back(bundle):
    xml = bundle / "model" / "model.xml"
    xml.write_text(xml.read_text().replace('type="Convolution"', 'type="NoSuchOperation"', 1))
    rehash(bundle, "model/model.xml")  # the hash matches: only loading can find the damage
    rc, out = run_deploy(bundle)
    assert rc == 0 and out["which"] == "fallback"
    assert "failed to load/compile on CPU" in out["reason"]


def _negate_f16_weights(bundle: Path, folder: str) -> None:
    """Flip the sign of every FP16 constant in the .bin (the weights), leaving shape constants intact."""
    xml = (bundle / folder / "model.xml").read_text()
    data = bytearray((bundle / folder / "model.bin").read_bytes())
    for offset, size in re.findall(r'element_type="f16" shape="[^"]*" offset="(\d+)" size="(\d+)"', xml):
        for pos in range(int(offset) + 1, int(offset) + int(size), 2):  # little-endian: sign bit in the high byte
            data[pos] ^= 0x80
    (bundle / folder / "model.bin").write_bytes(bytes(data))
    rehash(bundle, f"{folder}/model.bin")


def test_failed_selftest_falls_back(bundle):
    _negate_f16_weights(bundle, "model")
    rc, out = run_deploy(bundle)
    assert rc == 0 and out["which"] == "fallback"
    assert "failed the self-test" in out["reason"]


def test_nothing_usable_exits_with_error(bundle):
    (bundle / "model" / "model.xml").unlink()
    _negate_f16_weights(bundle, "fallback")
    rc, out = run_deploy(bundle)
    assert rc == 2 and out["which"] is None
    assert "model/model.xml is missing" in out["reason"] and "fallback model failed the self-test" in out["reason"]


def test_load_and_predict_in_process(bundle):
    spec = importlib.util.spec_from_file_location("bundle_deploy", bundle / "deploy.py")
    deploy = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(deploy)
    compiled, which, reason = deploy.load(str(bundle), "CPU")
    assert which == "pruned" and compiled is not None
    model, pruned, tspec, val = toy_setup()
    logits = deploy.predict(val.images[:16].numpy())  # uint8 NCHW
    nhwc = deploy.predict(val.images[:16].permute(0, 2, 3, 1).numpy())  # uint8 NHWC
    import torch

    from core.data import normalize

    with torch.no_grad():
        ref = pruned(normalize(val.images[:16], tspec.input)).numpy()
    assert logits.shape == (16, 4) and np.allclose(logits, nhwc)
    assert (logits.argmax(1) == ref.argmax(1)).mean() >= 15 / 16
    with pytest.raises(ValueError):
        deploy.predict(np.zeros((1, 3, 8, 8), np.uint8))


def _imports(src: str) -> set[str]:
    tree = ast.parse(src, feature_version=(3, 7))  # OpenVINO 2022.3 runs on Python 3.7-3.10
    modules = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            modules |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            modules.add((node.module or "").split(".")[0])
    return modules


def test_template_needs_only_openvino_numpy_and_old_python():
    from core.tasks.detection import postprocess as postprocess_module

    src = TEMPLATE.read_text()
    modules = _imports(src)
    # postprocess: the detection bundle's own decoder, shipped beside deploy.py (numpy only, below).
    assert modules <= {"__future__", "argparse", "hashlib", "json", "os", "sys", "numpy", "openvino", "PIL",
                       "postprocess"}
    assert _imports(Path(postprocess_module.__file__).read_text()) <= {"__future__", "math", "typing", "numpy"}
    bundle_dir, _ = shared_bundle()
    assert (bundle_dir / "deploy.py").read_text() == src


def test_missing_manifest_is_reported_not_a_traceback(bundle):
    (bundle / "manifest.json").unlink()
    rc, out = run_deploy(bundle)
    assert rc == 2 and out["which"] is None and "manifest.json" in out["reason"]


def test_bundle_reads_16_bit_images_as_the_tool_did(tmp_path):
    """deploy.py scales 16-bit grey images by their real range, like core.preprocess (never clips at 255)."""
    from PIL import Image

    from core.data import image_to_array
    from core.models import InputSpec

    spec = importlib.util.spec_from_file_location("deploy_template_mod", TEMPLATE)
    deploy = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(deploy)
    rng = np.random.default_rng(0)
    eight = rng.integers(0, 256, (16, 16)).astype(np.uint8)
    Image.fromarray(eight, mode="L").save(tmp_path / "8.png")
    Image.fromarray(eight.astype(np.uint16) * 257).save(tmp_path / "16.png")  # the same picture in 16 bits
    assert Image.open(tmp_path / "16.png").mode.startswith("I")
    for channels in (1, 3):
        manifest = {"input": {"input_shape": [1, channels, 16, 16]}}
        a8 = deploy.load_image(str(tmp_path / "8.png"), manifest)
        a16 = deploy.load_image(str(tmp_path / "16.png"), manifest)
        assert np.array_equal(a8, a16)
        tool = image_to_array(Image.open(tmp_path / "16.png"), InputSpec(height=16, width=16, channels=channels,
                                                                         mean=(0.5,) * channels, std=(0.5,) * channels))
        assert a16.shape == tool.shape and np.array_equal(a16, tool)
