"""What a recovery can buy back on a user-sized upload: one-shot prune, then KD recovery, vs the control.

    python bench/oneshot_recovery.py [--depth 20] [--target 0.72] [--epochs 8] [--lr 0.01] [--hflip 1] [--control]

Our CIFAR-10 ResNet (``sample_models/train_cifar.py``) is pruned in one shot to ``--target`` of its MACs or
below, in 8-filter clusters, each time the cluster with the least normalised L1 norm per MAC saved (a cheap
stand-in for the loop's ranking: the point is the recovery, not the choice), then recovered with the product's
``core.recovery.recover`` (KD from the original, cosine schedule, the best epoch by selection accuracy) on the
upload of ``bench/real_cifar.py --upload``: 5,000 training images; 2,000 held-out ``val`` images (selection);
3,000 other held-out images no choice touches (unseen). ``--control`` gives the original the same recovery.
Prints per model: MAC ratio, selection accuracy before and after, unseen accuracy, per-epoch selection, time.
Needs ``../shared/data/cifar10_train_jpeg.zip`` (skips with a message when it is absent).
"""
from __future__ import annotations

import json
import sys
import time

import numpy as np
import torch

from _common import ROOT, parse_with_data, parser

sys.path.insert(0, str(ROOT / "sample_models"))
import train_cifar  # noqa: E402
from real_cifar import upload_roles  # noqa: E402

from core.architectures import CifarResNet  # noqa: E402
from core.data import ImageSet  # noqa: E402
from core.evaluate import count_macs_params, evaluate_accuracy  # noqa: E402
from core.groups import PruningGraph  # noqa: E402
from core.models import InputSpec  # noqa: E402
from core.recovery import RecoveryConfig, recover  # noqa: E402


def prune_to(graph: PruningGraph, spec: InputSpec, target_macs: float, cluster: int = 8) -> None:
    """Remove clusters (the lowest normalised L1 per MAC saved, across groups) until MACs <= ``target_macs``."""
    while count_macs_params(graph.model, spec)[0] > target_macs:
        best = None
        for group in graph.groups():
            if group.left_alone or group.width <= cluster:
                continue
            l1 = graph.module(group.root).weight.detach().abs().flatten(1).sum(1).numpy()
            l1 = l1 / (l1.mean() + 1e-12)
            k = group.width - ((group.width - 1) // cluster) * cluster
            idx = np.argsort(l1)[:k]
            cost = l1[idx].sum() / (k * group.macs_per_filter + 1)
            if best is None or cost < best[0]:
                best = (cost, group.root, sorted(idx.tolist()))
        if best is None:
            return
        graph.prune(best[1], best[2])


def main() -> int:
    ap = parser(__doc__)
    ap.add_argument("--depth", type=int, default=20, choices=[20, 56])
    ap.add_argument("--target", type=float, default=0.72, help="MAC fraction to prune to (one shot)")
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--hflip", type=int, default=1, choices=[0, 1], help="mirrored images in the recovery")
    ap.add_argument("--no-kd", action="store_true")
    ap.add_argument("--control", action="store_true", help="also recover the original the same way")
    ap.add_argument("--threads", type=int, default=2)
    args = parse_with_data(ap, train_cifar.DATA_ZIP)
    if args is None:
        return 0
    manifest = {m["name"]: m for m in json.loads(train_cifar.MANIFEST.read_text())["models"]}
    record = manifest.get(f"cifar10_resnet{args.depth}")
    if record is None:
        print(f"skipped: no trained ResNet-{args.depth} in {train_cifar.MANIFEST}")
        return 0
    images, labels, classes, _ = train_cifar.cached_arrays(train_cifar.DATA_ZIP)
    roles = upload_roles(labels)

    def image_set(idx) -> ImageSet:
        return ImageSet(torch.from_numpy(images[idx]).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(labels[idx]),
                        list(classes))

    train, val, unseen = image_set(roles["train"]), image_set(roles["val"]), image_set(roles["unseen"])
    spec = InputSpec(height=32, width=32, mean=tuple(record["mean"]), std=tuple(record["std"]))

    def original() -> torch.nn.Module:
        model = CifarResNet(args.depth, 10)
        model.load_state_dict(torch.load(ROOT / "sample_models" / record["weights"], weights_only=True))
        return PruningGraph(model.eval(), spec.shape(1)).model  # option-A shortcuts as frozen convs, as a run has

    def accuracy(model, images_) -> float:
        return evaluate_accuracy(model.eval(), images_, spec).accuracy

    base_macs = count_macs_params(original(), spec)[0]
    teacher = original()
    print(f"original: selection {accuracy(teacher, val):.4f}, unseen {accuracy(teacher, unseen):.4f}, "
          f"{base_macs / 1e6:.1f} M MACs", flush=True)
    for which in ["pruned"] + (["control"] if args.control else []):
        graph = PruningGraph(original(), spec.shape(1))
        if which == "pruned":
            prune_to(graph, spec, args.target * base_macs)
        model = graph.model
        ratio = base_macs / count_macs_params(model, spec)[0]
        before = accuracy(model, val)
        rc = RecoveryConfig(epochs=args.epochs, lr=args.lr, distill=not args.no_kd, hflip=bool(args.hflip))
        t0 = time.perf_counter()
        result = recover(model, train, spec, rc, lambda m: accuracy(m, val), teacher=None if args.no_kd else teacher)
        print(f"{which}: {ratio:.2f}x fewer MACs, {args.epochs} epochs (lr {args.lr:g}, mirrors {args.hflip}, "
              f"KD {not args.no_kd}): selection {before:.4f} -> {accuracy(model, val):.4f}, unseen "
              f"{accuracy(model, unseen):.4f}, best epoch {result.best_epoch}, {time.perf_counter() - t0:.0f} s; "
              f"per epoch {[round(e['selection'], 4) for e in result.epochs]}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
