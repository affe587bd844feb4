"""ETA from the current phase's measured rate, checked against a job with known per-item cost."""
from __future__ import annotations

import pytest

from core.eta import EtaTracker, format_duration


class FakeClock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def _run(tracker, clock, phase, items, cost, check_at=0.2):
    checked = []
    for i in range(1, items + 1):
        clock.t += cost
        p = tracker.update(phase, i, items)
        if i == int(items * check_at):
            checked.append((p.eta_s, (items - i) * cost))
    return checked


def test_eta_within_30_percent_after_20_percent_of_the_work():
    clock = FakeClock()
    tracker = EtaTracker(clock=clock)
    # a fast phase first (must not bias the next one), then the phase the ETA is checked on
    _run(tracker, clock, "measuring", 50, 0.01)
    [(eta, real)] = _run(tracker, clock, "CAR", 200, 1.5)
    assert eta is not None and abs(eta - real) <= 0.3 * real


def test_eta_follows_a_rate_change_within_the_window():
    clock = FakeClock()
    tracker = EtaTracker(clock=clock, window_s=20.0)
    for i in range(1, 51):  # slow warm-up items
        clock.t += 2.0
        tracker.update("fine-tuning", i, 500)
    for i in range(51, 251):  # then steady at 0.5 s an item
        clock.t += 0.5
        p = tracker.update("fine-tuning", i, 500)
    assert p.eta_s == pytest.approx(250 * 0.5, rel=0.3)


def test_no_eta_before_anything_is_measured_and_formatting():
    tracker = EtaTracker(clock=FakeClock())
    assert tracker.update("export", 0, 10).eta_s is None
    assert format_duration(None) == "estimating…"
    assert format_duration(42.4) == "42 s"
    assert format_duration(185) == "3 min 05 s"
    assert format_duration(3720) == "1 h 02 min"
