"""Real models at real speed: CIFAR-10 ResNets of He et al. on real CIFAR-10 images.

    python bench/real_cifar.py [--images 400] [--exact-fraction 0.15] [--threads 2]

Needs ``../shared/data/cifar10_train_jpeg.zip`` (skips with a message when it is absent) and the
weights that ``sample_models/train_cifar.py`` wrote (``sample_models/cifar_manifest.json``); a model
without trained weights is reported as missing, never measured on random weights.

Part 1 — CAR of every filter of the original, exact vs fast, side by side in one process on the same
score images (held-out images, never seen in training): wall time of each and their ratio, Spearman's
rho between the two (ties averaged), and the recall of the exact lowest 10 % among the fast lowest
10 % (a fast pick counts when its exact CAR is within the exact lowest 10 %, ties at the cut included).
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np
import torch
from scipy.stats import spearmanr

from _common import ROOT, machine, table

sys.path.insert(0, str(ROOT / "sample_models"))
import train_cifar  # noqa: E402

from core.architectures import CifarResNet  # noqa: E402
from core.car import FAST_EXACT_FRACTION, compute_car  # noqa: E402
from core.data import ImageSet  # noqa: E402
from core.models import InputSpec  # noqa: E402


def score_images(n: int) -> tuple[ImageSet, np.ndarray, np.ndarray]:
    """``n`` held-out images (fixed seed) and the training-set mean/std the models were trained with."""
    images, labels, classes, _ = train_cifar.cached_arrays(train_cifar.DATA_ZIP)
    train_idx, held_idx = train_cifar.held_out_split(labels, train_cifar.HELD_OUT_PER_CLASS, train_cifar.SPLIT_SEED)
    mean = images[train_idx].reshape(-1, 3).mean(0) / 255.0
    std = images[train_idx].reshape(-1, 3).std(0) / 255.0
    pick = np.sort(np.random.default_rng(123).choice(held_idx, n, replace=False))
    subset = ImageSet(torch.from_numpy(images[pick]).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(labels[pick]),
                      classes)
    return subset, mean, std


def car_exact_vs_fast(model: torch.nn.Module, spec: InputSpec, images: ImageSet, exact_fraction: float) -> dict:
    """The product's own ``compute_car`` both ways, timed back to back on the same images."""
    t0 = time.perf_counter()
    exact = compute_car(model, spec, images, n_images=None, sensitivity=False, per_class=False)
    t_exact = time.perf_counter() - t0
    t0 = time.perf_counter()
    fast = compute_car(model, spec, images, n_images=None, sensitivity=False, per_class=False, method="fast",
                       exact_fraction=exact_fraction)
    t_fast = time.perf_counter() - t0
    gids = sorted(exact.car)
    e = np.concatenate([exact.car[g] for g in gids])
    f = np.concatenate([fast.car[g] for g in gids])
    k = max(1, len(e) // 10)
    # a fast pick counts as right when its exact CAR is within the exact lowest k (ties at the cut included)
    cut = np.sort(e)[k - 1]
    recall = float(np.mean(e[np.argsort(f, kind="stable")[:k]] <= cut + 1e-12))
    return {"filters": len(e), "exact CAR s": round(t_exact, 1), "fast CAR s": round(t_fast, 1),
            "ratio": round(t_exact / t_fast, 1), "exact in fast": fast.n_exact,
            "Spearman rho": round(float(spearmanr(e, f).statistic), 3), "recall low 10%": round(recall, 2)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=400)
    ap.add_argument("--exact-fraction", type=float, default=FAST_EXACT_FRACTION)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    if not train_cifar.DATA_ZIP.exists():
        print(f"skipped: the CIFAR-10 zip is not at {train_cifar.DATA_ZIP} (it lives in ../shared/data, "
              "which a fresh clone does not have)")
        return 0
    torch.set_num_threads(args.threads)
    manifest = json.loads(train_cifar.MANIFEST.read_text()) if train_cifar.MANIFEST.exists() else {"models": []}
    trained = {m["name"]: m for m in manifest["models"]}
    images, mean, std = score_images(args.images)
    print(f"machine: {machine()}; score images: {args.images} held-out CIFAR-10 images")
    rows = []
    for depth in (20, 56):
        name = f"cifar10_resnet{depth}"
        if name not in trained:
            rows.append({"model": f"ResNet-{depth}", "filters": "not trained yet "
                         f"(python sample_models/train_cifar.py --depth {depth})"})
            continue
        model = CifarResNet(depth, 10)
        model.load_state_dict(torch.load(ROOT / "sample_models" / trained[name]["weights"], weights_only=True))
        spec = InputSpec(height=32, width=32, mean=tuple(trained[name]["mean"]), std=tuple(trained[name]["std"]))
        rows.append({"model": f"ResNet-{depth} ({trained[name]['held_out_accuracy'] * 100:.2f} %)",
                     **car_exact_vs_fast(model.eval(), spec, images, args.exact_fraction)})
        print(table(rows[-1:], list(rows[-1])), flush=True)
    print()
    print(f"CAR of every filter of the original, exact vs fast (screen + exact CAR for the lowest-screened "
          f"{args.exact_fraction:.0%} of filters):")
    cols = ["model", "filters", "exact CAR s", "fast CAR s", "ratio", "exact in fast", "Spearman rho",
            "recall low 10%"]
    print(table(rows, cols))
    return 0


if __name__ == "__main__":
    sys.exit(main())
