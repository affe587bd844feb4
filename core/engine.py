"""The one greedy cluster-pruning loop, for every task (CAR + Cluster Pruning).

Each step removes one *cluster* — the lowest-scoring filters of one channel group, as many as it
takes to bring the group's width down to the next multiple of the hardware cluster size c —
choosing, across the whole network, the cluster with the least metric cost per MAC saved. After
each structural change the model is fine-tuned briefly and measured; a step that would take the
metric drop past the threshold is undone and the next candidate tried (``patience`` times) before
the run stops.

With ``clusters_per_step`` k > 1 a step first tries the k best-ranked clusters (of k distinct
groups) together, with one fine-tuning and one measurement: a deep network that needs ~60 clusters
for 2x fewer MACs then needs ~60/k steps, and the steps' fine-tuning, measuring and re-scoring
dominate its wall time. When the k together break the threshold, the step falls back to one cluster
at a time and later steps try k/2 (halved again on each such failure, never below 1).

The loop owns that flow; a task (``core.tasks.Task``: classification, detection) owns only what
differs: the metric and its measurement, the fine-tuning loss, what a criterion may use to score
filters, and how candidate clusters are ranked. Every record of the run folder stores the task's
metric under ``metric`` (a fraction 0..1); ``config.json`` names it (``metric_name``).
"""
from __future__ import annotations

import contextlib
import copy
import functools
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from . import criteria
from .car import CAR_METHODS
from .claim import lineage, shipped_claim, training_received
from .criteria import Cluster, lowest_clusters, new_width
from .device import DEVICES
from .distributed import WorkSetting, open_pool
from .errors import CancelledError, PruneScopeError, SettingsError
from .groups import ChannelGroup, PruningGraph, UnsafeGroupError
from .models import LoadedModel
from .plan import PrunePlan
from .runs import Run, RunWriter, select_step
from .tasks.base import Task
from .training import check_precision
from .workspace import read_json

RECOVER_MIRROR = ("auto", "on", "off")
NO_STRETCH_ROOM = ", and the budget has no room for a stretch"
STRETCH_EPOCHS = 3  # a stretch's recovery runs this many times ``recover_epochs``: it absorbs a removal
RETRY_STRETCH_EPOCHS = 2  # an undone stretch is tried again with a recovery up to this many times as long
LAST_STRETCH_EPOCHS = 3  # the last stretch's recovery, up to this many times as long, as the budget allows
FINAL_STRETCH_EPOCHS = 2  # and at least this many times: a stretch starts only with room for it (least_final_epochs)
CONTROL_DRIFT = 0.06  # a last stretch keeps this share of the control's estimate spare (stretch_recovery_epochs)
MAX_LEARNING_RATE = 10.0  # above this SGD and AdamW diverge on any network; a typo, not a setting


@dataclass
class PruneConfig:
    criterion: str = "car"
    cluster: int = 8
    max_drop: float = 1.0  # metric points (percentage points) below baseline
    mac_target: float | None = None  # stop once MACs <= this fraction of the original
    finetune_steps: int = 40  # mini-batches of fine-tuning after each step
    finetune_lr: float = 0.01
    batch_size: int = 64
    score_images: int = 400  # selection images used to score filters
    # a full re-score of every group every this many steps; in between only the groups whose width
    # changed are re-scored. Measured on the real ResNet-20, 8 steps each (bench/real_cifar.py --flows
    # fast fast-rescore1, docs/benchmarks.md): k = 1 took 1.6x as long (7.7 vs 4.8 min) for the same MACs and
    # selection drop; its final model was 1.33 test points better (paired over the test images, 95 %
    # 0.30..2.36), from one run each, whose step-to-step test figures move by about a point. 4 is kept
    # for time on small machines; --rescore-every 1 is the choice when accuracy matters more.
    rescore_every: int = 4
    # A step removes the best-ranked clusters (of distinct groups) together, with one fine-tuning and one
    # decision, until they save ``step_macs`` of the original MACs, at most ``clusters_per_step`` of them;
    # after a step where they break the threshold together, later steps take half as many. Few, large
    # decisions: each decision on the same selection images is a chance to keep a lucky measurement (the
    # winner's curse); a ResNet-56 that needed 47 one-cluster steps to 1.86x read 0.0 points lost on its
    # selection images and lost 1.95 on unseen ones. ``step_macs`` None: ``clusters_per_step`` clusters.
    clusters_per_step: int = 8
    step_macs: float | None = 0.04
    # When no candidate stays within the threshold, a recovery fine-tune (``recover_epochs`` passes of the
    # train split, distilled from the original when ``recover_kd``; ``core.recovery``) becomes a step and
    # the loop goes on from it; it stops when a recovery buys no further step, after ``max_recoveries``, at
    # the MAC target or the time budget. Whatever ends the loop, its last pruning step is recovered once more
    # (the budget keeps time for it), and only recovered steps ship (``core.runs.shippable``): on a real
    # ResNet-56 upload the steps after their 40 fine-tuning batches lost 0.7-2.3 points on unseen images, the
    # recovered ones 0.07-0.57. 0 epochs: stop where no candidate fits (the CAR paper's loop), any step ships.
    recover_epochs: int = 2
    # 16, was 10: the budget, not the count, ends a budgeted run; our ResNet-20 upload spent 10 (4 plain, 6 stretches)
    # with 2.1 of its 15 minutes left, where a one-cluster retry of its last stretch fitted (StretchSize.resize)
    max_recoveries: int = 16
    recover_kd: bool = True
    recover_lr: float = 0.01
    # With ``stretch``, where no candidate fits the loop first tries a *stretch* (:func:`stretch_step`): it removes
    # the best-ranked clusters up to ``STRETCH_STEPS`` steps' worth of MACs past the threshold and recovers them
    # (``STRETCH_EPOCHS`` times ``recover_epochs``), keeping the result only when the recovered model is back
    # within the threshold on all the selection images; else it goes back to the model before the stretch and
    # recovers that, or, where that model is a recovery already, tries the stretch again from it with a recovery
    # twice as long (StretchSize.resize). On by default: on our ResNet-56 upload (bench/real_cifar.py --upload) four stretches were
    # kept and the run shipped 1.67x fewer MACs at -0.03 points on 3,000 unseen images, where the loop without
    # stretches stopped at 1.29x (+0.40); ``--no-stretch`` is that loop.
    stretch: bool = True
    # A stretch walks on until it removed ``stretch_macs`` of the original MACs (halved after a stretch that did
    # not come back), each of its steps allowed ``stretch_allowance`` times ``max_drop`` (None: not checked, the
    # recovery decides), then recovers once. The default is one step's worth, unchecked: longer walks lost on
    # unseen images. Our ResNet-20 upload (bench/real_cifar.py --upload-flows default walked-stretch), walked
    # stretches of 12 % within 3x the threshold: 1.46x at 1.9 unseen points, 1.64x at 2.7, shipped 1.23x; the
    # one-step stretches: 1.45x at 0.9, 1.58x at 0.8, shipped 1.45x.
    stretch_macs: float = 0.04
    stretch_allowance: float | None = None
    # mirrored images in recoveries: "on", "off", or "auto" (default): on when the original scores mirrored
    # selection images as well as the originals (``core.tasks.classification.task.mirror_check``); the ResNet-56
    # run above was measured with it
    recover_mirror: str = "auto"
    time_budget: float | None = None  # minutes for the whole run, the last recovery and the control kept in (time_to_finish)
    # the original given the same fine-tuning and recoveries as the shipped step (the control): a model
    # fine-tuned on the user's images also adapts to them, which can hide pruning damage
    control: bool = True
    car: str = "fast"  # CAR scoring of filters: "fast" (first-order screen + exact shortlist) or "exact"
    device: str = "auto"  # where scoring, fine-tuning and evaluation run: auto | cpu | cuda
    # the arithmetic of fine-tuning, recoveries and the control (core.training.PRECISIONS): "auto" trains in bf16
    # mixed precision where the device computes bfloat16 natively, else fp32; decisions and reports read fp32
    train_precision: str = "auto"
    # where CAR's ablations run (core.distributed): None/None this process; ray_workers alone: a local Ray
    # cluster of that many workers started for the run; ray_address ("auto", "ray://host:10001"): an existing
    # cluster (ray_workers: how many workers there, default one per CPU of the cluster)
    ray_address: str | None = None
    ray_workers: int | None = None
    # recoveries on the same Ray workers with Ray Train's TorchTrainer (DDP; core.ray_recovery) instead of this
    # process; needs ray_address or ray_workers
    ray_recovery: bool = False
    plan: dict | None = None  # per-layer control (core.plan.PrunePlan.to_dict): excluded / capped groups
    max_steps: int = 200
    patience: int = 2  # candidates tried after one that breaks the threshold
    latency: bool = True
    latency_runs: int = 30
    analyse_car: bool = True  # store a full CAR analysis of the original in the run
    seed: int = 0

    task = "classification"  # the task whose criteria are valid (not a field: not stored in the run)
    # The app's starting values where they differ from the CLI's (not fields: not stored). None for
    # classification: the Prune page starts from the CLI's defaults, sized for real models.
    APP_DEFAULTS = {}

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
        if not 0 < self.stretch_macs < 1:
            raise SettingsError(f"A stretch's MACs are a fraction of the original MACs in (0, 1); got {self.stretch_macs}.")
        if self.stretch_allowance is not None and not 1 <= self.stretch_allowance <= 1000:
            raise SettingsError(f"A stretch's allowance is a multiple of the threshold from 1 to 1000; "
                                f"got {self.stretch_allowance}.")
        if self.mac_target is not None and not 0 < self.mac_target < 1:
            raise SettingsError(f"The MAC target is a fraction of the original MACs in (0, 1); got {self.mac_target}.")
        if self.finetune_steps < 0 or self.batch_size < 1 or self.score_images < 10 or self.rescore_every < 1:
            raise SettingsError("Fine-tune steps must be >= 0, batch size >= 1, score images >= 10, re-score every >= 1.")
        if not isinstance(self.clusters_per_step, int) or self.clusters_per_step < 1:
            raise SettingsError(f"Clusters per step must be a whole number of at least 1; got {self.clusters_per_step}.")
        if self.step_macs is not None and not 0 < self.step_macs < 1:
            raise SettingsError(f"The MACs per step are a fraction of the original MACs in (0, 1); got {self.step_macs}.")
        if self.recover_epochs < 0 or self.max_recoveries < 0:
            raise SettingsError("Recovery epochs and the number of recoveries must be 0 or more.")
        if not (isinstance(self.recover_lr, (int, float)) and 0 < self.recover_lr <= MAX_LEARNING_RATE):
            raise SettingsError(f"The recovery learning rate must be above 0 and at most {MAX_LEARNING_RATE}; "
                                f"got {self.recover_lr}.")
        if self.recover_mirror not in RECOVER_MIRROR:
            raise SettingsError(f"Mirrored images in recoveries: choose one of {', '.join(RECOVER_MIRROR)}; "
                                f"got {self.recover_mirror!r}.")
        if self.time_budget is not None and not self.time_budget > 0:
            raise SettingsError(f"The time budget is a number of minutes above 0; got {self.time_budget}.")
        if self.max_steps < 1:
            raise SettingsError("The step limit must be at least 1.")
        if not (isinstance(self.finetune_lr, (int, float)) and 0 < self.finetune_lr <= MAX_LEARNING_RATE):
            raise SettingsError(f"The fine-tuning learning rate must be above 0 and at most {MAX_LEARNING_RATE}; "
                                f"got {self.finetune_lr}.")
        if self.patience < 0 or self.latency_runs < 1:
            raise SettingsError("Patience must be >= 0 and latency runs >= 1.")
        if self.car not in CAR_METHODS:
            raise SettingsError(f"Unknown CAR method '{self.car}'. Choose one of: {', '.join(CAR_METHODS)}.")
        if self.device not in DEVICES:
            raise SettingsError(f"Unknown device '{self.device}'. Choose one of: {', '.join(DEVICES)}.")
        check_precision(self.train_precision)
        self.work_setting().validate()
        if self.ray_recovery and self.work_setting().where == "local":
            raise SettingsError("Recovery on Ray workers needs a Ray address or a number of local Ray workers "
                                "(--ray-address / --ray-workers).")

    def work_setting(self) -> WorkSetting:
        """Where CAR's ablations run (``core.distributed.WorkSetting``)."""
        return WorkSetting(self.ray_address, self.ray_workers)


@dataclass(frozen=True)
class Progress:
    """One progress report of a pruning run.

    ``phase``: ``original`` (measuring / analysing the unpruned model, ``step`` 0) or ``step``
    (pruning step ``step`` >= 1); ``fraction``: 0..1 within that phase; ``message``: for people only,
    never parsed. ``part``: the work within the phase (``measuring``, ``analysing``, ``scoring``,
    ``ranking``, ``fine-tuning``), whose rates differ by orders of magnitude, and ``part_fraction``
    (0..1 of that part): an ETA is the part's remaining fraction at the part's measured rate.
    """

    phase: str
    step: int
    fraction: float
    message: str
    part: str = ""
    part_fraction: float | None = None


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

    def progress(self, fraction: float, message: str, part: str = "", part_fraction: float | None = None) -> None:
        if self._progress:
            self._progress(fraction, message)
        if self._event:
            self._event(Progress(self.phase, self.current_step, fraction, message, part, part_fraction))

    def part(self, start: float, end: float, part: str, prefix: str = ""):
        """A ``progress(f, message)`` callback for one part of the phase mapped onto ``start..end``."""
        return lambda f, m: self.progress(start + (end - start) * f, prefix + m, part, f)

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


def group_key(group: ChannelGroup) -> str:
    """How the loop keys per-group scores: the group's root layer (stable while other groups shrink)."""
    return group.root


# ----------------------------------------------------------------------------- the run


def run_task(task: Task, loaded: LoadedModel, run_config: dict, run_dir: Path, callbacks: Callbacks | None = None,
             cancel: threading.Event | None = None, original_bytes: bytes | None = None,
             started: float | None = None) -> dict:
    """Prune ``loaded.model`` for ``task`` into ``run_dir``; returns :func:`run_summary`.

    ``run_config``: the task's entries of ``config.json`` (data source, class names, ...); the loop
    adds the task, its metric and the settings. Every step is on disk when reported; ``cancel``
    stops after the current phase and keeps the completed steps. Touches no UI. ``started``: when the user's wait
    for the run began (``time.time()``), if before this call; the time budget counts from it (a CLI command: the
    process's start, so that its imports and the loading of the model and images count too; without it the run
    began here). Why: our ResNet-20 upload's command took 900.7 s under a 15-minute budget, its run 5 s inside.
    """
    config = task.config
    config.validate()
    cb = callbacks or Callbacks()
    cancel = cancel or threading.Event()
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    model = copy.deepcopy(loaded.model).eval()
    writer = RunWriter(run_dir)
    writer.start({"task": task.name, "metric_name": task.metric_name, "metric_unit": task.metric_unit,
                  "prune": asdict(config), **run_config, "created": time.time(),
                  "class_order": list(run_config.get("class_names") or [])}, loaded, original_bytes)

    def body() -> dict:
        graph = PruningGraph(model, task.input_shape, output_layers=task.output_layers(model))
        check_prunable(graph.groups(), config.cluster)
        PrunePlan.from_dict(config.plan).validate(graph.groups())
        with task_workers(task, writer, cb):
            return prune_loop(graph, task, writer, cb, cancel, rng, original=loaded.model, started=started)

    return run_guarded(writer, body)


@contextlib.contextmanager
def task_workers(task: Task, writer: RunWriter, cb: "Callbacks"):
    """The run's Ray workers for CAR (``config.ray_address`` / ``ray_workers``), given to the task as ``task.pool``
    for the whole run and closed after it, however it ends: nothing of Ray is left running that the run started.
    ``workers.json`` says where CAR's ablations ran (written when the workers are up and again at the end).
    Local work (the default): nothing is opened or written."""
    setting = task.config.work_setting()
    if setting.where == "local":
        yield None
        return
    if not hasattr(task, "pool"):
        raise SettingsError(f"CAR on Ray workers serves classification runs; a {task.name} run scores in this process "
                            "(leave --ray-address / --ray-workers out).")
    cb.progress(0.0, f"starting Ray workers ({setting.describe()})")
    pool = open_pool(setting)
    task.pool = pool
    try:
        cb.progress(0.0, pool.describe())
        writer.write_json("workers.json", pool.record.to_dict())
        yield pool
    finally:
        task.pool = None
        try:
            writer.write_json("workers.json", pool.record.to_dict())
        finally:
            pool.close()


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


# ----------------------------------------------------------------------------- the loop


def prune_loop(graph: PruningGraph, task: Task, writer: RunWriter, cb: Callbacks, cancel: threading.Event,
               rng: np.random.Generator, original=None, started: float | None = None) -> dict:
    """The greedy loop: measure the original, then per step score, form candidates, try them, record;
    recover when no candidate fits (:func:`recover_step`); at the end the control (:func:`run_control`).
    ``original``: the model as loaded (before the graph converted any shortcut), the recoveries' teacher and
    the control's start, so that the control's weights load into the run's original architecture."""
    config = task.config
    plan = PrunePlan.from_dict(config.plan).validate(graph.groups())
    teacher = loop_teacher(task, original, graph)
    clock = RunClock(config.time_budget, started)  # the budget covers the whole run, from ``started`` when given
    base = measure_original(graph, task, writer, cb, cancel)
    channel_maps = {n: list(range(w)) for n, w in base["widths"].items()}
    structure = write_structure(graph, task, writer)
    t_start = clock.first_step = time.perf_counter()  # records' ``elapsed`` counts from the first step, as before budgets
    scores, batch = None, config.clusters_per_step  # group root -> score per filter; the most clusters a step tries
    # the current model's MACs; the last recorded step; the next stretch's size (StretchSize.resize); reason: why it
    # stopped (the step limit: the while's else); rejected: undone moves; stalled: a stall's reason (no try)
    macs, last, size, recoveries = base["macs"], base, StretchSize.first(config), 0
    step, reason, rejected, stalled = 0, "", [], None
    rank = functools.partial(rank_step, task, plan, structure["left_alone"], base["widths"], rng, cancel, cb)
    fallback = Fallback()  # the last model the test images accepted on the path, for a second refusal
    while step < config.max_steps:
        if cancel.is_set():
            raise CancelledError("Cancelled.")
        fallback.note(graph, last, channel_maps, base, config.max_drop)
        if clock.would_pass_budget(clock.step_estimate() + time_to_finish(task, writer, clock)):
            reason = f"time budget reached ({config.time_budget:g} min); the finished steps are kept"
            break
        step, stalled = step + 1, stalled or plain_step_crowds_out_stretch(task, writer, clock, last, size.epochs)
        cb.enter("step", step)
        t0 = time.perf_counter()
        scores, candidates = rank(graph, scores, step)
        if not candidates:
            reason = "every group is down to one cluster" + ("" if plan.empty else " or at its limit in the plan")
            break
        to_go = None if config.mac_target is None else macs - config.mac_target * base["macs"]
        moves = step_moves(candidates, batch, to_go, None if config.step_macs is None else config.step_macs * base["macs"])
        accepted, graph, broke_together = (None, graph, False) if stalled else try_candidates(  # stalled: no try
            graph, moves, task, structure, writer, cb, step, base["metric"], rng, cancel, rejected)
        if accepted is None and not stalled:
            clock.stall_done(time.perf_counter() - t0)
        batch = max(1, len(moves[0]) // 2) if broke_together else batch  # broke the threshold together: halve
        if accepted is None:
            reason = stalled or f"the next clusters would exceed the {config.max_drop:g}-point " \
                f"{task.metric_name} threshold"
            recovered_before = last.get("recovered_from") is not None  # a stretch's too: see after_stretch
            stretch = config.stretch and can_recover(task) and stretch_fits(task, writer, clock, size.epochs)
            if recovered_before and not stretch:
                reason += "; the recovery before bought no further step" + (NO_STRETCH_ROOM if config.stretch else "")
                break
            blocked = recovery_blocked(task, writer, recoveries, clock) if can_recover(task) else ""
            if blocked is not None:
                reason += blocked
                break
            if stretch:  # else a plain recovery, which does fit
                walk = StretchWalk(candidates, scores, rank, size.macs, t_start, size.epochs,
                                   functools.partial(size.after_undone, config, recovered_before))
                graph, last, step, kept = stretch_step(graph, walk, task, structure, writer, cb, step, last, base,
                                                       teacher, rng, cancel, clock, channel_maps)
                recoveries += kept is not None  # None: no removal fitted even the stretch's allowance
                scores, batch = None, config.clusters_per_step
                retry = size.resize(kept, config, walk.taken) and recovered_before  # from the same recovery
                stop, stalled = after_stretch(task, base, last, kept, recovered_before and not retry, recoveries,
                                              clock, writer, stalled), (reason if retry else None)
                again = test_refusal(base, last, config.max_drop) if stop is not None and kept \
                    and not at_mac_target(config, base, last) else None  # after_stretch's second refusal
                back = again and fallback.back_off(task, writer, clock, recoveries, size, walk.taken, channel_maps, cb)
                if back:  # the test images refused the stretch too: on from the last step they accepted
                    (graph, last), stalled = back, f"{again}; back to step {back[1]['step']}"
                if stop is not None and not back:
                    reason = stop if kept else reason + stop
                    break
                if kept or retry:
                    macs = last["macs"]
                    continue
                step += 1
            last = recover_step(task, graph, writer, cb, step, last, teacher, cancel, clock)
            recoveries += 1
            scores, batch = None, config.clusters_per_step  # every weight moved: a full re-score, full-sized steps
            continue
        move, metrics, tried = accepted
        macs = metrics["macs"]
        last, target_reached = record_step(writer, cb, graph, step, move, metrics, tried, channel_maps,
                                           (t0, t_start), base["macs"], config.mac_target, **task.step_extra(move),
                                           **({"awaits_recovery": True} if can_recover(task) else {}))
        clock.step_done(time.perf_counter() - t0)
        if target_reached:
            reason = target_reached
            break
        refused = test_refusal(base, last, config.max_drop)
        if refused and can_recover(task):  # the selection images passed a step the test images refuse: recover
            last, step, recoveries, stalled, reason = recover_refused(task, graph, writer, cb, step, last, base,
                                                                      teacher, cancel, clock, recoveries, refused)
            scores, batch = None, config.clusters_per_step
            if reason is not None:
                break
    else:
        reason = "step limit reached"
    return finish_run(task, graph, writer, cb, cancel, clock, teacher, last, reason, rejected)


def recover_refused(task: Task, graph: PruningGraph, writer: RunWriter, cb: Callbacks, step: int, last: dict,
                    base: dict, teacher, cancel: threading.Event, clock: "RunClock", recoveries: int, refused: str):
    """A kept step the test images refuse (``refused``, :func:`test_refusal`; never shipped): recover it, when a
    recovery is left and fits. Returns ``(last, step, recoveries, stalled, stop)``: the record to go on from, the
    last step number written, the recoveries spent, the stall reason when the recovery did not bring the step
    back (:func:`unrecovered_refusal`: the loop's next move is a stretch) and why the run ends (None: it goes on)."""
    blocked = recovery_blocked(task, writer, recoveries, clock)
    if blocked is not None:
        return last, step, recoveries, None, refused + blocked
    last = recover_step(task, graph, writer, cb, step + 1, last, teacher, cancel, clock)
    stalled = unrecovered_refusal(base, last, refused, task.config.max_drop)
    blocked = stretch_blocked(task, writer, clock, recoveries + 1) if stalled else None
    return last, step + 1, recoveries + 1, stalled, None if blocked is None else stalled + blocked


class Fallback:
    """The last model on the run's path that the test images accepted: a recovered step within the threshold on
    them (:func:`test_refusal`), its record, weights, Torch-Pruning history and channel maps, noted at the top of
    each step of :func:`prune_loop`; and :meth:`back_off` to it.

    Why: where the test images refuse a step, its recovery and the stretch taken from there (:func:`after_stretch`),
    the path past the last accepted step is spent; ending there ended our ResNet-20 upload (``bench/real_cifar.py
    --upload``, the teacher in channels-last) at 1.26x fewer MACs with 10 of its 15 minutes unspent."""

    def __init__(self):
        self.model = self.history = self.channel_maps = self.record = None

    def note(self, graph: PruningGraph, last: dict, channel_maps: dict, base: dict, max_drop: float) -> None:
        """Keep ``last`` (the model ``graph`` holds) when it is a recovered step the test images accept, new."""
        if last.get("recovered_from") is None or last.get("undone") or test_refusal(base, last, max_drop) \
                or (self.record is not None and self.record["step"] == last["step"]):
            return
        self.model, self.history = copy.deepcopy(graph.model), [list(h) for h in graph.history]
        self.channel_maps, self.record = copy.deepcopy(channel_maps), last

    def back_off(self, task: Task, writer: RunWriter, clock: "RunClock", recoveries: int, size: "StretchSize",
                 taken: int, channel_maps: dict, cb: Callbacks) -> tuple[PruningGraph, dict] | None:
        """Back to the noted step with a smaller next stretch (``size``, as after an undone stretch that removed
        ``taken`` clusters: :meth:`StretchSize.resize`): ``(graph, record)`` to go on from, ``channel_maps``
        restored; None when no step was noted, the stretch cannot shrink, or no recovery or room for that stretch
        is left (:func:`stretch_blocked`): the run ends as before. The steps past it stay in the history, where
        the test curve (``core.runs.accepted_test_drops``) still counts their reads: they were looks at the test
        images; the claim's path (``core.claim.lineage``) and the control leave them out."""
        before = (size.macs, size.epochs)
        if self.record is None:
            return None
        size.resize(False, task.config, taken)  # from another model than the refused stretch's: any change will do
        if (size.macs, size.epochs) == before or stretch_blocked(task, writer, clock, recoveries) is not None \
                or not stretch_fits(task, writer, clock, size.epochs):
            return None
        channel_maps.clear()
        channel_maps.update(copy.deepcopy(self.channel_maps))
        clock.path_end = self.record["step"]  # until the next stretch's first record names it (``from_step``)
        cb.progress(1.0, f"back to step {clock.path_end}, the last step the test images accepted")
        return rebuild_graph(task, copy.deepcopy(self.model), [list(h) for h in self.history]), self.record


def rank_step(task: Task, plan: PrunePlan, left_alone: dict[str, str], widths: dict[str, int],
              rng: np.random.Generator, cancel: threading.Event, cb: Callbacks, graph: PruningGraph,
              scores: dict | None, step: int) -> tuple[dict, list[Cluster]]:
    """Step ``step``'s scores (those still valid kept, :func:`score_step`) and its candidate clusters, best first,
    among the groups neither left alone nor excluded by the plan (``widths``: the original's, for its caps)."""
    groups = [g for g in graph.groups() if g.root not in left_alone and g.root not in plan.exclude]
    scorer = task.scorer(graph.model)
    scores = score_step(task, graph, groups, scorer, scores, step, rng, cancel, cb)
    return scores, step_candidates(task, graph, groups, scores, scorer, rng, cancel, cb, step,
                                   lambda clusters: plan.filter_candidates(clusters, widths))


def stretch_fits(task: Task, writer: RunWriter, clock: "RunClock", epochs: int | None = None,
                 before: float = 0.0) -> bool:
    """Whether the budget has room for a stretch: a step, its recovery (``epochs``, default ``STRETCH_EPOCHS`` times
    ``recover_epochs``, and at least what a last stretch gets, :func:`least_final_epochs`), the control's repeat of
    that recovery on the original (the control repeats a kept stretch's recovery, ``core.claim.training_received``,
    and a stretch is not known to be kept before it ends) and what the run keeps for its end after a recovery
    (:func:`reserve_after_recovery`: the control; a stretch ends recovered, so no final recovery is due after it);
    ``before``: seconds of other work first."""
    needs = before + reserve_after_recovery(task, writer, clock) + stretch_seconds(
        task, writer, clock, least_final_epochs(task.config, epochs))
    return not clock.would_pass_budget(needs)


def least_final_epochs(config: PruneConfig, epochs: int | None = None) -> int:
    """The fewest epochs a stretch is started with room for: its own (``epochs``, default the usual,
    :func:`usual_stretch_epochs`) and at least ``FINAL_STRETCH_EPOCHS`` times the usual, since any stretch may be the
    run's last, and the last stretch's recovery is the training the shipped model ends with.

    Why: on our ResNet-56 upload (``bench/real_cifar.py --upload``, 30 minutes) the room for one more stretch with
    the usual 6 epochs was found after a stretch to 2.37x fewer MACs, which then got those 6 epochs (1.0 points lost
    on 3,000 unseen images); the next stretch went to 2.64x and was recovered for the 7 epochs left (1.2 and 1.3
    in two runs), and shipped. The run that gave the 2.37x stretch the 11 epochs left shipped it at 0.37."""
    usual = usual_stretch_epochs(config)
    return max(epochs or usual, FINAL_STRETCH_EPOCHS * usual)


def stretch_seconds(task: Task, writer: RunWriter, clock: "RunClock", epochs: int | None = None) -> float:
    """Seconds of a stretch: its first step and its recovery of ``epochs`` (default ``STRETCH_EPOCHS`` times
    ``recover_epochs``), and when the run makes the control, the control's repeat of those epochs
    (:func:`recovery_epoch_seconds`). One formula for the gate (:func:`stretch_fits`) and the prediction that a
    stretch is the last (:func:`stretch_recovery_epochs`): where they differed, a run predicted room that the gate
    then refused."""
    epochs = epochs or usual_stretch_epochs(task.config)
    return clock.step_estimate() + epochs * recovery_epoch_seconds(task, writer, clock)


def recovery_epoch_seconds(task: Task, writer: RunWriter, clock: "RunClock") -> float:
    """Seconds one more recovery epoch adds to the run: the epoch (:meth:`RunClock.recovery_estimate`) and, with the
    control, the control's repeat of it at the rate :func:`control_estimate` will count it
    (:func:`control_epoch_seconds`).

    Why the control's own rate: the room for the last stretch's epochs counted the control's repeat at the last
    recovery's rate (4.31 s an epoch on our ResNet-20 upload, ``bench/real_cifar.py --upload``), the control's check
    at the end at the mean of all recoveries (4.55, its 2-epoch ones dearer by their measuring); over 76 epochs the
    difference (18 s) passed the budget and the run ended without its control."""
    guess = unmeasured_epoch_seconds(task)
    epoch_s = clock.recovery_estimate(1) if clock.recovery_seconds or guess is None else guess
    if makes_control(task):
        epoch_s += control_epoch_seconds(Run(writer.dir).history, clock, guess)
    return epoch_s


DISTILLED_BATCH_COST = 1.5  # a distilled mini-batch's time over a plain one's: the teacher's forward pass added


def unmeasured_epoch_seconds(task: Task) -> float | None:
    """Seconds of a recovery epoch on the original before any recovery was timed: its mini-batches at the original's
    fine-tuning rate (``finetune_batch_seconds``, timed by the classification task's fine-tuning check), times
    ``DISTILLED_BATCH_COST`` when the recovery distils; None where the task timed none.

    Why: before, an epoch was guessed at four steps' time (:meth:`RunClock.recovery_estimate`, a guess for a whole
    recovery), 64 s on our ResNet-56 upload (``bench/real_cifar.py --upload``) where an epoch takes 11-12 s; at the
    first stall a stretch's 12 epochs and the control's repeat of them then read 1,500 s, and whether the stretch
    fitted a 30-minute budget turned on a second of step time: two runs of the same code took different paths from
    step 3. The cost of the teacher: 153 ms against 102 ms a ResNet-56 mini-batch of 64 images on 2 cores, bf16."""
    batch_s = getattr(task, "finetune_batch_seconds", None)
    n_train = len(getattr(getattr(task, "data", None), "train", None) or ())
    if not batch_s or not n_train:
        return None
    batches = max(1, n_train // task.config.batch_size)
    return batches * batch_s * (DISTILLED_BATCH_COST if task.config.recover_kd else 1.0)


def plain_step_crowds_out_stretch(task: Task, writer: RunWriter, clock: "RunClock", last: dict,
                                  epochs: int) -> str | None:
    """Why the loop takes a stretch at once, trying no candidate first (a stall reason, :func:`prune_loop`), or None:
    from a recovered model (``last``), when the budget has room for a stretch (``epochs``, :func:`stretch_fits`) but
    not for a plain step (at the slowest so far) before it.

    Why: after a kept stretch the loop tries a plain step first, and a stalled step tries every candidate. On our
    ResNet-56 upload (``bench/real_cifar.py --upload``, 30 minutes) that step (about 25 s) was tried where the
    budget held the next stretch but not both, no stretch fitted after it, and the minutes the last stretch's
    recovery could have used went unspent (:func:`stretch_recovery_epochs` had predicted another stretch)."""
    if not (task.config.stretch and can_recover(task)) or last.get("recovered_from") is None:
        return None
    if stretch_fits(task, writer, clock, epochs, before=clock.slowest_step()) or not stretch_fits(
            task, writer, clock, epochs):
        return None
    return "no time in the budget for a plain step before a stretch"


def write_structure(graph: PruningGraph, task: Task, writer: RunWriter) -> dict:
    """Write ``structure.json`` before the first step and return it: the graph's notes, the groups left
    alone (root -> why its surgery cannot be trusted; the loop never touches them) and the task's output
    layers, so Review can say what was never pruned and why even when the run stops early."""
    left_alone: dict[str, str] = graph.left_alone()
    structure = {"notes": list(graph.notes), "left_alone": left_alone}
    outputs = task.output_layers(graph.model)
    if outputs is not None:
        structure["output_layers"] = outputs
    writer.write_json("structure.json", structure)
    return structure


def finish_run(task: Task, graph: PruningGraph, writer: RunWriter, cb: Callbacks, cancel: threading.Event,
               clock: RunClock, teacher, last: dict, reason: str, rejected: list[dict]) -> dict:
    """After the loop stopped for ``reason``: the final recovery when one is due, the control when asked for
    and time is left, then the run's ``done`` status (with the closest rejected move) and its summary.
    Kept apart from the loop so that what happens after the last step reads in one place."""
    if final_recovery_due(last, task, clock):
        written = Run(writer.dir).history[-1]["step"]  # past ``last`` when a stretch was undone after it
        last = recover_step(task, graph, writer, cb, written + 1, last, teacher, cancel, clock)
    if makes_control(task) and teacher is not None:
        needs = control_estimate(Run(writer.dir).history, task, clock)
        if clock.would_pass_budget(needs):
            reason += f"; no time left in the budget for the control (about {needs / 60:.0f} min)"
        else:
            run_control(task, teacher, writer, cb, cancel, last["step"])
    writer.status("done", reason, **({"closest_rejected": min(rejected, key=lambda r: r["drop_points"])}
                                     if rejected else {}))
    return run_summary(writer.dir, "done", reason)


@dataclass
class StretchWalk:
    """Where a stretch (:func:`stretch_step`) starts and how far it walks: the stalled step's ``candidates`` and
    ``scores``, ``rank(graph, scores, step) -> (scores, candidates)`` for its later steps, ``macs`` (the fraction of
    the original MACs it removes at most), ``t_start`` (what records' ``elapsed`` counts from), ``epochs`` (its
    recovery's, before :func:`stretch_recovery_epochs` adds what the budget leaves) and ``after_undone(taken)``
    (what the loop does when the stretch is undone: :meth:`StretchSize.after_undone`)."""
    candidates: list[Cluster]
    scores: dict | None
    rank: Callable
    macs: float
    t_start: float
    epochs: int
    after_undone: Callable[[int], tuple[int, bool]] = lambda taken: (0, False)
    taken: int = 0  # clusters the walk removed, set by stretch_step (StretchSize.resize)


def usual_stretch_epochs(config: PruneConfig) -> int:
    """A stretch's recovery epochs before any resizing: ``STRETCH_EPOCHS`` times ``recover_epochs``."""
    return STRETCH_EPOCHS * config.recover_epochs


@dataclass
class StretchSize:
    """The next stretch's size (:func:`stretch_step`): the fraction of the original MACs its walk removes at most
    (``macs``; 0: one cluster) and its recovery's epochs (``epochs``); :meth:`resize` after each stretch."""
    macs: float
    epochs: int

    @classmethod
    def first(cls, config: PruneConfig) -> "StretchSize":
        return cls(config.stretch_macs, usual_stretch_epochs(config))

    def after_undone(self, config: PruneConfig, recovered_before: bool, taken: int) -> tuple[int, bool]:
        """What the loop does after this stretch, should it be undone, its walk having removed ``taken`` clusters:
        ``(epochs, stretch)``, the epochs of the recovery that follows and whether it is a stretch's (a step and
        its scoring before it) or a plain recovery; ``(0, False)`` when the run ends there (:func:`prune_loop`:
        from a recovered model, ``recovered_before``, only a retry follows, :meth:`resize`). Leaves this size as
        it is."""
        if not recovered_before:
            return config.recover_epochs, False
        trial = StretchSize(self.macs, self.epochs)
        return (trial.epochs, True) if trial.resize(False, config, taken) else (0, False)

    def resize(self, kept: bool | None, config: PruneConfig, taken: int = 1) -> bool:
        """Resize after a stretch whose walk removed ``taken`` clusters; returns whether the next stretch from the
        same recovered model is worth its time (:func:`prune_loop`): only when its recovery grew or its walk
        shrank, since the same stretch again repeats the same removal and the same recovery.

        After an undone stretch (``kept`` False) the walk halves, down to a step's worth (``step_macs``); once there,
        the recovery doubles, up to ``RETRY_STRETCH_EPOCHS`` times a stretch's usual; once that is reached too, a
        walk that took more than one cluster shrinks to one (``macs`` 0: the walk's first move is one cluster, and
        it ends there). After a kept stretch a one-cluster walk grows back to a step's worth; None (nothing was
        walked) changes nothing.

        Why: on our ResNet-20 upload (``bench/real_cifar.py --upload``) a one-cluster stretch to 1.31x recovered for
        6 epochs read 1.2 points lost on the selection images and was undone, and the run ended 3.7 minutes into
        its 14-minute budget; that recovered model lost 0.53 points on 3,000 unseen images. With the recovery
        doubled the same upload went on to 1.73x, where a two-cluster stretch to 1.92x recovered for 12 epochs
        read 1.4 and was undone, and the run ended with 2.4 of its 15 minutes unused."""
        floor = config.step_macs or 0.0
        if kept:
            self.macs = max(self.macs, floor)
        if kept is not False:
            return False
        if self.macs > floor + 1e-12:
            self.macs = max(self.macs / 2, floor)
            return False
        most = RETRY_STRETCH_EPOCHS * usual_stretch_epochs(config)
        if self.epochs < most:
            self.epochs = min(2 * self.epochs, most)
            return True
        if taken > 1 and self.macs > 0:
            self.macs = 0.0
            return True
        return False


def stretch_step(graph: PruningGraph, walk: StretchWalk, task: Task, structure: dict, writer: RunWriter,
                 cb: Callbacks, step: int, last: dict, base: dict, teacher, rng: np.random.Generator,
                 cancel: threading.Event, clock: "RunClock", channel_maps: dict):
    """Where no candidate fits: walk on past the threshold and let one long recovery bring the model back.

    From step ``step`` the walk takes ordinary steps (scored, ranked, fine-tuned and decided as the loop's), each
    allowed ``stretch_allowance`` times the threshold, until they removed ``walk.macs`` of the original MACs (or
    reached the MAC target, or no move fits, or the budget has no room for another and the recovery); each is
    recorded (``stretch``: never shipped, ``core.runs.shippable``). The next step recovers the walk's last one
    (``STRETCH_EPOCHS`` times ``recover_epochs``), judged on all the selection images: kept when it is back within
    the threshold, else ``undone`` (never shipped either) and the model goes back to the one before the walk.
    Returns ``(graph, last, step, kept)``: the graph to go on from, the record to go on from, the last step number
    written, and whether the stretch was kept (None: no move fitted even the allowance, nothing was recorded).

    Why: the loop stalls where the 40 fine-tuning batches of a step cannot absorb the next removal, while a
    recovery of several epochs absorbs much more; a stretch spends its epochs on a larger removal, in one
    decision that reads all the selection images, instead of several small ones that each read them again.
    Measured on our ResNet-56 upload (``bench/real_cifar.py --upload``): stretches of one 4 % step each came back
    to -0.7..-0.1 selection points after 6 epochs, far inside a 1-point threshold. Longer walks did not come back
    where it counts (ResNet-20, 12 % within 3x the threshold: +0.1 selection points but +1.9 unseen at 1.46x), so
    the default walk is one step (``PruneConfig.stretch_macs``, unchecked)."""
    config = task.config
    snapshot = (copy.deepcopy(graph.model), [list(h) for h in graph.history])
    maps_before = copy.deepcopy(channel_maps)
    goal = max(last["macs"] - walk.macs * base["macs"], (config.mac_target or 0.0) * base["macs"])
    size = (config.step_macs or walk.macs) * base["macs"]
    walked = None  # the walk's last recorded step
    candidates, scores = walk.candidates, walk.scores
    allowance = float("inf") if config.stretch_allowance is None else config.stretch_allowance * config.max_drop
    while True:
        here = step if walked is None else walked["step"] + 1
        cb.enter("step", here)
        t0 = time.perf_counter()
        if candidates is None:
            scores, candidates = walk.rank(graph, scores, here)
        current = last["macs"] if walked is None else walked["macs"]
        moves = step_moves(candidates, max(2, config.clusters_per_step), current - goal, size) if candidates else []
        accepted, graph, _ = try_candidates(graph, moves, task, structure, writer, cb, here, base["metric"], rng,
                                            cancel, allowance=allowance)
        if accepted is None:
            break
        move, metrics, tried = accepted
        walk.taken += len(move)
        back = {} if clock.path_end is None else {"from_step": clock.path_end}  # the first record after a back-off
        clock.path_end = None  # that record names it: lineage follows it
        walked, _ = record_step(writer, cb, graph, here, move, metrics, tried, channel_maps, (t0, walk.t_start),
                                base["macs"], None, stretch=True, awaits_recovery=True, **back, **task.step_extra(move))
        clock.step_done(time.perf_counter() - t0)
        candidates = None
        if walked["macs"] <= goal + 1e-9 or not stretch_fits(task, writer, clock, walk.epochs):
            break
    if walked is None:
        cb.progress(0.5, f"step {step}: no stretch (no move fits {allowance:g} points)")
        return graph, last, step - 1, None
    outcome = {}

    def judge(model) -> dict:
        # all the selection images, the score images too: a stretch is one decision (no ranking of candidates
        # on them), and on our ResNet-20 upload the 600 deciding images alone undid a recovered stretch that read
        # 0.7 on all 1,000 and -0.2 on 3,000 unseen images (bench/real_cifar.py --upload-flows stretch)
        outcome["lost"] = (base["metric"] - recovered_decision(task, model).metric) * 100
        return {"stretch": True, "undone": bool(outcome["lost"] > config.max_drop + 1e-9),
                "stretch_drop_points": float(outcome["lost"])}

    done = walked["step"] + 1
    recovered = recover_step(task, graph, writer, cb, done, walked, teacher, cancel, clock, judge=judge,
                             epochs=stretch_recovery_epochs(task, writer, clock, walk.epochs,
                                                            walk.after_undone(walk.taken)))
    lost, label = outcome["lost"], f"the stretch of steps {step}-{walked['step']}"
    if not recovered["undone"]:
        cb.progress(1.0, f"step {done}: {label} recovered to {lost:.2f} points lost; kept")
        return graph, recovered, done, True
    cb.progress(1.0, f"step {done}: {label} recovered only to {lost:.2f} points lost; back to step {last['step']}")
    channel_maps.clear()
    channel_maps.update(maps_before)
    return rebuild_graph(task, *snapshot), last, done, False


def stretch_recovery_epochs(task: Task, writer: RunWriter, clock: "RunClock", epochs: int | None = None,
                            undone: tuple[int, bool] = (0, False)) -> int:
    """Epochs of a stretch's recovery: ``epochs`` (default ``STRETCH_EPOCHS`` times ``recover_epochs``, the usual);
    or, when the budget will have no room for another stretch after it (the last stretch the run can take if it is
    kept), as many more as the budget holds beside what the run keeps for its end (:func:`reserve_after_recovery`)
    and what follows should this stretch be undone (``undone``: :meth:`StretchSize.after_undone`, kept room for only when it
    fits), the control's repeat of each epoch counted, up to ``LAST_STRETCH_EPOCHS`` times the usual. Without a
    budget, or before any recovery was timed, ``epochs``.

    Another stretch after this one needs, after its recovery: the re-scoring of the recovered model and slack for
    the drift of the estimates, each counted at the slowest step so far (:meth:`RunClock.slowest_step`), the next
    stretch's first step and its recovery of ``epochs`` and at least a last stretch's (:func:`least_final_epochs`),
    repeated by the control; where the budget then holds the
    stretch but not a plain step before it, the loop skips that step (:func:`plain_step_crowds_out_stretch`). Why:
    counting only the next stretch's step, our ResNet-56 upload (``bench/real_cifar.py --upload``, 30 minutes)
    predicted room for another stretch at step 27, gave this one the usual 6 epochs, tried a plain step after it,
    found no room for a stretch (:func:`stretch_fits`) and ended with 3.6 minutes unspent; its shipped step lost
    1.00 points on 3,000 unseen images where the same step recovered for 11 epochs (the leftover, an earlier run)
    lost 0.37. Counting that plain step at the slowest step (24 s) was not enough: the next run of the same upload
    tried it, and again no stretch fitted after it.

    Why the room for an undone stretch's retry: on our ResNet-20 upload the leftover went to a two-cluster stretch
    to 1.92x (18 epochs; 1.3 points lost on the selection images, undone), and the one-cluster retry at 1.82x that
    an earlier run had taken there (0.7 selection, 0.6 on the unseen images) no longer fitted.

    Why one epoch spare: the leftover is spent to the epoch, and the control's check at the end
    (:func:`finish_run`) reads the estimates again; on our ResNet-20 upload a stretch recovered to the second (and
    with the control's repeat counted at another rate than that check's, :func:`recovery_epoch_seconds`) left the
    control 6 minutes without room, and the run ended without it. Why ``CONTROL_DRIFT`` of what the run keeps
    for its end where that is more: the control's estimate (:func:`control_estimate`) erred 5 % low on our
    ResNet-20 upload (361 s for 380: the original's epochs ran 5 % dearer than the line through the recoveries read)
    and 2 % high on the ResNet-56's (687 s for 675); with one epoch spare (8.7 s) the ResNet-20's run ended 2.4 s
    past its 15-minute budget.

    Why longer recoveries: the recovery of the last stretch is what the run ships, and longer recoveries come back
    further. Our ResNet-56 upload's last stretch (2.14x fewer MACs, 4.03 points lost on 3,000 unseen images)
    recovered to 0.97 after 6 epochs and to 0.70 after 12 (``bench/recovery_epochs.py``); the minutes it takes are
    those the run had spent on one-cluster steps and a second recovery that shipped nothing better."""
    usual = usual_stretch_epochs(task.config)
    epochs = epochs or usual
    if clock.budget_s is None or not clock.recovery_seconds:
        return epochs
    epoch_s = recovery_epoch_seconds(task, writer, clock)  # the control repeats each epoch
    reserve = reserve_after_recovery(task, writer, clock)
    room = clock.budget_s - clock.elapsed() - reserve - epochs * epoch_s
    # another stretch fits after this one: its first step and recovery, the re-scoring before it and slack for the
    # estimates' drift, each at the slowest step so far (plain_step_crowds_out_stretch skips the plain step)
    if room >= 2 * clock.slowest_step() + stretch_seconds(task, writer, clock, least_final_epochs(task.config, epochs)):
        return epochs
    follow_epochs, follow_stretch = undone  # a retry is gated as any stretch (stretch_fits)
    follow = 0.0 if not follow_epochs else follow_epochs * epoch_s
    if follow_epochs and follow_stretch:
        follow = stretch_seconds(task, writer, clock, least_final_epochs(task.config, follow_epochs))
    if room >= follow:  # what follows an undone stretch still fits: keep its room
        room -= follow
    room -= max(epoch_s, CONTROL_DRIFT * reserve)  # spare for the estimates' drift: the control must still fit
    return epochs + int(min(max(room, 0.0) // epoch_s, max(LAST_STRETCH_EPOCHS * usual - epochs, 0)))


def after_stretch(task: Task, base: dict, last: dict, kept: bool | None, recovered_before: bool, recoveries: int,
                  clock: "RunClock", writer: RunWriter, refused: str | None = None) -> str | None:
    """Why the run ends after a stretch (:func:`stretch_step`), or None to go on: from a kept stretch when it
    reached the MAC target, or when it was taken for a step the test images refused (``refused``:
    :func:`unrecovered_refusal`) and they refuse its recovery too; from an undone one (the text is added to the
    stall's reason) when a plain recovery was already tried, none is left, or no time is left for one.

    Why the second refusal ends the walk: the stretch's longer recovery is the remedy the loop has for a step the
    test images refuse; walking on past it made the bundled cifar10 sample's default run, whose 400 test images
    refused every step from the first (1.75 to 6.75 points lost), take 14 steps instead of 2 for nothing that
    could ship. The loop then goes back to the last recovered step the test images accepted, when there is one
    and a smaller stretch fits (:class:`Fallback`), and ends only otherwise.

    ``recovered_before``: the model the stall started from is a recovery, a stretch's included; a second recovery
    of it buys no step (the loop ends where no stretch fits, :func:`prune_loop`, or this one was undone). Why a
    stretch's too: on our ResNet-56 upload the plain recovery of the last stretch's recovered model moved its drop
    on 3,000 unseen images from 0.97 to 1.23 points at the same MACs, and as one more look at the test images
    (0.3 -> 0.0) it was the step shipped (``bench/real_cifar.py --upload``, step 26)."""
    config = task.config
    if kept:
        if at_mac_target(config, base, last):
            return f"MAC target reached ({last['macs'] / base['macs']:.2f} of the original)"
        again = test_refusal(base, last, config.max_drop) if refused else None
        if again:
            return f"{again}: the recovery of the stretch taken where {refused}"
        return None  # the test images accept what ships, not the walk: a kept stretch was one decision on all
        # the selection images, and on our ResNet-20 upload the test images refused one (1.2 points) that lost
        # -0.2 on 3,000 unseen images
    if recovered_before:
        return "; the recovery before bought no further step, nor did a stretch"
    blocked = recovery_blocked(task, writer, recoveries, clock)
    return None if blocked is None else "; the stretch did not come back" + blocked


def at_mac_target(config: PruneConfig, base: dict, last: dict) -> bool:
    """Whether ``last`` has reached the run's MAC target (``mac_target`` of the original's, ``base``'s, MACs)."""
    return config.mac_target is not None and last["macs"] <= config.mac_target * base["macs"]


def loop_teacher(task: Task, original, graph: PruningGraph):
    """The recoveries' teacher and the control's start: a frozen copy of the model as loaded (``original``, else
    the graph's model before any step), or None when the run neither recovers nor makes the control."""
    if not (can_recover(task) or task.config.control):
        return None
    return copy.deepcopy(original if original is not None else graph.model).eval()


def unrecovered_refusal(base: dict, recovered: dict, refused: str, max_drop: float) -> str | None:
    """After the recovery of a step the test images refused: None when it brought the step back within the
    threshold on them (the walk goes on), else the reason of a stall (``refused`` and that the recovery did not
    bring it back). The loop (:func:`prune_loop`) then tries no candidate but a stretch when one fits the budget
    (its longer recovery, judged on all the selection images, may bring the model back; the test images then
    only accept what ships, ``core.runs.select_step``), and ends otherwise.

    Why: ending at once ended a ResNet-20 upload 2.5 minutes into a 14-minute budget at 1.16x fewer MACs, on a
    test read of 1.1 points for a step that lost 0.67 on 3,000 unseen images (``bench/real_cifar.py --upload``).
    Going back to the model before the refused step and walking on with smaller steps was measured and lost
    (docs/how-it-works.md): every recovered step it added was one more look at the test images."""
    return refused + "; the recovery did not bring it back" if test_refusal(base, recovered, max_drop) else None


def stretch_blocked(task: Task, writer: RunWriter, clock: "RunClock", recoveries: int) -> str | None:
    """What keeps the loop from a stretch now, as the end of a stop reason, or None: stretches off (empty text),
    every recovery spent, or no room in the budget for a stretch (:func:`stretch_fits`)."""
    if not task.config.stretch:
        return ""
    blocked = recovery_blocked(task, writer, recoveries, clock)
    if blocked is not None:
        return blocked
    return None if stretch_fits(task, writer, clock) else NO_STRETCH_ROOM


def recovery_blocked(task: Task, writer: RunWriter, recoveries: int, clock: "RunClock") -> str | None:
    """What keeps the loop from a further recovery, as the end of a stop reason, or None: every one of
    ``max_recoveries`` spent, or no time left in the budget for one as long as the last and what the run keeps
    for its end (:func:`time_to_finish`: with the control, the control's repeat of this recovery and the control).

    Why the control's share: a ResNet-56 upload (``bench/real_cifar.py --upload``, 30-minute budget) recovered
    its last model once more 18 minutes in, where only the recovery itself was checked against the budget, and
    then had no time for the 12-minute control."""
    config = task.config
    if recoveries >= config.max_recoveries:
        return f"; all {config.max_recoveries} recoveries spent"
    if clock.would_pass_budget(time_to_finish(task, writer, clock)):
        return (f"; no time left in the {config.time_budget:g}-minute budget for a recovery"
                + (" and the control" if makes_control(task) else ""))
    return None


def recovered_decision(task: Task, model):
    """What keeps or undoes a stretch: the recovered model's decision figures (``Task.decision``), read once."""
    return task.decision(model)


def test_refusal(base: dict, record: dict, max_drop: float) -> str | None:
    """Why the test images refuse ``record`` (its test drop from ``base`` past ``max_drop`` points), or None.

    The loop's own decisions read the selection images again and again, and a walk of steps each kept on
    them drifts: on a real ResNet-20 upload the selection images read 0.3–1.0 points lost where the test
    images read 2–4 (``bench/real_cifar.py --upload``). A step the test images refuse is never shipped
    (``core.runs.select_step``), so the loop recovers there (:func:`prune_loop`). This is one more use of
    the test images than the final acceptance: they decide *when* to recover (at most ``max_recoveries``
    times), never which step is kept; the bench's unseen images check that the claim still holds."""
    if base.get("test_metric") is None or record.get("test_metric") is None:
        return None
    drop = (base["test_metric"] - record["test_metric"]) * 100
    if drop <= max_drop + 1e-9:
        return None
    return f"the test images refuse step {record['step']} ({drop:.2f} points lost, threshold {max_drop:g})"


class RunClock:
    """The run's time against its budget (minutes; None: no budget): whether the next step, or a recovery,
    would pass it, judged from the measured seconds of the steps and recoveries so far."""

    def __init__(self, budget_minutes: float | None, started: float | None = None):
        # ``started``: when the user's wait began (``time.time()``; a CLI command's process start), if earlier
        self.start = time.perf_counter() - (0.0 if started is None else max(time.time() - started, 0.0))
        self.budget_s = None if budget_minutes is None else budget_minutes * 60.0
        self.step_seconds: list[float] = []
        self.stall_seconds: list[float] = []  # steps that kept no candidate: not recorded, not in step_estimate
        self.recovery_seconds: list[float] = []
        self.recovery_epochs: list[int | None] = []
        self.first_step: float | None = None  # when the loop's first step began: what records' ``elapsed`` counts from
        # the step the loop's model is at while no record names it (after a back-off, Fallback, until the next stretch's
        # first record carries it as ``from_step``): the path the control's estimate counts
        self.path_end: int | None = None

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def since_first_step(self) -> float:
        """Seconds since the loop's first step began (since the run began before it): a record's ``elapsed``, the
        same for pruning steps (``record_step``) and recoveries. The budget reads :meth:`elapsed`, from the run's
        start. Recoveries counted from the run's start before, 60 s ahead of the steps around them on our
        ResNet-56 upload."""
        return time.perf_counter() - (self.start if self.first_step is None else self.first_step)

    def step_done(self, seconds: float) -> None:
        self.step_seconds.append(seconds)

    def stall_done(self, seconds: float) -> None:
        """A step that tried its candidates and kept none took ``seconds`` (:meth:`slowest_step` counts it)."""
        self.stall_seconds.append(seconds)

    def recovery_done(self, seconds: float, epochs: int | None = None) -> None:
        self.recovery_seconds.append(seconds)
        self.recovery_epochs.append(epochs)

    def step_estimate(self) -> float:
        """Seconds of the next step: the mean of the steps so far (0 before the first)."""
        return float(np.mean(self.step_seconds)) if self.step_seconds else 0.0

    def slowest_step(self) -> float:
        """Seconds of the slowest step so far, kept or stalled (0 before the first): what a step that re-scores every
        group may take (the first step, and the first after a recovery; :func:`stretch_recovery_epochs`), or one that
        tries every candidate and keeps none.

        Why the stalled ones: a stall tries every candidate, where a kept step stops at the first that fits. On our
        ResNet-56 upload (``bench/real_cifar.py --upload``, 30 minutes) the step after the stretch to 2.37x was
        predicted to leave room for another stretch at the slowest kept step (23 s); it stalled after four
        candidates, the stretch no longer fitted, and the 2.37x stretch had been given 6 epochs instead of the
        leftover."""
        return float(max(self.step_seconds + self.stall_seconds, default=0.0))

    def recovery_estimate(self, epochs: int | None = None) -> float:
        """Seconds of the next recovery: the last one's, scaled to ``epochs`` when both are known (a stretch
        recovers 3x as long as a plain recovery); four steps' before any was measured (a guess)."""
        if self.recovery_seconds:
            last_epochs = self.recovery_epochs[-1]
            if epochs is None or not last_epochs:
                return self.recovery_seconds[-1]
            return self.recovery_seconds[-1] * epochs / last_epochs
        return 4 * self.step_estimate()

    def would_pass_budget(self, next_seconds: float | None = None) -> bool:
        """Whether work of ``next_seconds`` (default: the mean step so far) would end past the budget."""
        if self.budget_s is None:
            return False
        if next_seconds is None:
            next_seconds = self.step_estimate()
        return self.elapsed() + next_seconds > self.budget_s


def final_recovery_due(last: dict, task: Task, clock: RunClock) -> bool:
    """Whether the run recovers its last step once more before it ends: whenever that step is a pruning step
    (``awaits_recovery``: a run that recovers ships only recovered steps, ``core.runs.shippable``) and the budget
    leaves time for it (the loop keeps that time: :func:`prune_loop`), whatever ended the loop. No recovery count
    limits this one: it is what makes the last steps shippable.

    Why: on a real ResNet-56 upload (``bench/real_cifar.py --upload``) every step taken after its 40 fine-tuning
    batches lost 0.7–2.3 points on 3,000 unseen images while the selection and test images, which took the
    step's decisions, read −0.7…+1.1; every recovered step lost 0.07–0.57 there."""
    return (last["step"] > 0 and last.get("recovered_from") is None and can_recover(task)
            and not clock.would_pass_budget(clock.recovery_estimate(task.config.recover_epochs)))


def time_to_finish(task: Task, writer: RunWriter, clock: RunClock) -> float:
    """Seconds the run keeps in reserve after its last step (0 without a budget): the last pruning step's recovery
    (:func:`final_recovery_due`), the control's repeat of it and the control (:func:`reserve_after_recovery`), so
    that a budgeted run ends within its budget with both."""
    if clock.budget_s is None:
        return 0.0
    recovery = clock.recovery_estimate(task.config.recover_epochs) if can_recover(task) else 0.0
    return recovery * (2 if makes_control(task) else 1) + reserve_after_recovery(task, writer, clock)


def reserve_after_recovery(task: Task, writer: RunWriter, clock: RunClock) -> float:
    """Seconds the run keeps for its end after work that ends in a recovery (a stretch, kept or undone: either way
    the last step is a recovered one and no final recovery is due): the control (:func:`control_estimate`) alone;
    0 without a budget or the control. The stretch's own recovery and the control's repeat of it are the
    stretch's (:func:`stretch_seconds`).

    Why not :func:`time_to_finish`: it also keeps a final recovery and the control's repeat of it, due only after
    a plain step. Counted beside a stretch's own recovery, on our ResNet-20 upload (``bench/real_cifar.py
    --upload``, 15 minutes; 4.7 s an epoch) that held back about a minute: the run ended 2 minutes inside its
    budget with no room found for the one-cluster retry after its undone two-cluster stretch."""
    if clock.budget_s is None or not makes_control(task):
        return 0.0
    return control_estimate(Run(writer.dir).history, task, clock)


def control_estimate(history: list[dict], task: Task, clock: RunClock) -> float:
    """Seconds the control will take (:func:`run_control`): the training the run's last step received
    (``core.claim.training_received``) at this run's measured rates: each recovery epoch at the original's rate as
    the recoveries tell it (:func:`control_epoch_seconds`), each recovery's measuring beside its epochs
    (:func:`recovery_overhead_seconds`), each fine-tuning mini-batch at the original's rate where the task measured
    it (``finetune_batch_seconds``, the classification task's fine-tuning check), else at a recovery epoch's time
    over its mini-batches. Before any recovery: :meth:`RunClock.recovery_estimate`. Why: the control can cost as
    much training as the whole run (a ResNet-56 upload's: 600 mini-batches and 7 recoveries, 15 minutes past a
    28-minute budget); counted at the largest recovered model's rate, measuring included, and its mini-batches at
    the distilled recovery's rate, a ResNet-56 upload's control was estimated at 699 s and took 657. Before any
    recovery, with the original's mini-batch timed, its epochs at :func:`unmeasured_epoch_seconds`."""
    guess = unmeasured_epoch_seconds(task)
    if not recorded_recoveries(history) and guess is None:
        return clock.recovery_estimate()
    epoch_s = control_epoch_seconds(history, clock, guess)
    n_train = len(getattr(getattr(task, "data", None), "train", None) or ())
    batch_s = getattr(task, "finetune_batch_seconds", None) or (
        epoch_s / max(1, -(-n_train // task.config.batch_size)) if n_train else 0.0)
    received = training_received(history, task.config.finetune_steps, upto=getattr(clock, "path_end", None))
    return (sum(received["recovery_epochs"]) * epoch_s + len(received["recovery_epochs"]) * recovery_overhead_seconds(
        history) + received["finetune_batches"] * batch_s)


def recorded_recoveries(history: list[dict]) -> list[dict]:
    """The run's recoveries with their epochs recorded (the control's rates are measured on them)."""
    return [r for r in history if r.get("recovered_from") is not None and (r.get("recovery") or {}).get("epochs")]


def epoch_training_seconds(record: dict) -> float | None:
    """A recovery's seconds of training an epoch (the median of its epochs' ``seconds``, ``core.recovery.recover``),
    without its measuring; None where its epochs carry no times (older runs, the Ray recovery)."""
    times = [e["seconds"] for e in (record.get("recovery") or {}).get("per_epoch") or [] if e.get("seconds")]
    return float(np.median(times)) if times else None


def recovery_overhead_seconds(history: list[dict]) -> float:
    """Seconds a recovery spends beside its epochs' training (scoring the model it starts from and its last epoch,
    measuring the result), as the largest recovered model's took them: what the control's repeat of each recovery
    adds to its epochs (it scores the same way, on the original). 0 where no recovery's epochs carry times."""
    timed = [r for r in recorded_recoveries(history) if epoch_training_seconds(r) is not None]
    if not timed:
        return 0.0
    largest = max(timed, key=lambda r: r.get("macs") or 0)
    trained = sum(e["seconds"] for e in largest["recovery"]["per_epoch"] if e.get("seconds"))
    return max(largest["seconds"] - trained, 0.0)


def control_epoch_seconds(history: list[dict], clock: RunClock, guess: float | None = None) -> float:
    """Seconds the control takes to train one recovery epoch on the original, as :func:`control_estimate` counts it.

    From the recoveries' epochs' training times (:func:`epoch_training_seconds`): a straight line through each
    recovery's time against its model's MACs (weighted by the square root of its epochs), read at the original's MACs (step 0's), kept between the largest
    recovered model's time and that time scaled by the original's MACs over that model's (the scaling alone while
    the recoveries' MACs span less than a tenth of the original's). Where no epoch carries a time: the dearest
    epoch of the largest model's recoveries, measuring included, or the recoveries pooled where that is more;
    before any recovery, ``guess`` (:func:`unmeasured_epoch_seconds`), else :meth:`RunClock.recovery_estimate` of
    one epoch.

    Why a line: a recovery epoch's time hardly grows with the model's MACs, since the teacher (the original) runs
    on every mini-batch whatever the student's size: on our ResNet-56 upload (``bench/real_cifar.py --upload``)
    11.3 s at 105 M MACs, 11.1 at 75 M, 10.7 at 53 M. Why not the pruned models' rate: the control trains the
    unpruned original, dearer per epoch; on our ResNet-20 upload the recoveries pooled ran at 4.41 s an epoch
    (measuring included), the control on the 41-M-MAC original at 4.72, and the command ended 7 s past its budget.
    Why not measuring included: a 2-epoch recovery's measuring made its epochs read 5.14 s, the control was
    estimated 30 s high, and the run found no room for a step it had room for."""
    recoveries = recorded_recoveries(history)
    if not recoveries:
        return guess or clock.recovery_estimate(1)
    timed = [(float(r.get("macs") or 0), epoch_training_seconds(r), r["recovery"]["epochs"]) for r in recoveries]
    timed = [(m, t, n) for m, t, n in timed if t is not None and m > 0]
    original = float(history[0].get("macs") or 0) if history else 0.0
    if not timed or original <= 0:
        pooled = sum(r["seconds"] for r in recoveries) / sum(r["recovery"]["epochs"] for r in recoveries)
        largest = max(r.get("macs") or 0 for r in recoveries)
        nearest = max(r["seconds"] / r["recovery"]["epochs"] for r in recoveries if (r.get("macs") or 0) == largest)
        return max(pooled, nearest)
    macs, secs, epochs = (np.array(column, dtype=float) for column in zip(*timed))
    top = macs.max()
    at_top = float(secs[macs == top].max())
    scaled = at_top * max(original / top, 1.0)
    if macs.max() - macs.min() < 0.1 * original:
        return scaled
    slope, intercept = np.polyfit(macs, secs, 1, w=np.sqrt(epochs))  # a median of more epochs varies less
    return float(min(max(intercept + slope * original, at_top), scaled))


def makes_control(task: Task) -> bool:
    """Whether the run ends with the control: the settings ask for it and the task can make it (``Task.control``)."""
    return task.config.control and hasattr(task, "control")


def can_recover(task: Task) -> bool:
    """Whether the loop recovers when it stalls: the task can (``Task.recover``) and the settings ask for it."""
    return task.config.recover_epochs > 0 and hasattr(task, "recover")


def recover_step(task: Task, graph: PruningGraph, writer: RunWriter, cb: Callbacks, step: int, source: dict,
                 teacher, cancel: threading.Event, clock: RunClock, judge=None, epochs: int | None = None) -> dict:
    """A recovery fine-tune of the current model (the last recorded step, ``source``) recorded as step
    ``step`` with ``recovered_from`` and ``recovery``, the loop going on from it; its record. ``judge(model)``,
    when given, returns keys the record gets before it is written (a stretch's outcome, :func:`stretch_step`).

    The schedule's last epoch is kept (``core.recovery.RecoveryConfig.keep``), even below the source step's
    figure (that figure is the winner of the loop's decisions, so it reads high: ``core.recovery.recover``). A cancel
    before the first epoch ends raises ``CancelledError`` with the model as it came in."""
    cb.enter("step", step)
    t0 = time.perf_counter()
    info = task.recover(graph.model, teacher, cancel, cb.part(0.0, 0.9, "recovering",
                                                              f"step {step}: recovery after step {source['step']}: "),
                        **({"epochs": epochs} if epochs else {}))
    if info.get("best_epoch", 0) == 0:
        raise CancelledError("Cancelled during a recovery; the steps before it are kept.")
    cb.progress(0.92, f"step {step}: measuring the recovered model", "measuring", 0.0)
    metrics = task.measure(graph.model)
    seconds = time.perf_counter() - t0
    clock.recovery_done(seconds, info.get("epochs"))
    record = {"step": step, **metrics, "widths": graph.widths(), "removed": None, "recovered_from": source["step"],
              "recovery": {**info, "seconds": seconds}, "seconds": seconds, "elapsed": clock.since_first_step(),
              **(judge(graph.model) if judge is not None else {})}
    writer.add_step(record, graph.model, graph.history)
    cb.step(record)
    return record


def run_control(task: Task, original, writer: RunWriter, cb: Callbacks, cancel: threading.Event, step: int) -> None:
    """The control (``control.json``): the original given the fine-tuning and recoveries on the path of the step
    the run ships (:func:`control_step`), measured on the same images (``Task.control``). Without it a pruned model
    that fine-tuning adapted to the user's images can read better than the original as given while it lost to the
    same training. Its progress is reported as part ``control`` of the last step, ``step``."""
    history = Run(writer.dir).history
    target, ships = control_step(history, task.config.max_drop)
    received = training_received(history, task.config.finetune_steps, upto=target)
    if not received["finetune_batches"] and not received["recovery_epochs"]:
        return
    cb.enter("step", step)
    t0 = time.perf_counter()
    model = copy.deepcopy(original)
    result = task.control(model, original, received, cancel,
                          cb.part(0.0, 1.0, "control", "control: the original given the same training: "))
    if result is None:  # cancelled
        return
    digest = writer.write_weights("control.pt", model.state_dict())  # the original's architecture; sha256 kept
    writer.write_json("control.json", {**result, "received": received, "for_step": target, "ships": ships,
                                       "seconds": time.perf_counter() - t0, "weights_sha256": digest})


def control_step(history: list[dict], max_drop: float) -> tuple[int, bool]:
    """The step whose training the control repeats, and whether the run ships it: the step the run ships at its
    threshold (``core.runs.select_step``, what the run's claim compares with the control); when it ships none, the
    last step on the path of its model (``core.claim.lineage``; not an undone stretch). Why not the last step: it
    can be a step the test images refused, and its recovery; on our ResNet-20 upload the last step's path held 66
    recovery epochs where the shipped step's held 58, and the control took half the run's time."""
    shipped = select_step(history, max_drop)
    if shipped > 0:
        return shipped, True
    path = lineage(history)
    return (path[-1]["step"] if path else 0), False


def measure_original(graph: PruningGraph, task: Task, writer: RunWriter, cb: Callbacks,
                     cancel: threading.Event) -> dict:
    """Measure the unpruned model (``baseline.json``, step 0) and, if asked, analyse it (``car.json``).
    Returns step 0's record."""
    cb.progress(0.0, "measuring the original model", "measuring", 0.0)
    base = task.measure(graph.model)
    writer.write_json("baseline.json", base)
    record0 = {"step": 0, **base, "widths": graph.widths(), "removed": None, "seconds": 0.0, "elapsed": 0.0}
    writer.add_step(record0, None, [])
    cb.step(record0)
    if task.config.analyse_car:
        analysis = task.analyse(graph.model, cancel, cb.part(0.0, 1.0, "analysing", "analysing the original: "))
        if analysis is not None:
            writer.write_json("car.json", analysis)
    check = getattr(task, "check_finetune_lr", None)  # a task whose fine-tuning can harm the unpruned model
    if check is not None and task.config.finetune_steps > 0:
        writer.write_json("finetune.json", check(graph.model, base, cancel,
                                                 cb.part(0.0, 1.0, "checking fine-tuning", "fine-tuning check: ")))
    return record0


def stale_groups(groups: list[ChannelGroup], scores: dict | None, step: int, rescore_every: int,
                 partial: bool) -> list[ChannelGroup]:
    """The groups to score at ``step``: all of them on a full re-score (the first step, every
    ``rescore_every`` steps); else those whose scores are missing or no longer match their width
    (their filter indices changed) — only those when ``partial``, every group otherwise."""
    if scores is None or (step - 1) % rescore_every == 0:
        return groups
    keys = {group_key(g) for g in groups}
    stale = [g for g in groups if group_key(g) not in scores or len(scores[group_key(g)]) != g.width]
    if partial:
        return stale
    return groups if stale or set(scores) != keys else []


def score_step(task: Task, graph: PruningGraph, groups: list[ChannelGroup], scorer, scores: dict | None, step: int,
               rng: np.random.Generator, cancel: threading.Event, cb: Callbacks) -> dict[str, np.ndarray]:
    """Per group root, one score per filter of the current model (lower = removed first), with the
    criterion ``task.config.criterion``; scores still valid from an earlier step are kept."""
    config = task.config
    stale = stale_groups(groups, scores, step, config.rescore_every, task.partial_rescore)
    if not stale:
        return scores
    cb.progress(0.0, f"step {step}: scoring the filters of {len(stale)} group(s)", "scoring", 0.0)
    ctx = task.score_context(graph, stale, scorer, rng, cancel, cb.part(0.0, 0.3, "scoring", f"step {step}: "))
    fresh = criteria.get(config.criterion, task.name).score(ctx)
    return {**(scores or {}), **fresh} if task.partial_rescore else fresh


def step_candidates(task: Task, graph: PruningGraph, groups: list[ChannelGroup], scores: dict, scorer,
                    rng: np.random.Generator, cancel: threading.Event, cb: Callbacks, step: int,
                    allowed: Callable[[list[Cluster]], list[Cluster]] = lambda clusters: clusters) -> list[Cluster]:
    """Candidate clusters (each group's lowest-scoring filters down to the next multiple of c) that the
    run's plan ``allowed``, best first (ranked only after the plan's filter: no measurement is wasted)."""
    clusters = allowed(lowest_clusters(groups, scores, task.config.cluster, key=group_key))
    if not clusters:
        return []
    return task.rank(graph, clusters, scores, scorer, rng, cancel, cb.part(0.3, 0.5, "ranking", f"step {step}: "))


def step_moves(candidates: list[Cluster], batch: int, macs_to_go: float | None = None,
               step_macs: float | None = None) -> list[list[Cluster]]:
    """What a step tries, in order: the best candidates together (when ``batch`` > 1 and there are two or
    more; each candidate is of its own group), then each candidate alone, best first.

    The group move takes candidates in rank order until they save ``step_macs`` MACs (None: no such
    limit), at most ``batch`` of them; it also stops at the candidate that reaches ``macs_to_go`` (the MACs
    still to save before the run's MAC target, by ``Cluster.macs_saved``), so that a step overshoots the
    target by one cluster at most, as a one-cluster step does. A group move whose surgery fails is not
    retried without the failing cluster: the step goes on with single clusters."""
    moves = [[c] for c in candidates]
    together = []
    limits = [m for m in (macs_to_go, step_macs) if m is not None]
    for c in candidates[:batch]:
        together.append(c)
        if limits and sum(t.macs_saved for t in together) >= min(limits):
            break
    if len(together) > 1:
        moves.insert(0, together)
    return moves


def move_label(move: list[Cluster]) -> str:
    """A move for progress messages: its group's label, or ``k clusters (label, label, ...)``."""
    return move[0].group.label if len(move) == 1 else f"{len(move)} clusters ({', '.join(c.group.label for c in move)})"


def try_candidates(graph: PruningGraph, moves: list[list[Cluster]], task: Task, structure: dict, writer: RunWriter,
                   cb: Callbacks, step: int, base_metric: float, rng: np.random.Generator,
                   cancel: threading.Event, rejected: list[dict] | None = None, allowance: float | None = None):
    """Remove, fine-tune and measure moves (clusters removed together, :func:`step_moves`) in order until
    one stays within the threshold (``allowance`` points when given: a stretch's, else ``max_drop``).

    A group whose surgery fails the check is recorded in ``structure["left_alone"]`` and does not
    count against ``patience``, nor does a rejected multi-cluster move (its clusters are tried alone
    next). Returns ``((move, metrics, tried), graph, broke_together)``, or ``(None, graph, broke_together)``;
    a rejected move leaves the graph as it was. ``broke_together``: a multi-cluster move was measured and
    undone by the threshold (not skipped for a failed surgery), which is what halves later moves.
    ``rejected``: when given, each move the threshold undid is appended (step, clusters, MACs saved, its
    selection drop and the allowance), so a run that keeps no step can say how close it came.
    """
    config = task.config
    left_alone = structure["left_alone"]
    tried = singles = 0
    broke_together = False
    for move in moves:
        if singles > config.patience:
            break
        if any(c.group.root in left_alone for c in move):
            continue
        snapshot = (copy.deepcopy(graph.model), [list(h) for h in graph.history])
        cand = move[0]
        try:
            for cand in move:
                graph.prune(cand.group.root, cand.filters)
        except UnsafeGroupError as exc:
            left_alone[cand.group.root] = str(exc)
            writer.write_json("structure.json", structure)
            cb.progress(0.5, f"step {step}: leaving {cand.group.label} alone: {exc}")
            graph = rebuild_graph(task, *snapshot)
            continue
        except PruneScopeError as exc:
            tried, singles = tried + 1, singles + (len(move) == 1)
            cb.progress(0.5, f"step {step}: skipped {cand.group.label}: {exc}")
            graph = rebuild_graph(task, *snapshot)
            continue
        tried, singles = tried + 1, singles + (len(move) == 1)
        decision = finetune_and_decide(task, graph.model, rng, cancel, cb, step)
        lost = decision_drop(task, decision, base_metric)
        if lost > (config.max_drop if allowance is None else allowance) + 1e-9:
            cb.progress(0.95, f"step {step}: {move_label(move)} would drop {lost:.2f} {task.metric_name} points; undone")
            if rejected is not None:
                rejected.append({"step": step, "clusters": move_label(move), "n_clusters": len(move),
                                 "macs_saved": float(sum(c.macs_saved for c in move)), "drop_points": float(lost),
                                 "max_drop": float(config.max_drop)})
            graph = rebuild_graph(task, *snapshot)
            broke_together = broke_together or len(move) > 1
            continue
        cb.progress(0.96, f"step {step}: measuring the kept step", "measuring", 0.0)
        return (move, task.measure(graph.model, decision), tried), graph, broke_together
    return None, graph, broke_together


def decision_drop(task: Task, decision, base_metric: float) -> float:
    """Points a candidate loses against the original on what decides it: the task's own paired drop on the
    selection images that scored no filter (``decision_drop``, classification), else the metric's change."""
    own = getattr(task, "decision_drop", None)
    return own(decision) if own is not None else (base_metric - decision.metric) * 100


def rebuild_graph(task: Task, model, history: list) -> PruningGraph:
    """The pruning graph of a snapshot (model + Torch-Pruning history), for undoing a removal."""
    return PruningGraph(model, task.input_shape, history=history, output_layers=task.output_layers(model))


def finetune_and_decide(task: Task, model, rng: np.random.Generator, cancel: threading.Event, cb: Callbacks,
                        step: int):
    """Let the model adapt to a removal, then measure only what accepting or undoing it reads (the
    selection metric): a candidate that is undone costs no test-split, MAC or latency measurement."""
    task.finetune(model, rng, cancel, cb.part(0.5, 0.9, "fine-tuning", f"step {step}: "))
    if cancel.is_set():
        raise CancelledError("Cancelled.")
    cb.progress(0.92, f"step {step}: measuring {task.metric_name}", "measuring", 0.0)
    return task.decision(model)


def record_step(writer: RunWriter, cb: Callbacks, graph: PruningGraph, step: int, move: list[Cluster], metrics: dict,
                tried: int, channel_maps: dict, times: tuple[float, float], base_macs: float,
                mac_target: float | None, **extra) -> tuple[dict, str | None]:
    """Write an accepted step (weights, then its history line) and report it; returns the record and why
    to stop when the MAC target is reached, else None. ``removed`` is one cluster's record (a dict) for a
    one-cluster step, a list of them for a multi-cluster step (``core.runs.removals`` reads both)."""
    now = time.perf_counter()
    removed = [removed_record(c, channel_maps) for c in move]
    costs = [c.cost for c in move]
    record = {"step": step, **metrics, "widths": graph.widths(), "removed": removed[0] if len(removed) == 1 else removed,
              "estimated_drop": None if None in costs else sum(costs), **extra, "candidates_tried": tried,
              "seconds": now - times[0], "elapsed": now - times[1]}
    writer.add_step(record, graph.model, graph.history)
    cb.step(record)
    if mac_target is not None and metrics["macs"] <= mac_target * base_macs:
        return record, f"MAC target reached ({metrics['macs'] / base_macs:.2f} of the original)"
    return record, None


def removed_record(cand: Cluster, channel_maps: dict[str, list[int]]) -> dict:
    """One removed cluster as a record stores it, its filters also as indices of the original model
    (``filters_original``, from ``channel_maps``: per producer layer, the original index of each current
    channel, updated here). Groups are disjoint, so a multi-cluster step calls this once per cluster."""
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


# ----------------------------------------------------------------------------- reading a run


def run_summary(run_dir: Path, state: str, reason: str = "") -> dict:
    """The headline figures of a run folder (first vs last step): what the CLI prints and benches reuse.

    ``metric_name`` says what ``baseline_metric`` / ``final_metric`` (fractions 0..1) measure.
    """
    run = Run(run_dir)
    hist = run.history
    first, last = (hist[0], hist[-1]) if hist else ({}, {})
    return {
        "run": str(run_dir), "state": state, "reason": reason, "steps": len(hist) - 1 if hist else 0,
        "metric_name": run.metric_name,
        "baseline_metric": first.get("metric"), "final_metric": last.get("metric"),
        # the held-out test images' figures (None without a test split): reported, never decided on
        "baseline_test_metric": first.get("test_metric"), "final_test_metric": last.get("test_metric"),
        "final_paired": last.get("paired"),
        "baseline_macs": first.get("macs"), "final_macs": last.get("macs"),
        "baseline_params": first.get("params"), "final_params": last.get("params"),
        "baseline_latency_ms": first.get("latency_ms"), "final_latency_ms": last.get("latency_ms"),
        # the step the run's threshold ships (final acceptance on the test images) and what may be claimed
        # about it: its test drop with the interval, from the original and from the control
        "claim": run_claim(run) if hist else None,
    }


def run_claim(run: Run) -> dict | None:
    """:func:`core.claim.shipped_claim` of the step a run's own threshold selects (None for a run whose
    settings record no threshold)."""
    max_drop = (run.config.get("prune") or {}).get("max_drop")
    if max_drop is None:
        return None
    claim = shipped_claim(run.history, run.select_step(float(max_drop)), run.control_record())
    return {**claim, "max_drop": float(max_drop)}


def read_structure(run_dir: Path) -> dict:
    """What a run changed about the model's structure (converted shortcuts) and which groups it left
    alone, with why; empty for runs written before this was recorded."""
    path = Path(run_dir) / "structure.json"
    data = read_json(path) if path.exists() else {}
    notes, left = (data.get("notes", []), data.get("left_alone", {})) if isinstance(data, dict) else (None, None)
    if not (isinstance(notes, list) and all(isinstance(n, str) for n in notes) and isinstance(left, dict)
            and all(isinstance(k, str) and isinstance(v, str) for k, v in left.items())):
        raise PruneScopeError(f"{Path(run_dir).name}/structure.json is damaged (not notes and groups left alone).")
    return {"notes": notes, "left_alone": left}
