"""Time left, from the measured rate of the phase that is running now.

A job is a sequence of phases (measuring the original, CAR, fine-tuning, ...) whose work is counted
in the phase's own units (filters, batches, images). Rates differ by orders of magnitude between
phases, so a single overall fraction extrapolated over the whole elapsed time is wrong by as much;
the ETA here is the current phase's remaining units divided by the rate measured over its recent
units, plus, when given, the known work of later phases at their last measured rate.
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable


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
