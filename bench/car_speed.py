"""CAR speed: the naive way (one full evaluation per filter) vs PruneScope's batched engine.

Both run here, side by side in one process, on the same images and filters, and must give the same
numbers. Also prints the floor: the fraction of the naive work that suffix-only evaluation needs
(MACs of the layers after each filter's consumers, summed over filters), i.e. the best speed-up
that skipping the unchanged prefix could give if time were proportional to MACs.

    python bench/car_speed.py [--images 200]
"""
from __future__ import annotations

import time

import torch
from torch import nn

from _common import SAMPLES, load_sample, machine, parser, table


def suffix_macs_fraction(engine, groups) -> float:
    """Summed over filters: MACs of conv/linear layers re-run after the filter's consumers / full MACs."""
    per_module: dict[str, int] = {}

    def hook(name):
        def fn(m, i, o):
            if isinstance(m, nn.Conv2d):
                per_module[name] = o[0].numel() * (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]
            else:
                per_module[name] = o[0].numel() * m.in_features
        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in engine.gm.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        engine.gm(engine.inputs[:1])
    for h in handles:
        h.remove()
    full = sum(per_module.values())
    total_suffix, filters = 0.0, 0
    for g in groups:
        tainted, _ = engine._taint(frozenset(g.consumers))
        consumers = {n.target for n in tainted if n.op == "call_module" and n.target in g.consumers}
        suffix = sum(per_module.get(n.target, 0) for n in tainted if n.op == "call_module" and n.target not in consumers)
        total_suffix += suffix * g.width
        filters += g.width
    return total_suffix / (full * filters)


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--images", type=int, default=200)
    args = ap.parse_args()
    from core.car import CarScorer, filter_ablation
    from core.groups import PruningGraph

    rows = []
    print(f"machine: {machine()}")
    for name in SAMPLES:
        loaded, data = load_sample(name)
        images = data.val.subset(args.images)
        scorer = CarScorer(loaded.model, loaded.spec.input, images)
        groups = PruningGraph(loaded.model, loaded.spec.input.shape(1)).groups()
        ablations = [filter_ablation(g, [f]) for g in groups for f in range(g.width)]
        scorer.accuracies(ablations[:2])  # warm-up of both paths
        scorer.accuracies(ablations[:2], fast=False)
        t0 = time.perf_counter()
        naive = scorer.accuracies(ablations, fast=False)
        t_naive = time.perf_counter() - t0
        t0 = time.perf_counter()
        fast = scorer.accuracies(ablations)
        t_fast = time.perf_counter() - t0
        same = bool(torch.equal(naive.sum(1), fast.sum(1)))
        floor = suffix_macs_fraction(scorer.engine, groups)
        rows.append({"model": name, "filters": len(ablations), "images": len(images),
                     "naive_s": f"{t_naive:.1f}", "ours_s": f"{t_fast:.1f}", "speed-up": f"{t_naive / t_fast:.2f}x",
                     "same_numbers": same, "floor_speed-up": f"{1 / floor:.2f}x",
                     "ours_vs_floor": f"{(t_fast / t_naive) / floor:.2f}"})
        print(f"{name}: speed-up {t_naive / t_fast:.2f}x (naive {t_naive:.1f} s, ours {t_fast:.1f} s, "
              f"same numbers: {same}; suffix-only floor would be {1 / floor:.2f}x)", flush=True)
    print()
    print(table(rows, list(rows[0])))
    print("\nours_vs_floor: our time / the MAC-proportional time of suffix-only evaluation (below 1: the "
          "delta trick for first consumers and batching beat the floor; above 1: overhead of masks, copies, Python).")


if __name__ == "__main__":
    main()
