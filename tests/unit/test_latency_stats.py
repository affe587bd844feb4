"""Latency with its spread, a paired significance test, and per-layer timing from OpenVINO's counters."""
from __future__ import annotations

import numpy as np
import pytest

from core.architectures import SampleVGG
from core.ov_runtime import latency_difference, latency_stats, layer_timings, to_openvino


def test_median_iqr_and_fps():
    s = latency_stats([1.0, 2.0, 3.0, 4.0, 5.0])
    assert (s.median_ms, s.q1_ms, s.q3_ms, s.iqr_ms) == (3.0, 2.0, 4.0, 2.0)
    assert s.fps == pytest.approx(1000 / 3)
    assert "IQR" in s.label() and "FPS" in s.label()


def test_paired_difference_is_significant_only_beyond_the_noise():
    rng = np.random.default_rng(0)
    drift = rng.uniform(0.5, 3.0, 60)  # the machine's noise, shared by both models round by round
    a = 1.0 + drift + rng.normal(0, 0.01, 60)
    slower = latency_difference(a, 1.1 + drift + rng.normal(0, 0.01, 60))
    same = latency_difference(a, 1.0 + drift + rng.normal(0, 0.01, 60))
    assert slower["significant"] and slower["ratio"] > 1.0
    assert not same["significant"]
    assert not latency_difference([1.0] * 10, [1.0] * 10)["significant"]


def test_layer_timings_name_the_convolutions(one_thread):
    rows = layer_timings(to_openvino(SampleVGG().eval(), (1, 3, 32, 32)), (1, 3, 32, 32), runs=3, threads=1)
    assert rows and all(r["median_ms"] >= 0 for r in rows)
    assert sum(r["type"] == "Convolution" for r in rows) == 6
    assert [r["median_ms"] for r in rows] == sorted((r["median_ms"] for r in rows), reverse=True)
