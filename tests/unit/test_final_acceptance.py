"""The final acceptance on the test images (``core.runs.select_step``, ``accepted_test_drops``, issue 23): the test
drops of the shippable steps are read as one non-decreasing curve of the compression, so that a lucky read after
refused ones does not ship alone, while nothing ships on a read of its own past the threshold."""
from __future__ import annotations

import numpy as np
import pytest

from core.runs import accepted_test_drops, passed_over, select_step


def _history(test_drops: list[float], selection_drop: float = 0.0) -> list[dict]:
    """Step 0 and one recovered step per test drop (points), each with fewer MACs than the one before."""
    base = {"step": 0, "metric": 0.80, "test_metric": 0.80, "macs": 1000}
    steps = [{"step": i, "metric": 0.80 - selection_drop / 100, "test_metric": 0.80 - d / 100, "macs": 1000 - 50 * i,
              "recovered_from": i} for i, d in enumerate(test_drops, start=1)]
    return [base, *steps]


def test_a_lucky_read_past_refused_steps_no_longer_ships_alone():
    """The recovered steps' test drops of a real ResNet-20 upload (``bench/real_cifar.py --upload``, 2026-12-05): the
    smallest step passing was the 10th (1.82x, a read of exactly 1.0 that lost 2.13 on 3,000 unseen images). Pooled
    with its refused neighbours it reads 1.13; the 5th (1.31x, 0.8 unseen) is the last the curve accepts."""
    drops = [0.2, 0.3, 1.1, 0.3, 0.5, 1.3, 1.0, 1.2, 1.0, 1.8]
    history = _history(drops)
    fitted = accepted_test_drops(history)
    assert fitted[3] == fitted[4] == fitted[5] == pytest.approx((1.1 + 0.3 + 0.5) / 3)
    assert fitted[6] == fitted[7] == fitted[8] == fitted[9] == pytest.approx((1.3 + 1.0 + 1.2 + 1.0) / 4)
    assert select_step(history, 1.0) == 5
    assert select_step(history, 1.2) == 9, "a looser threshold takes the pooled block"
    assert select_step(history, 0.25) == 1
    assert [(r["step"], round(f, 2)) for r, f in passed_over(history, 1.0)] == [(9, 1.13), (7, 1.13)], \
        "Review names the smaller steps that pass on their own read but not on the curve"
    assert passed_over(_history([0.1, 0.4, 0.9]), 1.0) == []


def test_test_drops_that_grow_with_the_compression_are_read_as_they_are():
    drops = [0.1, 0.4, 0.4, 0.9, 1.5]
    history = _history(drops)
    assert accepted_test_drops(history) == {0: 0.0, **{i: pytest.approx(d) for i, d in enumerate(drops, start=1)}}
    assert select_step(history, 1.0) == 4


def test_the_shipped_step_never_reads_past_the_threshold_on_its_own_test_images():
    """Whatever the reads, the step the curve accepts is within the threshold on its own read too, and the curve
    never ships a smaller model than the smallest step passing alone (it is the stricter of the two)."""
    rng = np.random.default_rng(0)
    for _ in range(300):
        drops = list(np.round(np.cumsum(rng.normal(0.15, 0.6, size=rng.integers(1, 12))), 1))
        history = _history(drops)
        threshold = float(rng.choice([0.5, 1.0, 2.0]))
        shipped = select_step(history, threshold)
        own = (history[0]["test_metric"] - history[shipped]["test_metric"]) * 100
        assert own <= threshold + 1e-9
        alone = [r["step"] for r in history if (0.80 - r["test_metric"]) * 100 <= threshold + 1e-9]
        assert history[shipped]["macs"] >= min(history[s]["macs"] for s in alone)
        fitted = [accepted_test_drops(history)[s] for s in range(len(history))]
        assert all(a <= b + 1e-9 for a, b in zip(fitted, fitted[1:])), "the curve never falls"


def test_without_test_figures_the_selection_figure_alone_decides():
    history = [{**r, "test_metric": None} for r in _history([0.5, 3.0, 0.2])]
    assert accepted_test_drops(history) == {}
    assert select_step(history, 1.0) == 3
    assert select_step(_history([0.5, 3.0, 0.2], selection_drop=1.5), 1.0) == 0, "the selection figure still counts"


def test_equal_mac_steps_are_not_ordered_by_the_curve():
    """A step and a later recovery of it have equal MACs, which say nothing about which should read worse: the
    curve takes them from the best read to the worst, so a recovery that reads better than its step ships and
    its step (1.4 test points lost) is not pooled with it; a read past the threshold never ships."""
    history = _history([0.3, 1.4, 0.2])
    history[3]["macs"] = history[2]["macs"]
    history[2]["metric"] = 0.805  # the better selection figure: it would win the tie
    fitted = accepted_test_drops(history)
    assert fitted[1] == fitted[3] == pytest.approx(0.25) and fitted[2] == pytest.approx(1.4)
    assert select_step(history, 1.0) == 3
    history[3]["test_metric"], history[2]["test_metric"] = history[2]["test_metric"], history[3]["test_metric"]
    assert select_step(history, 1.0) == 2, "the order follows the reads, not the step numbers"


def test_a_recovery_of_the_original_is_not_a_point_of_the_compression_curve():
    """``recover --step 0`` appends the original fine-tuned, at the original's MACs (a break test: on a digits run
    it read one test image worse, lifted the pruned steps' fitted drops and nothing shipped at threshold 0)."""
    history = _history([0.0, 0.0, 0.0])
    history.append({"step": 4, "metric": 0.80, "test_metric": 0.79, "macs": 1000, "recovered_from": 0})
    fitted = accepted_test_drops(history)
    assert 4 not in fitted and all(fitted[s] == pytest.approx(0.0) for s in (1, 2, 3))
    assert select_step(history, 0.0) == 3
    assert select_step(history, 1.0) == 3, "the fewest MACs still ship first"
