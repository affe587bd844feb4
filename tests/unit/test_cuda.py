"""The GPU path for real (skipped without CUDA; run on a GPU machine): CAR, pruning and the recovery
fine-tune run on the GPU and agree with the CPU, and ``prune --recover-epochs`` recovers where it pruned.

Without a GPU only the refusal is testable (``test_device.py``); these tests are what a GPU machine adds.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from core.car import compute_car
from core.models import load_model
from core.runs import Run
from core.sources import load_dataset

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine")
ROOT = Path(__file__).resolve().parents[2]


def test_exact_car_on_the_gpu_equals_the_cpu():
    loaded = load_model("sample:vgg_digits")
    data = load_dataset("sample:vgg_digits", loaded.spec.input)
    cpu = compute_car(loaded.model, loaded.spec.input, data.val, n_images=200, method="exact", device="cpu")
    gpu = compute_car(loaded.model, loaded.spec.input, data.val, n_images=200, method="exact", device="cuda")
    assert next(loaded.model.parameters()).device.type == "cpu", "the model is back on the CPU afterwards"
    assert gpu.baseline_accuracy == pytest.approx(cpu.baseline_accuracy, abs=1 / 200)
    for gid, values in cpu.car.items():  # float order may flip an image whose margin is ~0: one image at most
        assert np.allclose(gpu.car[gid], values, atol=1 / 200 + 1e-6), gid


def test_prune_and_recover_on_the_gpu(tmp_path):
    out = tmp_path / "run"
    res = subprocess.run(
        [sys.executable, "-m", "core", "prune", "--model", "sample:vgg_digits", "--data", "sample:vgg_digits",
         "--test-fraction", "0.5", "--max-steps", "2", "--finetune-steps", "5", "--max-drop", "100",
         "--score-images", "64", "--no-latency", "--device", "cuda", "--recover-epochs", "1", "--out", str(out),
         "--json"], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr
    assert "device: GPU" in res.stderr
    summary = json.loads(res.stdout)
    run = Run(out)
    assert summary["steps"] >= 1 and run.record(1)["widths"] != run.record(0)["widths"], "channels were removed"
    recovered = run.history[-1]
    assert recovered.get("recovered_from") is not None, summary
    assert recovered["recovery"]["device"].startswith("cuda"), "the recovery trains where the run pruned"
    model = run.rebuild_step(recovered["step"]).eval()
    assert model(torch.zeros(1, *run.spec.input.shape(1)[1:])).shape == (1, run.spec.num_classes)
