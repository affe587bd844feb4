"""The CLI: evaluate reproduces the samples' manifest accuracy; bad input is one line, no traceback."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from core.models import sample_entry

ROOT = Path(__file__).resolve().parents[2]


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "core", *args], cwd=ROOT, capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("name", ["vgg_digits", "resnet_shapes"])
def test_evaluate_sample_reproduces_manifest(name):
    res = _cli("evaluate", "--model", f"sample:{name}", "--data", f"sample:{name}", "--json")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["accuracy"] >= 0.95
    assert abs(out["accuracy"] - sample_entry(name)["accuracy"]) <= 0.01
    assert set(out["per_class"]) == set(sample_entry(name)["class_names"])
    assert out["macs"] > 0 and out["params"] > 0 and out["latency_ms"] > 0


def test_bad_model_file_is_one_line_error(tmp_path):
    bad = tmp_path / "junk.pt"
    bad.write_bytes(b"\x00garbage" * 100)
    res = _cli("evaluate", "--model", str(bad), "--arch", "resnet18", "--data", "sample:vgg_digits", "--json")
    assert res.returncode == 2
    assert res.stderr.strip().startswith("error:") and "Traceback" not in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1


def test_class_mismatch_is_reported(tmp_path):
    res = _cli("evaluate", "--model", "sample:vgg_digits", "--data", "sample:resnet_shapes", "--no-latency")
    assert res.returncode == 2
    assert "8 classes but the model outputs 10" in res.stderr


def test_missing_data_path():
    res = _cli("evaluate", "--model", "sample:vgg_digits", "--data", "/nonexistent/data.zip")
    assert res.returncode == 2 and "not found" in res.stderr


def test_a_prune_that_keeps_no_step_says_why_and_what_to_change(tmp_path):
    """Issue 27: a finished run without a kept step gives the CLI user the advice Review gives, in flags."""
    res = _cli("prune", "--model", "sample:vgg_digits", "--data", "sample:vgg_digits", "--out", str(tmp_path / "r"),
               "--criterion", "l1", "--max-drop", "0", "--max-steps", "1", "--finetune-steps", "0",
               "--clusters-per-step", "1", "--step-macs", "0", "--recover-epochs", "0", "--no-control",
               "--no-latency", "--no-analysis", "--json")
    assert res.returncode == 0, res.stderr
    assert "The run finished without keeping a pruning step: it stopped because" in res.stderr
    assert "The closest candidate," in res.stderr and "the acceptable drop is 0 points" in res.stderr
    assert "(--max-drop)" in res.stderr and "--recover-epochs 2" in res.stderr
    assert json.loads(res.stdout)["steps"] == 0
