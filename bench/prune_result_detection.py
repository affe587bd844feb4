"""The detection row of bench/prune_result.py: the sample SSD pruned within a 1-point mAP drop.

1. CAR cluster pruning (mAP), c = 8, until 0.66 of the original MACs or the threshold.
2. The same MAC budget with the cluster sizes of ``--clusters`` (c = 1: unclustered).
All final models and the original are exported and timed together, interleaved, on the OpenVINO CPU
runtime (batch 1, median), so the latency ratios come from one process under the same load.

    python bench/prune_result.py --task detection [--reuse RUN] [--clusters 1]
"""
from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

from _common import machine, result_rows, summary_line, table

DETECTION_SETTINGS = {"finetune_steps": 50, "finetune_lr": 3e-4, "mac_target": 0.66, "max_steps": 400}


def main(args) -> None:
    import torch

    from core.tasks.detection.prune import DetectionPruneConfig, run_detection_pruning
    from core.tasks.detection.sample import load_sample_detection
    from core.tasks.detection.sample_model import load_sample_detector
    from core.ov_runtime import compile_cpu, time_interleaved, to_openvino
    from core.prune import run_summary
    from core.runs import Run

    torch.set_num_threads(args.threads)
    print(f"machine: {machine()}")
    model, entry = load_sample_detector("ssd_counting")
    data = load_sample_detection("counting")
    out = Path(args.out or tempfile.mkdtemp(prefix="prune_result_det_"))
    results: dict[str, tuple[Run, dict, float]] = {}

    def run(label: str, cluster: int, mac_target: float) -> dict:
        t0 = time.time()
        cfg = DetectionPruneConfig(cluster=cluster, max_drop=args.max_drop, latency=False,
                                   **{**DETECTION_SETTINGS, "mac_target": mac_target})
        summary = run_detection_pruning(model, entry, data, cfg, out / label)
        results[label] = (Run(out / label), summary, time.time() - t0)
        print(summary_line(label, summary, "mAP", "", time.time() - t0), flush=True)
        return summary

    steps: dict[str, int] = {}
    if args.reuse:
        reused = Run(args.reuse)
        main_summary = run_summary(Path(args.reuse), "done", reused.status.get("message", ""))
        record = reused.history[-1]
        if args.mac_budget:  # compare at an earlier step of the c8 run: a cheaper unclustered run
            record = next(r for r in reused.history if r["macs"] <= args.mac_budget * main_summary["baseline_macs"])
            main_summary.update(final_macs=record["macs"], final_metric=record["metric"], steps=record["step"])
        steps["c8"] = record["step"]
        results["c8"] = (reused, main_summary, record.get("elapsed", 0.0))
        print(f"c8: reused {args.reuse}: step {record['step']} of {len(reused.history) - 1}")
    else:
        main_summary = run("c8", 8, DETECTION_SETTINGS["mac_target"])
    budget = main_summary["final_macs"] / main_summary["baseline_macs"]
    for c in args.clusters:
        run(f"c{c}", c, budget)

    shape = (1, 3, *model.input_size)
    models = {"original": model, **{k: r.rebuild_step(steps.get(k, r.history[-1]["step"]))
                                    for k, (r, _, _) in results.items()}}
    compiled = [compile_cpu(to_openvino(m, shape)) for m in models.values()]
    times = time_interleaved(compiled, shape, runs=args.runs, warmup=10)
    lat = {k: statistics.median(t) for k, t in zip(models, times)}
    base = main_summary
    rows = result_rows(base, {label: s for label, (_, s, _) in results.items()}, lat, "mAP")
    for row, seconds in zip(rows, ["-", *(f"{sec:.0f}" for _, _, sec in results.values())]):
        row["run_s"] = seconds
    print()
    print(table(rows, ["model", "cluster", "MACs_M", "MAC_ratio", "mAP", "drop_pts", "latency_ms", "latency_ratio",
                       "run_s"]))
    print("\nmAP@0.5 on the 300 validation images; latency_ratio = pruned / original, OpenVINO CPU, batch 1, "
          "median of interleaved runs in this process.")
