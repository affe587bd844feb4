"""Training precision: the same recovery in fp32 and in bf16 mixed precision, on real CIFAR-10 ResNets.

    python bench/train_precision.py [--depths 20 56] [--epochs 6] [--seeds 0 1] [--threads 2]

Needs ``../shared/data/cifar10_train_jpeg.zip`` (skips with a message when it is absent) and the weights that
``sample_models/train_cifar.py`` wrote. The roles are a user's upload as ``bench/real_cifar.py --upload`` draws
them: 5,000 training images (JPEG, as users have them), 2,000 held-out selection images that choose the best
epoch, and the 3,000 other held-out images, **unseen**, which only this report reads.

Per depth, the trained original loses the lowest-L1 quarter of every prunable group's filters (one structural
cut, the same for every variant), then the pruned model is recovered as the pruning loop's stretch recovery does
it (``core.recovery.recover``: KD from the original, mirrored images, cosine schedule, ``--epochs`` epochs) once per
precision and seed, the variants alternating in this process. Printed: each recovery's wall time, selection and
unseen accuracy; per seed the time ratio fp32 / bf16 and the paired unseen difference bf16 - fp32 with its 95 %
interval; and fp32 seed against fp32 seed, the run-to-run spread that difference is to be read against. Also the
ratio of one training step's time (forward with the teacher, backward, SGD) in both, best of 10, alternating.
"""
from __future__ import annotations

import copy
import json
import sys
import time

import torch
import torch.nn.functional as F

from _common import machine, parse_with_data, parser, table

import train_cifar  # noqa: E402  (sample_models/, on sys.path by _common)

from core.architectures import CifarResNet  # noqa: E402
from core.data import ImageSet, normalize  # noqa: E402
from core.evaluate import evaluate_accuracy  # noqa: E402
from core.groups import PruningGraph  # noqa: E402
from core.models import InputSpec  # noqa: E402
from core.recovery import RecoveryConfig, recover  # noqa: E402
from core.stats import paired_drop  # noqa: E402
from core.training import native_bf16, train_steps  # noqa: E402

PRECISIONS = ("fp32", "bf16")


def upload_sets(depth_record: dict) -> tuple[ImageSet, ImageSet, ImageSet, InputSpec]:
    """train (5,000), selection (2,000 held out) and unseen (the other 3,000 held out), as real_cifar's upload."""
    from real_cifar import upload_roles  # the same draw as the upload bench (bench/ is this script's folder)

    images, labels, classes, _ = train_cifar.cached_arrays(train_cifar.DATA_ZIP)
    roles = upload_roles(labels)

    def subset(idx) -> ImageSet:
        return ImageSet(torch.from_numpy(images[idx]).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(labels[idx]),
                        classes)

    spec = InputSpec(height=32, width=32, mean=tuple(depth_record["mean"]), std=tuple(depth_record["std"]))
    return subset(roles["train"]), subset(roles["val"]), subset(roles["unseen"]), spec


def trained_originals(depths: list[int]):
    """Per depth whose weights ``sample_models/train_cifar.py`` wrote: ``(depth, the trained original in eval
    mode, upload_sets(...))``; a depth not trained yet is skipped with one line."""
    manifest = json.loads(train_cifar.MANIFEST.read_text()) if train_cifar.MANIFEST.exists() else {"models": []}
    trained = {m["name"]: m for m in manifest["models"]}
    for depth in depths:
        record = trained.get(f"cifar10_resnet{depth}")
        if record is None:
            print(f"ResNet-{depth}: not trained yet (sample_models/train_cifar.py); skipped")
            continue
        original = CifarResNet(depth)
        original.load_state_dict(torch.load(train_cifar.MANIFEST.parent / record["weights"], weights_only=True))
        yield depth, original.eval(), upload_sets(record)


def pruned_copy(original: torch.nn.Module, fraction: float = 0.25) -> torch.nn.Module:
    """The original without the lowest-L1 ``fraction`` of every prunable group's filters (whole clusters of 8)."""
    graph = PruningGraph(copy.deepcopy(original).eval(), (1, 3, 32, 32))
    for group in graph.groups():
        if group.left_alone:
            continue
        weight = graph.module(group.root).weight.detach()
        cut = int(group.width * fraction) // 8 * 8
        if cut:
            order = weight.abs().sum(dim=(1, 2, 3)).argsort()
            graph.prune(group.root, order[:cut].tolist())
    return graph.model.eval()


def step_ratio(model: torch.nn.Module, teacher: torch.nn.Module, spec: InputSpec, train: ImageSet) -> float:
    """fp32 / bf16 time of one KD training step of 64 images, best of 10 each, alternating."""
    x, y = normalize(train.images[:64], spec), train.labels[:64]
    best = {p: float("inf") for p in PRECISIONS}
    nets = {p: copy.deepcopy(model).train() for p in PRECISIONS}
    opts = {p: torch.optim.SGD(nets[p].parameters(), lr=1e-9, momentum=0.9) for p in PRECISIONS}
    for i in range(12):
        for p in PRECISIONS:
            net = nets[p]
            net.train()
            t0 = time.perf_counter()

            def loss(net=net) -> torch.Tensor:
                with torch.no_grad():
                    teacher(x)
                return F.cross_entropy(net(x), y)

            train_steps(net, opts[p], 1, loss, precision=p)
            if i >= 2:
                best[p] = min(best[p], time.perf_counter() - t0)
    return best["fp32"] / best["bf16"]


def recovery_parser(doc: str | None):
    """The arguments of a bench that recovers pruned ResNets on the upload: ``--depths``, ``--epochs`` (of each
    recovery), ``--seeds`` and ``--threads``."""
    ap = parser(doc)
    ap.add_argument("--depths", type=int, nargs="+", default=[20, 56])
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--threads", type=int, default=2)
    return ap


def recovery_args(ap, note: str = ""):
    """A recovery bench's arguments from ``ap`` (:func:`recovery_parser` and what the bench added), with the machine
    line (and ``note``) printed; None, after one ``skipped:`` line, when the real data is absent."""
    args = parse_with_data(ap, train_cifar.DATA_ZIP)
    if args is not None:
        print(f"machine: {machine()}{note}", flush=True)
    return args


def main() -> int:
    args = recovery_args(recovery_parser(__doc__), f"; native bf16 on this CPU: {native_bf16('cpu')}")
    if args is None:
        return 0
    rows, pairs = [], []
    for depth, original, (train, selection, unseen, spec) in trained_originals(args.depths):
        pruned = pruned_copy(original)
        base = evaluate_accuracy(original, unseen, spec)
        cut = evaluate_accuracy(pruned, unseen, spec)
        print(f"ResNet-{depth}: original {base.accuracy:.2%} unseen, pruned {cut.accuracy:.2%}; one KD training step "
              f"fp32 / bf16 = {step_ratio(pruned, original, spec, train):.2f}x", flush=True)
        correct = {}
        for seed in args.seeds:
            for precision in PRECISIONS:
                model = copy.deepcopy(pruned)
                config = RecoveryConfig(epochs=args.epochs, distill=True, hflip=True, seed=seed, precision=precision)
                t0 = time.perf_counter()
                result = recover(model, train, spec, config,
                                 lambda m: evaluate_accuracy(m, selection, spec).accuracy, teacher=original)
                seconds = time.perf_counter() - t0
                acc = evaluate_accuracy(model, unseen, spec)
                correct[precision, seed] = acc.correct.numpy()
                rows.append({"model": f"ResNet-{depth}", "precision": result.precision, "seed": seed,
                             "wall s": round(seconds, 1), "best epoch": result.best_epoch,
                             "selection %": round(100 * max(e["selection"] for e in result.epochs), 2),
                             "unseen %": round(100 * acc.accuracy, 2),
                             "unseen drop from original": round(100 * (base.accuracy - acc.accuracy), 2)})
                print(table(rows[-1:], list(rows[-1])), flush=True)
        for seed in args.seeds:
            d = paired_drop(correct["fp32", seed], correct["bf16", seed])
            times = {p: next(r["wall s"] for r in rows if r["model"] == f"ResNet-{depth}" and r["seed"] == seed
                             and r["precision"] == p) for p in PRECISIONS}
            pairs.append({"model": f"ResNet-{depth}", "compared": f"fp32 vs bf16, seed {seed}",
                          "wall ratio": f"{times['fp32'] / times['bf16']:.2f}x",
                          "unseen points lost (95 % CI)": f"{d.drop_points:+.2f} ({d.low_points:+.2f}..{d.high_points:+.2f})"})
        for a, b in zip(args.seeds, args.seeds[1:]):
            d = paired_drop(correct["fp32", a], correct["fp32", b])
            pairs.append({"model": f"ResNet-{depth}", "compared": f"fp32 seed {a} vs fp32 seed {b}", "wall ratio": "",
                          "unseen points lost (95 % CI)": f"{d.drop_points:+.2f} ({d.low_points:+.2f}..{d.high_points:+.2f})"})
    print()
    print(table(rows, list(rows[0]) if rows else []))
    print()
    print("Paired on the unseen images (points the second loses against the first; the seed pair is the spread):")
    print(table(pairs, ["model", "compared", "wall ratio", "unseen points lost (95 % CI)"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
