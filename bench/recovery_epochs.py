"""How long a recovery should run, and which of its epochs to keep: per epoch, the drop on the selection images
and on unseen images, for a short and a long cosine schedule.

    python bench/recovery_epochs.py [--depths 56] [--schedules 6 12] [--lrs 0.01] [--seeds 0 1] [--run DIR --step N]
                                    [--threads 2]

Why: a recovery kept the epoch best on the selection images, one more decision on them, and the loop's last
stretch recovered for a fixed 6 epochs however much of the budget was left. Needs
``../shared/data/cifar10_train_jpeg.zip`` (skips with a message when it is absent) and the weights that
``sample_models/train_cifar.py`` wrote. The roles are a user's upload as ``bench/real_cifar.py --upload`` draws them
(``bench/train_precision.py``'s ``upload_sets``): 5,000 training images, 2,000 held-out selection images, 3,000
other held-out images (unseen) that only this report reads.

The model recovered: the original without the lowest-L1 quarter of every group (``train_precision.pruned_copy``),
or with ``--run DIR --step N`` that step of a run folder of ``bench/real_cifar.py --upload`` (e.g. the unrecovered
last stretch of a ResNet-56 run; one depth). Each recovery is the loop's: KD from the original, mirrored images,
cosine schedule peaking at each of ``--lrs`` (the loop's ``--recover-lr``, default 0.01), seed per ``--seeds``. Printed per recovery: the drop on the selection and unseen images after
every epoch, the epoch the selection images pick and its unseen drop, and the last epoch's unseen drop.
"""
from __future__ import annotations

import copy
import sys
import time

from _common import table

from train_precision import pruned_copy, recovery_args, recovery_parser, trained_originals  # noqa: E402

from core.evaluate import evaluate_accuracy  # noqa: E402
from core.recovery import RecoveryConfig, recover  # noqa: E402
from core.runs import Run  # noqa: E402


def main() -> int:
    ap = recovery_parser(__doc__)  # its --epochs (one schedule) is not read: --schedules compares several
    ap.set_defaults(depths=[56])
    ap.add_argument("--schedules", type=int, nargs="+", default=[6, 12], help="recovery lengths to compare (epochs)")
    ap.add_argument("--lrs", type=float, nargs="+", default=[RecoveryConfig.lr],
                    help="peak learning rates to compare (default: the loop's, 0.01)")
    ap.add_argument("--run", help="a run folder whose step --step is recovered (instead of the L1-pruned copy)")
    ap.add_argument("--step", type=int)
    args = recovery_args(ap)
    if args is None:
        return 0
    rows = []
    for depth, original, (train, selection, unseen, spec) in trained_originals(args.depths):
        base = {"selection": evaluate_accuracy(original, selection, spec).accuracy,
                "unseen": evaluate_accuracy(original, unseen, spec).accuracy}
        start = Run(args.run).rebuild_step(args.step).eval() if args.run else pruned_copy(original)
        what = f"step {args.step} of {args.run}" if args.run else "the L1-pruned copy"
        print(f"ResNet-{depth}, {what}: {100 * (base['unseen'] - evaluate_accuracy(start, unseen, spec).accuracy):.2f}"
              " points lost on the unseen images before the recovery", flush=True)
        for epochs in args.schedules:
            for lr in args.lrs:
                for seed in args.seeds:
                    rows.append(one_recovery(depth, start, original, train, selection, unseen, spec, base, epochs, seed,
                                             lr))
                    print(table(rows[-1:], list(rows[-1])), flush=True)
    print()
    print(table(rows, list(rows[0]) if rows else []))
    return 0


def one_recovery(depth, start, original, train, selection, unseen, spec, base, epochs, seed, lr=RecoveryConfig.lr
                 ) -> dict:
    """One recovery of a copy of ``start``, its per-epoch drops (points) read on both image sets."""
    model, drops = copy.deepcopy(start), []

    def select(m) -> float:  # called once before the first epoch, then after each
        s = evaluate_accuracy(m, selection, spec).accuracy
        drops.append((100 * (base["selection"] - s), 100 * (base["unseen"] - evaluate_accuracy(m, unseen, spec).accuracy)))
        return s

    t0 = time.perf_counter()
    recover(model, train, spec, RecoveryConfig(epochs=epochs, lr=lr, distill=True, hflip=True, seed=seed), select,
            teacher=original)
    per_epoch = drops[1:]
    picked = min(range(len(per_epoch)), key=lambda i: (per_epoch[i][0], i))  # the best selection read, earliest on ties
    # (the rule "best" of core.recovery.keeps_epoch)
    return {"model": f"ResNet-{depth}", "epochs": epochs, "lr": lr, "seed": seed, "wall s": round(time.perf_counter() - t0),
            "per epoch (selection/unseen drop)": " ".join(f"{s:.1f}/{u:.2f}" for s, u in per_epoch),
            "best-on-selection epoch": picked + 1, "its unseen drop": round(per_epoch[picked][1], 2),
            "last epoch's unseen drop": round(per_epoch[-1][1], 2)}


if __name__ == "__main__":
    sys.exit(main())
