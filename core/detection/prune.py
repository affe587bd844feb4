"""Greedy cluster pruning of SSD detectors, scored by mAP (CAR for detection).

The classification loop (``core.prune``) measures the accuracy cost of a cluster exactly on a few
hundred images. A detector's metric, mAP, needs decoding + NMS + matching per evaluation, which is
too slow to run for every group at every step, so each step works in two stages:

1. *screen*: every group's candidate cluster (its c lowest-scoring filters) is removed by emulation
   (``AblationEngine``: the consumers' inputs zeroed, prefix activations cached) on a fixed subset of
   the validation images, and the MultiBox-loss increase it causes is measured; it ranks clusters by
   loss increase per MAC saved;
2. *decide*: the best few clusters (``exact_candidates``) get their exact emulated mAP on the
   validation images, and the cheapest mAP drop per MAC saved is removed for real.

After the surgery the model is fine-tuned briefly with the MultiBox loss and its real mAP measured;
a step past the threshold is undone and the next candidate tried, as in classification. The head's
output convs (``model.output_layers()``) define the [A, 4 + C] layout and are never pruned; every
other conv, the heads' hidden ones included, may lose clusters.

The run folder is the classification one (``core.runs``): history records carry the metric under
both ``map`` and ``accuracy`` (so the Review/Export readers work unchanged), and ``config.json``
says ``task: detection`` and holds the detector config that rebuilds every step.
"""
from __future__ import annotations

import copy
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from ..ablation import AblationEngine
from ..errors import CancelledError, SettingsError
from ..evaluate import count_macs_params
from ..groups import ChannelGroup, PruningGraph
from ..models import InputSpec, LoadedModel, ModelSpec
from ..ov_runtime import measure_latency_ms
from .. import criteria
from ..criteria import Cluster, ScoreContext, lowest_clusters
from ..prune import (Callbacks, PruneConfig, check_prunable,
                     record_step, run_guarded, run_summary, try_candidates)
from ..runs import RunWriter
from .data import DetectionData, DetectionSet
from .evaluate import EvalSettings, detect, evaluate_map, map_of_detections, normalize_images
from .loss import encode_batch, multibox_loss
from .models import output_layer_names

TASK = "detection"
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

    task = TASK
    APP_DEFAULTS = {"max_steps": 3, "latency": False}

    def validate(self) -> None:
        super().validate()
        if self.optimizer not in ("sgd", "adamw"):
            raise SettingsError(f"Unknown optimizer '{self.optimizer}'. Choose sgd or adamw.")
        if self.exact_candidates < 1:
            raise SettingsError("At least one screened cluster must get an exact mAP (exact_candidates >= 1).")
        if self.map_images is not None and self.map_images < 10:
            raise SettingsError("mAP needs at least 10 validation images (map_images >= 10).")


def as_detection_config(config: PruneConfig) -> DetectionPruneConfig:
    """A plain ``PruneConfig`` keeps its values; detection-only settings take their defaults."""
    if isinstance(config, DetectionPruneConfig):
        return config
    return DetectionPruneConfig(**asdict(config))


def detection_spec(model: nn.Module, info: dict) -> ModelSpec:
    """The ``ModelSpec`` a run folder stores for a detector (``info``: mean, std, class_names, source)."""
    h, w = model.input_size
    ispec = InputSpec(height=int(h), width=int(w), mean=tuple(info.get("mean", (0.5,) * 3)),
                      std=tuple(info.get("std", (0.5,) * 3)))
    names = info.get("class_names")
    return ModelSpec(arch=model.config["arch"], num_classes=int(model.num_classes), input=ispec,
                     class_names=list(names) if names else None, source=str(info.get("source", "")))


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
                     settings: EvalSettings = EvalSettings()) -> dict:
    """The figures of one history record: mAP (also under ``accuracy``), per-class AP, MACs, params, latency."""
    result = evaluate_map(model, data.val, spec.mean, spec.std, settings)
    macs, params = count_macs_params(model, spec)
    latency = None
    if config.latency:
        latency = measure_latency_ms(model, spec.shape(1), runs=config.latency_runs, warmup=5)
    return {"accuracy": result.map, "map": result.map, "per_class": result.per_class, "macs": macs,
            "params": params, "latency_ms": latency}


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
    for i in range(steps):
        if cancel is not None and cancel.is_set():
            break
        idx = rng.choice(len(train), size=min(config.batch_size, len(train)), replace=False)
        images, boxes = _flip_batch(train.images[torch.from_numpy(idx)], [train.boxes[j] for j in idx], rng)
        targets = encode_batch(boxes, [train.labels[j] for j in idx], anchors, model.box_coder_weights)
        loss = multibox_loss(model(normalize_images(images, spec.mean, spec.std)), targets)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if progress:
            progress((i + 1) / steps, f"fine-tuning ({i + 1}/{steps})")
    model.eval()


# ----------------------------------------------------------------------------- the run


def run_detection_pruning(model: nn.Module, info: dict, data: DetectionData, config: PruneConfig, run_dir: Path,
                          callbacks: Callbacks | None = None, cancel: threading.Event | None = None,
                          data_options: dict | None = None) -> dict:
    """Prune an ``SSDDetector`` into ``run_dir``; returns the run summary (``core.prune.run_summary``).

    ``info``: ``mean``, ``std`` (the detector's normalisation), ``class_names``, ``source`` (e.g. a
    sample detector's manifest entry). Progress goes to ``callbacks.progress(fraction, message)``,
    each accepted step to ``callbacks.step(record)``; setting ``cancel`` stops after the current phase
    and keeps the completed steps. Safe to call from a worker thread (touches no UI).
    """
    config = as_detection_config(config)
    config.validate()
    cb = callbacks or Callbacks()
    cancel = cancel or threading.Event()
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    model = copy.deepcopy(model).eval()
    spec = detection_spec(model, info)
    if tuple(data.val.images.shape[-2:]) != tuple(model.input_size):
        raise SettingsError(f"The data is at {tuple(data.val.images.shape[-2:])} but the detector expects "
                            f"{tuple(model.input_size)}; load the data at the detector's input size.")
    writer = RunWriter(run_dir)
    writer.start({"task": TASK, "metric": METRIC, "prune": asdict(config), "data_source": data.source,
                  "class_names": data.class_names, "detector_config": dict(model.config),
                  "eval_settings": EvalSettings().to_dict(),
                  "data_options": data_options or {"val_fraction": 0.2, "seed": 0}, "created": time.time()},
                 LoadedModel(model, spec))

    def body() -> dict:
        graph = PruningGraph(model, spec.input.shape(1), output_layers=output_layer_names(model))
        check_prunable(graph.groups(), config.cluster)
        return _loop(graph, spec.input, data, config, writer, cb, cancel, rng)

    return run_guarded(writer, body)


def _loop(graph: PruningGraph, spec: InputSpec, data: DetectionData, config: DetectionPruneConfig,
          writer: RunWriter, cb: Callbacks, cancel: threading.Event, rng) -> dict:
    outputs = output_layer_names(graph.model)
    cb.progress(0.0, "measuring the original detector")
    base = measure_detector(graph.model, data, spec, config)
    writer.write_json("baseline.json", base)
    record0 = {"step": 0, **base, "widths": graph.widths(), "removed": None, "seconds": 0.0, "elapsed": 0.0}
    writer.add_step(record0, None, [])
    cb.step(record0)
    channel_maps = {n: list(range(w)) for n, w in graph.widths().items()}
    left_alone: dict[str, str] = graph.left_alone()
    structure = {"notes": list(graph.notes), "left_alone": left_alone, "output_layers": outputs}
    writer.write_json("structure.json", structure)
    screen = data.val.subset(_subset_indices(len(data.val), config.score_images, config.seed))
    exact = data.val if config.map_images is None else data.val.subset(
        _subset_indices(len(data.val), config.map_images, config.seed))
    t_start = time.perf_counter()
    scores: dict[str, np.ndarray] | None = None  # group root -> score per filter
    reason = "step limit reached"
    for step in range(1, config.max_steps + 1):
        cb.enter("step", step)
        if cancel.is_set():
            raise CancelledError("Cancelled.")
        t0 = time.perf_counter()
        groups = [g for g in graph.groups() if g.root not in left_alone]
        cb.progress(0.0, f"step {step}: screening clusters")
        scorer = DetectionScorer(graph.model, spec, screen, exact)
        stale = groups if scores is None or (step - 1) % config.rescore_every == 0 else [
            g for g in groups if g.root not in scores or len(scores[g.root]) != g.width]
        if stale:
            cb.progress(0.0, f"step {step}: scoring the filters of {len(stale)} group(s)")
            scores = {**(scores or {}), **_filter_scores(config.criterion, graph, stale, scorer, rng, cancel,
                                                             config.filter_images)}
        candidates = rank_candidates(groups, scores, config, scorer, cancel,
                                     progress=lambda f, m: cb.progress(0.1 + 0.3 * f, f"step {step}: {m}"))
        if not candidates:
            reason = "every group is down to one cluster"
            break
        accepted, graph = try_candidates(
            graph, candidates, structure, writer, cb, step, config.patience,
            rebuild=lambda model, history: PruningGraph(model, spec.shape(1), history=history, output_layers=outputs),
            apply=lambda model: _finetune_and_measure(model, data, spec, config, rng, cancel, cb, step),
            drop=lambda metrics: (base["map"] - metrics["map"]) * 100, max_drop=config.max_drop, unit="mAP points")
        if accepted is None:
            reason = f"the next clusters would exceed the {config.max_drop:g}-point mAP threshold"
            break
        cand, metrics, tried = accepted
        target_reached = record_step(writer, cb, graph, step, cand, metrics, tried, channel_maps, (t0, t_start),
                                     base["macs"], config.mac_target, screen_loss_increase=cand.loss_up)
        if target_reached:
            reason = target_reached
            break
    writer.status("done", reason)
    return run_summary(writer.dir, "done", reason)


def _subset_indices(n: int, k: int, seed: int) -> np.ndarray:
    """A fixed, seed-determined choice of ``min(k, n)`` validation images, in their original order."""
    if k >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=k, replace=False))


def _filter_scores(criterion: str, graph: PruningGraph, groups: list[ChannelGroup], scorer: DetectionScorer, rng,
                   cancel, images: int | None = None) -> dict[str, np.ndarray]:
    """Which filters of a group form its cluster: lowest score first, keyed by group root.

    ``car`` orders a group's filters by the loss increase of removing each one alone (detection's
    per-filter CAR on the screen images); the other criteria as in classification.
    """

    def loss_increase(gs: list[ChannelGroup]) -> dict[str, np.ndarray]:
        up = scorer.loss_increase([g.ablation([f]) for g in gs for f in range(g.width)], cancel, images)
        out, i = {}, 0
        for g in gs:
            out[g.root] = up[i:i + g.width]
            i += g.width
        return out

    ctx = ScoreContext(graph, groups, rng, key=lambda g: g.root, filter_costs=loss_increase)
    return criteria.get(criterion, TASK).score(ctx)


def rank_candidates(groups: list[ChannelGroup], scores: dict[str, np.ndarray], config: DetectionPruneConfig,
                    scorer: DetectionScorer, cancel=None,
                    progress: Callable[[float, str], None] | None = None) -> list[Cluster]:
    """Candidate clusters, best first: screened by loss increase per MAC, the top few decided by exact mAP.

    The exactly measured candidates come first (cheapest mAP drop per MAC saved), the others follow
    in screening order, so ``patience`` can still reach them.
    """
    cands = lowest_clusters(groups, scores, config.cluster, key=lambda g: g.root)
    if not cands:
        return []
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


def _finetune_and_measure(model: nn.Module, data: DetectionData, spec: InputSpec, config: DetectionPruneConfig, rng,
                          cancel: threading.Event, cb: Callbacks, step: int) -> dict:
    finetune_detector(model, data.train, spec, config, rng, cancel,
                      progress=lambda f, m: cb.progress(0.4 + 0.5 * f, f"step {step}: {m}"))
    if cancel.is_set():
        raise CancelledError("Cancelled.")
    cb.progress(0.92, f"step {step}: measuring mAP")
    return measure_detector(model, data, spec, config)
