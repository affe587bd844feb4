"""A pruning job's ETA is the running part's, at the rate measured in that part (issue 16)."""
from __future__ import annotations

import threading
import time

import pytest

from core.jobs import JobRegistry, run_progress


def test_eta_follows_the_running_part_not_the_whole_run():
    reg = JobRegistry()
    release = threading.Event()

    def fn(ctx):
        cb = run_progress(ctx, total=5)
        # a slow part first (whose average would inflate a whole-job ETA), then a fast one at a known rate
        cb.progress(0.0, "analysing", "analysing", 0.0)
        time.sleep(0.6)
        cb.progress(1.0, "analysed", "analysing", 1.0)
        cb.enter("step", 1)
        for i in range(1, 6):  # 0.05 s per 10 % of "step 1: scoring"
            time.sleep(0.05)
            cb.progress(0.5 * i / 10, f"scoring {i}", "scoring", i / 10)
        release.wait(10)

    job = reg.start("prune", fn)
    end = time.time() + 10
    while time.time() < end and not ((p := job.snapshot().part or {}).get("phase") == "step 1: scoring"
                                     and p["fraction"] >= 0.5):
        time.sleep(0.01)
    snap = job.snapshot()
    assert snap.part["phase"] == "step 1: scoring" and snap.part["fraction"] == pytest.approx(0.5)
    assert snap.part["phase_elapsed_s"] >= 0.2
    # half the part left at 0.1 s per 20 %: about 0.25 s (a whole-job extrapolation would say seconds)
    assert snap.eta is not None and snap.eta < 0.6
    assert 0.2 < snap.progress < 0.4, "the overall bar still counts steps"
    release.set()
    assert job.wait(10)
    assert job.snapshot().part is None
