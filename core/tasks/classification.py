"""Classification as a pruning task: top-1 accuracy, exact CAR, cross-entropy fine-tuning.

With the ``car`` criterion the cost of a filter and of a candidate cluster is measured exactly (its
emulated removal on ``score_images`` validation images, ``core.car.CarScorer``), not summed from
single-filter scores; other criteria rank clusters by their normalised filter scores per MAC saved.
"""
from __future__ import annotations

import threading
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .. import criteria
from ..car import CarScorer, compute_car, filter_ablation
from ..criteria import Cluster, ScoreContext
from ..data import DataSet, ImageSet, normalize
from ..engine import PruneConfig, group_key, train_steps
from ..evaluate import count_macs_params, evaluate_accuracy
from ..groups import ChannelGroup, PruningGraph
from ..models import InputSpec
from ..ov_runtime import measure_latency_ms
from ..screen import tiebreak

NAME = "classification"
METRIC = "accuracy"


class ClassificationTask:
    """A classifier on an image set (``core.tasks.Task``); the metric is top-1 accuracy on the validation split."""

    name = NAME
    metric_name = METRIC
    metric_unit = "%"
    partial_rescore = False  # a re-score scores every group: exact CAR depends on the whole current model

    def __init__(self, spec: InputSpec, data: DataSet, config: PruneConfig):
        self.spec, self.data, self.config = spec, data, config
        self.input_shape = spec.shape(1)

    def output_layers(self, model: nn.Module) -> None:
        return None

    def measure(self, model: nn.Module) -> dict:
        return measure(model, self.data, self.spec, self.config)

    def analyse(self, model: nn.Module, cancel: threading.Event, progress) -> dict:
        """CAR of every filter of the original, per class, and per-layer sensitivity (``car.json``)."""
        return compute_car(model, self.spec, self.data.val, n_images=self.config.score_images, sensitivity=True,
                           progress=progress, cancel=cancel).to_dict()

    def scorer(self, model: nn.Module) -> CarScorer | None:
        if self.config.criterion != "car":
            return None
        return CarScorer(model, self.spec, self.data.val.subset(self.config.score_images, seed=self.config.seed))

    def score_context(self, graph: PruningGraph, groups: list[ChannelGroup], scorer: CarScorer | None, rng,
                      cancel, progress) -> ScoreContext:
        return score_context(graph, groups, scorer, self.data.train, self.spec, rng, cancel, progress)

    def rank(self, graph: PruningGraph, clusters: list[Cluster], scores: dict, scorer: CarScorer | None, rng,
             cancel, progress) -> list[Cluster]:
        """The criterion's own ranking: CAR's exact cluster cost per MAC, or normalised scores per MAC."""
        ctx = score_context(graph, [c.group for c in clusters], scorer, None, None, rng, cancel)
        criteria.get(self.config.criterion, NAME).rank(clusters, scores, ctx)
        return sorted(clusters, key=lambda c: c.rank)

    def finetune(self, model: nn.Module, rng, cancel, progress) -> None:
        c = self.config
        finetune(model, self.data.train, self.spec, c.finetune_steps, c.finetune_lr, c.batch_size, rng, cancel, progress)

    def step_extra(self, cluster: Cluster) -> dict:
        return {}


def measure(model: nn.Module, data: DataSet, spec: InputSpec, config: PruneConfig) -> dict:
    """One record's figures: ``metric`` (top-1 accuracy, 0..1), ``per_class`` accuracy, MACs, params,
    OpenVINO CPU latency in ms (None when ``config.latency`` is off)."""
    acc = evaluate_accuracy(model, data.val, spec)
    macs, params = count_macs_params(model, spec)
    latency = None
    if config.latency:
        latency = measure_latency_ms(model, spec.shape(1), runs=config.latency_runs, warmup=5)
    return {"metric": acc.accuracy, "per_class": acc.per_class, "macs": macs, "params": params, "latency_ms": latency}


# ----------------------------------------------------------------------------- scores


def score_context(graph: PruningGraph, groups: list[ChannelGroup], scorer: CarScorer | None, train: ImageSet | None,
                  spec: InputSpec | None, rng: np.random.Generator, cancel=None,
                  progress: Callable[[float, str], None] | None = None) -> ScoreContext:
    """What classification gives a criterion: exact CAR of filters and clusters (``scorer``), CE gradients.
    Scores are keyed by group root (``core.engine.group_key``)."""

    def filter_costs(gs: list[ChannelGroup]) -> dict[str, np.ndarray]:
        by_gid = car_filter_scores(scorer, gs, cancel, progress)
        return {group_key(g): by_gid[g.gid] for g in gs}

    def cluster_costs(clusters: list[Cluster]) -> np.ndarray:
        correct = scorer.accuracies([filter_ablation(c.group, c.filters) for c in clusters], cancel=cancel)
        return scorer.baseline_accuracy - correct.float().mean(1).numpy()

    return ScoreContext(graph, groups, rng, key=group_key, filter_costs=filter_costs if scorer else None,
                        cluster_costs=cluster_costs if scorer else None,
                        accumulate_gradients=lambda: _accumulate_gradients(graph.model, train, spec, rng),
                        cluster_eps=1.0 / max(len(scorer.labels), 1) if scorer else 0.0)


def score_filters(criterion: str, graph: PruningGraph, groups: list[ChannelGroup], scorer: CarScorer | None,
                  train: ImageSet, spec: InputSpec, rng: np.random.Generator, cancel=None,
                  progress: Callable[[float, str], None] | None = None) -> dict[str, np.ndarray]:
    """Per group root, a score per filter: lower = less important, removed first."""
    ctx = score_context(graph, groups, scorer, train, spec, rng, cancel, progress)
    return criteria.get(criterion, NAME).score(ctx)


def car_filter_scores(scorer: CarScorer, groups: list[ChannelGroup], cancel=None,
                      progress: Callable[[float, str], None] | None = None) -> dict[int, np.ndarray]:
    """Per group id, the exact CAR of each filter alone, ties broken by the loss increase."""
    ablations, owners = [], []
    for g in groups:
        for f in range(g.width):
            ablations.append(filter_ablation(g, [f]))
            owners.append(g.gid)
    total = len(ablations) * len(scorer.labels)
    correct, loss_up = scorer.accuracies_and_loss(
        ablations, cancel=cancel, progress=(lambda d: progress(d / total, "scoring filters (CAR)")) if progress else None)
    return car_with_tiebreak(scorer.baseline_accuracy - correct.float().mean(1).numpy(), loss_up.numpy(),
                             np.asarray(owners), groups, len(scorer.labels))


def car_with_tiebreak(car: np.ndarray, loss_up: np.ndarray, owners: np.ndarray, groups: list[ChannelGroup],
                      n_images: int) -> dict[int, np.ndarray]:
    """Per group id, CAR with ties broken by the loss increase of the same ablation.

    The loss term is scaled below one image's worth of accuracy (0.5 / N), so it only orders filters
    whose CAR is equal; without it the many filters with CAR 0 on a small image set would be removed
    in arbitrary order.
    """
    return {g.gid: tiebreak(car[owners == g.gid], loss_up[owners == g.gid], n_images) for g in groups}


def _accumulate_gradients(model: nn.Module, train: ImageSet, spec: InputSpec, rng, batches: int = 4, bs: int = 64) -> None:
    model.eval()
    model.zero_grad(set_to_none=True)
    for _ in range(batches):
        idx = rng.choice(len(train), size=min(bs, len(train)), replace=False)
        loss = F.cross_entropy(model(normalize(train.images[idx], spec)), train.labels[idx])
        loss.backward()


# ----------------------------------------------------------------------------- fine-tuning


def _augment(x: torch.Tensor, rng: np.random.Generator, shift: int = 2) -> torch.Tensor:
    """Random translation by up to ``shift`` pixels (zero padded): mild, label-preserving for any image."""
    if shift <= 0:
        return x
    padded = F.pad(x, (shift, shift, shift, shift))
    h, w = x.shape[2:]
    out = torch.empty_like(x)
    offs = rng.integers(0, 2 * shift + 1, size=(len(x), 2))
    for i, (dy, dx) in enumerate(offs):
        out[i] = padded[i, :, dy:dy + h, dx:dx + w]
    return out


def finetune(model: nn.Module, train: ImageSet, spec: InputSpec, steps: int, lr: float, batch_size: int,
             rng: np.random.Generator, cancel: threading.Event | None = None,
             progress: Callable[[float, str], None] | None = None) -> None:
    """A few mini-batches of SGD on the training split, to let the network adapt to the removal."""
    if steps <= 0 or len(train) == 0:
        return
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=5e-4)

    def batch_loss() -> torch.Tensor:
        idx = rng.choice(len(train), size=min(batch_size, len(train)), replace=False)
        return F.cross_entropy(model(_augment(normalize(train.images[idx], spec), rng)), train.labels[idx])

    train_steps(model, opt, steps, batch_loss, cancel, progress)
