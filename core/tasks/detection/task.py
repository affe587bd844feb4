"""Object detection (SSD) as a pruning task: mAP@0.5, MultiBox-loss screen + exact mAP, MultiBox fine-tuning.

Classification measures the accuracy cost of a cluster exactly on a few hundred images. A
detector's metric, mAP, needs decoding + NMS + matching per evaluation, which is too slow to run
for every group at every step, so each step ranks clusters in two stages:

1. *screen*: every group's candidate cluster (its c lowest-scoring filters) is removed by emulation
   (``AblationEngine``: the consumers' inputs zeroed, prefix activations cached) on a fixed subset of
   the validation images, and the MultiBox-loss increase it causes is measured; it ranks clusters by
   loss increase per MAC saved;
2. *decide*: the best few clusters (``exact_candidates``) get their exact emulated mAP on the
   validation images, and the cheapest mAP drop per MAC saved goes first.

After the surgery the loop (``core.engine``) fine-tunes briefly with the MultiBox loss and measures
the real mAP. The head's output convs (``model.output_layers()``) define the [A, 4 + C] layout and
are never pruned; every other conv, the heads' hidden ones included, may lose clusters.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch import nn

from ...ablation import AblationEngine
from ...criteria import Cluster, ScoreContext
from .data import DetectionData, DetectionSet
from .evaluate import EvalSettings, MapResult, detect, evaluate_map, map_of_detections, normalize_images
from .loss import encode_batch, multibox_loss
from .models import output_layer_names
from ...engine import PruneConfig, group_key
from ...training import train_steps
from ...errors import SettingsError
from ...groups import ChannelGroup, PruningGraph
from ...models import InputSpec
from ...measure import measure_model

NAME = "detection"
METRIC = "mAP@0.5"


@dataclass
class DetectionPruneConfig(PruneConfig):
    """``PruneConfig`` with detection's defaults and three settings of its own.

    ``max_drop`` is in mAP points (mAP x 100); ``score_images`` is the screening subset (loss
    increase); ``map_images`` the images exact mAP is measured on (None: the whole validation split);
    ``exact_candidates`` how many screened clusters get an exact mAP each step.
    """

    finetune_steps: int = 20
    # Measured on the sample: 20 steps of SGD at lr 0.005 cost 12 mAP points on the unpruned detector,
    # AdamW at 1e-4 (BatchNorm statistics frozen) none.
    finetune_lr: float = 1e-4
    batch_size: int = 32
    score_images: int = 128
    # Scoring every filter alone costs about a minute on the sample (1000 filters); between full
    # re-scores only the group that lost a cluster is scored again (its filter indices changed).
    rescore_every: int = 10
    optimizer: str = "adamw"  # adamw | sgd
    map_images: int | None = None
    exact_candidates: int = 3
    filter_images: int = 32  # screen images used to order the filters of a group (one ablation per filter)
    analyse_car: bool = False  # the classification CAR analysis does not apply to detectors
    # one cluster per step, no recovery and no control: detection keeps the loop it was measured with
    # (the recovery fine-tune trains classifiers only)
    clusters_per_step: int = 1
    step_macs: float | None = None
    recover_epochs: int = 0
    control: bool = False
    train_precision: str = "fp32"  # the detector's fine-tuning (AdamW, frozen BatchNorm) was measured in fp32 only

    task = NAME
    APP_DEFAULTS = {"max_steps": 3, "latency": False}

    def validate(self) -> None:
        super().validate()
        if self.optimizer not in ("sgd", "adamw"):
            raise SettingsError(f"Unknown optimizer '{self.optimizer}'. Choose sgd or adamw.")
        if self.exact_candidates < 1:
            raise SettingsError("At least one screened cluster must get an exact mAP (exact_candidates >= 1).")
        if self.map_images is not None and self.map_images < 10:
            raise SettingsError("mAP needs at least 10 validation images (map_images >= 10).")
        if self.train_precision != "fp32":
            raise SettingsError("A detection run fine-tunes in fp32 only; leave --train-precision out (or give fp32).")
        if self.work_setting().where != "local":
            raise SettingsError("Ray workers score classification CAR only; a detection run scores in this process "
                                "(leave --ray-address / --ray-workers out).")


class DetectionTask:
    """An SSD detector on a Pascal VOC set (``core.tasks.Task``); the metric is mAP@0.5 on the validation split.

    The screen and exact-mAP image subsets are fixed by the seed for the whole run.
    """

    name = NAME
    metric_name = METRIC
    metric_unit = "%"
    partial_rescore = True  # see DetectionPruneConfig.rescore_every

    def __init__(self, spec: InputSpec, data: DetectionData, config: DetectionPruneConfig):
        self.spec, self.data, self.config = spec, data, config
        self.input_shape = spec.shape(1)
        self.screen = data.val.subset(_subset_indices(len(data.val), config.score_images, config.seed))
        self.exact = data.val if config.map_images is None else data.val.subset(
            _subset_indices(len(data.val), config.map_images, config.seed))

    def output_layers(self, model: nn.Module) -> list[str]:
        return output_layer_names(model)

    def decision(self, model: nn.Module) -> MapResult:
        return evaluate_map(model, self.data.val, self.spec.mean, self.spec.std)

    def measure(self, model: nn.Module, decision: MapResult | None = None) -> dict:
        return measure_detector(model, self.data, self.spec, self.config, selection=decision)

    def analyse(self, model: nn.Module, cancel, progress) -> None:
        return None  # the classification CAR analysis does not apply; the Analyse page runs detection CAR per group

    def scorer(self, model: nn.Module) -> DetectionScorer:
        return DetectionScorer(model, self.spec, self.screen, self.exact)

    def score_context(self, graph: PruningGraph, groups: list[ChannelGroup], scorer: DetectionScorer, rng,
                      cancel, progress) -> ScoreContext:
        return score_context(graph, groups, scorer, rng, cancel, self.config.filter_images)

    def rank(self, graph: PruningGraph, clusters: list[Cluster], scores: dict, scorer: DetectionScorer, rng,
             cancel, progress) -> list[Cluster]:
        return rank_clusters(clusters, self.config, scorer, cancel, progress)

    def finetune(self, model: nn.Module, rng, cancel, progress) -> None:
        finetune_detector(model, self.data.train, self.spec, self.config, rng, cancel, progress)

    def step_extra(self, clusters: list[Cluster]) -> dict:
        """The screened loss increase of the removal (summed over a multi-cluster step's clusters)."""
        losses = [c.loss_up for c in clusters]
        return {"screen_loss_increase": None if None in losses else sum(losses)}


# ----------------------------------------------------------------------------- measuring


class DetectionScorer:
    """Emulated removals of one model on fixed validation images: loss increase and exact mAP.

    Both go through ``AblationEngine`` (prefix cached, suffix re-run per ablation), so a screened or
    decided cluster costs a fraction of a full evaluation, and the numbers are those of the real
    removal up to float rounding (BatchNorm is folded in the traced copy).
    """

    def __init__(self, model: nn.Module, spec: InputSpec, screen: DetectionSet, exact: DetectionSet,
                 settings: EvalSettings = EvalSettings()):
        self.model, self.settings = model.eval(), settings
        self.anchors = model.anchors()
        self.weights = model.box_coder_weights
        self.screen, self.exact = screen, exact
        self.targets = encode_batch(screen.boxes, screen.labels, self.anchors, self.weights)
        self.num_pos = float((self.targets.cls > 0).sum().clamp(min=1))
        self.screen_engine = AblationEngine(self.model, normalize_images(screen.images, spec.mean, spec.std))
        self.exact_engine = AblationEngine(self.model, normalize_images(exact.images, spec.mean, spec.std))
        self.raw_shape = tuple(self.screen_engine.baseline_logits().shape[1:])  # (A, 4 + C)
        self.base_loss = 0.0
        base = self.screen_engine.baseline_logits().unsqueeze(0)
        self.base_loss = float(self._summed_loss(base, [0], 0, np.zeros(1))[0]) / self.num_pos
        self.base_map = self._maps_of(self.exact_engine.baseline_logits().unsqueeze(0).numpy())[0]

    def _run(self, engine: AblationEngine, ablations: list[dict], account, cancel, reset=None) -> None:
        """The engine's batched emulation (with its naive fallback); outputs are reshaped back to [A, 4 + C]."""

        def shaped(ids, start, outputs):
            account(ids, start, outputs.reshape(outputs.shape[0], outputs.shape[1], *self.raw_shape))

        engine.run(ablations, shaped, None, cancel, reset=reset)

    def _summed_loss(self, outputs: torch.Tensor, ids, start: int, total: np.ndarray) -> np.ndarray:
        """Add each ablation's MultiBox loss x positives of this chunk of images into ``total``."""
        loc, cls = self.targets
        n = outputs.shape[1]
        chunk = type(self.targets)(loc[start:start + n], cls[start:start + n])
        pos = float((chunk.cls > 0).sum().clamp(min=1))
        for row, i in enumerate(ids):
            total[i] += float(multibox_loss(outputs[row].float(), chunk)) * pos
        return total

    def _maps_of(self, rows: np.ndarray) -> list[float]:
        return [map_of_detections(detect(r, self.anchors, self.settings, self.weights), self.exact, self.settings).map
                for r in rows]

    def loss_increase(self, ablations: list[dict], cancel: threading.Event | None = None,
                      images: int | None = None) -> np.ndarray:
        """MultiBox loss (per positive anchor) under each ablation minus the unablated loss, on the
        screen images or only their first ``images`` (a cheaper, coarser ranking of single filters)."""
        engine, pos, base = self.screen_engine, self.num_pos, self.base_loss
        if images is not None and images < len(self.screen):
            engine, pos, base = self._small_engine(images)
        total = np.zeros(len(ablations))
        self._run(engine, ablations, lambda ids, start, out: self._summed_loss(out, ids, start, total), cancel,
                  reset=lambda: total.fill(0.0))
        return total / pos - base

    def _small_engine(self, images: int) -> tuple[AblationEngine, float, float]:
        """An engine on the first ``images`` screen images, with their positives and baseline loss."""
        if getattr(self, "_small", (None, 0))[1] != images:
            engine = AblationEngine(self.model, self.screen_engine.inputs[:images])
            pos = float((self.targets.cls[:images] > 0).sum().clamp(min=1))
            base = float(self._summed_loss(engine.baseline_logits().unsqueeze(0), [0], 0, np.zeros(1))[0]) / pos
            self._small = ((engine, pos, base), images)
        return self._small[0]

    def maps(self, ablations: list[dict], cancel: threading.Event | None = None) -> list[float]:
        """Exact mAP (fraction) of the model under each ablation on the exact-mAP images."""
        n, rows = len(self.exact), None

        def account(ids, start: int, outputs: torch.Tensor) -> None:
            nonlocal rows
            if rows is None:
                rows = np.zeros((len(ablations), n, *outputs.shape[2:]), np.float32)
            rows[ids, start:start + outputs.shape[1]] = outputs.float().numpy()

        self._run(self.exact_engine, ablations, account, cancel)
        return self._maps_of(rows)


def measure_detector(model: nn.Module, data: DetectionData, spec: InputSpec, config: PruneConfig,
                     settings: EvalSettings = EvalSettings(), selection: MapResult | None = None) -> dict:
    """One record's figures: ``metric`` (mAP@0.5, 0..1), ``per_class`` AP, then ``core.measure.measure_model``'s
    MACs, params and OpenVINO CPU latency (median ms with its spread; None when ``config.latency`` is off). ``selection``: this model's mAP on ``data.val`` with the
    default settings when already measured (the step's decision), else measured here."""
    result = selection if selection is not None and settings == EvalSettings() else \
        evaluate_map(model, data.val, spec.mean, spec.std, settings)
    # the one measurement path (core.measure): MACs, params, latency with its spread, as a classifier's records
    cost = measure_model(model, spec, latency=config.latency, runs=config.latency_runs, warmup=5).to_dict()
    return {"metric": result.map, "per_class": result.per_class, **cost}


# ----------------------------------------------------------------------------- fine-tuning


def _flip_batch(images: torch.Tensor, boxes: list[np.ndarray], rng) -> tuple[torch.Tensor, list[np.ndarray]]:
    """Random horizontal flip of each image with its boxes: label-preserving for any scene."""
    flip = rng.random(len(images)) < 0.5
    if not flip.any():
        return images, boxes
    images = images.clone()
    images[torch.from_numpy(flip)] = images[torch.from_numpy(flip)].flip(-1)
    out = [np.stack([1 - b[:, 2], b[:, 1], 1 - b[:, 0], b[:, 3]], 1) if f and len(b) else b for b, f in zip(boxes, flip)]
    return images, out


def _freeze_batchnorm(model: nn.Module) -> None:
    """BatchNorm layers to eval mode: a few small batches would otherwise replace the running statistics
    learnt over the whole training set with noisy ones, costing more mAP than the fine-tuning recovers."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


def finetune_detector(model: nn.Module, train: DetectionSet, spec: InputSpec, config: DetectionPruneConfig, rng,
                      cancel: threading.Event | None = None,
                      progress: Callable[[float, str], None] | None = None) -> None:
    """A few mini-batches of MultiBox-loss training, to let the detector adapt to the removal."""
    steps = config.finetune_steps
    if steps <= 0 or len(train) == 0:
        return
    anchors = model.anchors()
    params = [p for p in model.parameters() if p.requires_grad]
    if config.optimizer == "adamw":
        opt = torch.optim.AdamW(params, lr=config.finetune_lr, weight_decay=1e-4)
    else:
        opt = torch.optim.SGD(params, lr=config.finetune_lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    model.train()
    _freeze_batchnorm(model)

    def batch_loss() -> torch.Tensor:
        idx = rng.choice(len(train), size=min(config.batch_size, len(train)), replace=False)
        images, boxes = _flip_batch(train.images[torch.from_numpy(idx)], [train.boxes[j] for j in idx], rng)
        targets = encode_batch(boxes, [train.labels[j] for j in idx], anchors, model.box_coder_weights)
        return multibox_loss(model(normalize_images(images, spec.mean, spec.std)), targets)

    train_steps(model, opt, steps, batch_loss, cancel, progress)


def _subset_indices(n: int, k: int, seed: int) -> np.ndarray:
    """A fixed, seed-determined choice of ``min(k, n)`` validation images, in their original order."""
    if k >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=k, replace=False))


def score_context(graph: PruningGraph, groups: list[ChannelGroup], scorer: DetectionScorer, rng, cancel=None,
                  images: int | None = None) -> ScoreContext:
    """What detection gives a criterion: the loss increase of removing each filter alone (detection's
    per-filter CAR on the first ``images`` screen images), keyed by group root."""

    def loss_increase(gs: list[ChannelGroup]) -> dict[str, np.ndarray]:
        up = scorer.loss_increase([g.ablation([f]) for g in gs for f in range(g.width)], cancel, images)
        out, i = {}, 0
        for g in gs:
            out[group_key(g)] = up[i:i + g.width]
            i += g.width
        return out

    return ScoreContext(graph, groups, rng, key=group_key, filter_costs=loss_increase)


def rank_clusters(cands: list[Cluster], config: DetectionPruneConfig, scorer: DetectionScorer, cancel=None,
                  progress: Callable[[float, str], None] | None = None) -> list[Cluster]:
    """Candidate clusters, best first: screened by loss increase per MAC, the top few decided by exact mAP.

    The exactly measured candidates come first (cheapest mAP drop per MAC saved), the others follow
    in screening order, so ``patience`` can still reach them.
    """
    if progress:
        progress(0.0, f"screening {len(cands)} clusters (loss increase)")
    loss_up = scorer.loss_increase([c.ablation() for c in cands], cancel)
    scale = float(np.mean(np.abs(loss_up))) + 1e-9
    for c, up in zip(cands, loss_up):
        c.loss_up = float(up)
        c.rank = (max(float(up), 0.0) + 0.01 * scale) / c.macs_saved
    cands.sort(key=lambda c: c.rank)
    top = cands[:config.exact_candidates]
    if progress:
        progress(0.5, f"exact mAP of the best {len(top)} clusters")
    maps = scorer.maps([c.ablation() for c in top], cancel)
    eps = 1.0 / max(len(scorer.exact), 1) / 100  # ties broken toward the larger MAC saving
    for c, m in zip(top, maps):
        c.cost = scorer.base_map - m
        c.rank = (max(c.cost, 0.0) + eps) / c.macs_saved
    return sorted(top, key=lambda c: c.rank) + cands[config.exact_candidates:]


