"""``--json`` output is exactly one strict JSON object on stdout for evaluate, analyse, prune and export, on a
degenerate data set (a class with a single image, hence none in validation), and for a refused input too;
the undefined per-class accuracy is ``null`` and the data set's warning goes to stderr (issue 13 item 11,
issue 15 item 6)."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from core.architectures import SampleVGG
from core.sources import load_dataset
from core.jsonout import dumps, strict
from core.models import InputSpec

ROOT = Path(__file__).resolve().parents[2]


def _reject(constant: str):
    raise ValueError(f"non-strict JSON constant {constant}")


def strict_loads(text: str):
    """The whole of ``text`` must be one JSON object, with no NaN/Infinity."""
    obj = json.loads(text, parse_constant=_reject)
    assert isinstance(obj, dict)
    return obj


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "core", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=900)


@pytest.fixture(scope="module")
def degenerate(tmp_path_factory):
    """Three classes of 16×16 images; 'lonely' has one image, so validation never sees it."""
    root = tmp_path_factory.mktemp("degenerate")
    rng = np.random.default_rng(0)
    data = root / "data"
    for cls, n in (("a", 12), ("b", 12), ("lonely", 1)):
        (data / cls).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(data / cls / f"{i}.png")
    torch.manual_seed(0)
    weights = root / "vgg.pt"
    torch.save(SampleVGG(num_classes=3).state_dict(), weights)
    return root, data, weights


def test_strict_replaces_non_finite_numbers():
    assert strict({"a": float("nan"), "b": [float("inf"), np.float32(0.5)], "c": np.int64(3)}) == \
        {"a": None, "b": [None, 0.5], "c": 3}
    assert strict_loads(dumps({"x": math.nan}))["x"] is None


def test_single_image_class_is_warned_about(degenerate):
    _, data, _ = degenerate
    ds = load_dataset(data, InputSpec(height=16, width=16))
    assert any("no selection image" in w and "lonely (1 image)" in w for w in ds.report.warnings)


def test_every_command_prints_one_strict_json_object(degenerate, tmp_path):
    root, data, weights = degenerate
    model = ["--model", str(weights), "--arch", "sample_vgg", "--data", str(data), "--input-size", "16", "16"]

    ev = _cli("evaluate", *model, "--no-latency", "--json")
    assert ev.returncode == 0, ev.stderr
    result = strict_loads(ev.stdout)
    assert result["per_class"]["lonely"] is None and "no selection image" in ev.stderr

    an = _cli("analyse", *model, "--images", "16", "--out", str(tmp_path / "an"), "--json")
    assert an.returncode == 0, an.stderr
    assert strict_loads(an.stdout)["filters"] > 0

    pr = _cli("prune", *model, "--out", str(tmp_path / "run"), "--criterion", "l1", "--cluster", "4",
              "--max-drop", "100", "--max-steps", "1", "--finetune-steps", "1", "--score-images", "10",
              "--no-latency", "--no-analysis", "--json")
    assert pr.returncode == 0, pr.stderr
    assert strict_loads(pr.stdout)["steps"] >= 1

    ex = _cli("export", "--run", str(tmp_path / "run"), "--out", str(tmp_path / "bundle"), "--json")
    assert ex.returncode in (0, 3), ex.stderr  # 3: the bundle is not NCS2-ready (still one JSON object)
    assert "bundle" in strict_loads(ex.stdout)


def test_a_refused_input_is_one_json_object_too(tmp_path):
    res = _cli("evaluate", "--model", str(tmp_path / "missing.pt"), "--arch", "resnet18", "--data",
               "sample:vgg_digits", "--json")
    assert res.returncode == 2 and "Traceback" not in res.stderr
    out = strict_loads(res.stdout)
    assert out["exit_code"] == 2 and "not found" in out["error"]
