"""Which images can score filters: CAR measured on training images against CAR on held-out ones.

    python bench/score_images.py [--depths 20] [--images 400] [--threads 2]

A run scores filters (CAR) on 400 of its selection images, so those 400 cannot decide a step nor be test
images. Scoring on ``train/`` images instead would free them for the test split, whose noise gates what
ships (issue 23). But a user's training images are usually images the model was trained on, where it is
more confident, so a filter's removal may cost less there and rank differently. This measures it on our
CIFAR-10 ResNets (trained on the 45,000-image training split): exact CAR of every filter of the original on
two disjoint sets of held-out images (A, B) and on training images (T), ``--images`` each, stratified; then
Spearman's rho and the recall of the lowest 10 % for each pair (``real_cifar.ranking_quality``). Held-out A
against B is the agreement two draws of the same kind reach; A or B against T is what scoring on training
images would give. Also each set's accuracy and mean CAR (points). Only the original is measured: later
steps of a run are fine-tuned on ``train/`` too, which this does not cover.

Needs ``../shared/data/cifar10_train_jpeg.zip`` and the weights of ``sample_models/train_cifar.py`` (skips,
saying why, without them).
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from _common import machine, parse_with_data, table

import train_cifar  # noqa: E402  (on sys.path through _common)
from real_cifar import ranking_quality  # noqa: E402
from train_precision import trained_originals  # noqa: E402

from core.car import compute_car  # noqa: E402
from core.data import ImageSet, stratified_indices  # noqa: E402
from core.evaluate import evaluate_accuracy  # noqa: E402


def image_sets(n: int, seed: int = 7) -> dict[str, ImageSet]:
    """``held-out A``, ``held-out B`` (disjoint, from the 5,000 held-out images) and ``train T`` (from the
    training split the models were trained on), ``n`` images each, stratified by class."""
    images, labels, classes, _ = train_cifar.cached_arrays(train_cifar.DATA_ZIP)
    train_idx, held_idx = train_cifar.held_out_split(labels, train_cifar.HELD_OUT_PER_CLASS, train_cifar.SPLIT_SEED)
    rng = np.random.default_rng(seed)
    held = rng.permutation(held_idx)
    a = held[stratified_indices(labels[held], n, seed)]
    rest = np.setdiff1d(held, a)
    b = rest[stratified_indices(labels[rest], n, seed + 1)]
    t = train_idx[stratified_indices(labels[train_idx], n, seed + 2)]

    def take(idx: np.ndarray) -> ImageSet:
        idx = np.sort(idx)
        return ImageSet(torch.from_numpy(images[idx]).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(labels[idx]),
                        classes)
    return {"held-out A": take(a), "held-out B": take(b), "train T": take(t)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--depths", type=int, nargs="+", default=[20])
    ap.add_argument("--images", type=int, default=400)
    ap.add_argument("--threads", type=int, default=2)
    args = parse_with_data(ap, train_cifar.DATA_ZIP)
    if args is None:
        return 0
    sets = image_sets(args.images)
    print(f"machine: {machine()}; {args.images} images a set")
    sets_rows, pair_rows = [], []
    for depth, model, (*_, spec) in trained_originals(args.depths):
        car = {}
        for label, images in sets.items():
            t0 = time.perf_counter()
            result = compute_car(model, spec, images, n_images=None, sensitivity=False, per_class=False)
            car[label] = np.concatenate([result.car[g] for g in sorted(result.car)])
            sets_rows.append({"model": f"ResNet-{depth}", "images": label,
                              "accuracy %": f"{evaluate_accuracy(model, images, spec).accuracy * 100:.2f}",
                              "mean CAR (points)": f"{car[label].mean() * 100:.3f}",
                              "filters at CAR <= 0": int(np.sum(car[label] <= 0)),
                              "CAR s": round(time.perf_counter() - t0, 1)})
            print(table(sets_rows[-1:], list(sets_rows[-1])), flush=True)
        for x, y in (("held-out A", "held-out B"), ("held-out A", "train T"), ("held-out B", "train T")):
            pair_rows.append({"model": f"ResNet-{depth}", "pair": f"{x} vs {y}", **ranking_quality(car[x], car[y])})
    print()
    print("Each set (exact CAR of every filter of the original):")
    print(table(sets_rows, ["model", "images", "accuracy %", "mean CAR (points)", "filters at CAR <= 0", "CAR s"]))
    print()
    print("Agreement of the rankings (Spearman's rho; recall of the first set's lowest 10 % in the second's):")
    print(table(pair_rows, ["model", "pair", "Spearman rho", "recall low 10%"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
