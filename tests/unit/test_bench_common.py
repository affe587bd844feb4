"""The helpers the benchmark scripts share (``bench/_common.py``): the prune-result table, the run line,
and the skip of a bench whose real data is absent."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("bench_common", ROOT / "bench" / "_common.py")
common = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(common)

BASE = {"baseline_macs": 26.66e6, "baseline_metric": 0.9712, "final_macs": 4.26e6, "final_metric": 0.9655,
        "steps": 12, "reason": "threshold"}


def test_result_rows_compare_every_run_with_the_original():
    summaries = {"c8": BASE, "c1": {**BASE, "final_macs": 13.33e6, "final_metric": 0.9612}}
    rows = common.result_rows(BASE, summaries, {"original": 0.4, "c8": 0.1, "c1": 0.3}, "accuracy_%")
    assert [r["model"] for r in rows] == ["original", "c8", "c1"]
    assert rows[0] == {"model": "original", "cluster": "-", "MACs_M": "26.66", "MAC_ratio": "1.00x",
                       "accuracy_%": "97.12", "drop_pts": "0.00", "latency_ms": "0.400", "latency_ratio": "1.00"}
    assert rows[2] == {"model": "c1", "cluster": "1", "MACs_M": "13.33", "MAC_ratio": "2.00x", "accuracy_%": "96.12",
                       "drop_pts": "1.00", "latency_ms": "0.300", "latency_ratio": "0.75"}
    assert rows[1]["MAC_ratio"] == "6.26x" and rows[1]["drop_pts"] == "0.57"


def test_summary_line_names_the_metric_and_its_unit():
    assert common.summary_line("c8", BASE, "accuracy", "%", 61.6) == (
        "c8: 12 steps, MACs 26.66 M -> 4.26 M, accuracy 97.12% -> 96.55% (threshold; 62 s)")
    assert common.summary_line("c8", BASE, "mAP", "", 3) == "c8: 12 steps, MACs 26.66 M -> 4.26 M, mAP 97.12 -> 96.55 (threshold; 3 s)"


@pytest.fixture
def threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_a_bench_without_its_real_data_skips_with_one_line(tmp_path, capsys, threads):
    ap = common.parser("A bench.\n\nMore.")
    ap.add_argument("--threads", type=int, default=1)
    assert ap.description == "A bench."
    assert common.parse_with_data(ap, tmp_path / "absent.zip", ["--threads", "1"]) is None
    assert capsys.readouterr().out == f"skipped: the real data is not at {tmp_path / 'absent.zip'} (nothing is measured without it).\n"
    present = tmp_path / "data.zip"
    present.write_bytes(b"")
    want = 2 if torch.get_num_threads() != 2 else 1
    args = common.parse_with_data(ap, present, ["--threads", str(want)])
    assert args.threads == want and torch.get_num_threads() == want
