"""Recovery fine-tune with and without knowledge distillation, on the bundled CIFAR-10 ResNet-20.

    python bench/recovery_kd.py [--train-images 3000] [--epochs 2] [--steps 6] [--threads 1]

Needs ``../shared/data/cifar10_train_jpeg.zip`` (skips with a message when it is absent). The
ResNet-20 (``sample_models/cifar10_resnet20.pt``) was trained on 45,000 of its 50,000 images; the other
5,000 (``train_cifar.held_out_split``, 500 per class) were never seen in training. Roles here:

- train: ``--train-images`` of the 45,000 training images (stratified, seed 0), for the pruning loop's
  fine-tuning and for the recovery;
- selection: 500 held-out images (50 per class), the pruning loop's and the recovery's decisions;
- test: 2,000 other held-out images (200 per class), only reported.

A short pruning run (``--steps`` L1 steps of one 8-filter cluster each, every step accepted, 10
fine-tuning mini-batches) makes the damaged model; its last step is then recovered twice from the same
run folder, with plain cross-entropy and with KD from the original (Hinton et al. 2015, alpha 0.5,
T 4), for the same epochs, batch and schedule. Printed: selection and test accuracy of the original,
the pruned step and both recoveries, the paired test drop with its 95 % interval, and the wall time.
"""
from __future__ import annotations

import io
import shutil
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from _common import machine, parse_with_data, parser, table

import train_cifar  # noqa: E402  (sample_models/, on sys.path by _common)

from core.data import DataReport, DataSet, ImageSet, stratified_indices  # noqa: E402
from core.evaluate import evaluate_accuracy  # noqa: E402
from core.models import load_model  # noqa: E402
from core.prune import PruneConfig, run_pruning  # noqa: E402
from core.recovery import RecoveryConfig, recover_run_step  # noqa: E402
from core.runs import Run  # noqa: E402
from core.stats import paired_drop  # noqa: E402


def cifar_roles(train_images: int, spec) -> DataSet:
    """Train/selection/test from the CIFAR-10 zip, decoding only the images used."""
    with zipfile.ZipFile(train_cifar.DATA_ZIP) as zf:
        names = sorted(n for n in zf.namelist() if n.lower().endswith((".jpg", ".jpeg", ".png")))
        classes = sorted({n.split("/")[-2] for n in names})
        labels = np.array([classes.index(n.split("/")[-2]) for n in names], dtype=np.int64)
        train_idx, held_idx = train_cifar.held_out_split(labels, train_cifar.HELD_OUT_PER_CLASS, train_cifar.SPLIT_SEED)
        rng = np.random.default_rng(1)
        held = np.concatenate([rng.permutation(held_idx[labels[held_idx] == c]) for c in range(len(classes))])
        per = len(held) // len(classes)
        sel = np.sort(np.concatenate([held[c * per:c * per + 50] for c in range(len(classes))]))
        test = np.sort(np.concatenate([held[c * per + 50:c * per + 250] for c in range(len(classes))]))
        train = train_idx[stratified_indices(labels[train_idx], train_images, seed=0)]

        def image_set(idx: np.ndarray) -> ImageSet:
            arrays = [np.asarray(Image.open(io.BytesIO(zf.read(names[i]))).convert("RGB")) for i in idx]
            return ImageSet(torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous(),
                            torch.from_numpy(labels[idx]), classes, [names[i] for i in idx])

        roles = [image_set(idx) for idx in (train, sel, test)]
    return DataSet(roles[0], roles[1], classes, spec, DataReport(num_classes=len(classes)), str(train_cifar.DATA_ZIP),
                   test=roles[2], split={"layout": "bench", "seed": 0})


def main() -> int:
    p = parser(__doc__)
    p.add_argument("--train-images", type=int, default=3000)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--steps", type=int, default=6, help="pruning steps before the recovery")
    p.add_argument("--threads", type=int, default=1)
    args = parse_with_data(p, train_cifar.DATA_ZIP)
    if args is None:
        return 0
    loaded = load_model("sample:cifar10")
    spec = loaded.spec.input
    t0 = time.perf_counter()
    data = cifar_roles(args.train_images, spec)
    print(f"{machine()}\nimages: {len(data.train)} train, {len(data.val)} selection, {len(data.test)} test "
          f"(decoded in {time.perf_counter() - t0:.1f} s)", flush=True)
    work = Path(tempfile.mkdtemp(prefix="recovery_kd-"))
    try:
        run_dir = work / "run"
        t0 = time.perf_counter()
        config = PruneConfig(criterion="l1", cluster=8, max_drop=100.0, finetune_steps=10, max_steps=args.steps,
                             latency=False, analyse_car=False, score_images=200, patience=0)
        run_pruning(loaded, data, config, run_dir, data_source=data.source)
        run = Run(run_dir)
        step = run.steps()[-1]
        print(f"pruned {step} step(s) in {time.perf_counter() - t0:.1f} s", flush=True)
        rows = [figures("original", run, 0, data), figures(f"pruned (step {step})", run, step, data)]
        for kd in (False, True):
            copy = work / f"kd{int(kd)}"
            shutil.copytree(run_dir, copy)
            record = recover_run_step(copy, step, RecoveryConfig(epochs=args.epochs, distill=kd), data=data)
            name = f"recovered, {args.epochs} epochs, " + ("KD" if kd else "no KD")
            rows.append(figures(name, Run(copy), record["step"] or step, data, record["recovery"]))
        print(table(rows, ["model", "MACs (M)", "selection %", "test %", "test drop (95 % CI)", "best epoch",
                           "seconds"]))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


def figures(name: str, run: Run, step: int, data: DataSet, recovery: dict | None = None) -> dict:
    spec = run.spec.input
    model, original = run.rebuild_step(step), run.rebuild_step(0)
    sel = evaluate_accuracy(model, data.val, spec)
    test = evaluate_accuracy(model, data.test, spec)
    drop = paired_drop(evaluate_accuracy(original, data.test, spec).correct.numpy(), test.correct.numpy())
    return {"model": name, "MACs (M)": f"{run.record(step)['macs'] / 1e6:.1f}",
            "selection %": f"{100 * sel.accuracy:.2f}", "test %": f"{100 * test.accuracy:.2f}",
            "test drop (95 % CI)": f"{drop.drop_points:+.2f} ({drop.low_points:+.2f} to {drop.high_points:+.2f})",
            "best epoch": recovery["best_epoch"] if recovery else "",
            "seconds": f"{recovery['seconds']:.0f}" if recovery else ""}


if __name__ == "__main__":
    sys.exit(main())
