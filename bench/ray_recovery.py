"""Recovery in this process vs on Ray Train (TorchTrainer, DDP): selection accuracy over seeds, and time.

The digits sample with seeded noise on every weight (its selection accuracy far down) is recovered for
``--epochs`` epochs with distillation from the original, in this process with seeds 0..``--local-seeds``-1
and on a local Ray cluster of ``--workers`` training workers with seeds 0..``--ray-seeds``-1. DDP differs
from the local recovery only in BatchNorm's batch statistics (each worker's share of a batch), so the
question is whether the Ray runs fall within the local runs' spread; the table says.

    python bench/ray_recovery.py [--local-seeds 6] [--ray-seeds 3] [--workers 2] [--epochs 1]
"""
from __future__ import annotations

import copy
import statistics
import time

import torch

from _common import load_sample, machine, parser, table


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--local-seeds", type=int, default=6)
    ap.add_argument("--ray-seeds", type=int, default=3)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=1)
    args = ap.parse_args()
    from core.distributed import WorkSetting
    from core.evaluate import evaluate_accuracy
    from core.ray_recovery import recover_on_ray
    from core.recovery import RecoveryConfig, recover

    torch.set_num_threads(1)
    print(f"machine: {machine()}")
    loaded, data = load_sample("vgg_digits")
    spec = loaded.spec.input
    model = copy.deepcopy(loaded.model)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    select = lambda m: evaluate_accuracy(m, data.val, spec).accuracy  # noqa: E731
    print(f"damaged model: {select(model) * 100:.2f} % on {len(data.val)} selection images")
    runs = {"this process": [], f"Ray Train, {args.workers} workers": []}
    seconds = {k: [] for k in runs}
    for seed in range(args.local_seeds):
        m, t0 = copy.deepcopy(model), time.perf_counter()
        recover(m, data.train, spec, RecoveryConfig(epochs=args.epochs, distill=True, seed=seed), select,
                teacher=loaded.model)
        seconds["this process"].append(time.perf_counter() - t0)
        runs["this process"].append(select(m))
        print(f"  this process, seed {seed}: {runs['this process'][-1] * 100:.2f} %", flush=True)
    label = f"Ray Train, {args.workers} workers"
    for seed in range(args.ray_seeds):
        m, t0 = copy.deepcopy(model), time.perf_counter()
        recover_on_ray(m, data.train, data.val, spec, RecoveryConfig(epochs=args.epochs, distill=True, seed=seed),
                       WorkSetting(workers=args.workers), teacher=loaded.model)
        seconds[label].append(time.perf_counter() - t0)
        runs[label].append(select(m))
        print(f"  {label}, seed {seed}: {runs[label][-1] * 100:.2f} %", flush=True)
    lo, hi = min(runs["this process"]), max(runs["this process"])
    rows = [{"where": k, "seeds": len(v), "accuracy_%": ", ".join(f"{a * 100:.2f}" for a in v),
             "mean_%": f"{statistics.mean(v) * 100:.2f}", "median_s": f"{statistics.median(seconds[k]):.1f}",
             "inside_local_range": "-" if k == "this process" else f"{sum(lo <= a <= hi for a in v)} of {len(v)}"}
            for k, v in runs.items()]
    print()
    print(table(rows, ["where", "seeds", "accuracy_%", "mean_%", "median_s", "inside_local_range"]))
    print(f"one image = {100 / len(data.val):.2f} points; median_s includes Ray Train's start-up per fit.")


if __name__ == "__main__":
    main()
