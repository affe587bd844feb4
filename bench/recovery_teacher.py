"""Which teacher a recovery distils from: the original as given, or the original adapted to the user's images.

    python bench/recovery_teacher.py [--depths 20 56] [--epochs 6] [--adapt-epochs 6] [--seeds 0 1] [--threads 2]

Why: the control (the original given a run's training) reads 0.1–0.8 points above the original as given on unseen
images, so a teacher that had that training might pass the gain on to the pruned student. Needs
``../shared/data/cifar10_train_jpeg.zip`` (skips with a message when it is absent) and the weights that
``sample_models/train_cifar.py`` wrote. The roles are a user's upload as ``bench/real_cifar.py --upload`` draws them
(``bench/train_precision.py``'s ``upload_sets``): 5,000 training images, 2,000 held-out selection images that pick
the best epoch, 3,000 other held-out images (unseen) that only this report reads.

Per depth: the original is adapted by a recovery of its own (``--adapt-epochs``, KD from itself, mirrored images,
bf16 where native); the pruned model (``train_precision.pruned_copy``: the lowest-L1 quarter of every group) is then
recovered as a stretch recovery does it (``--epochs``, KD, mirrored images) once from each teacher per seed.
Printed: the adapted original's unseen accuracy, each recovery's unseen drop from the original as given, and per
seed the points the adapted teacher's student loses against the other on the unseen images (positive: worse), with
its 95 % interval.
"""
from __future__ import annotations

import copy
import sys
import time

from _common import table

from train_precision import pruned_copy, recovery_args, recovery_parser, trained_originals  # noqa: E402

from core.evaluate import evaluate_accuracy  # noqa: E402
from core.recovery import RecoveryConfig, recover  # noqa: E402
from core.stats import paired_drop  # noqa: E402


def main() -> int:
    ap = recovery_parser(__doc__)
    ap.add_argument("--adapt-epochs", type=int, default=6)
    args = recovery_args(ap)
    if args is None:
        return 0
    rows, pairs = [], []
    for depth, original, (train, selection, unseen, spec) in trained_originals(args.depths):
        def select(model) -> float:
            return evaluate_accuracy(model, selection, spec).accuracy

        base = evaluate_accuracy(original, unseen, spec).accuracy
        adapted = copy.deepcopy(original)
        t0 = time.perf_counter()
        recover(adapted, train, spec, RecoveryConfig(epochs=args.adapt_epochs, distill=True, hflip=True, seed=5),
                select, teacher=original)
        print(f"ResNet-{depth}: original {base:.2%} unseen; adapted by {args.adapt_epochs} epochs "
              f"({time.perf_counter() - t0:.0f} s): {evaluate_accuracy(adapted, unseen, spec).accuracy:.2%}", flush=True)
        pruned = pruned_copy(original)
        correct = {}
        for seed in args.seeds:
            for name, teacher in (("as given", original), ("adapted", adapted)):
                model = copy.deepcopy(pruned)
                t0 = time.perf_counter()
                result = recover(model, train, spec, RecoveryConfig(epochs=args.epochs, distill=True, hflip=True,
                                                                    seed=seed), select, teacher=teacher)
                acc = evaluate_accuracy(model, unseen, spec)
                correct[name, seed] = acc.correct.numpy()
                rows.append({"model": f"ResNet-{depth}", "teacher": name, "seed": seed,
                             "wall s": round(time.perf_counter() - t0, 1), "best epoch": result.best_epoch,
                             "unseen %": round(100 * acc.accuracy, 2),
                             "unseen drop from original": round(100 * (base - acc.accuracy), 2)})
                print(table(rows[-1:], list(rows[-1])), flush=True)
        for seed in args.seeds:
            d = paired_drop(correct["as given", seed], correct["adapted", seed])
            pairs.append({"model": f"ResNet-{depth}", "seed": seed,
                          "adapted teacher's student loses (95 % CI)":
                              f"{d.drop_points:+.2f} ({d.low_points:+.2f}..{d.high_points:+.2f})"})
    print()
    print(table(rows, list(rows[0]) if rows else []))
    print()
    print("Paired on the unseen images (points the adapted teacher's student loses against the other):")
    print(table(pairs, list(pairs[0]) if pairs else []))
    return 0


if __name__ == "__main__":
    sys.exit(main())
