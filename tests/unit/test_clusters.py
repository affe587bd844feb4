"""Hardware cluster sizes: named profiles, CPU detection, and the latency staircase probe."""
from __future__ import annotations

import json

import numpy as np
import pytest

from core.clusters import (PROFILES, cluster_size, detect_cpu_profile, fit_staircase, get_profile,
                           latency_staircase)
from core.errors import SettingsError


def test_profiles():
    assert cluster_size("ncs2") == 8 and cluster_size("MYRIAD") == 8
    assert "SHAVE" in PROFILES["ncs2"].description and "8 FP16 lanes" in PROFILES["ncs2"].description
    assert cluster_size("cpu-avx2") == 8
    assert cluster_size("cpu-avx512") == 16
    assert cluster_size("none") == 1
    assert all(p.description and p.cluster >= 1 for p in PROFILES.values())
    assert get_profile(" NCS2 ").name == "ncs2"
    with pytest.raises(SettingsError):
        cluster_size("tpu-v9")


def test_detect_cpu_profile():
    d = detect_cpu_profile()
    assert d.profile in PROFILES and d.cluster == PROFILES[d.profile].cluster
    assert d.reason
    json.dumps(d.to_dict())


CHANNELS = list(range(8, 129, 4))


@pytest.mark.parametrize("width", [8, 16, 32])
def test_fit_finds_staircase_width(width):
    rng = np.random.default_rng(width)
    lat = [0.2 + 0.01 * np.ceil(c / width) * width + rng.normal(0, 0.003) for c in CHANNELS]
    best, scores, confidence = fit_staircase(CHANNELS, lat)
    assert best == width and scores[width] <= 0.35 and 0 < confidence <= 1


def test_fit_smooth_latency_has_no_staircase():
    best, scores, _ = fit_staircase(CHANNELS, [0.2 + 0.01 * c for c in CHANNELS])
    assert best == 4  # the sampling step: no plateau wider than it
    assert all(v > 0.35 for v in scores.values())


def test_fit_ignores_one_odd_kernel_switch():
    lat = [0.2 + 0.01 * np.ceil(c / 16) * 16 for c in CHANNELS]
    lat[CHANNELS.index(60)] += 0.3  # a different convolution algorithm picked at one width
    assert fit_staircase(CHANNELS, lat)[0] == 16


def test_latency_staircase_probe_runs_and_is_sane():
    r = latency_staircase(channel_counts=range(8, 105, 4), runs=15)
    assert r.channels == list(range(8, 105, 4))
    assert len(r.latency_ms) == len(r.channels) == len(r.latency_p25_ms) == len(r.latency_p75_ms)
    assert all(v > 0 for v in r.latency_ms)
    assert all(lo <= m <= hi for lo, m, hi in zip(r.latency_p25_ms, r.latency_ms, r.latency_p75_ms))
    assert r.latency_ms[-1] > r.latency_ms[0]  # 104 output channels cost more than 8
    assert r.cluster in (4, 8, 16, 32)
    assert "3x3 convolution" in r.method and str(r.cluster) in r.method
    json.dumps(r.to_dict())
    with pytest.raises(SettingsError):
        latency_staircase(channel_counts=[8, 16])
