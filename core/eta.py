"""Time left, from the measured rate of the phase that is running now.

A job is a sequence of phases (measuring the original, CAR, fine-tuning, ...) whose work is counted
in the phase's own units (filters, batches, images). Rates differ by orders of magnitude between
phases, so a single overall fraction extrapolated over the whole elapsed time is wrong by as much;
the ETA here is the current phase's remaining units divided by the rate measured over its recent
units, plus, when given, the known work of later phases at their last measured rate.
"""
from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

CHECK_ATTEMPTS = 5  # the fine-tuning check's most attempts: core.tasks.classification.task.LR_HALVINGS + 1


@dataclass
class PhaseProgress:
    """One progress report: ``done`` of ``total`` units of ``phase``; ``eta_s`` None until measurable."""

    phase: str
    done: float
    total: float
    elapsed_s: float
    phase_elapsed_s: float
    eta_s: float | None
    message: str = ""

    @property
    def fraction(self) -> float:
        return min(max(self.done / self.total, 0.0), 1.0) if self.total > 0 else 0.0

    def to_dict(self) -> dict:
        return {"phase": self.phase, "done": self.done, "total": self.total, "fraction": self.fraction,
                "elapsed_s": self.elapsed_s, "phase_elapsed_s": self.phase_elapsed_s, "eta_s": self.eta_s,
                "message": self.message}


@dataclass
class EtaTracker:
    """Feeds on ``update(phase, done, total)``; gives ``PhaseProgress`` with a rate-based ETA.

    The rate is taken over a sliding window of the phase's last ``window_s`` seconds (at least two
    reports), so a phase whose first units were slow (warm-up, caches) does not bias the estimate for
    long. No ETA is given before ``min_fraction`` of the phase or ``min_seconds`` have passed.
    """

    window_s: float = 30.0
    min_fraction: float = 0.02
    min_seconds: float = 1.0
    clock: Callable[[], float] = time.monotonic
    _start: float | None = None
    _phase: str | None = None
    _phase_start: float = 0.0
    _samples: deque = field(default_factory=deque)

    def update(self, phase: str, done: float, total: float, message: str = "") -> PhaseProgress:
        now = self.clock()
        if self._start is None:
            self._start = now
        if phase != self._phase:
            self._phase, self._phase_start = phase, now
            self._samples.clear()
            self._samples.append((now, 0.0))
        self._samples.append((now, float(done)))
        while len(self._samples) > 2 and now - self._samples[0][0] > self.window_s:
            self._samples.popleft()
        return PhaseProgress(phase, done, total, now - self._start, now - self._phase_start,
                             self._eta(now, done, total), message)

    def _eta(self, now: float, done: float, total: float) -> float | None:
        if total <= 0 or done <= 0:
            return None
        if done / total < self.min_fraction and now - self._phase_start < self.min_seconds:
            return None
        t0, d0 = self._samples[0]
        if now - t0 <= 0 or done - d0 <= 0:
            t0, d0 = self._phase_start, 0.0
        if now - t0 <= 0:
            return None
        rate = (done - d0) / (now - t0)
        return max(total - done, 0.0) / rate if rate > 0 else None


def format_duration(seconds: float | None) -> str:
    """``None`` -> 'estimating…'; else '42 s', '3 min 05 s' or '1 h 02 min'."""
    if seconds is None:
        return "estimating…"
    s = int(round(seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {(s % 3600) // 60:02d} min"


# ----------------------------------------------------------------------------- a whole pruning run


@dataclass
class RunEta:
    """Time left in a whole pruning run (``core.engine.prune_loop``), from the measured rates of each of its parts.

    A run is: the original (measuring, the CAR analysis, the fine-tuning check), then pruning steps in
    *segments* that each end where no candidate fits the acceptable drop (a *stall*); a stall is followed by a
    recovery (``recover_epochs``) and a new segment, at most ``max_recoveries`` times; then the recovery of the
    last pruning step and the control (the original given the same training). The time left is

        the running step's rest  +  steps to come x a step's time  +  stalls to come x (a stalled step + a
        recovery)  +  the control (its mini-batches x a training batch's time)

    where every duration is the one measured in this run as soon as there is one (the mean accepted step, the
    measured stalls and recoveries, a training batch from the fine-tuning parts), and until then the pre-run
    estimate's (``core.estimate.Estimate``; without one the ETA waits for the first measurement). The steps to
    come follow the selection drop: a segment lasts while the drop, climbing by the measured mean climb per
    step (a prior of a third of the allowance until steps are measured), stays within the allowance; each later
    segment starts from the mean drop measured after recoveries. The MAC target, the step limit and the time
    budget cap it. It is an expectation: the threshold decides each step, so the ETA moves as steps are kept or
    undone, and it says so (``basis``).
    """

    config: object  # PruneConfig (or any object with its fields)
    n_train: int | None = None  # training images (a recovery's and the control's batches)
    estimate: object | None = None  # core.estimate.Estimate of this run, the prior of every rate
    clock: Callable[[], float] = time.monotonic
    start: float | None = None
    base: dict | None = None  # step 0's record
    records: list = field(default_factory=list)  # step records after step 0, in order
    _step: int = 0  # the step the last event was in (0: the original)
    _step_start: dict = field(default_factory=dict)  # step -> first event time
    _part: tuple | None = None  # (name, start time, last time, last fraction) of the running part
    _part_seconds: dict = field(default_factory=dict)  # part kind -> [full durations measured]
    _stalls: list = field(default_factory=list)  # seconds of stalled steps (until their recovery began)
    _seen: set = field(default_factory=set)  # part kinds seen
    _last: float | None = None  # time of the last event: where the next part's work began
    _p_stall: float = 1.0  # the share of segments that end in a stall (the rest: a refusal by the test images)

    # -- fed by the run's callbacks ------------------------------------------------------------------

    def event(self, phase: str, step: int, part: str = "", part_fraction: float | None = None) -> None:
        now = self.clock()
        if self.start is None:
            self.start = now
        step = step if phase == "step" else 0
        if step not in self._step_start:
            self._step_start[step] = self._last if self._last is not None else now
        self._step = step
        if not part:
            self._last = now
            return
        name = (step, part)
        if self._part is not None and (self._part[0] != name or (part_fraction or 0.0) < self._part[3] - 1e-9):
            self._close_part()
        if part == "recovering" and (self._part is None or self._part[0] != name):
            stalled = now - self._step_start.get(step, now)  # the step whose candidates all broke the threshold
            if stalled > 0.5:  # not the final recovery of a run that ended at its MAC target or step limit
                self._stalls.append(stalled)
        self._seen.add(part)
        if self._part is None or self._part[0] != name:  # its work began when the previous report was made
            began = self._last if self._last is not None else now
            self._part = (name, began, now, float(part_fraction or 0.0))
        else:
            self._part = (name, self._part[1], now, float(part_fraction or 0.0))
        self._last = now

    def record(self, record: dict) -> None:
        if record.get("step", 0) == 0:
            self.base = dict(record)
        else:
            self.records.append(dict(record))

    def _close_part(self) -> None:
        (step, kind), t0, t1, frac = self._part
        if frac >= 0.5 and t1 > t0:
            self._part_seconds.setdefault(kind, []).append((t1 - t0) / frac)
        self._part = None

    # -- read ------------------------------------------------------------------------------------------

    def remaining(self) -> float | None:
        """Seconds left in the whole run (None while nothing that would give it is measured or estimated)."""
        now = self.clock()
        if self.start is None:
            return None
        c = self.config
        step_s = self._step_seconds()
        batch_s = self._batch_seconds()
        if step_s is None or batch_s is None:
            return None
        left = 0.0
        if "control" in self._seen:  # the last part of a run: the original trained as the steps were
            return self._control_left(now, batch_s)
        steps_left, stalls_left, recoveries_left, stalling = self._to_come()
        recovery_s = self._recovery_seconds(batch_s)
        stall_s = float(np.mean(self._stalls)) if self._stalls else 2.0 * step_s
        if self._step == 0:  # the original: the running part's rest, the parts still to come
            left += self._part_left(now)
            left += self._original_parts_left()
        else:  # the running step's rest; with no room left in the allowance it is the stall to come
            running = not self.records or self.records[-1].get("step") != self._step
            this_step = step_s
            if stalling and running:  # it ends the segment: undone (a stall) or kept and refused by the test images
                p = self._p_stall
                this_step, stalls_left = p * stall_s + (1 - p) * step_s, max(stalls_left - p, 0.0)
            left += max(this_step - (now - self._step_start.get(self._step, now)), self._part_left(now), 0.0)
        left += steps_left * step_s + stalls_left * stall_s + recoveries_left * recovery_s
        if getattr(c, "control", False):  # the original trained alike: the steps' fine-tuning, then each recovery
            kept = sum(1 for r in self.records if r.get("removed"))
            done = sum(1 for r in self.records if r.get("recovered_from") is not None)
            done += self._part is not None and self._part[0][1] == "recovering"  # the running one, not recorded yet
            left += (kept + steps_left) * getattr(c, "finetune_steps", 0) * batch_s
            left += (done + recoveries_left) * recovery_s
        budget = getattr(c, "time_budget", None)
        if budget:
            left = min(left, max(budget * 60.0 - (now - self.start), 0.0))
        return max(left, 0.0)

    def basis(self) -> str:
        """What the ETA rests on, in a few words, for the page."""
        kept = sum(1 for r in self.records if r.get("removed"))
        if not kept:
            return "from the pre-run estimate until a step is measured" if self.estimate else "from the first part"
        return (f"from {kept} measured step(s); the threshold decides how many follow, so it moves as steps are "
                "kept or undone")

    # -- the model ---------------------------------------------------------------------------------------

    def _control_left(self, now: float, batch_s: float) -> float:
        """The control's rest: its fine-tuning batches and recoveries at this run's rates less the time it has
        run, until half of it has shown its own rate (its parts differ in rate: batches first, then recoveries, so
        its early fraction says little) or it runs past that prediction."""
        part = self._part_left(now)
        if self._part is None or self._part[0][1] != "control" or self._part[3] >= 0.5:
            return part
        kept = sum(1 for r in self.records if r.get("removed"))
        done = sum(1 for r in self.records if r.get("recovered_from") is not None)
        predicted = kept * getattr(self.config, "finetune_steps", 0) * batch_s + done * self._recovery_seconds(batch_s)
        rest = predicted - (now - self._part[1])
        return rest if rest > 0 else part

    def _part_left(self, now: float) -> float:
        """The running part's rest at its own rate. The fine-tuning check reports its progress over its most
        attempts (``CHECK_ATTEMPTS``), but usually stops after the configured rate and as often as not one
        halving: its end is taken as two attempts, or the end of the attempt running past those."""
        if self._part is None:
            return 0.0
        key, t0, t1, frac = self._part
        if frac <= 0.0 or t1 <= t0:
            return 0.0
        end = 1.0
        if key[1] == "checking fine-tuning":
            attempts = CHECK_ATTEMPTS
            end = min(max(2, math.floor(frac * attempts + 1e-9) + 1) / attempts, 1.0)
        return max((t1 - t0) * (end - frac) / frac - (now - t1), 0.0)

    def _prior(self, key: str) -> float | None:
        b = getattr(self.estimate, "breakdown", None) or {}
        if key not in b:
            return None
        low, high = b[key]
        return math.sqrt(max(low, 1e-9) * max(high, 1e-9))

    def _original_parts_left(self) -> float:
        c, left = self.config, 0.0
        if getattr(c, "analyse_car", False) and "analysing" not in self._seen:
            left += self._prior("original: CAR analysis") or 0.0
        if getattr(c, "finetune_steps", 0) and "checking fine-tuning" not in self._seen:
            batch = self._batch_seconds() or 0.0
            left += 2 * c.finetune_steps * batch  # the configured rate and, as often as not, one halving
        return left

    def _step_seconds(self) -> float | None:
        kept = [r["seconds"] for r in self.records if r.get("removed") and r.get("seconds")]
        if kept:
            return float(np.mean(kept))
        est = self.estimate
        if est is None or not getattr(est, "steps", None):
            return None
        n = max(math.sqrt(max(est.steps[0], 1) * max(est.steps[1], 1)), 1.0)
        parts = [self._prior("steps: scoring"), self._prior("steps: fine-tuning, evaluation, latency")]
        return sum(p for p in parts if p) / n if any(parts) else None

    def _batch_seconds(self) -> float | None:
        """One training mini-batch: measured in the steps' fine-tuning, else in the fine-tuning check (five
        attempts of ``finetune_steps`` batches at most), else the estimate's rate."""
        steps = getattr(self.config, "finetune_steps", 0)
        tuned = self._part_seconds.get("fine-tuning")
        if tuned and steps:
            return float(np.median(tuned)) / steps
        check = list(self._part_seconds.get("checking fine-tuning", []))
        if self._part is not None and self._part[0][1] == "checking fine-tuning" and self._part[3] > 0.05:
            check.append((self._part[2] - self._part[1]) / self._part[3])
        if check and steps:
            return float(np.median(check)) / (5 * steps)
        rates = getattr(self.estimate, "rates", None)
        if rates is not None:
            return math.sqrt(max(rates.train_step[0], 1e-9) * max(rates.train_step[1], 1e-9))
        return 0.0 if not steps else None

    def _batches_per_epoch(self) -> int:
        return math.ceil((self.n_train or 0) / max(getattr(self.config, "batch_size", 64), 1))

    def _recovery_seconds(self, batch_s: float) -> float:
        done = [r["seconds"] for r in self.records if r.get("recovered_from") is not None and r.get("seconds")]
        if done:
            return float(np.mean(done))
        return getattr(self.config, "recover_epochs", 0) * self._batches_per_epoch() * batch_s * 1.2  # + teacher, eval

    def _to_come(self) -> tuple[float, float, float, bool]:
        """(expected pruning steps, stalled steps, recoveries) still to come, and whether the segment running now
        has no room for another step (its running step is then the stall).

        The drop is the larger of the selection and the test images' (the loop recovers where the test images
        refuse a kept step). A segment goes on while the next step's climb fits the allowance: about
        (room / climb) - 1/2 steps, at least one once it starts. The climb is the mean measured climb per kept
        step, with a prior of a third of the allowance or, when larger, the test figure's own noise (one
        standard error of a step's drop on the test images: a 1-point allowance on 400 test images is refused
        by noise alone). A segment ends in a stall (its step undone by the threshold) or a refusal (a kept step
        the test images refuse), a stall with the share measured in the run (prior: one half, less where the
        noise exceeds the allowance); while recoveries are left a recovery follows, and the run goes on only
        if it buys a step: with probability q, the share of this run's recoveries that did (prior one half), so
        the segments still to come are q + q^2 + ... for the recoveries left."""
        c = self.config
        max_drop = float(getattr(c, "max_drop", 1.0)) or 1e-9
        base = self.base or {}
        climbs, after_recovery = [], []
        now_drop, refused = 0.0, False  # the last record's drop; whether the test images refuse it
        recoveries, refusals, in_segment = [], 0, 0
        for i, r in enumerate(self.records):
            d = now_drop
            if base.get("metric") is not None and r.get("metric") is not None:
                d = (base["metric"] - r["metric"]) * 100
                if base.get("test_metric") is not None and r.get("test_metric") is not None:
                    d = max(d, (base["test_metric"] - r["test_metric"]) * 100)
            if r.get("recovered_from") is not None:
                after_recovery.append(d)
                recoveries.append(i)
                in_segment = 0
            elif r.get("removed"):
                climbs.append(d - now_drop)
                in_segment += 1
            now_drop = d
            refused = bool(r.get("removed")) and d > max_drop + 1e-9
            refusals += refused
        judged = [i for i in recoveries if i < len(self.records) - 1]  # a record came after it
        bought = sum(1 for i in judged if any(r.get("removed") for r in self.records[i + 1:]))
        q = (0.5 + bought) / (1.0 + len(judged))
        noise = self._test_noise()
        if base.get("test_metric") is None:  # no test images: only the threshold ends a segment
            stall_prior = 1.0
        else:
            stall_prior = 0.5 * min(1.0, max_drop / noise) if noise else 0.5
        p_stall = (stall_prior + len(self._stalls)) / (1.0 + len(self._stalls) + refusals)
        climb = max((max(max_drop / 3.0, noise) + sum(climbs)) / (1 + len(climbs)), max_drop / 4.0)
        can_recover = getattr(c, "recover_epochs", 0) > 0
        left = max(getattr(c, "max_recoveries", 0) - len(recoveries), 0) if can_recover else 0
        start_drop = min(float(np.mean(after_recovery)), max_drop) if after_recovery else 0.0
        per_segment = max((max_drop - start_drop) / climb - 0.5, 1.0)
        recovering = self._part is not None and self._part[0][1] == "recovering"
        segments = sum(q ** k for k in range(1, left + 1))  # after this one; the first needs this recovery's step
        current = 0.0
        if recovering:  # this segment ended; the running recovery is one of ``left``
            steps, ends, recoveries_left = segments * per_segment, segments, sum(q ** k for k in range(1, left))
        else:
            if not refused:
                current = max((max_drop - now_drop) / climb - 0.5, 0.0 if in_segment else 1.0)
            steps = current + segments * per_segment
            ends = (0.0 if refused else 1.0) + segments
            recoveries_left = sum(q ** k for k in range(left))
        if can_recover and left == 0 and not recovering:  # the last pruning step's recovery (core.engine.
            recoveries_left += 1.0  # final_recovery_due) once no other is left; with some left its chance is
            # q ** left (each of them must buy a step), small and not counted
        kept = sum(1 for r in self.records if r.get("removed"))
        steps = min(steps, max(getattr(c, "max_steps", 10**6) - kept - len(recoveries), 0))
        target = getattr(c, "mac_target", None)
        if target is not None and base.get("macs"):
            macs = next((r["macs"] for r in reversed(self.records) if r.get("macs")), base["macs"])
            per_step = (getattr(c, "step_macs", None) or 0.04) * base["macs"]
            steps = min(steps, max((macs - target * base["macs"]) / per_step, 0.0))
        self._p_stall = p_stall
        return steps, ends * p_stall, recoveries_left, not recovering and not refused and current <= 0.0

    def _test_noise(self) -> float:
        """One standard error (points) of a step's drop on the test images (or the selection images without
        them), from their number and the original's accuracy: 100 sqrt(p (1 - p) / n)."""
        base = self.base or {}
        paired = base.get("paired") or {}
        role = "test" if paired.get("test") else "selection"
        n = (paired.get(role) or {}).get("n")
        p = base.get("test_metric") if role == "test" else base.get("metric")
        if not n or p is None:
            return 0.0
        return 100.0 * math.sqrt(max(p * (1.0 - p), 1e-4) / n)
