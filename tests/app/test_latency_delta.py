"""A step's latency change is coloured as a gain or a loss only beyond the two runs' spread (issue 16)."""
from __future__ import annotations

from ui.common import latency_delta


def _record(median: float, q1: float, q3: float) -> dict:
    return {"latency_ms": median, "latency_q1_ms": q1, "latency_q3_ms": q3}


def test_a_change_inside_the_spread_is_not_shown_as_a_loss():
    text, colour = latency_delta(_record(1.3, 0.9, 1.6), _record(1.0, 0.8, 1.2))
    assert colour == "off" and "within the spread" in text and text.startswith("+30.0 %")


def test_a_change_beyond_the_spread_is_coloured():
    text, colour = latency_delta(_record(0.6, 0.55, 0.65), _record(1.0, 0.9, 1.1))
    assert colour == "inverse" and text == "-40.0 %"


def test_an_old_record_without_a_spread_is_shown_uncoloured():
    assert latency_delta({"latency_ms": 0.6}, {"latency_ms": 1.0}) == ("-40.0 %", "off")
