"""Train the bundled sample detector on the CPU and write its weights and manifest entry.

    python sample_models/train_detector.py                 # ssd_counting (about 11 min on one busy CPU core)
    python sample_models/train_detector.py --epochs 5      # a quick, worse model (manifest says so)
    python sample_models/train_detector.py --write-zip DIR # also write the data set as a VOC zip

The model (``sample_ssd``) is trained on the train split of ``load_sample_detection('counting')``
only; its mAP@0.5 is measured on the held-out val split after a round trip through the saved file,
i.e. exactly as ``load_sample_detector('ssd_counting')`` + ``evaluate_map`` measure it later.
Writes ``sample_models/ssd_counting.pt`` (plain state dict) and ``sample_models/detection_manifest.json``;
the classifier manifest (``manifest.json``) is not touched.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from core.tasks.detection.evaluate import EvalSettings, evaluate_map  # noqa: E402
from core.tasks.detection.loss import encode_batch, multibox_loss  # noqa: E402
from core.tasks.detection.models import build_detector  # noqa: E402
from core.tasks.detection.sample import DATA_SEED, SAMPLE_DETECTION_SETS, load_sample_detection, write_sample_voc_zip  # noqa: E402
from core.tasks.detection.sample_model import MANIFEST, detection_manifest, load_sample_detector  # noqa: E402
from core.evaluate import count_macs_params  # noqa: E402
from core.models import InputSpec  # noqa: E402
from core.workspace import atomic_torch_save, atomic_write_json  # noqa: E402

OUT = REPO / "sample_models"
SEED = 0


@dataclass
class Recipe:
    name: str = "ssd_counting"
    architecture: str = "sample_ssd"
    dataset: str = "counting"
    epochs: int = 30
    lr: float = 3e-3
    batch_size: int = 32
    weight_decay: float = 1e-4
    hflip: bool = True
    jitter: float = 0.15  # random brightness/contrast change, +- this fraction


def augment(images_u8: torch.Tensor, boxes: list[np.ndarray], r: Recipe,
            gen: torch.Generator) -> tuple[torch.Tensor, list[np.ndarray]]:
    """Horizontal flip (boxes flipped with the image) and brightness/contrast jitter; float [0, 1] out."""
    x = images_u8.float() / 255.0
    n = len(x)
    if r.hflip:
        flip = (torch.rand(n, generator=gen) < 0.5).tolist()
        x = torch.stack([xi.flip(2) if f else xi for xi, f in zip(x, flip)])
        boxes = [np.stack([1 - b[:, 2], b[:, 1], 1 - b[:, 0], b[:, 3]], 1) if f and len(b) else b
                 for b, f in zip(boxes, flip)]
    if r.jitter:
        gain = 1 + (torch.rand(n, 1, 1, 1, generator=gen) * 2 - 1) * r.jitter
        bias = (torch.rand(n, 1, 1, 1, generator=gen) * 2 - 1) * r.jitter / 2
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        x = ((x - mean) * gain + mean + bias).clamp(0, 1)
    return x, boxes


def channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    x = images.float().div(255.0)
    return (tuple(round(float(v), 4) for v in x.mean(dim=(0, 2, 3))),
            tuple(round(float(v), 4) for v in x.std(dim=(0, 2, 3))))


def train(model, data, mean, std, r: Recipe, log) -> None:
    gen = torch.Generator().manual_seed(SEED)
    opt = torch.optim.AdamW(model.parameters(), lr=r.lr, weight_decay=r.weight_decay)
    n = len(data)
    steps_per_epoch = math.ceil(n / r.batch_size)
    total, warmup = r.epochs * steps_per_epoch, steps_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: (s + 1) / warmup if s < warmup
                                              else 0.5 * (1 + math.cos(math.pi * (s - warmup) / max(total - warmup, 1))))
    anchors = model.anchors()
    mean_t, std_t = torch.tensor(mean).view(1, -1, 1, 1), torch.tensor(std).view(1, -1, 1, 1)
    model.train()
    for epoch in range(r.epochs):
        t0, perm, loss_sum, seen = time.time(), torch.randperm(n, generator=gen), 0.0, 0
        for i in range(0, n, r.batch_size):
            idx = perm[i:i + r.batch_size]
            if len(idx) < 2:  # BatchNorm needs more than one sample
                continue
            x, boxes = augment(data.images[idx], [data.boxes[j] for j in idx.tolist()], r, gen)
            targets = encode_batch(boxes, [data.labels[j] for j in idx.tolist()], anchors, model.box_coder_weights)
            loss = multibox_loss(model((x - mean_t) / std_t), targets)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_sum, seen = loss_sum + loss.item() * len(idx), seen + len(idx)
        log(f"  epoch {epoch + 1:2d}/{r.epochs}  loss {loss_sum / seen:.4f}  ({time.time() - t0:.0f} s)")
    model.eval()


def run(r: Recipe, log=print) -> dict:
    torch.manual_seed(SEED)
    np.random.seed(SEED)
    t0 = time.time()
    data = load_sample_detection(r.dataset)
    mean, std = channel_stats(data.train.images)
    h, w = data.input_size
    model = build_detector(r.architecture, data.num_classes, (h, w), head="ssd")
    log(f"{r.name}: {r.architecture} on {r.dataset} ({len(data.train)} train / {len(data.val)} val images, "
        f"{data.train.num_objects} / {data.val.num_objects} objects)")
    train(model, data.train, mean, std, r, log)
    train_s = time.time() - t0
    atomic_torch_save(OUT / f"{r.name}.pt", model.state_dict())

    entry = {
        "name": r.name,
        "architecture": r.architecture,
        "weights": f"{r.name}.pt",
        "dataset": r.dataset,
        "dataset_description": SAMPLE_DETECTION_SETS[r.dataset].description,
        "input_size": [3, h, w],
        "mean": list(mean),
        "std": list(std),
        "class_names": list(data.class_names),
        "num_classes_with_background": data.num_classes,
        "options": {"head": "ssd"},
    }
    _write_entry(entry)  # provisional (no mAP yet), so that the model can be reloaded as users will
    reloaded, _ = load_sample_detector(r.name)
    settings = EvalSettings()
    result = evaluate_map(reloaded, data.val, mean, std, settings)
    macs, params = count_macs_params(reloaded, InputSpec(height=h, width=w, mean=mean, std=std))
    log(f"{r.name}: val mAP@0.5 {result.map:.4f} on {result.n_images} images "
        f"({', '.join(f'{k} {v:.3f}' for k, v in result.per_class.items())}), "
        f"{macs / 1e6:.1f} M MACs, {params / 1e3:.1f} k params, trained in {train_s:.0f} s")
    entry.update({
        "val_map": round(result.map, 6),
        "val_ap_per_class": {k: round(v, 6) for k, v in result.per_class.items()},
        "n_val": result.n_images,
        "n_train": len(data.train),
        "eval": settings.to_dict(),
        "anchors": {"count": int(len(reloaded.anchors())), "format": "normalised cx cy w h",
                    "box_coder_weights": list(reloaded.box_coder_weights)},
        "macs": macs,
        "params": params,
        "seed": SEED,
        "data_seed": DATA_SEED,
        "train_seconds": round(train_s),
        "recipe": {**{k: v for k, v in asdict(r).items() if k not in ("name", "architecture", "dataset")},
                   "optimizer": "adamw", "schedule": "1 epoch warm-up + cosine", "threads": torch.get_num_threads(),
                   "loss": "multibox: smooth-L1 + cross-entropy, 3:1 hard negatives"},
        "trained_with": "python sample_models/train_detector.py" + ("" if r.epochs == Recipe.epochs else f" --epochs {r.epochs}")
                        + ("" if torch.get_num_threads() == 2 else f" --threads {torch.get_num_threads()}"),
    })
    _write_entry(entry)
    return entry


def _write_entry(entry: dict) -> None:
    try:
        models = [m for m in detection_manifest()["models"] if m["name"] != entry["name"]]
    except Exception:  # first run: no manifest yet
        models = []
    atomic_write_json(MANIFEST, {"models": models + [entry]})


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=Recipe.epochs)
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    ap.add_argument("--write-zip", metavar="DIR", type=Path, help="also write the data set as a VOC zip")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)  # tiny activations late in training otherwise slow the CPU many-fold
    if args.write_zip:
        print(f"wrote {write_sample_voc_zip('counting', args.write_zip / 'counting_voc.zip')}")
    run(Recipe(epochs=args.epochs))
    print(f"wrote {MANIFEST}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
