"""Train the bundled sample models on the CPU and write their weights and manifest.

    python sample_models/train.py                    # both samples (a few minutes on 2 cores)
    python sample_models/train.py --only vgg_digits  # one of them (the manifest keeps the other)
    python sample_models/train.py --write-zips DIR   # also write both data sets as ImageFolder zips

Each model is trained on the train split of ``core.data.load_dataset('sample:<dataset>')`` only and
its accuracy is measured on the held-out val split of the same call (default split, seed 0), which is
what ``load_dataset('sample:<model name>', spec)`` gives every later user of the sample.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from core.data import ImageSet, normalize  # noqa: E402
from core.sources import load_dataset  # noqa: E402
from core.evaluate import count_macs_params, evaluate_accuracy  # noqa: E402
from core.models import InputSpec, build_architecture  # noqa: E402
from core.sample_data import DATA_SEED, SAMPLE_DATASETS, write_imagefolder_zip  # noqa: E402
from core.workspace import atomic_torch_save, atomic_write_json  # noqa: E402

OUT = REPO / "sample_models"
SEED = 0


@dataclass
class Recipe:
    name: str
    architecture: str
    dataset: str
    epochs: int
    lr: float
    batch_size: int = 64
    weight_decay: float = 5e-4
    shift: int = 3  # random translation by up to this many pixels (pad + crop)
    hflip: bool = False  # never for digits
    optimizer: str = "sgd"  # "sgd" (Nesterov momentum 0.9) or "adamw"


RECIPES = [
    Recipe("vgg_digits", "sample_vgg", "digits", epochs=30, lr=0.05, shift=3, hflip=False),
    Recipe("resnet_shapes", "sample_resnet", "shapes", epochs=10, lr=3e-3, shift=3, hflip=True, optimizer="adamw"),
]


def augment(x: torch.Tensor, shift: int, hflip: bool, gen: torch.Generator) -> torch.Tensor:
    """Random translation by up to ``shift`` pixels (edge-replicated padding + crop) and optional flip."""
    n, _, h, w = x.shape
    if shift:
        padded = nn.functional.pad(x, (shift,) * 4, mode="replicate")
        dx = torch.randint(0, 2 * shift + 1, (n,), generator=gen)
        dy = torch.randint(0, 2 * shift + 1, (n,), generator=gen)
        x = torch.stack([padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(n)])
    if hflip:
        flip = torch.rand(n, generator=gen) < 0.5
        x = torch.where(flip.view(-1, 1, 1, 1), x.flip(3), x)
    return x


def channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    x = images.float().div(255.0)
    mean = x.mean(dim=(0, 2, 3))
    std = x.std(dim=(0, 2, 3))
    return tuple(round(float(v), 4) for v in mean), tuple(round(float(v), 4) for v in std)


def train_model(model: nn.Module, train: ImageSet, spec: InputSpec, r: Recipe, log) -> None:
    gen = torch.Generator().manual_seed(SEED)
    if r.optimizer == "adamw":
        opt = torch.optim.AdamW(model.parameters(), lr=r.lr, weight_decay=r.weight_decay)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=r.lr, momentum=0.9, nesterov=True, weight_decay=r.weight_decay)
    n = len(train)
    steps_per_epoch = math.ceil(n / r.batch_size)
    total = r.epochs * steps_per_epoch
    warmup = steps_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warmup if s < warmup else 0.5 * (1 + math.cos(math.pi * (s - warmup) / (total - warmup)))
    )
    x_all = normalize(train.images, spec)
    y_all = train.labels
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    for epoch in range(r.epochs):
        perm = torch.randperm(n, generator=gen)
        seen, loss_sum, correct = 0, 0.0, 0
        for i in range(0, n, r.batch_size):
            idx = perm[i:i + r.batch_size]
            if len(idx) < 2:  # BatchNorm needs more than one sample
                continue
            x = augment(x_all[idx], r.shift, r.hflip, gen)
            y = y_all[idx]
            out = model(x)
            loss = loss_fn(out, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            seen += len(idx)
            loss_sum += loss.item() * len(idx)
            correct += int((out.argmax(1) == y).sum())
        log(f"  epoch {epoch + 1:2d}/{r.epochs}  loss {loss_sum / seen:.4f}  train acc {correct / seen:.4f}")
    model.eval()


def run_recipe(r: Recipe, log=print) -> dict:
    torch.manual_seed(SEED)
    np.random.seed(SEED)
    t0 = time.time()
    probe = InputSpec(height=32, width=32, channels=3, mean=(0.5,) * 3, std=(0.5,) * 3)
    data = load_dataset(f"sample:{r.dataset}", probe)  # default split: val_fraction 0.2, seed 0
    mean, std = channel_stats(data.train.images)
    spec = InputSpec(height=32, width=32, channels=3, mean=mean, std=std)
    model = build_architecture(r.architecture, data.num_classes)
    log(f"{r.name}: {r.architecture} on {r.dataset} ({len(data.train)} train / {len(data.val)} val images)")
    train_model(model, data.train, spec, r, log)
    train_s = time.time() - t0

    # weights: a plain state dict, loadable with torch.load(weights_only=True)
    atomic_torch_save(OUT / f"{r.name}.pt", model.state_dict())
    # Held-out accuracy, measured exactly the way a user of the sample measures it.
    val = load_dataset(f"sample:{r.dataset}", spec).val
    acc = evaluate_accuracy(model, val, spec)
    macs, params = count_macs_params(model, spec)
    log(f"{r.name}: val accuracy {acc.accuracy:.4f} on {acc.n} images, {macs / 1e6:.2f} M MACs, "
        f"{params / 1e3:.1f} k params, trained in {train_s:.0f} s")
    return {
        "name": r.name,
        "architecture": r.architecture,
        "weights": f"{r.name}.pt",
        "dataset": r.dataset,
        "dataset_description": SAMPLE_DATASETS[r.dataset].description,
        "input_size": [3, 32, 32],
        "mean": list(mean),
        "std": list(std),
        "class_names": list(data.class_names),
        "accuracy": round(acc.accuracy, 6),
        "num_val_images": acc.n,
        "num_train_images": len(data.train),
        "macs": macs,
        "params": params,
        "seed": SEED,
        "data_seed": DATA_SEED,
        "recipe": {"epochs": r.epochs, "lr": r.lr, "batch_size": r.batch_size, "optimizer": r.optimizer,
                   "weight_decay": r.weight_decay, "schedule": "1 epoch warm-up + cosine",
                   "augmentation": f"random shift +-{r.shift} px" + (", horizontal flip" if r.hflip else "")},
        "trained_with": "python sample_models/train.py",
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", choices=[r.name for r in RECIPES], help="train only this sample")
    ap.add_argument("--write-zips", metavar="DIR", type=Path, help="also write both data sets as ImageFolder zips")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    if args.write_zips:
        for ds in SAMPLE_DATASETS:
            path = write_imagefolder_zip(ds, args.write_zips / f"{ds}.zip")
            print(f"wrote {path}")

    manifest_path = OUT / "manifest.json"
    old = json.loads(manifest_path.read_text())["models"] if manifest_path.exists() else []
    entries = {e["name"]: e for e in old}
    for r in RECIPES:
        if args.only and r.name != args.only:
            continue
        entries[r.name] = run_recipe(r)
    models = [entries[r.name] for r in RECIPES if r.name in entries]
    atomic_write_json(manifest_path, {"models": models})
    print(f"wrote {manifest_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
