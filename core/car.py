"""CAR (Classification Accuracy Reduction) scores, per-class CAR and per-layer sensitivity.

CAR of a filter = baseline accuracy - accuracy with that one filter removed (Abbasi-Asl & Yu,
arXiv 1705.07356), measured exactly by emulated removal on a fixed stratified subset of the
validation images. Scores are in accuracy points of a fraction (0.01 = one percentage point).
"""
from __future__ import annotations

import math
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from torch import nn

from .ablation import Ablation, AblationEngine
from .data import ImageSet, normalize
from .device import model_device, on_device
from .errors import SettingsError
from .fingerprint import model_fingerprint, tensors_fingerprint
from .groups import ChannelGroup, PruningGraph
from .models import InputSpec
from .screen import global_shortlist, screen_filters, screened_order_scores

SENSITIVITY_FRACTIONS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
Progress = Callable[[float, str], None]
CAR_METHODS = ("exact", "fast")
# Fast CAR measures exact CAR for this fraction of all filters, the lowest-screened ones. Chosen on the
# real CIFAR-10 ResNet-20 and ResNet-56 (bench/real_cifar.py, 400 held-out images) with the screen's
# soft flip count: at 5 % the exact lowest 10 % were found with recall 0.84 / 0.96 (0.80 on another
# 400 images of the ResNet-20) for a 8.5x / 17x shorter analysis; 15 % raised the ResNet-20's recall to
# 0.95-1.0 at 5x. The pruning loop does not depend on it: it shortlists per group (core.rescore).
FAST_EXACT_FRACTION = 0.05


@dataclass
class CarResult:
    baseline_accuracy: float
    n_images: int
    class_names: list[str]
    groups: list[dict]
    car: dict[int, list[float]]  # gid -> CAR per filter
    per_class: dict[int, list[list[float]]] = field(default_factory=dict)  # gid -> filter -> class -> drop
    sensitivity: dict[int, list[tuple[float, float]]] = field(default_factory=dict)  # gid -> (fraction, accuracy)
    seconds: float = 0.0
    mode: str = "exact"
    # gid -> per filter, whether its CAR is exact (measured) or screened (first-order estimate); empty = all exact
    exact: dict[int, list[bool]] = field(default_factory=dict)
    # layer -> why it is neither analysed nor pruned (see PruningGraph.left_alone); includes left-alone groups
    left_alone: dict[str, str] = field(default_factory=dict)
    # gid -> per filter, the mean loss increase of the same ablation (ties of CAR are broken by it)
    loss_up: dict[int, list[float]] = field(default_factory=dict)
    # the model state and score images it was measured on (CarScorer.fingerprint): a result is reused
    # only where both match; empty for analyses written before fingerprints
    fingerprint: dict = field(default_factory=dict)
    # where its ablations ran (CarScorer.where): {"where": "local"} or a Ray pool's setting, workers,
    # ablations per place and events (core.distributed); empty for analyses written before it was recorded
    where: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {
            "baseline_accuracy": self.baseline_accuracy, "n_images": self.n_images, "class_names": self.class_names,
            "groups": self.groups, "car": {str(k): v for k, v in self.car.items()},
            "per_class": {str(k): v for k, v in self.per_class.items()},
            "sensitivity": {str(k): v for k, v in self.sensitivity.items()},
            "seconds": self.seconds, "mode": self.mode, "left_alone": self.left_alone,
            "exact": {str(k): v for k, v in self.exact.items()},
            "loss_up": {str(k): v for k, v in self.loss_up.items()}, "fingerprint": self.fingerprint,
            "where": self.where,
        }

    @classmethod
    def from_dict(cls, d: dict) -> "CarResult":
        return cls(
            baseline_accuracy=d["baseline_accuracy"], n_images=d["n_images"], class_names=d["class_names"],
            groups=d["groups"], car={int(k): v for k, v in d["car"].items()},
            per_class={int(k): v for k, v in d.get("per_class", {}).items()},
            sensitivity={int(k): [tuple(x) for x in v] for k, v in d.get("sensitivity", {}).items()},
            seconds=d.get("seconds", 0.0), mode=d.get("mode", "exact"), left_alone=d.get("left_alone", {}),
            exact={int(k): v for k, v in d.get("exact", {}).items()},
            loss_up={int(k): v for k, v in d.get("loss_up", {}).items()}, fingerprint=d.get("fingerprint", {}),
            where=d.get("where", {}),
        )

    def is_exact(self, gid: int, f: int) -> bool:
        """Whether filter ``f`` of group ``gid`` has a measured (not screened) CAR."""
        return not self.exact or bool(self.exact.get(gid, [True] * (f + 1))[f])

    @property
    def n_exact(self) -> int:
        return sum(len(v) for v in self.car.values()) if not self.exact else sum(sum(v) for v in self.exact.values())


def filter_ablation(group: ChannelGroup, filters: list[int]) -> Ablation:
    """The consumer inputs to zero to emulate removing ``filters`` of ``group``."""
    return group.ablation(filters)


class CarScorer:
    """Scores filters of one model on one image subset; reused across groups and calls.

    ``pool``: Ray workers (``core.distributed.CarPool``) that evaluate the ablations instead of this
    process, with the same values; None: this process, as always. ``placed`` counts the ablations per
    place they ran (``where()``)."""

    def __init__(self, model: nn.Module, spec: InputSpec, images: ImageSet, pool=None):
        self.model = model.eval()
        self.pool = pool
        self.placed: Counter = Counter()
        self.events: list[str] = []
        self.images = images
        self.labels = images.labels
        self.inputs = normalize(images.images.to(model_device(model)), spec)
        self.engine = AblationEngine(self.model, self.inputs)
        self.base_pred = self.engine.baseline_logits().argmax(1)
        self.base_correct = (self.base_pred == self.labels)
        self.baseline_accuracy = float(self.base_correct.float().mean())

    def accuracies(self, ablations: list[Ablation], progress: Callable[[int], None] | None = None,
                   cancel: threading.Event | None = None, fast: bool = True) -> torch.Tensor:
        """Correct-prediction matrix (len(ablations), N) as bool."""
        preds, _ = self._evaluate(ablations, None, progress, cancel, fast)
        return preds == self.labels.unsqueeze(0)

    def accuracies_and_loss(self, ablations: list[Ablation], progress: Callable[[int], None] | None = None,
                            cancel: threading.Event | None = None, fast: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Correct-prediction matrix and the mean loss increase over the unablated model, per ablation."""
        if not hasattr(self, "_base_loss"):
            _, base = self.engine.evaluate([{}], self.labels, fast=fast)
            self._base_loss = float(base[0])
        preds, loss = self._evaluate(ablations, self.labels, progress, cancel, fast)
        return preds == self.labels.unsqueeze(0), loss - self._base_loss

    def _evaluate(self, ablations: list[Ablation], labels: torch.Tensor | None, progress, cancel,
                  fast: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The engine's predictions and losses, from this process or from the pool's workers (same values)."""
        if self.pool is None or not ablations:
            self.placed["local"] += len(ablations)
            return self.engine.evaluate(ablations, labels, progress=progress, cancel=cancel, fast=fast)
        before, n_events = Counter(self.pool.record.ablations), len(self.pool.record.events)
        out = self.pool.evaluate(self.model, self.inputs, self.labels, ablations, labels is not None, fast, progress,
                                 cancel, local=lambda part: self.engine.evaluate(part, labels, cancel=cancel, fast=fast))
        self.placed.update(self.pool.record.ablations - before)
        self.events.extend(self.pool.record.events[n_events:])
        return out

    def where(self) -> dict:
        """Where this scorer's ablations ran: ``{"where": "local", ...}`` or the pool's setting and workers, with
        the ablations per place (``"worker 0"``, ``"local"``) and what went wrong on the way (``events``)."""
        out = {"where": "local"} if self.pool is None else {**self.pool.record.setting,
                                                             "workers": self.pool.record.workers}
        return {**out, "ablations_by_place": dict(self.placed), "events": list(self.events)}

    def fingerprint(self) -> dict:
        """What its measurements depend on: the model state and the score images with their labels."""
        return {"model": model_fingerprint(self.model, tuple(self.inputs.shape)),
                "images": tensors_fingerprint(self.images.images, self.labels)}

    def per_class_drop(self, correct: torch.Tensor, num_classes: int) -> list[list[float]]:
        """Per ablation, the drop in each class's accuracy."""
        onehot = torch.nn.functional.one_hot(self.labels, num_classes).float()  # (N, C)
        counts = onehot.sum(0).clamp(min=1)
        base = (self.base_correct.float() @ onehot) / counts
        acc = (correct.float() @ onehot) / counts
        return (base.unsqueeze(0) - acc).tolist()


def check_image_count(n_images: int | None) -> None:
    """Refuse a number of CAR images below 1 before any work starts (None: all validation images)."""
    if n_images is not None and (not isinstance(n_images, int) or n_images < 1):
        raise SettingsError(f"CAR needs at least 1 validation image; got {n_images}.")


def check_method(method: str) -> None:
    if method not in CAR_METHODS:
        raise SettingsError(f"Unknown CAR method '{method}'. Choose one of: {', '.join(CAR_METHODS)}.")


def compute_car(
    model: nn.Module,
    spec: InputSpec,
    images: ImageSet,
    n_images: int | None = 500,
    sensitivity: bool = True,
    per_class: bool = True,
    progress: Progress | None = None,
    cancel: threading.Event | None = None,
    fast: bool = True,
    method: str = "exact",
    exact_fraction: float = FAST_EXACT_FRACTION,
    device: torch.device | str | None = None,
    pool=None,
) -> CarResult:
    """CAR of every filter of every prunable group (+ per-class CAR and per-layer sensitivity).

    ``method="exact"`` measures every filter (``fast`` only chooses the batched engine over the naive
    one; same numbers). ``method="fast"`` screens every filter to first order (``core.screen``, one
    forward and two backward passes) and measures exact CAR for the lowest-screened ``exact_fraction``
    of them; ``result.exact`` says which figures are measured and which screened. ``device``: where the
    forward passes run (``core.device``); the model is back on the CPU afterwards. ``pool``: Ray workers that
    evaluate the ablations (``core.distributed.CarPool``; same values); ``result.where`` says where they ran.
    """
    check_image_count(n_images)
    check_method(method)
    t0 = time.perf_counter()
    subset = images.subset(n_images)
    graph = PruningGraph(model, spec.shape(1))
    groups = graph.groups()
    with on_device(model, device):
        result = _car_on_device(model, spec, images, subset, groups, sensitivity, per_class, progress, cancel, fast,
                                method, exact_fraction, pool)
    result.left_alone = graph.left_alone()
    result.seconds = time.perf_counter() - t0
    return result


def _car_on_device(model, spec, images, subset, groups, sensitivity, per_class, progress, cancel, fast, method,
                   exact_fraction, pool=None) -> CarResult:
    scorer = CarScorer(model, spec, subset, pool=pool)
    screen = None
    if method == "fast":
        if progress:
            progress(0.0, f"CAR: screening all {sum(g.width for g in groups)} filters (first order)")
        screen = screen_filters(model, normalize(subset.images, spec), subset.labels, groups, cancel=cancel)
        picks = global_shortlist(screened_order_scores(screen, groups), groups, exact_fraction)
    else:
        picks = {g.gid: np.arange(g.width) for g in groups}
    ablations, owners, filters = [], [], []
    for g in groups:
        for f in picks.get(g.gid, []):
            ablations.append(filter_ablation(g, [int(f)]))
            owners.append(g.gid)
            filters.append(int(f))
    # the bar counts ablated images, the sensitivity's too: every ablation costs about the same, so the fraction
    # moves at one rate and a rate-based ETA holds (issue 27: the sensitivity's fewer, slower-looking ablations
    # were given half the bar)
    n_sensitivity = sensitivity_points(groups) if sensitivity else 0
    total = (len(ablations) + n_sensitivity) * len(subset)
    what = "filters" if method == "exact" else "shortlisted filters (exact)"

    def report(done: int) -> None:
        if progress:
            progress(min(done / max(total, 1), 1.0), f"CAR: {done // max(len(subset), 1)} of {len(ablations)} {what}")

    correct, loss_up = scorer.accuracies_and_loss(ablations, progress=report, cancel=cancel, fast=fast)
    acc = correct.float().mean(1)
    result = CarResult(scorer.baseline_accuracy, len(subset), list(images.class_names), [g.to_dict() for g in groups], {},
                       fingerprint=scorer.fingerprint())
    owners_t = torch.tensor(owners, dtype=torch.long)
    for g in groups:
        rows = (owners_t == g.gid).nonzero().flatten()
        measured = [scorer.baseline_accuracy - float(acc[r]) for r in rows]
        measured_loss = [float(loss_up[r]) for r in rows]
        measured_pc = scorer.per_class_drop(correct[rows], len(images.class_names)) if per_class and len(rows) else []
        if screen is None:
            result.car[g.gid], result.loss_up[g.gid] = measured, measured_loss
            if per_class:
                result.per_class[g.gid] = measured_pc
            continue
        car = screen.car[g.gid].astype(float).tolist()
        loss = screen.loss_up[g.gid].astype(float).tolist()
        pc = screen.per_class[g.gid].tolist()
        exact = [False] * g.width
        for k, r in enumerate(rows.tolist()):
            f = filters[r]
            car[f], loss[f], exact[f] = measured[k], measured_loss[k], True
            if per_class:
                pc[f] = measured_pc[k]
        result.car[g.gid], result.exact[g.gid], result.loss_up[g.gid] = car, exact, loss
        if per_class:
            result.per_class[g.gid] = pc
    if sensitivity:
        result.sensitivity = _sensitivity(scorer, groups, result.car, progress, cancel, len(ablations) * len(subset), total)
    engine = "exact" if (fast and scorer.engine.fast) or not fast else "exact (naive)"
    result.where = scorer.where()
    result.mode = engine if screen is None else (
        f"fast: first-order screen of all {sum(g.width for g in groups)} filters, {engine} CAR for the "
        f"{len(ablations)} lowest-screened")
    return result


def sensitivity_points(groups: list[ChannelGroup]) -> int:
    """How many ablations the per-layer sensitivity makes (one per group and fraction that removes some but not
    all of the group's filters), known before any CAR is measured."""
    return sum(1 for g in groups for frac in SENSITIVITY_FRACTIONS if 0 < int(round(frac * g.width)) < g.width)


def _sensitivity(scorer: CarScorer, groups: list[ChannelGroup], car: dict[int, list[float]], progress, cancel,
                 offset: int, total: int) -> dict[int, list[tuple[float, float]]]:
    """Accuracy with the lowest-CAR 10 %, 20 %, ... 90 % of one group's filters removed, that group alone."""
    ablations, keys = [], []
    for g in groups:
        order = np.argsort(np.asarray(car[g.gid]), kind="stable")
        for frac in SENSITIVITY_FRACTIONS:
            k = int(round(frac * g.width))
            if 0 < k < g.width:
                ablations.append(filter_ablation(g, order[:k].tolist()))
                keys.append((g.gid, frac))

    def report(done: int) -> None:
        if progress:
            progress(min((offset + done) / max(total, 1), 1.0), "per-layer sensitivity")

    correct = scorer.accuracies(ablations, progress=report, cancel=cancel)
    acc = correct.float().mean(1).tolist()
    out: dict[int, list[tuple[float, float]]] = {g.gid: [(0.0, scorer.baseline_accuracy)] for g in groups}
    for (gid, frac), a in zip(keys, acc):
        out[gid].append((frac, a))
    return out


def exact_budget(n_filters: int, finetune_steps: int, batch_size: int, score_images: int) -> int:
    """The most filters fast CAR measures exactly in one scoring pass of the loop: the larger of the share
    the analysis measures (``FAST_EXACT_FRACTION`` of all ``n_filters``, the share bench/real_cifar.py times)
    and as many as one step's fine-tuning costs (a filter's exact CAR is at most one forward pass of the
    ``score_images``; a fine-tuning mini-batch of ``batch_size`` about three forward passes of its images),
    so that a step's scoring never costs much more than its fine-tuning."""
    finetune_equivalent = 3 * finetune_steps * batch_size // max(score_images, 1)
    return max(math.ceil(FAST_EXACT_FRACTION * n_filters), finetune_equivalent)
