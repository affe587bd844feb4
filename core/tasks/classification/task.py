"""Classification as a pruning task: top-1 accuracy, CAR, cross-entropy fine-tuning.

With the ``car`` criterion the cost of a candidate cluster is measured exactly (its joint emulated
removal on ``score_images`` selection images, ``core.car.CarScorer``), not summed from single-filter
scores; single-filter CAR is exact or fast (``config.car``, ``core.rescore``), each measurement made
once (the original's analysis seeds step 1). Other criteria rank clusters by their normalised filter
scores per MAC saved.

Image roles (``core.data``): ``train`` fine-tunes; ``val`` (the *selection* images) scores filters,
chooses candidates and decides the threshold; ``test`` is measured and recorded beside it
(``test_metric``) and never read by any decision.
"""
from __future__ import annotations

import copy
import threading
import time
from dataclasses import asdict
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ... import criteria
from ...claim import pack_correct
from ...car import CarResult, CarScorer, compute_car, filter_ablation
from ...criteria import Cluster, ScoreContext
from ...data import DataSet, ImageSet, normalize, stratified_indices
from ...device import model_device, on_device, resolve_device
from ...engine import PruneConfig, group_key
from ...evaluate import Accuracy, evaluate_accuracy
from ...fingerprint import model_fingerprint, tensors_fingerprint
from ...groups import ChannelGroup, PruningGraph
from ...measure import measure_model
from ...recovery import RecoveryConfig, recover
from ...models import InputSpec, LoadedModel
from ...car import exact_budget
from ...rescore import ScoreBook, ScoreReport, car_scores
from ...screen import tiebreak
from ...training import augment_np, resolve_precision, train_steps
from ...stats import paired_drop, paired_figures, resolution_warning

NAME = "classification"
METRIC = "accuracy"
LR_HALVINGS = 4  # the fine-tuning check tries the configured rate and at most this many halvings


def score_indices_of(val: ImageSet, config: PruneConfig) -> np.ndarray:
    """Indices into ``val`` of the images a run with ``config`` scores filters on: a stratified subset of
    ``config.score_images`` images fixed by ``config.seed`` (all of them when there are fewer), in the
    order of ``ImageSet.subset``."""
    return stratified_indices(val.labels.numpy(), min(config.score_images, len(val)), config.seed)


def score_images_of(val: ImageSet, config: PruneConfig) -> ImageSet:
    """The selection images a run with ``config`` scores filters on (:func:`score_indices_of`)."""
    return val.take(score_indices_of(val, config))


def decision_mask_of(val: ImageSet, config: PruneConfig) -> np.ndarray:
    """bool (N,) over ``val``: the selection images that decide a step: those that score no filter when
    ``val`` holds at least twice ``config.score_images``, else all of them.

    Why apart: a ranking picks the clusters whose removal costs least on the score images, so on those
    very images the cost reads low (a winner's curse), and a decision taken on them passes steps that
    lose more elsewhere: on our ResNet-20 with 1,000 selection images, 400 of them scoring, steps read
    0.0–1.0 points lost on selection while the test split lost 2–4. Why only from twice: fewer images
    resolve less (a 1-point threshold on 180 images is two flips), so a small ``val`` keeps deciding on
    all of them, and the record says so (``decision["apart_from_scoring"]``)."""
    mask = np.ones(len(val), dtype=bool)
    if len(val) >= 2 * config.score_images:
        mask[score_indices_of(val, config)] = False
    return mask


def analysis_reuse(analysis: CarResult | None, model: nn.Module, images: ImageSet, method: str) -> tuple[bool, str]:
    """Whether a finished CAR analysis is the one a run would compute for its original ``model`` on its score
    ``images`` (:func:`score_images_of`) with CAR ``method``, and why (not). The one decision of reuse: the
    run acts on it (:meth:`ClassificationTask.analyse`), the app's job logs it and its Prune page shows it
    before Start (``core.jobs.reusable_car``).

    The analysis' own fingerprint (``CarResult.fingerprint``: what the model computes, ``core.fingerprint``,
    so an option-A ResNet analysed after its shortcuts became convolutions still matches, and the exact images
    with labels it was measured on) must match, so a changed weight, another subset or seed, or other labels
    all mean recomputing. It must have per-layer sensitivity (the run stores it); an analysis with
    screened filters serves only a ``fast`` run (an ``exact`` one would store figures it never measured).
    """
    if analysis is None:
        return False, "no finished analysis of this model"
    fingerprint = analysis.fingerprint or {}
    if not fingerprint:
        return False, "the analysis has no fingerprint (made before they were recorded)"
    if fingerprint.get("model") != model_fingerprint(model, (1, *images.images.shape[1:])):
        return False, "the model changed"
    if analysis.n_images != len(images):
        return False, f"it used {analysis.n_images} images, the run scores on {len(images)}"
    if fingerprint.get("images") != tensors_fingerprint(images.images, images.labels):
        return False, "other selection images"
    if not analysis.sensitivity:
        return False, "it has no per-layer sensitivity"
    screened = analysis.n_exact < sum(len(v) for v in analysis.car.values())
    if screened and method != "fast":
        return False, "it screened some filters (fast CAR); the run measures every filter (exact CAR)"
    return True, f"same model, {len(images)} images, {'fast' if screened else 'exact'} CAR"


class ClassificationTask:
    """A classifier on an image set (``core.tasks.Task``); the metric is top-1 accuracy on the validation split."""

    name = NAME
    metric_name = METRIC
    metric_unit = "%"
    # Between full re-scores (every ``rescore_every`` steps) only groups whose width changed are scored;
    # a candidate's cost is still measured exactly on the current model (CAR's rank).
    partial_rescore = True

    def __init__(self, spec: InputSpec, data: DataSet, config: PruneConfig, analysis: CarResult | None = None):
        """``analysis``: a finished CAR analysis of this very model (e.g. the app's Analyse job); it is
        used, and said to be, only when its fingerprint matches the model and the score images."""
        self.spec, self.data, self.config = spec, data, config
        self.input_shape = spec.shape(1)
        self.device = resolve_device(config.device)
        self.precision = resolve_precision(config.train_precision, self.device)  # fine-tuning's and recoveries'
        self.book = ScoreBook()
        self.analysis = analysis
        self._report: ScoreReport | None = None
        self.finetune_lr: float | None = None  # set by check_finetune_lr
        # seconds of one fine-tuning mini-batch of the original, measured by check_finetune_lr (the control's rate)
        self.finetune_batch_seconds: float | None = None
        self._baseline_correct: dict[str, np.ndarray] | None = None
        self.mirror: dict | None = None  # mirror_check of the original, made when it is first measured
        self._decides = decision_mask_of(data.val, config)  # the selection images that score no filter
        self.pool = None  # Ray workers for CAR's ablations (core.distributed), set by the engine for a run
        self._scorer: CarScorer | None = None  # the current step's, for where its ablations ran
        self.criterion = criteria.get(config.criterion, NAME)  # what it needs decides what is measured

    def output_layers(self, model: nn.Module) -> None:
        return None

    def score_images(self) -> ImageSet:
        """The selection images that score filters (a fixed stratified subset)."""
        return score_images_of(self.data.val, self.config)

    def decision(self, model: nn.Module) -> Accuracy:
        """Top-1 accuracy on the selection images: all a step's accept or undo reads."""
        with on_device(model, self.device):
            return evaluate_accuracy(model, self.data.val, self.spec)

    def decision_drop(self, decision: Accuracy) -> float:
        """Points lost against the original on the selection images that decide (:func:`decision_mask_of`:
        none of them scored a filter), paired image by image; what a step's accept or undo compares with
        the threshold."""
        base = self._baseline_correct["selection"][self._decides]
        now = decision.correct.numpy()[self._decides]
        return float(base.mean() - now.mean()) * 100.0

    def measure(self, model: nn.Module, decision: Accuracy | None = None) -> dict:
        """Figures of a record (``measure``) with the paired drops from the original (``paired``); the first
        call (the original) is their base and says when the threshold is finer than the selection images
        resolve (``resolution_warning``, None when they resolve it). ``decision``: this model's
        :meth:`decision`, reused."""
        figures, correct = measure(model, self.data, self.spec, self.config, self.device, selection=decision)
        if self._baseline_correct is None:
            self._baseline_correct = correct
            figures["resolution_warning"] = resolution_warning(self.config.max_drop, len(self.data.val),
                                                               figures["metric"])
            self.mirror = mirror_check(model, self.data.val, self.spec, correct["selection"], self.device)
            figures["mirror_check"] = self.mirror
        figures["paired"] = paired_figures(self._baseline_correct, correct)
        decides = self._decides
        # the drop on the images that decide (none of them scored a filter): what the step was accepted on
        figures["decision"] = {**paired_drop(self._baseline_correct["selection"][decides],
                                             correct["selection"][decides]).to_dict(),
                               "apart_from_scoring": bool(not decides.all())}
        figures["correct"] = pack_correct(correct)
        return figures

    def recover(self, model: nn.Module, teacher: nn.Module | None, cancel, progress, epochs: int | None = None) -> dict:
        """A recovery fine-tune of ``model`` in place (``core.recovery.recover``: ``recover_epochs`` passes of
        the train split, cosine schedule, distilled from ``teacher`` when ``recover_kd``), the schedule's last
        epoch kept (``RecoveryConfig.keep``); what the record stores under ``recovery`` (``best_epoch`` 0: cancelled
        before an epoch finished, the model unchanged). ``epochs``: other than ``recover_epochs`` (a stretch's)."""
        rc = self.recovery_config(epochs)
        result = self._train_recovery(model, teacher, rc, cancel, progress)
        where, self.recovery_where = getattr(self, "recovery_where", None), None
        return {"epochs": rc.epochs, "kd": rc.distill, "best_epoch": result.best_epoch, "cancelled": result.cancelled,
                "start_selection": result.start_selection, "per_epoch": result.epochs, "config": asdict(rc),
                "precision": result.precision,
                "device": str(self.device), **({"where": where} if where else {})}

    def recovery_config(self, epochs: int | None = None) -> RecoveryConfig:
        """The recovery's settings from the run's; mirrored images (``hflip``) only where the original
        classifies the mirrored selection images as well as the originals (:func:`mirror_check`), unless the
        run's ``recover_mirror`` says "on" or "off"."""
        c = self.config
        hflip = {"on": True, "off": False}.get(c.recover_mirror, bool((self.mirror or {}).get("hflip", False)))
        return RecoveryConfig(epochs=epochs or c.recover_epochs, lr=c.recover_lr, batch_size=c.batch_size,
                              distill=c.recover_kd, seed=c.seed, hflip=hflip, precision=self.precision)

    def _train_recovery(self, model: nn.Module, teacher: nn.Module | None, rc: RecoveryConfig, cancel, progress):
        select = lambda m: evaluate_accuracy(m, self.data.val, self.spec).accuracy  # noqa: E731
        if self.config.ray_recovery and self.pool is not None:
            return self._train_recovery_on_ray(model, teacher, rc, cancel, progress)
        try:
            return recover(model, self.data.train, self.spec, rc, select, teacher=teacher if rc.distill else None,
                           device=self.device, cancel=cancel,
                           progress=lambda done, total, msg: progress(done / max(total, 1), msg))
        finally:
            model.cpu()
            if teacher is not None:
                teacher.cpu()

    def _train_recovery_on_ray(self, model: nn.Module, teacher: nn.Module | None, rc: RecoveryConfig, cancel,
                               progress):
        """The recovery on the run's Ray workers (``core.ray_recovery``: TorchTrainer, DDP, the same rules); the CAR
        actors make room for it and come back when CAR next runs. ``self.recovery_where`` says where it ran."""
        from ...ray_recovery import recover_on_ray

        self.pool.park()
        result, where = recover_on_ray(model, self.data.train, self.data.val, self.spec, rc, self.pool.setting,
                                       teacher=teacher if rc.distill else None, cancel=cancel,
                                       progress=lambda done, total, msg: progress(done / max(total, 1), msg),
                                       use_gpu=self.device.type == "cuda", threads_per_worker=1,
                                       n_workers=len(self.pool.record.workers) or None)
        self.recovery_where = where
        return result

    def control(self, model: nn.Module, teacher: nn.Module | None, received: dict, cancel, progress) -> dict | None:
        """The control: ``model`` (a copy of the original) given the training a step received (``received``:
        ``core.claim.training_received``: its fine-tuning mini-batches at the run's rate, then each recovery),
        measured on the selection and test images with per-image correctness (``correct``) and its paired
        change from the original (``paired``). Its fine-tuning runs in one stretch, where the step's came
        in pieces between removals. None when cancelled."""
        c = self.config
        parts = 1 + len(received["recovery_epochs"])
        with on_device(model, self.device):
            finetune(model, self.data.train, self.spec, received["finetune_batches"], self.finetune_lr or c.finetune_lr,
                     c.batch_size, np.random.default_rng(c.seed + 1), cancel, lambda f, m: progress(f / parts, m),
                     precision=self.precision)
        for i, epochs in enumerate(received["recovery_epochs"], start=1):
            if cancel.is_set():
                return None
            result = self._train_recovery(model, teacher, self.recovery_config(epochs), cancel,
                                          lambda f, m, i=i: progress((i + f) / parts, m))
            if result.cancelled:
                return None
        if cancel.is_set():
            return None
        figures, correct = measure(model, self.data, self.spec, PruneConfig(latency=False), self.device)
        return {"metric": figures["metric"], "test_metric": figures["test_metric"],
                "paired": paired_figures(self._baseline_correct, correct), "correct": pack_correct(correct)}

    def analyse(self, model: nn.Module, cancel: threading.Event, progress) -> dict:
        """CAR of every filter of the original, per class, and per-layer sensitivity (``car.json``), on the
        score images; seeds the score book so that step 1 measures nothing twice."""
        images = self.score_images()
        reused, why = analysis_reuse(self.analysis, model, images, self.config.car)
        if reused:
            progress(1.0, f"reused the finished analysis ({why}; not recomputed)")
            result = self.analysis
        else:
            result = compute_car(model, self.spec, images, n_images=None, sensitivity=True, progress=progress,
                                 cancel=cancel, method=self.config.car, device=self.device, pool=self.pool)
        if self.criterion.measures_removals:  # the analysis's single-filter CAR is step 1's scores
            self.book.seed_from_analysis(result)
        return {**result.to_dict(), **({"reused_from": f"a finished analysis of this model ({why})"}
                                       if reused else {})}

    def scorer(self, model: nn.Module) -> CarScorer | None:
        if not self.criterion.measures_removals:
            return None
        with on_device(model, self.device):
            self._scorer = CarScorer(model, self.spec, self.score_images(), pool=self.pool)
            return self._scorer

    def score_context(self, graph: PruningGraph, groups: list[ChannelGroup], scorer: CarScorer | None, rng,
                      cancel, progress) -> ScoreContext:
        c = self.config
        budget = exact_budget(sum(g.width for g in graph.groups()), c.finetune_steps, c.batch_size, c.score_images)
        return score_context(graph, groups, scorer, self.data.train, self.spec, rng, cancel, progress,
                             filter_costs=self._filter_costs(scorer, cancel, progress, budget), device=self.device)

    def _filter_costs(self, scorer: CarScorer | None, cancel, progress, max_exact: int | None = None):
        """CAR of single filters through the score book (exact or fast, measured once; fast mode measures
        at most ``max_exact`` filters exactly per scoring pass)."""
        if scorer is None:
            return None

        def filter_costs(gs: list[ChannelGroup]) -> dict[str, np.ndarray]:
            with on_device(scorer.model, self.device):
                by_gid, report = car_scores(scorer, gs, self.book, self.config.car, self.config.cluster, cancel, progress,
                                            max_exact=max_exact)
            if progress:
                progress(1.0, f"CAR ({self.config.car}): {report.describe()}")
            self._report = report
            return {group_key(g): by_gid[g.gid] for g in gs}

        return filter_costs

    def rank(self, graph: PruningGraph, clusters: list[Cluster], scores: dict, scorer: CarScorer | None, rng,
             cancel, progress) -> list[Cluster]:
        """The criterion's own ranking: CAR's exact cluster cost per MAC, or normalised scores per MAC."""
        ctx = score_context(graph, [c.group for c in clusters], scorer, None, None, rng, cancel, device=self.device)
        with on_device(graph.model, self.device):
            criteria.get(self.config.criterion, NAME).rank(clusters, scores, ctx)
        return sorted(clusters, key=lambda c: c.rank)

    def finetune(self, model: nn.Module, rng, cancel, progress) -> None:
        c = self.config
        with on_device(model, self.device):
            finetune(model, self.data.train, self.spec, c.finetune_steps, self.finetune_lr or c.finetune_lr,
                     c.batch_size, rng, cancel, progress, precision=self.precision)

    def check_finetune_lr(self, model: nn.Module, base: dict, cancel, progress) -> dict:
        """The fine-tuning learning rate this model tolerates, found on the unpruned model.

        A converged model (e.g. trained with a one-cycle schedule down to ~0) loses accuracy from the
        step fine-tuning alone when its learning rate is too large: a real CIFAR-10 ResNet-20 lost 1.85
        selection points after 40 batches at 0.01 with nothing removed (0.25 at 0.001), so every
        candidate cluster looked worse than it was and the run stopped at step 0. The configured rate
        is tried on a copy of the original; while its measured cost exceeds a quarter of the threshold
        (at least two selection images), it is halved (at most ``LR_HALVINGS`` times). The point estimate
        decides, not the low end of its interval: this cost is paid by every candidate of every step, so a
        rate whose cost merely sits inside the selection images' noise (the bundled cifar10 sample: 0.005
        cost 1.75 points, interval low end 0.4) refused every step, while halving a harmless rate only
        slows the fine-tuning a little. The rate used is what the steps fine-tune with, and the returned
        record (``finetune.json``) says why.
        """
        c = self.config
        allowed = max(0.25 * c.max_drop, 200.0 / max(len(self.data.val), 1))
        lr, tried = c.finetune_lr, []
        for attempt in range(LR_HALVINGS + 1):
            trial = copy.deepcopy(model)
            with on_device(trial, self.device):
                t0 = time.perf_counter()
                finetune(trial, self.data.train, self.spec, c.finetune_steps, lr, c.batch_size,
                         np.random.default_rng(c.seed), cancel,
                         lambda f, m, a=attempt: progress((a + f) / (LR_HALVINGS + 1), f"learning rate {lr:g}: {m}"),
                         precision=self.precision)
                seconds = time.perf_counter() - t0
                correct = evaluate_accuracy(trial, self.data.val, self.spec).correct.numpy()
            self.finetune_batch_seconds = seconds / c.finetune_steps  # the last try's: the kernels warmed up
            cost = paired_drop(self._baseline_correct["selection"], correct)
            tried.append({"lr": lr, "selection_drop_points": cost.drop_points, "ci_low_points": cost.low_points,
                          "batches": c.finetune_steps, "seconds": seconds})
            if cost.drop_points <= allowed or attempt == LR_HALVINGS:
                break
            lr /= 2
        self.finetune_lr = lr
        progress(1.0, f"fine-tuning with learning rate {lr:g}"
                 + ("" if lr == c.finetune_lr else f" ({c.finetune_lr:g} cost the unpruned model "
                                                   f"{tried[0]['selection_drop_points']:.2f} points)"))
        return {"configured_lr": c.finetune_lr, "lr": lr, "allowed_drop_points": allowed, "tried": tried}

    def step_extra(self, clusters: list[Cluster]) -> dict:
        """How the step's single-filter scores were made (``core.rescore.ScoreReport``): exact or screened,
        measured or reused; ``rescored_groups`` is empty when every group kept its earlier scores."""
        if not self.criterion.measures_removals:
            return {}
        report, self._report = self._report, None
        out = (report or ScoreReport(method=self.config.car)).to_dict()
        if self.pool is not None and self._scorer is not None:  # where this step's ablations ran (core.distributed)
            out["where"] = {k: v for k, v in self._scorer.where().items() if k != "workers"}  # workers.json has them
        return {"car_scoring": out}


def measure_baseline(loaded: LoadedModel, data: DataSet) -> dict:
    """The Load page's baseline of a classifier on its data's selection images: accuracy (also under ``metric``),
    per-class accuracy, confusion, MACs, parameters and OpenVINO CPU latency with its spread.
    ``eval_seconds``: the time that evaluation took (what one decision of a prune costs on these images)."""
    t0 = time.perf_counter()
    acc = evaluate_accuracy(loaded.model, data.val, loaded.spec.input)
    eval_seconds = time.perf_counter() - t0
    # the one measurement path (core.measure): strict=False so a model OpenVINO cannot convert keeps its
    # accuracy, MACs and parameters, and latency_note says why its latency is missing
    figures = measure_model(loaded.model, loaded.spec.input, latency=True, runs=30, warmup=5, strict=False)
    out = {"metric": acc.accuracy, "accuracy": acc.accuracy, "per_class": acc.per_class, "confusion": acc.confusion,
           "n": acc.n, "macs": figures.macs, "params": figures.params, "latency_ms": figures.latency_ms,
           "latency_note": figures.device if figures.latency is not None else figures.latency_note,
           "eval_seconds": eval_seconds}
    if figures.latency is not None:  # the spread, so a step's latency change is coloured only beyond the noise
        out.update(figures.latency.to_dict())
    return out


MIRROR_ALLOWANCE_POINTS = 2.0  # a mirror may cost the original this much on the selection images and still be used


def mirror_check(model: nn.Module, val: ImageSet, spec: InputSpec, correct: np.ndarray, device=None) -> dict:
    """Whether the recovery may train on left-right mirrored images: the original classifies the mirrored
    selection images within ``MIRROR_ALLOWANCE_POINTS`` of the originals (paired, point estimate).

    Why: a mirror doubles what a few thousand training images teach (He et al. 2016 train CIFAR with it),
    but a digit or a letter mirrored is another class or none. The tool cannot know which a user's classes
    are; the model it was given can tell: a network trained on mirror-safe classes (or with mirrors) scores
    mirrored images as well as the originals, and one for digits loses tens of points. Returns
    ``{"hflip": bool, "accuracy", "mirrored_accuracy", "drop_points", "allowance_points"}``; ``correct`` is the
    original's per-image correctness on ``val`` (bool (N,))."""
    flipped = ImageSet(val.images.flip(3), val.labels, val.class_names)
    with on_device(model, device):
        mirrored = evaluate_accuracy(model, flipped, spec).correct.numpy()
    drop = float(correct.mean() - mirrored.mean()) * 100.0
    return {"hflip": bool(drop <= MIRROR_ALLOWANCE_POINTS), "accuracy": float(correct.mean()),
            "mirrored_accuracy": float(mirrored.mean()), "drop_points": drop,
            "allowance_points": MIRROR_ALLOWANCE_POINTS}


def measure(model: nn.Module, data: DataSet, spec: InputSpec, config: PruneConfig,
            device=None, selection: Accuracy | None = None) -> tuple[dict, dict[str, np.ndarray]]:
    """One record's figures and the per-image correctness behind them.

    Figures: ``metric`` (top-1 accuracy on the selection images, 0..1) and ``per_class``; with a test
    split ``test_metric`` and ``test_per_class`` (None without one); MACs, params and OpenVINO CPU
    latency (median ms with its spread, None when ``config.latency`` is off) from
    ``core.measure.measure_model``. Correctness: role -> bool per image (for paired drops).
    ``selection``: the model's accuracy on ``data.val`` when already measured (the step's decision).
    """
    with on_device(model, device):
        selection = selection if selection is not None else evaluate_accuracy(model, data.val, spec)
        test = evaluate_accuracy(model, data.test, spec) if len(data.test) else None
    # strict=False: a model OpenVINO cannot convert keeps its accuracy and MACs; latency_note says why (issue 28)
    cost = measure_model(model, spec, latency=config.latency, runs=config.latency_runs, strict=False).to_dict()
    figures = {"metric": selection.accuracy, "per_class": selection.per_class,
               "test_metric": test.accuracy if test else None, "test_per_class": test.per_class if test else None,
               **cost}
    correct = {"selection": selection.correct.numpy()}
    if test is not None:
        correct["test"] = test.correct.numpy()
    return figures, correct


# ----------------------------------------------------------------------------- scores


def score_context(graph: PruningGraph, groups: list[ChannelGroup], scorer: CarScorer | None, train: ImageSet | None,
                  spec: InputSpec | None, rng: np.random.Generator, cancel=None,
                  progress: Callable[[float, str], None] | None = None, filter_costs=None,
                  device=None) -> ScoreContext:
    """What classification gives a criterion: CAR of filters (``filter_costs``, default exact CAR of every
    filter, measured by ``core.rescore.car_scores`` into a fresh score book) and exact CAR of clusters
    (``scorer``), CE gradients. Scores are keyed by group root (``core.engine.group_key``)."""

    def exact_filter_costs(gs: list[ChannelGroup]) -> dict[str, np.ndarray]:
        by_gid, _ = car_scores(scorer, gs, ScoreBook(), "exact", cancel=cancel, progress=progress)
        return {group_key(g): by_gid[g.gid] for g in gs}

    def cluster_costs(clusters: list[Cluster]) -> np.ndarray:
        correct = scorer.accuracies([filter_ablation(c.group, c.filters) for c in clusters], cancel=cancel)
        return scorer.baseline_accuracy - correct.float().mean(1).numpy()

    def accumulate_gradients() -> None:
        with on_device(graph.model, device):
            _accumulate_gradients(graph.model, train, spec, rng)

    return ScoreContext(graph, groups, rng, key=group_key,
                        filter_costs=(filter_costs or exact_filter_costs) if scorer else None,
                        cluster_costs=cluster_costs if scorer else None,
                        accumulate_gradients=accumulate_gradients,
                        cluster_eps=1.0 / max(len(scorer.labels), 1) if scorer else 0.0)


def score_filters(criterion: str, graph: PruningGraph, groups: list[ChannelGroup], scorer: CarScorer | None,
                  train: ImageSet, spec: InputSpec, rng: np.random.Generator, cancel=None,
                  progress: Callable[[float, str], None] | None = None) -> dict[str, np.ndarray]:
    """Per group root, a score per filter: lower = less important, removed first."""
    ctx = score_context(graph, groups, scorer, train, spec, rng, cancel, progress)
    return criteria.get(criterion, NAME).score(ctx)


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
    device = model_device(model)
    for _ in range(batches):
        idx = rng.choice(len(train), size=min(bs, len(train)), replace=False)
        loss = F.cross_entropy(model(normalize(train.images[idx].to(device), spec)), train.labels[idx].to(device))
        loss.backward()


# ----------------------------------------------------------------------------- fine-tuning


def finetune(model: nn.Module, train: ImageSet, spec: InputSpec, steps: int, lr: float, batch_size: int,
             rng: np.random.Generator, cancel: threading.Event | None = None,
             progress: Callable[[float, str], None] | None = None, precision: str = "fp32") -> None:
    """A few mini-batches of SGD on the training split, to let the network adapt to the removal; ``precision``:
    ``fp32`` or ``bf16`` (``core.training.train_steps``)."""
    if steps <= 0 or len(train) == 0:
        return
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=5e-4)

    device = model_device(model)

    def batch_loss() -> torch.Tensor:
        idx = rng.choice(len(train), size=min(batch_size, len(train)), replace=False)
        x = augment_np(normalize(train.images[idx].to(device), spec), rng)
        return F.cross_entropy(model(x), train.labels[idx].to(device))

    train_steps(model, opt, steps, batch_loss, cancel, progress, precision=precision)
