"""The headline result: the sample ResNet pruned within a 1-point accuracy drop, and whether
hardware-sized clusters pay off in latency against unclustered pruning at the same MAC budget.

1. CAR cluster pruning, c = 8, max drop 1.0 point: MAC ratio, accuracy drop, latency ratio.
2. The same MAC budget (the MACs run 1 reached) with c = 1 (unclustered) and c = 16.
All final models are timed together, interleaved, on the OpenVINO CPU runtime (batch 1, median).

    python bench/prune_result.py [--finetune-steps 40]
    python bench/prune_result.py --task detection [--reuse RUN]   # the sample SSD, mAP (see prune_result_detection.py)
"""
from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

from _common import load_sample, machine, parser, result_rows, summary_line, table


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--sample", default="resnet_shapes")
    ap.add_argument("--max-drop", type=float, default=1.0)
    ap.add_argument("--finetune-steps", type=int, default=40)
    ap.add_argument("--clusters", type=int, nargs="*", default=[1, 16], help="cluster sizes compared at the same MACs")
    ap.add_argument("--compare-finetune-steps", type=int, default=20, help="fine-tuning per step of the compared runs")
    ap.add_argument("--reuse", help="a finished c=8 run folder to take instead of pruning again")
    ap.add_argument("--runs", type=int, default=300, help="timed inferences per model")
    ap.add_argument("--out", help="keep run folders here (default: a temporary folder)")
    ap.add_argument("--mac-budget", type=float, help="detection, with --reuse: compare at the first c8 step within "
                    "this fraction of the original MACs")
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the detection row (1: steady on a busy machine)")
    ap.add_argument("--task", choices=("classification", "detection"), default="classification",
                    help="detection: the sample SSD on the counting set, mAP instead of accuracy")
    args = ap.parse_args()
    if args.task == "detection":
        from prune_result_detection import main as detection_main

        return detection_main(args)

    from core.ov_runtime import compile_cpu, time_compiled, to_openvino
    from core.prune import PruneConfig, run_pruning
    from core.runs import Run

    print(f"machine: {machine()}")
    loaded, data = load_sample(args.sample)
    spec = loaded.spec.input
    out = Path(args.out or tempfile.mkdtemp(prefix="prune_result_"))
    results = {}

    def run(label, cluster, mac_target=None, rescore=1, finetune_steps=args.finetune_steps):
        t0 = time.time()
        cfg = PruneConfig(criterion="car", cluster=cluster, max_drop=args.max_drop, mac_target=mac_target,
                          finetune_steps=finetune_steps, rescore_every=rescore, latency=False, analyse_car=False,
                          max_steps=400)
        summary = run_pruning(loaded, data, cfg, out / label)
        r = Run(out / label)
        results[label] = (r, summary)
        print(summary_line(label, summary, "accuracy", "%", time.time() - t0), flush=True)
        return summary

    if args.reuse:
        from core.prune import run_summary

        main_summary = run_summary(Path(args.reuse), "done", Run(args.reuse).status.get("message", ""))
        results["c8"] = (Run(args.reuse), main_summary)
        print(f"c8: reused {args.reuse}: {main_summary['steps']} steps, MACs {main_summary['baseline_macs'] / 1e6:.2f} M -> "
              f"{main_summary['final_macs'] / 1e6:.2f} M, accuracy {main_summary['final_metric'] * 100:.2f}%")
    else:
        main_summary = run("c8", 8)
    budget = main_summary["final_macs"] / main_summary["baseline_macs"]
    for c in args.clusters:
        run(f"c{c}", c, mac_target=budget, rescore=1 if c > 1 else 8, finetune_steps=args.compare_finetune_steps)

    models = {"original": loaded.model}
    for label, (r, s) in results.items():
        models[label] = r.rebuild_step(r.history[-1]["step"])
    compiled = {k: compile_cpu(to_openvino(m, spec.shape(1))) for k, m in models.items()}
    times = {k: [] for k in compiled}
    for _ in range(10):  # interleave rounds so that machine noise hits every model alike
        for k, c in compiled.items():
            times[k] += time_compiled(c, spec.shape(1), runs=args.runs // 10, warmup=3)
    lat = {k: statistics.median(v) for k, v in times.items()}
    base = results["c8"][1]
    rows = result_rows(base, {label: s for label, (_, s) in results.items()}, lat, "accuracy_%")
    for row, (r, _) in zip(rows[1:], results.values()):
        row["widths"] = " ".join(str(w) for n, w in r.history[-1]["widths"].items() if n.endswith("conv1"))
    print()
    print(table(rows, ["model", "cluster", "MACs_M", "MAC_ratio", "accuracy_%", "drop_pts", "latency_ms", "latency_ratio", "widths"]))
    print("\nlatency_ratio = pruned / original, OpenVINO CPU, batch 1, median of interleaved runs; "
          "widths = output channels of each block's first conv.")


if __name__ == "__main__":
    main()
