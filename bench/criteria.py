"""Does CAR keep more accuracy than magnitude (L1) or random choice at the same fraction removed?

For both samples and each fraction p in 10..70 %, every prunable group loses round(p * width) of its
filters, chosen as the lowest-scoring by each criterion (CAR measured on training images, so the
validation accuracy reported here is not the set the choice was made on; filters with equal CAR are
ordered by the loss increase of the same ablation, as in the pruning loop). Accuracy is reported
without fine-tuning (exact emulated removal) and after the same short fine-tuning of the really
pruned model. This is the CAR paper's per-layer comparison, applied to all groups at once.

    python bench/criteria.py [--fractions 0.1 0.3 0.5 0.7] [--finetune-steps 60]
"""
from __future__ import annotations

import copy
import time

import numpy as np
import torch

from _common import SAMPLES, load_sample, machine, parser, table


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--fractions", type=float, nargs="+", default=[0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7])
    ap.add_argument("--finetune-steps", type=int, default=60)
    ap.add_argument("--score-images", type=int, default=400)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    from core.car import CarScorer, filter_ablation
    from core.evaluate import evaluate_accuracy
    from core.groups import PruningGraph
    from core import criteria
    from core.criteria import ScoreContext
    from core.tasks.classification.task import car_with_tiebreak, finetune

    print(f"machine: {machine()}")
    rows = []
    for name in SAMPLES:
        loaded, data = load_sample(name)
        spec = loaded.spec.input
        graph = PruningGraph(copy.deepcopy(loaded.model), spec.shape(1))
        groups = graph.groups()
        score_set = data.train.subset(args.score_images, seed=args.seed)
        car_scorer = CarScorer(loaded.model, spec, score_set)
        car_correct, loss_up = car_scorer.accuracies_and_loss([filter_ablation(g, [f]) for g in groups for f in range(g.width)])
        owners = np.asarray([g.gid for g in groups for _ in range(g.width)])
        car = car_with_tiebreak(car_scorer.baseline_accuracy - car_correct.float().mean(1).numpy(), loss_up.numpy(),
                                owners, groups, len(score_set))
        rng = np.random.default_rng(args.seed)
        scores = {"car": car, "l1": criteria.REGISTRY["l1"].score(ScoreContext(graph, groups, rng)),
                  "random": {g.gid: rng.random(g.width) for g in groups}}
        val_scorer = CarScorer(loaded.model, spec, data.val)
        base = val_scorer.baseline_accuracy
        for frac in args.fractions:
            row = {"model": name, "removed": f"{frac:.0%}"}
            for crit in ("car", "l1", "random"):
                chosen = {g.gid: np.argsort(scores[crit][g.gid], kind="stable")[: int(round(frac * g.width))].tolist()
                          for g in groups}
                ablation: dict[str, list[int]] = {}
                for g in groups:
                    for consumer, idxs in filter_ablation(g, chosen[g.gid]).items():
                        ablation[consumer] = sorted(set(ablation.get(consumer, [])) | set(idxs))
                no_ft = float(val_scorer.accuracies([ablation]).float().mean())
                pruned = PruningGraph(copy.deepcopy(loaded.model), spec.shape(1))
                for g in groups:
                    if chosen[g.gid]:
                        pruned.prune(g.root, chosen[g.gid])
                finetune(pruned.model, data.train, spec, args.finetune_steps, 0.01, 64, np.random.default_rng(args.seed))
                ft = evaluate_accuracy(pruned.model, data.val, spec).accuracy
                row[f"{crit}"] = f"{no_ft * 100:.1f}"
                row[f"{crit}+ft"] = f"{ft * 100:.1f}"
            rows.append(row)
            print(row, flush=True)
        print(f"{name}: baseline {base * 100:.2f}%")
    print()
    print(table(rows, list(rows[0])))
    wins = {c: 0 for c in ("l1", "random")}
    for r in rows:
        for c in wins:
            wins[c] += float(r["car"]) >= float(r[c])
    print(f"\nwithout fine-tuning, CAR >= L1 in {wins['l1']}/{len(rows)} rows and >= random in {wins['random']}/{len(rows)} rows")


if __name__ == "__main__":
    t = time.time()
    main()
    print(f"({time.time() - t:.0f} s)")
