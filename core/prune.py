"""Greedy cluster pruning with short fine-tuning between steps (CAR + Cluster Pruning).

Each step removes one *cluster* — the lowest-scoring filters of one group, as many as it takes to
bring the group's width down to the next multiple of the hardware cluster size c — choosing, across
the whole network, the cluster with the least accuracy cost per MAC saved. With the ``car``
criterion the cost of a candidate cluster is measured exactly (its joint emulated removal), not
summed from single-filter scores. After each structural change the model is fine-tuned briefly and
evaluated; a step that would take the accuracy drop past the threshold is undone and the next
candidate tried (``patience`` times) before the run stops.
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
import torch.nn.functional as F
from torch import nn

from . import criteria
from .car import CarScorer, compute_car, filter_ablation
from .criteria import Cluster, ScoreContext, lowest_clusters, new_width
from .data import DataSet, ImageSet, normalize
from .errors import CancelledError, PruneScopeError, SettingsError
from .evaluate import count_macs_params, evaluate_accuracy
from .groups import ChannelGroup, PruningGraph, UnsafeGroupError
from .models import InputSpec, LoadedModel
from .ov_runtime import measure_latency_ms
from .runs import Run, RunWriter
from .screen import tiebreak
from .workspace import read_json

TASK = "classification"
MAX_LEARNING_RATE = 10.0  # above this SGD and AdamW diverge on any network; a typo, not a setting


@dataclass
class PruneConfig:
    criterion: str = "car"
    cluster: int = 8
    max_drop: float = 1.0  # accuracy points (percentage points) below baseline
    mac_target: float | None = None  # stop once MACs <= this fraction of the original
    finetune_steps: int = 40  # mini-batches of fine-tuning after each step
    finetune_lr: float = 0.01
    batch_size: int = 64
    score_images: int = 400  # validation images used to score filters
    rescore_every: int = 1
    max_steps: int = 200
    patience: int = 2  # candidates tried after one that breaks the threshold
    latency: bool = True
    latency_runs: int = 30
    analyse_car: bool = True  # store a full CAR analysis of the original in the run
    seed: int = 0

    task = TASK  # the task whose criteria are valid (not a field: not stored in the run)
    # The app's starting values where they differ from the CLI's: they finish the bundled sample's flow
    # within about 3 minutes on 2 CPU cores (see the README). Not fields: not stored in the run.
    APP_DEFAULTS = {"finetune_steps": 20, "score_images": 200, "max_steps": 4}

    @classmethod
    def app_defaults(cls) -> "PruneConfig":
        """The settings the Prune page starts from: the class defaults with ``APP_DEFAULTS`` over them."""
        return cls(**cls.APP_DEFAULTS)

    def validate(self) -> None:
        criteria.get(self.criterion, self.task)
        if not 0 <= self.max_drop <= 100:
            raise SettingsError(f"The accuracy threshold must be between 0 and 100 points; got {self.max_drop}.")
        if self.cluster < 1:
            raise SettingsError(f"The cluster size must be at least 1; got {self.cluster}.")
        if self.mac_target is not None and not 0 < self.mac_target < 1:
            raise SettingsError(f"The MAC target is a fraction of the original MACs in (0, 1); got {self.mac_target}.")
        if self.finetune_steps < 0 or self.batch_size < 1 or self.score_images < 10 or self.rescore_every < 1:
            raise SettingsError("Fine-tune steps must be >= 0, batch size >= 1, score images >= 10, re-score every >= 1.")
        if self.max_steps < 1:
            raise SettingsError("The step limit must be at least 1.")
        if not (isinstance(self.finetune_lr, (int, float)) and 0 < self.finetune_lr <= MAX_LEARNING_RATE):
            raise SettingsError(f"The fine-tuning learning rate must be above 0 and at most {MAX_LEARNING_RATE}; "
                                f"got {self.finetune_lr}.")
        if self.patience < 0 or self.latency_runs < 1:
            raise SettingsError("Patience must be >= 0 and latency runs >= 1.")


@dataclass(frozen=True)
class Progress:
    """One progress report of a pruning run.

    ``phase``: ``original`` (measuring / analysing the unpruned model, ``step`` 0) or ``step``
    (pruning step ``step`` >= 1); ``fraction``: 0..1 within that phase; ``message``: for people only,
    never parsed.
    """

    phase: str
    step: int
    fraction: float
    message: str


class Callbacks:
    """What the job runner hears: progress (0..1 of the current phase), finished steps, the stop reason.

    ``progress(fraction, message)`` is the plain form (the CLI prints it); ``event(Progress)`` the
    structured one (the job runner places it in the run by phase and step). The loop says which
    phase it is in with ``enter``. Subclass or pass callables; the engine never touches any UI.
    """

    def __init__(self, progress: Callable[[float, str], None] | None = None,
                 step: Callable[[dict], None] | None = None, event: Callable[[Progress], None] | None = None):
        self._progress, self._step, self._event = progress, step, event
        self.phase, self.current_step = "original", 0

    def enter(self, phase: str, step: int = 0) -> None:
        self.phase, self.current_step = phase, step

    def progress(self, fraction: float, message: str) -> None:
        if self._progress:
            self._progress(fraction, message)
        if self._event:
            self._event(Progress(self.phase, self.current_step, fraction, message))

    def step(self, record: dict) -> None:
        if self._step:
            self._step(record)


def check_prunable(groups: list[ChannelGroup], cluster: int) -> None:
    if not groups:
        raise SettingsError("The model has no prunable channel group (only the classifier output?).")
    if all(g.left_alone for g in groups):
        raise SettingsError("No channel group of this model can be pruned safely: " + groups[0].left_alone)
    groups = [g for g in groups if not g.left_alone]
    if all(new_width(g.width, cluster) is None for g in groups):
        widest = max(g.width for g in groups)
        raise SettingsError(
            f"Cluster size {cluster} is too large: no group can lose a cluster and keep at least {cluster} filters "
            f"(widest group: {widest} filters). Choose a cluster size of at most {widest // 2}."
        )


# ----------------------------------------------------------------------------- scores


def score_context(graph: PruningGraph, groups: list[ChannelGroup], scorer: CarScorer | None, train: ImageSet,
                  spec: InputSpec, rng: np.random.Generator, cancel=None,
                  progress: Callable[[float, str], None] | None = None) -> ScoreContext:
    """What classification gives a criterion: exact CAR of filters and clusters (``scorer``), CE gradients."""

    def filter_costs(gs: list[ChannelGroup]) -> dict[int, np.ndarray]:
        return car_filter_scores(scorer, gs, cancel, progress)

    def cluster_costs(clusters: list[Cluster]) -> np.ndarray:
        correct = scorer.accuracies([filter_ablation(c.group, c.filters) for c in clusters], cancel=cancel)
        return scorer.baseline_accuracy - correct.float().mean(1).numpy()

    return ScoreContext(graph, groups, rng, filter_costs=filter_costs if scorer else None,
                        cluster_costs=cluster_costs if scorer else None,
                        accumulate_gradients=lambda: _accumulate_gradients(graph.model, train, spec, rng),
                        cluster_eps=1.0 / max(len(scorer.labels), 1) if scorer else 0.0)


def score_filters(criterion: str, graph: PruningGraph, groups: list[ChannelGroup], scorer: CarScorer | None,
                  train: ImageSet, spec: InputSpec, rng: np.random.Generator, cancel=None,
                  progress: Callable[[float, str], None] | None = None) -> dict[int, np.ndarray]:
    """Per group, a score per filter: lower = less important, removed first."""
    ctx = score_context(graph, groups, scorer, train, spec, rng, cancel, progress)
    return criteria.get(criterion, TASK).score(ctx)


def car_filter_scores(scorer: CarScorer, groups: list[ChannelGroup], cancel=None,
                      progress: Callable[[float, str], None] | None = None) -> dict[int, np.ndarray]:
    """Per group, the exact CAR of each filter alone, ties broken by the loss increase."""
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
    """Per group, CAR with ties broken by the loss increase of the same ablation.

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
    for i in range(steps):
        if cancel is not None and cancel.is_set():
            break
        idx = rng.choice(len(train), size=min(batch_size, len(train)), replace=False)
        x = _augment(normalize(train.images[idx], spec), rng)
        loss = F.cross_entropy(model(x), train.labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if progress:
            progress((i + 1) / steps, f"fine-tuning ({i + 1}/{steps})")
    model.eval()


# ----------------------------------------------------------------------------- the loop


def measure(model: nn.Module, data: DataSet, spec: InputSpec, config: PruneConfig) -> dict:
    acc = evaluate_accuracy(model, data.val, spec)
    macs, params = count_macs_params(model, spec)
    latency = None
    if config.latency:
        latency = measure_latency_ms(model, spec.shape(1), runs=config.latency_runs, warmup=5)
    return {"accuracy": acc.accuracy, "per_class": acc.per_class, "macs": macs, "params": params, "latency_ms": latency}


def run_pruning(loaded: LoadedModel, data: DataSet, config: PruneConfig, run_dir: Path,
                callbacks: Callbacks | None = None, cancel: threading.Event | None = None,
                data_source: str | None = None, original_bytes: bytes | None = None,
                data_options: dict | None = None) -> dict:
    """Run greedy cluster pruning into ``run_dir``; returns a summary. Every step is on disk when reported."""
    config.validate()
    cb = callbacks or Callbacks()
    cancel = cancel or threading.Event()
    spec = loaded.spec.input
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    model = copy.deepcopy(loaded.model).eval()
    writer = RunWriter(run_dir)
    writer.start({"prune": asdict(config), "data_source": data_source or data.source, "class_names": data.class_names,
                  "data_options": data_options or {"val_fraction": 0.2, "seed": 0}, "created": time.time()}, loaded, original_bytes)

    def body() -> dict:
        graph = PruningGraph(model, spec.shape(1))
        check_prunable(graph.groups(), config.cluster)
        return _loop(graph, loaded, data, config, writer, cb, cancel, rng)

    return run_guarded(writer, body)


def run_guarded(writer: RunWriter, body: Callable[[], dict]) -> dict:
    """Run a pruning loop so that its run folder always ends in a final status.

    A cancel keeps the completed steps (state ``cancelled``); any error is recorded (``failed``, with
    its message) before it propagates, so the app never shows a dead run as running.
    """
    try:
        return body()
    except CancelledError:
        writer.status("cancelled", "Cancelled by the user; completed steps are kept.")
        return run_summary(writer.dir, "cancelled")
    except PruneScopeError as exc:
        writer.status("failed", str(exc))
        raise
    except BaseException as exc:
        writer.status("failed", f"{type(exc).__name__}: {exc}")
        raise


def _loop(graph: PruningGraph, loaded: LoadedModel, data: DataSet, config: PruneConfig, writer: RunWriter,
          cb: Callbacks, cancel: threading.Event, rng) -> dict:
    spec = loaded.spec.input
    cb.progress(0.0, "measuring the original model")
    base = measure(graph.model, data, spec, config)
    writer.write_json("baseline.json", base)
    base_widths = graph.widths()
    record0 = {"step": 0, **base, "widths": base_widths, "removed": None, "seconds": 0.0, "elapsed": 0.0}
    writer.add_step(record0, None, [])
    cb.step(record0)
    if config.analyse_car:
        car = compute_car(graph.model, spec, data.val, n_images=config.score_images, sensitivity=True,
                          progress=lambda f, m: cb.progress(f, f"analysing the original: {m}"), cancel=cancel)
        writer.write_json("car.json", car.to_dict())
    channel_maps = {n: list(range(w)) for n, w in base_widths.items()}
    # group root -> why Torch-Pruning's surgery on it cannot be trusted
    left_alone: dict[str, str] = graph.left_alone()
    structure = {"notes": list(graph.notes), "left_alone": left_alone}
    writer.write_json("structure.json", structure)
    t_start = time.perf_counter()
    scores: dict[int, np.ndarray] | None = None
    reason = "step limit reached"
    for step in range(1, config.max_steps + 1):
        cb.enter("step", step)
        if cancel.is_set():
            raise CancelledError("Cancelled.")
        t0 = time.perf_counter()
        groups = graph.groups()
        subset = data.val.subset(config.score_images, seed=config.seed)
        scorer = CarScorer(graph.model, spec, subset) if config.criterion == "car" else None
        if scores is None or (step - 1) % config.rescore_every == 0 or set(scores) != {g.gid for g in groups} \
                or any(len(scores[g.gid]) != g.width for g in groups):
            scores = score_filters(config.criterion, graph, groups, scorer, data.train, spec, rng, cancel,
                                   progress=lambda f, m: cb.progress(f * 0.5, f"step {step}: {m}"))
        candidates = _candidates(graph, [g for g in groups if g.root not in left_alone], scores, config, scorer, rng, cancel)
        if not candidates:
            reason = "every group is down to one cluster"
            break
        accepted, graph = try_candidates(
            graph, candidates, structure, writer, cb, step, config.patience,
            rebuild=lambda model, history: PruningGraph(model, spec.shape(1), history=history),
            apply=lambda model: _finetune_and_measure(model, data, spec, config, rng, cancel, cb, step),
            drop=lambda metrics: (base["accuracy"] - metrics["accuracy"]) * 100, max_drop=config.max_drop)
        if accepted is None:
            reason = f"the next clusters would exceed the {config.max_drop:g}-point threshold"
            break
        cand, metrics, tried = accepted
        target_reached = record_step(writer, cb, graph, step, cand, metrics, tried, channel_maps, (t0, t_start),
                                     base["macs"], config.mac_target)
        if target_reached:
            reason = target_reached
            break
    writer.status("done", reason)
    return run_summary(writer.dir, "done", reason)


def record_step(writer: RunWriter, cb: Callbacks, graph: PruningGraph, step: int, cand: Cluster, metrics: dict,
                tried: int, channel_maps: dict, times: tuple[float, float], base_macs: float,
                mac_target: float | None, **extra) -> str | None:
    """Write an accepted step (weights, then its history line) and report it; returns why to stop
    when the MAC target is reached, else None."""
    now = time.perf_counter()
    record = {"step": step, **metrics, "widths": graph.widths(), "removed": removed_record(cand, channel_maps),
              "estimated_drop": cand.cost, **extra, "candidates_tried": tried,
              "seconds": now - times[0], "elapsed": now - times[1]}
    writer.add_step(record, graph.model, graph.history)
    cb.step(record)
    if mac_target is not None and metrics["macs"] <= mac_target * base_macs:
        return f"MAC target reached ({metrics['macs'] / base_macs:.2f} of the original)"
    return None


def try_candidates(graph: PruningGraph, candidates: list[Cluster], structure: dict, writer: RunWriter, cb: Callbacks,
                   step: int, patience: int, rebuild, apply, drop, max_drop: float, unit: str = "points"):
    """Remove, fine-tune and measure candidates in order until one stays within the threshold.

    ``apply(model) -> metrics`` fine-tunes and measures; ``drop(metrics)`` is the loss in points;
    ``rebuild(model, history)`` makes a graph from a snapshot. A group whose surgery fails the check
    is recorded in ``structure["left_alone"]`` and does not count against ``patience``. Returns
    ``((candidate, metrics, tried), graph)``, or ``(None, graph)``; a rejected candidate leaves the
    graph as it was.
    """
    left_alone = structure["left_alone"]
    tried = 0
    for cand in candidates:
        if tried > patience:
            break
        if cand.group.root in left_alone:
            continue
        snapshot = (copy.deepcopy(graph.model), [list(h) for h in graph.history])
        try:
            graph.prune(cand.group.root, cand.filters)
        except UnsafeGroupError as exc:
            left_alone[cand.group.root] = str(exc)
            writer.write_json("structure.json", structure)
            cb.progress(0.5, f"step {step}: leaving {cand.group.label} alone: {exc}")
            graph = rebuild(*snapshot)
            continue
        except PruneScopeError as exc:
            tried += 1
            cb.progress(0.5, f"step {step}: skipped {cand.group.label}: {exc}")
            graph = rebuild(*snapshot)
            continue
        tried += 1
        metrics = apply(graph.model)
        lost = drop(metrics)
        if lost > max_drop + 1e-9:
            cb.progress(0.95, f"step {step}: {cand.group.label} would drop {lost:.2f} {unit}; undone")
            graph = rebuild(*snapshot)
            continue
        return (cand, metrics, tried), graph
    return None, graph


def _finetune_and_measure(model: nn.Module, data: DataSet, spec: InputSpec, config: PruneConfig, rng, cancel,
                          cb: Callbacks, step: int) -> dict:
    finetune(model, data.train, spec, config.finetune_steps, config.finetune_lr, config.batch_size, rng, cancel,
             progress=lambda f, m: cb.progress(0.5 + 0.4 * f, f"step {step}: {m}"))
    if cancel.is_set():
        raise CancelledError("Cancelled.")
    cb.progress(0.92, f"step {step}: evaluating")
    return measure(model, data, spec, config)


def _candidates(graph: PruningGraph, groups, scores, config: PruneConfig, scorer: CarScorer | None, rng,
                cancel) -> list[Cluster]:
    """Candidate clusters, cheapest accuracy cost per MAC saved first."""
    cands = lowest_clusters(groups, scores, config.cluster, key=lambda g: g.gid)
    if not cands:
        return []
    ctx = score_context(graph, groups, scorer, None, None, rng, cancel)
    criteria.get(config.criterion, TASK).rank(cands, scores, ctx)
    return sorted(cands, key=lambda c: c.rank)


def removed_record(cand: Cluster, channel_maps: dict[str, list[int]]) -> dict:
    g: ChannelGroup = cand.group
    original = None
    for name in g.producers:
        cmap = channel_maps.get(name)
        if cmap is None or len(cmap) != g.width:
            continue
        if original is None:
            original = [cmap[i] for i in cand.filters]
        channel_maps[name] = [c for i, c in enumerate(cmap) if i not in set(cand.filters)]
    return {"group": g.root, "display": g.display, "producers": g.producers, "filters": cand.filters,
            "filters_original": original,
            "width_before": g.width, "width_after": g.width - len(cand.filters)}


def run_summary(run_dir: Path, state: str, reason: str = "") -> dict:
    """The headline figures of a run folder (first vs last step): what the CLI prints and benches reuse."""
    run = Run(run_dir)
    hist = run.history
    first, last = (hist[0], hist[-1]) if hist else ({}, {})
    return {
        "run": str(run_dir), "state": state, "reason": reason, "steps": len(hist) - 1 if hist else 0,
        "baseline_accuracy": first.get("accuracy"), "final_accuracy": last.get("accuracy"),
        "baseline_macs": first.get("macs"), "final_macs": last.get("macs"),
        "baseline_params": first.get("params"), "final_params": last.get("params"),
        "baseline_latency_ms": first.get("latency_ms"), "final_latency_ms": last.get("latency_ms"),
    }


def read_structure(run_dir: Path) -> dict:
    """What a run changed about the model's structure (converted shortcuts) and which groups it left
    alone, with why; empty for runs written before this was recorded."""
    path = Path(run_dir) / "structure.json"
    data = read_json(path) if path.exists() else {}
    return {"notes": data.get("notes", []), "left_alone": data.get("left_alone", {})}
