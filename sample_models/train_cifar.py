"""Train the CIFAR-10 ResNets of He et al. (option-A shortcuts) on real CIFAR-10 images, resumably.

    python sample_models/train_cifar.py --depth 20 --epochs 10          # ResNet-20
    python sample_models/train_cifar.py --depth 56 --epochs 10          # ResNet-56 (~10 min an epoch, 1 thread)
    python sample_models/train_cifar.py --depth 20 --write-sample       # + the `cifar10` sample's data zip

Data: ``../shared/data/cifar10_train_jpeg.zip`` (the 50,000 CIFAR-10 training images as an ImageFolder
zip ``train/<class>/NNNN.jpg``; CIFAR-10 by Krizhevsky, 2009). A fixed stratified split (seed 0) keeps
500 images per class (5,000) held out; training sees the other 45,000 only. The held-out accuracy is
measured at the end and written to ``cifar_manifest.json`` with the command and the wall time.

Training is resumable: a checkpoint (model, optimizer, scheduler, RNG, elapsed time) is written
atomically every ``--chunk`` steps and at each epoch's end under ``workspace/train_cifar/``; running the
same command again continues where it stopped. Schedule: one-cycle (Smith & Topin 2019) SGD with
Nesterov momentum, random crop (4 px zero padding) and horizontal flip, as in He et al.

The product never needs the data at run time; this script and the benches do.
"""
from __future__ import annotations

import argparse
import io
import json
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from core.architectures import CifarResNet  # noqa: E402
from core.evaluate import count_macs_params, evaluate_accuracy  # noqa: E402
from core.export import sha256_file  # noqa: E402
from core.models import InputSpec, build_architecture  # noqa: E402
from core.sample_data import SAMPLE_DATASETS, load_sample_dataset  # noqa: E402
from core.workspace import atomic_torch_save, atomic_write_json  # noqa: E402

DATA_ZIP = REPO.parent / "shared" / "data" / "cifar10_train_jpeg.zip"
OUT = REPO / "sample_models"
WORK = REPO / "workspace" / "train_cifar"
MANIFEST = OUT / "cifar_manifest.json"
HELD_OUT_PER_CLASS = 500
SAMPLE_PER_CLASS = 200
SPLIT_SEED = 0
# Per-channel statistics of the 45,000 training images (computed by this script, see `stats`).
MEAN_STD_FILE = "cifar10_mean_std.json"


def load_cifar_zip(path: Path) -> tuple[np.ndarray, np.ndarray, list[str], list[str]]:
    """Decode the ImageFolder zip into uint8 images ``[N, 32, 32, 3]``, labels ``[N]``, class names, member names.

    Class folders are sorted by name (torchvision's ImageFolder order); members within a class by name.
    """
    with zipfile.ZipFile(path) as zf:
        names = sorted(n for n in zf.namelist() if n.lower().endswith((".jpg", ".jpeg", ".png")))
        classes = sorted({n.split("/")[-2] for n in names})
        index = {c: i for i, c in enumerate(classes)}
        images = np.empty((len(names), 32, 32, 3), np.uint8)
        labels = np.empty(len(names), np.int64)
        for k, name in enumerate(names):
            with Image.open(io.BytesIO(zf.read(name))) as im:
                images[k] = np.asarray(im.convert("RGB"))
            labels[k] = index[name.split("/")[-2]]
    return images, labels, classes, names


def held_out_split(labels: np.ndarray, per_class: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Fixed stratified split: ``per_class`` images of each class held out; returns (train_idx, held_idx)."""
    rng = np.random.default_rng(seed)
    held = np.concatenate([rng.permutation(np.flatnonzero(labels == c))[:per_class] for c in np.unique(labels)])
    held.sort()
    train = np.setdiff1d(np.arange(len(labels)), held)
    return train, held


def cached_arrays(path: Path) -> tuple[np.ndarray, np.ndarray, list[str], list[str]]:
    """Decode once; later runs read the ``.npz`` cache in the workspace, keyed by the zip's content (its
    SHA-256), not its mtime: a shared folder copied anew each session keeps its cache, and a cache of other
    content is replaced rather than left beside it (each is ~160 MB)."""
    cache = WORK / f"cifar10_{sha256_file(path)[:16]}.npz"
    if cache.exists():
        z = np.load(cache, allow_pickle=False)
        return z["images"], z["labels"], list(z["classes"]), list(z["names"])
    images, labels, classes, names = load_cifar_zip(path)
    WORK.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(".tmp.npz")
    np.savez(tmp, images=images, labels=labels, classes=np.array(classes), names=np.array(names))
    tmp.replace(cache)
    for stale in WORK.glob("cifar10_*.npz"):
        if stale != cache:
            stale.unlink(missing_ok=True)
    return images, labels, classes, names


def to_tensor(images: np.ndarray, mean: np.ndarray, std: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div_(255.0)
    m = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    return (x - m) / s


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random 32x32 crop of the 4-px zero-padded image and a random horizontal flip (He et al. 2016)."""
    n = x.shape[0]
    padded = F.pad(x, (4, 4, 4, 4))
    dx = torch.randint(0, 9, (n,), generator=gen)
    dy = torch.randint(0, 9, (n,), generator=gen)
    rows = (dy.view(n, 1) + torch.arange(32).view(1, 32))
    cols = (dx.view(n, 1) + torch.arange(32).view(1, 32))
    out = padded[torch.arange(n).view(n, 1, 1), :, rows.view(n, 32, 1), cols.view(n, 1, 32)]
    out = out.permute(0, 3, 1, 2)
    flip = torch.rand(n, generator=gen) < 0.5
    out[flip] = out[flip].flip(3)
    return out.contiguous()


@torch.no_grad()
def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 500) -> float:
    model.eval()
    correct = sum(int((model(x[i:i + batch]).argmax(1) == y[i:i + batch]).sum()) for i in range(0, len(x), batch))
    return correct / len(x)


def write_sample_zip(images: np.ndarray, labels: np.ndarray, classes: list[str], names: list[str],
                     held: np.ndarray, dest: Path) -> int:
    """Write ``SAMPLE_PER_CLASS`` held-out images per class, as the original JPEG bytes, to an ImageFolder zip."""
    rng = np.random.default_rng(SPLIT_SEED + 1)
    chosen = np.concatenate([rng.permutation(held[labels[held] == c])[:SAMPLE_PER_CLASS] for c in range(len(classes))])
    tmp = dest.with_suffix(".tmp")
    with zipfile.ZipFile(DATA_ZIP) as src, zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as out:
        for k in sorted(chosen):
            cls = classes[labels[k]]
            out.writestr(f"{cls}/{Path(names[k]).name}", src.read(names[k]))
    tmp.replace(dest)
    return len(chosen)


def train(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    images, labels, classes, names = cached_arrays(args.data)
    train_idx, held_idx = held_out_split(labels, HELD_OUT_PER_CLASS, SPLIT_SEED)
    mean = images[train_idx].reshape(-1, 3).mean(0) / 255.0
    std = images[train_idx].reshape(-1, 3).std(0) / 255.0
    x_train = to_tensor(images[train_idx], mean, std)
    y_train = torch.from_numpy(labels[train_idx])
    x_held = to_tensor(images[held_idx], mean, std)
    y_held = torch.from_numpy(labels[held_idx])

    torch.manual_seed(args.seed)
    model = CifarResNet(args.depth, len(classes))
    steps_per_epoch = len(x_train) // args.batch_size
    total = steps_per_epoch * args.epochs
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, nesterov=True, weight_decay=args.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=total, pct_start=0.25)
    gen = torch.Generator().manual_seed(args.seed)
    ckpt_path = WORK / f"resnet{args.depth}_e{args.epochs}.ckpt"
    step, elapsed, order = 0, 0.0, None
    if ckpt_path.exists():
        ck = torch.load(ckpt_path, weights_only=False)  # our own checkpoint (RNG state), never a user file
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["opt"])
        sched.load_state_dict(ck["sched"])
        gen.set_state(ck["gen"])
        step, elapsed, order = ck["step"], ck["elapsed"], ck["order"]
        print(f"resumed at step {step}/{total} ({elapsed / 60:.1f} min so far)", flush=True)

    def save() -> None:
        WORK.mkdir(parents=True, exist_ok=True)
        atomic_torch_save(ckpt_path, {"model": model.state_dict(), "opt": opt.state_dict(),
                                      "sched": sched.state_dict(), "gen": gen.get_state(), "step": step,
                                      "elapsed": elapsed, "order": order})

    t0 = time.time() - elapsed
    session_start = time.time()
    model.train()
    while step < total:
        if step % steps_per_epoch == 0 or order is None:
            order = torch.randperm(len(x_train), generator=gen)
        i = step % steps_per_epoch
        idx = order[i * args.batch_size:(i + 1) * args.batch_size]
        xb = augment(x_train[idx], gen)
        loss = F.cross_entropy(model(xb), y_train[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        step += 1
        elapsed = time.time() - t0
        if step % 50 == 0:
            print(f"step {step}/{total} epoch {step / steps_per_epoch:.2f} loss {loss.item():.3f} "
                  f"lr {sched.get_last_lr()[0]:.4f} {elapsed / 60:.1f} min", flush=True)
        if step % args.chunk == 0 or step % steps_per_epoch == 0:
            save()
            if step % steps_per_epoch == 0:
                print(f"epoch {step // steps_per_epoch}: held-out accuracy {accuracy(model, x_held, y_held):.4f}",
                      flush=True)
                model.train()
        if args.stop_after and time.time() - session_start > args.stop_after:
            save()
            print(f"stopped after {elapsed / 60:.1f} min at step {step}; run again to resume", flush=True)
            return {}
    save()
    acc = accuracy(model, x_held, y_held)
    name = f"cifar10_resnet{args.depth}"
    weights = OUT / f"{name}.pt"
    atomic_torch_save(weights, model.state_dict())
    record = {
        "name": name, "architecture": f"cifar_resnet{args.depth}", "weights": weights.name,
        "dataset": "CIFAR-10 training images (../shared/data/cifar10_train_jpeg.zip)",
        "split": f"stratified, seed {SPLIT_SEED}: {len(train_idx)} train / {len(held_idx)} held out "
                 f"({HELD_OUT_PER_CLASS} per class)",
        "class_names": classes, "input_size": [3, 32, 32],
        "mean": [round(float(v), 4) for v in mean], "std": [round(float(v), 4) for v in std],
        "held_out_accuracy": round(acc, 4), "num_held_out": len(held_idx),
        "recipe": {"epochs": args.epochs, "batch_size": args.batch_size, "max_lr": args.lr,
                   "weight_decay": args.weight_decay, "schedule": "one-cycle (25 % warm-up), SGD Nesterov 0.9",
                   "augmentation": "4-px pad + random 32x32 crop, horizontal flip", "seed": args.seed},
        "train_minutes": round(elapsed / 60, 1), "threads": args.threads,
        "trained_with": f"python sample_models/train_cifar.py --depth {args.depth} --epochs {args.epochs}",
    }
    manifest = json.loads(MANIFEST.read_text()) if MANIFEST.exists() else {"models": []}
    manifest["models"] = [m for m in manifest["models"] if m["name"] != name] + [record]
    atomic_write_json(MANIFEST, manifest)
    print(json.dumps(record, indent=1), flush=True)
    if args.write_sample:
        n = write_sample_zip(images, labels, classes, names, held_idx, OUT / "cifar10_sample.zip")
        print(f"wrote sample_models/cifar10_sample.zip ({n} held-out images)", flush=True)
        print(json.dumps(register_sample(record), indent=1), flush=True)
    return record


def register_sample(record: dict) -> dict:
    """The ``cifar10`` entry of ``sample_models/manifest.json``: the ResNet-20 with the 2,000-image subset.

    Its accuracy is measured as every user of the sample will see it: on the val split that
    ``load_dataset('sample:cifar10', spec)`` gives (default split, seed 0).
    """
    spec = InputSpec(height=32, width=32, mean=tuple(record["mean"]), std=tuple(record["std"]))
    model = build_architecture(record["architecture"], 10)
    model.load_state_dict(torch.load(OUT / record["weights"], weights_only=True))
    data = load_sample_dataset("cifar10", spec)
    acc = evaluate_accuracy(model.eval(), data.val, spec).accuracy
    macs, params = count_macs_params(model, spec)
    entry = {
        "name": "cifar10", "architecture": record["architecture"], "weights": record["weights"],
        "dataset": "cifar10", "dataset_description": SAMPLE_DATASETS["cifar10"].description,
        "input_size": [3, 32, 32], "mean": record["mean"], "std": record["std"], "class_names": record["class_names"],
        "accuracy": round(acc, 6), "num_val_images": len(data.val), "num_train_images": len(data.train),
        "held_out_accuracy": record["held_out_accuracy"], "num_held_out": record["num_held_out"],
        "macs": macs, "params": params, "seed": record["recipe"]["seed"], "data_seed": SPLIT_SEED,
        "recipe": record["recipe"], "trained_with": record["trained_with"] + " --write-sample",
    }
    path = OUT / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["models"] = [m for m in manifest["models"] if m["name"] != "cifar10"] + [entry]
    atomic_write_json(path, manifest)
    return entry


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--depth", type=int, default=20)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.2, help="one-cycle peak learning rate")
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--chunk", type=int, default=100, help="checkpoint every this many steps")
    p.add_argument("--stop-after", type=float, default=0.0, help="stop (resumably) after this many seconds of this call")
    p.add_argument("--data", type=Path, default=DATA_ZIP)
    p.add_argument("--write-sample", action="store_true", help="also write sample_models/cifar10_sample.zip")
    args = p.parse_args(argv)
    if not args.data.exists():
        print(f"CIFAR-10 zip not found at {args.data}; this script needs ../shared/data.", file=sys.stderr)
        return 2
    train(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
