"""Background jobs: long work (CAR analysis, pruning) in a thread, with progress, ETA and cancel.

The job thread only ever touches its :class:`Job` (under the job's lock); a UI reads
:meth:`Job.snapshot`, a consistent copy, and never shares mutable state with the thread. No
Streamlit here: the app keeps one :class:`JobRegistry` for the whole process (``st.cache_resource``),
so a reloaded browser tab finds the job it started, and the CLI or tests can use it unchanged.

What a job produced that must outlive the process (a pruning run) is written by the engine into its
run folder (:mod:`core.runs`); after an app restart the registry is empty and runs are listed from
the workspace, a run whose process died reading as ``interrupted`` with its completed steps intact.
"""
from __future__ import annotations

import copy
import itertools
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .car import CarResult, compute_car
from .distributed import open_pool
from .eta import EtaTracker, PhaseProgress, RunEta
from .tasks.detection.analysis import group_car
from .tasks.detection.prune import run_detection_pruning
from .engine import Callbacks, Progress
from .errors import CancelledError, PruneScopeError
from .prune import run_pruning
from .recovery import RecoveryConfig, recover_run_step
from .runs import Run, list_runs
from .tasks.classification.task import analysis_reuse, score_images_of
from .tasks.registry import task_plugin

RUNNING_STATES = ("running", "cancelling")
FINAL_STATES = ("done", "cancelled", "failed")
ETA_MIN_PROGRESS = 0.02  # below this fraction an ETA is a guess, not an estimate


class JobAlreadyRunning(PruneScopeError):
    """A job of the same kind and key is still running; ``job`` is that job (attach to it instead)."""

    def __init__(self, job: "Job"):
        super().__init__(f"A {job.kind} job is already running (started {time.strftime('%H:%M:%S', time.localtime(job.started))}); "
                         "wait for it to finish or cancel it first.")
        self.job = job


@dataclass
class JobSnapshot:
    """A consistent copy of a job's state at one moment; safe to read anywhere."""

    id: str
    kind: str
    key: str
    state: str
    progress: float
    message: str
    error: str | None
    started: float
    finished: float | None
    elapsed: float
    eta: float | None
    steps: list[dict]
    result: Any
    run_dir: Path | None
    meta: dict
    log: list[str] = field(default_factory=list)
    # the part of the work running now (PhaseProgress.to_dict(): phase, done, total, fraction,
    # phase_elapsed_s, eta_s, message), when the job reports parts
    part: dict | None = None
    # what ``eta`` is: "job" (the whole job, from the measured rates of each part: core.eta.RunEta), "part"
    # (the running part's rest) or "fraction" (the overall fraction over the elapsed time); ``eta_basis`` says
    # what a whole-job ETA rests on
    eta_kind: str = "fraction"
    eta_basis: str = ""

    @property
    def running(self) -> bool:
        return self.state in RUNNING_STATES

    @property
    def last_step(self) -> dict | None:
        return self.steps[-1] if self.steps else None


@dataclass
class Job:
    """One unit of background work. Mutated only under ``lock``; read through :meth:`snapshot`."""

    id: str
    kind: str
    key: str
    run_dir: Path | None = None
    meta: dict = field(default_factory=dict)
    total_steps: int | None = None  # known upper bound of step records, for the ETA
    state: str = "running"
    progress: float = 0.0  # 0..1 of the whole job
    progress_changed: float = 0.0  # time.time() the fraction last moved
    message: str = "starting"
    error: str | None = None
    traceback: str | None = None
    started: float = field(default_factory=time.time)
    finished: float | None = None
    steps: list[dict] = field(default_factory=list)
    log: list[str] = field(default_factory=list)  # decisions the job made that a user should read
    result: Any = None
    part: PhaseProgress | None = None  # the running part of the work, with its measured-rate ETA
    part_reported: float = 0.0  # time.time() of the last part report
    whole: float | None = None  # seconds left in the whole job when last reported (core.eta.RunEta)
    whole_reported: float = 0.0
    whole_basis: str = ""
    cancel: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    thread: threading.Thread | None = field(default=None, repr=False)

    # -- written by the worker -------------------------------------------------------------------

    def set_progress(self, fraction: float, message: str | None = None) -> None:
        with self.lock:
            fraction = min(max(float(fraction), 0.0), 1.0)
            if fraction > self.progress:
                self.progress_changed = time.time()
            self.progress = max(self.progress, fraction)  # never runs backwards on screen
            if message is not None:
                self.message = message

    def set_part(self, part: PhaseProgress) -> None:
        """The running part (its count, elapsed and rate-based ETA); the ETA shown is this part's."""
        with self.lock:
            self.part, self.part_reported = part, time.time()
            if part.message:
                self.message = part.message

    def set_whole(self, seconds: float | None, basis: str = "") -> None:
        """Seconds left in the whole job (None: not known yet), and what that rests on."""
        with self.lock:
            self.whole, self.whole_reported, self.whole_basis = seconds, time.time(), basis

    def add_step(self, record: dict) -> None:
        with self.lock:
            self.steps.append(copy.deepcopy(record))

    def add_log(self, line: str) -> None:
        with self.lock:
            self.log.append(str(line))

    # -- read by anyone --------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        with self.lock:
            return self.state in RUNNING_STATES

    def eta_seconds(self, now: float | None = None) -> float | None:
        with self.lock:
            return self._eta(now or time.time())

    def _eta_kind(self) -> str:
        return "job" if self.whole_reported else "part" if self.part is not None else "fraction"

    def _eta(self, now: float) -> float | None:
        """Seconds left. A job that reports its whole remaining time (:meth:`set_whole`, a pruning run's
        :class:`core.eta.RunEta`): that, less the time since it was reported. A job that reports parts
        (:meth:`set_part`): the running part's remaining work at that part's measured rate
        (:class:`core.eta.EtaTracker`); parts differ in rate by orders of magnitude, so one rate over the whole
        job would be wrong by as much. Otherwise the overall fraction extrapolated over the elapsed time (None
        while too early to tell)."""
        if self.state not in RUNNING_STATES:
            return 0.0 if self.state == "done" else None
        if self.whole_reported:
            return None if self.whole is None else max(self.whole - (now - self.whole_reported), 0.0)
        if self.part is not None:
            eta = self.part.eta_s
            return None if eta is None else max(eta - (now - self.part_reported), 0.0)
        p = self.progress
        if p < ETA_MIN_PROGRESS or p >= 1.0:
            return None
        # extrapolated when the fraction last moved, counting down since: a fraction that waits in a long phase
        # must not make the ETA climb (issue 27: an export's went from 1:45 to 31:14 at 20 %); past it, unknown
        at_change = (self.progress_changed - self.started) * (1.0 - p) / p
        left = at_change - (now - self.progress_changed)
        return left if left > 0 else None

    def snapshot(self) -> JobSnapshot:
        with self.lock:
            now = time.time()
            end = self.finished or now
            return JobSnapshot(
                id=self.id, kind=self.kind, key=self.key, state=self.state, progress=self.progress,
                message=self.message, error=self.error, started=self.started, finished=self.finished,
                elapsed=end - self.started, eta=self._eta(now), steps=copy.deepcopy(self.steps),
                result=self.result, run_dir=self.run_dir, meta=dict(self.meta), log=list(self.log),
                part=self._part_dict(now), eta_kind=self._eta_kind(), eta_basis=self.whole_basis,
            )

    def _part_dict(self, now: float) -> dict | None:
        if self.part is None or self.state not in RUNNING_STATES:
            return None
        out = self.part.to_dict()
        out["phase_elapsed_s"] += now - self.part_reported
        return out

    def request_cancel(self) -> None:
        """Ask the worker to stop; it does at its next check (within one pruning step)."""
        with self.lock:
            if self.state == "running":
                self.state = "cancelling"
                self.message = "cancelling after the current operation..."
        self.cancel.set()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the worker ends; True if it did within ``timeout``."""
        if self.thread is not None:
            self.thread.join(timeout)
            return not self.thread.is_alive()
        return True


class JobContext:
    """What a job function gets: report progress and steps, and see whether it should stop."""

    def __init__(self, job: Job):
        self.job = job
        self.cancel = job.cancel

    def progress(self, fraction: float, message: str | None = None) -> None:
        self.job.set_progress(fraction, message)

    def part(self, part: PhaseProgress) -> None:
        self.job.set_part(part)

    def whole(self, seconds: float | None, basis: str = "") -> None:
        self.job.set_whole(seconds, basis)

    def step(self, record: dict) -> None:
        self.job.add_step(record)

    def log(self, line: str) -> None:
        self.job.add_log(line)

    @property
    def cancelled(self) -> bool:
        return self.cancel.is_set()

    def check_cancel(self) -> None:
        if self.cancel.is_set():
            raise CancelledError("Cancelled by the user.")


JobFunction = Callable[[JobContext], Any]


class WorkingSets:
    """The working sets (loaded model, data, baseline, analysis...) of this process's sessions, so that a
    reloaded or new browser tab gets its work back instead of "Load a model first".

    A browser reload starts a new app session with empty session state, but the process lives on, and
    so do the objects a session loaded. Sessions ``remember`` their set under a token (the app carries
    it in the URL, so a reload of the same tab finds its own set even after another tab loaded
    something else) and the newest set is also kept as ``latest`` for a tab opened without a token
    (PruneScope is a local single-user tool: a new tab continues the work of the last one). Values are
    opaque to this class (the app stores a copy of its state object); at most ``keep`` tokens are
    kept, oldest dropped first. Thread-safe; holds objects in memory only (an app restart forgets
    them; runs on disk are listed from the workspace as before).
    """

    def __init__(self, keep: int = 8):
        self._sets: dict[str, tuple[float, Any]] = {}
        self._latest: Any = None
        self._lock = threading.Lock()
        self.keep = keep

    def remember(self, token: str, value: Any) -> None:
        with self._lock:
            self._sets.pop(token, None)
            self._sets[token] = (time.time(), value)
            self._latest = value
            while len(self._sets) > self.keep:
                del self._sets[next(iter(self._sets))]

    def recall(self, token: str | None) -> Any:
        """The set remembered under ``token``, else the newest set of any session (None if there is none)."""
        with self._lock:
            if token and token in self._sets:
                return self._sets[token][1]
            return self._latest

    def clear(self) -> None:
        with self._lock:
            self._sets.clear()
            self._latest = None


class JobRegistry:
    """Every job of this process. Thread-safe; at most one running job per (kind, key).

    ``working_sets`` keeps what the app's sessions had loaded (see :class:`WorkingSets`): the registry
    is the one object that outlives a browser tab, so the jobs and the work they belong to live together.
    """

    def __init__(self, keep_finished: int = 50):
        self._jobs: dict[str, Job] = {}
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self.keep_finished = keep_finished
        self.working_sets = WorkingSets()

    def start(self, kind: str, fn: JobFunction, key: str | None = None, run_dir: Path | str | None = None,
              total_steps: int | None = None, meta: dict | None = None) -> Job:
        """Start ``fn(context)`` in a daemon thread and return its job.

        Raises :class:`JobAlreadyRunning` (carrying the running job) if a job of the same ``kind`` and
        ``key`` (default: the kind alone) is still running, so starting twice never starts two jobs.
        """
        key = str(key if key is not None else kind)
        with self._lock:
            for job in self._jobs.values():
                if job.kind == kind and job.key == key and job.running:
                    raise JobAlreadyRunning(job)
            job = Job(id=f"{kind}-{next(self._ids)}-{int(time.time())}", kind=kind, key=key,
                      run_dir=Path(run_dir) if run_dir is not None else None, meta=dict(meta or {}),
                      total_steps=total_steps)
            self._jobs[job.id] = job
            self._prune_old()
            job.thread = threading.Thread(target=self._run, args=(job, fn), name=f"prunescope-{job.id}", daemon=True)
            job.thread.start()
        return job

    @staticmethod
    def _run(job: Job, fn: JobFunction) -> None:
        ctx = JobContext(job)
        try:
            result = fn(ctx)
        except CancelledError:
            state, result, error, tb = "cancelled", None, None, None
        except PruneScopeError as exc:
            state, result, error, tb = "failed", None, str(exc), None
        except BaseException as exc:  # the thread must always leave a final state behind
            state, result, error, tb = "failed", None, f"{type(exc).__name__}: {exc}", traceback.format_exc()
        else:
            reported = result.get("state") if isinstance(result, dict) else None
            if reported in FINAL_STATES:
                state = reported
            else:
                state = "cancelled" if job.cancel.is_set() else "done"
            error, tb = None, None
        with job.lock:
            job.result, job.error, job.traceback = result, error, tb
            job.state = state
            job.finished = time.time()
            if state == "done":
                job.progress = 1.0
            job.message = {"done": "finished", "cancelled": "cancelled; completed steps are kept",
                           "failed": f"failed: {error}"}[state]

    def _prune_old(self) -> None:
        """Forget the oldest finished jobs beyond ``keep_finished`` (their runs stay on disk)."""
        finished = sorted((j for j in self._jobs.values() if j.state in FINAL_STATES), key=lambda j: j.started)
        for j in finished[:max(len(finished) - self.keep_finished, 0)]:
            del self._jobs[j.id]

    def get(self, job_id: str | None) -> Job | None:
        with self._lock:
            return self._jobs.get(job_id) if job_id else None

    def list(self, kind: str | None = None) -> list[Job]:
        """Jobs, newest first."""
        with self._lock:
            jobs = [j for j in self._jobs.values() if kind is None or j.kind == kind]
        return sorted(jobs, key=lambda j: j.started, reverse=True)

    def active(self, kind: str | None = None, key: str | None = None) -> list[Job]:
        return [j for j in self.list(kind) if j.running and (key is None or j.key == key)]

    def latest(self, kind: str, key: str | None = None) -> Job | None:
        """The newest job of a kind (running or not), e.g. to re-attach after a browser reload."""
        for j in self.list(kind):
            if key is None or j.key == key:
                return j
        return None

    def for_run(self, run_dir: Path | str) -> Job | None:
        target = Path(run_dir).resolve()
        for j in self.list():
            if j.run_dir is not None and j.run_dir.resolve() == target:
                return j
        return None

    def cancel(self, job_id: str) -> bool:
        job = self.get(job_id)
        if job is None or not job.running:
            return False
        job.request_cancel()
        return True


# ----------------------------------------------------------------------------- the two jobs of the app


def part_name(p: Progress) -> str:
    """'step 3: scoring', 'original: analysing': the part of a run a progress report belongs to."""
    where = f"step {p.step}" if p.phase == "step" else "original"
    return f"{where}: {p.part}" if p.part else where


def run_progress(ctx: JobContext, total: int, eta: RunEta | None = None) -> Callbacks:
    """A pruning run's callbacks as one job's progress: the original (measured and analysed) is unit 0,
    pruning step k is unit k, of ``total`` units (the overall bar); every accepted step record goes to
    the job. Reports that name their part (``Progress.part`` with ``part_fraction``) also feed an
    :class:`core.eta.EtaTracker` keyed by (phase, step, part): the part's own progress and ETA. With ``eta``
    (a :class:`core.eta.RunEta` of the run) every report and record also feeds it, and the job's ETA is the
    whole run's, from the measured rates of each part."""
    tracker = EtaTracker()
    whole = getattr(ctx, "whole", None)

    def report_whole() -> None:
        if eta is not None and whole is not None:
            whole(eta.remaining(), eta.basis())

    def event(p: Progress) -> None:
        unit = p.step if p.phase == "step" else 0
        ctx.progress(min((unit + min(max(p.fraction, 0.0), 1.0)) / total, 0.999), p.message)
        if p.part and p.part_fraction is not None:
            ctx.part(tracker.update(part_name(p), min(max(p.part_fraction, 0.0), 1.0), 1.0, p.message))
        if eta is not None:
            eta.event(p.phase, p.step, p.part, p.part_fraction)
            report_whole()

    def step(record: dict) -> None:
        ctx.step(record)
        if eta is not None:
            eta.record(record)
            report_whole()
        if record["step"] > 0:
            ctx.progress(min((record["step"] + 1) / total, 0.999), f"step {record['step']} done")

    return Callbacks(step=step, event=event)


def reusable_car(car: Any, model, images, config) -> tuple[bool, str]:
    """Whether a finished CAR analysis ``car`` (a :class:`core.car.CarResult`, or its dict) serves a
    pruning run with ``config`` of ``model`` on the validation images ``images``, and why (not): the
    run's own decision (:func:`core.tasks.classification.task.analysis_reuse` on the run's score images), asked
    before the run starts, so that the Prune page and the job's log say what the run will do."""
    if car is not None and not hasattr(car, "fingerprint"):
        car = CarResult.from_dict(car)
    return analysis_reuse(car, model, score_images_of(images, config), getattr(config, "car", "exact"))


def split_options_of(data) -> dict:
    """What a run records of its data set's split (as the CLI does), so that Review, recovery and export reload
    the same selection and test images: the loader's settings plus :meth:`core.data.DataSet.split_record`."""
    split = getattr(data, "split", None) or {}
    return {"val_fraction": split.get("val_fraction", 0.2), "seed": split.get("seed", 0),
            "test_fraction": split.get("test_fraction", 0.0), "split": data.split_record()}


def prune_job(loaded, data, config, run_dir: Path, data_source: str | None = None,
              original_bytes: bytes | None = None, data_options: dict | None = None,
              car: Any = None, estimate: Any = None) -> JobFunction:
    """A job function running :func:`core.prune.run_pruning` into ``run_dir``.

    ``car``: a finished CAR analysis (a :class:`core.car.CarResult`, e.g. the Analyse page's). With
    ``config.analyse_car`` the run reuses it when it is the analysis the run would compute
    (:func:`reusable_car`: same model state, score images and method): it stores it as its
    ``car.json`` (saying it was reused) and seeds step 1's filter scores from it instead of computing it
    again (minutes on a real model); the job's log says which, and why. ``data_options`` None: the data
    set's own split (:func:`split_options_of`).

    Overall progress: the original's measurement and analysis count as one unit, then each pruning
    step one more, of ``config.max_steps + 1`` (the bar; the run may stop earlier). The ETA is the whole
    run's (:class:`core.eta.RunEta`), from the measured rates of each part, with the pre-run estimate
    (``estimate``, a :class:`core.estimate.Estimate` of these settings; timed here first when None: a few
    seconds) as its prior until the run has measured its own.
    """

    total = config.max_steps + 1
    data_options = data_options if data_options is not None else split_options_of(data)
    note, reused = None, None
    if config.analyse_car:
        reuse, why = reusable_car(car, loaded.model, data.val, config)
        if reuse:
            # the run checks it again (the same decision) before it stores it as its car.json and seeds
            # step 1's scores from it (core.rescore)
            reused = car if hasattr(car, "fingerprint") else CarResult.from_dict(car)
            note = f"CAR analysis of the original: reused the finished analysis ({why}) instead of recomputing it."
        else:
            note = f"CAR analysis of the original: computed for this run ({why})."

    def fn(ctx: JobContext) -> dict:
        if note:
            ctx.log(note)
            ctx.progress(0.0, note)
        eta = RunEta(config, n_train=len(data.train), estimate=estimate or run_estimate(ctx, loaded, data, config))
        if reused is not None:
            eta._seen.add("analysing")  # the analysis will not run: nothing of it is still to come
        return run_pruning(loaded, data, config, run_dir, callbacks=run_progress(ctx, total, eta), cancel=ctx.cancel,
                           data_source=data_source, original_bytes=original_bytes, data_options=data_options,
                           analysis=reused)

    return fn


def run_estimate(ctx: JobContext, loaded, data, config):
    """The pre-run estimate of a prune job (``core.estimate``: this model's work units timed now), the prior of
    its whole-job ETA; None when the model cannot be timed (the ETA then waits for the run's own measurements)."""
    from .estimate import estimate_prune_time

    ctx.progress(0.0, "timing this model's work units for the run's ETA")
    try:
        return estimate_prune_time(copy.deepcopy(loaded.model), loaded.spec, len(data.val), config,
                                   n_train=len(data.train))
    except Exception as exc:  # no ETA prior is no reason to stop the run
        ctx.log(f"No pre-run estimate for the ETA ({type(exc).__name__}: {exc}); it starts from measured parts.")
        return None


def detection_prune_job(model, info: dict, data, config, run_dir: Path, data_options: dict | None = None
                        ) -> JobFunction:
    """A job function running :func:`core.tasks.detection.prune.run_detection_pruning` into ``run_dir``.

    Same plumbing as :func:`prune_job`: measuring the original counts as one unit, then each step one
    more, of ``config.max_steps + 1`` (an upper bound: the run may stop earlier).
    """
    total = config.max_steps + 1
    model = copy.deepcopy(model).eval()

    def fn(ctx: JobContext) -> dict:
        return run_detection_pruning(model, info, data, config, run_dir, callbacks=run_progress(ctx, total),
                                     cancel=ctx.cancel, data_options=data_options)

    return fn


def detection_car_job(model, root: str, val, mean, std, n_images: int = 64) -> JobFunction:
    """A job function: detection CAR (mAP drop) of every filter of one group, on a private copy of ``model``."""
    model = copy.deepcopy(model).eval()

    def fn(ctx: JobContext):
        return group_car(model, root, val, mean, std, n_images=n_images, progress=ctx.progress, cancel=ctx.cancel)

    return fn


def car_job(model, spec, imageset, n_images: int = 500, sensitivity: bool = True, method: str = "exact",
            work=None) -> JobFunction:
    """A job function computing CAR (+ per-class CAR, sensitivity) on a private copy of ``model``;
    ``method``: ``exact`` (every filter measured) or ``fast`` (screened, exact for a shortlist). ``work``: where
    its ablations run (``core.distributed.WorkSetting``; None: this process); Ray workers the job starts end
    with it, however it ends, and the result's ``where`` says where each part ran.

    Its parts: the fast method's first-order ``screening`` (one pass, no count inside), then ``measuring`` (every
    ablation, the sensitivity's included, counted alike); the whole job's ETA is the measuring part's rest at
    its measured rate, as soon as that part runs (nothing follows it)."""
    model = copy.deepcopy(model).eval()  # the UI keeps using its own model while this runs
    tracker = EtaTracker()

    def progress(fraction: float, message: str) -> None:
        ctx_ = progress.ctx
        ctx_.progress(fraction, message)
        part = "screening" if message.startswith("CAR: screening") else "measuring"
        state = tracker.update(part, min(max(fraction, 0.0), 1.0), 1.0, message)
        ctx_.part(state)
        ctx_.whole(state.eta_s if part == "measuring" else None,
                   "the ablations left at the rate measured in them" if part == "measuring" else "")

    def fn(ctx: JobContext):
        progress.ctx = ctx
        if work is not None and work.where != "local":
            ctx.progress(0.0, f"starting Ray workers ({work.describe()})")
        pool = open_pool(work)
        try:
            return compute_car(model, spec, imageset, n_images=n_images, sensitivity=sensitivity,
                               progress=progress, cancel=ctx.cancel, method=method, pool=pool)
        finally:
            if pool is not None:
                pool.close()

    return fn


def export_job(run_dir: Path | str, step: int, max_drop: float | None = None, out_path: Path | str | None = None,
               target: str | None = None) -> JobFunction:
    """A job function exporting ``step`` of a run of either task for ``target`` (``core.targets``, default
    ``ncs2``): bundle folder + zip.

    ``step`` is exported as given; ``max_drop`` (points) is the threshold it was picked with, recorded
    in the manifest.
    """
    export = task_plugin(Run(run_dir).task).hook("export_run")

    def fn(ctx: JobContext) -> dict:
        result = export(run_dir, step=step, max_drop=max_drop, out_path=out_path, progress=ctx.progress,
                        target=target)
        result["max_drop"] = max_drop
        return result

    return fn


def recovery_job(run_dir: Path | str, step: int, config: RecoveryConfig, data=None,
                 trusted: bool = False) -> JobFunction:
    """A job function running :func:`core.recovery.recover_run_step` (a recovery fine-tune of ``step``
    appended to the run as a new step). Its progress reports parts (``recovery`` in mini-batches, then
    ``measuring``), so the job's ETA is the running part's at its measured rate; the overall bar is the
    recovery's share of mini-batches. Result: the new step's record (its ``step`` None when no epoch
    finished)."""

    def fn(ctx: JobContext) -> dict:
        def progress(p: PhaseProgress) -> None:
            ctx.part(p)
            ctx.progress(p.fraction * 0.95 if p.phase == "recovery" else 0.95 + 0.05 * p.fraction, p.message)

        return recover_run_step(run_dir, step, config, data=data, cancel=ctx.cancel, progress=progress,
                                trusted=trusted)

    return fn


Phase = tuple[str, Callable[[dict], Any]]


def phased_job(phases: list[Phase]) -> JobFunction:
    """A job function running named phases in order, e.g. the app's "Load and validate" (read the model,
    read the data set, measure the baseline, check its plausibility).

    Each phase is ``(name, fn)`` with ``fn(results)`` getting the results of the phases before it (by
    name) and returning its own; the job's result is that dict. Progress is the share of phases done,
    with the running phase's name and number; a cancel takes effect between phases (a phase runs to its
    end). A phase's :class:`PruneScopeError` ends the job as failed with its message.
    """

    def fn(ctx: JobContext) -> dict:
        results: dict[str, Any] = {}
        for k, (name, phase) in enumerate(phases):
            ctx.check_cancel()
            ctx.progress(k / len(phases), f"{name} (phase {k + 1} of {len(phases)})")
            results[name] = phase(results)
        return results

    return fn


def past_runs(registry: JobRegistry | None = None) -> list[dict]:
    """Every run in the workspace (newest first) with its state; a live job of this process wins."""
    out = []
    for run in list_runs():
        status = run.status
        job = registry.for_run(run.dir) if registry is not None else None
        state = status.get("state", "unknown")
        if job is not None and job.running:
            state = job.snapshot().state
        hist = run.history
        out.append({"run": run, "name": run.name, "dir": run.dir, "state": state, "message": status.get("message", ""),
                    "steps": max(len(hist) - 1, 0), "created": run.config.get("created"),
                    "criterion": (run.config.get("prune") or {}).get("criterion"),
                    "arch": run.spec.arch, "data_source": run.config.get("data_source")})
    return out
