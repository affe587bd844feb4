"""Paired drops: flip counts, the Agresti-Min interval, and what an image set can resolve."""
from __future__ import annotations

import numpy as np
import pytest

from core.stats import images_to_resolve, paired_drop, resolution_points


def test_paired_drop_counts_flips_and_brackets_the_drop():
    before = np.array([1] * 80 + [0] * 20, bool)
    after = before.copy()
    after[:5] = False  # 5 lost
    after[80:82] = True  # 2 gained
    d = paired_drop(before, after)
    assert (d.lost, d.gained, d.n) == (5, 2, 100)
    assert d.drop_points == pytest.approx(3.0)
    assert d.low_points < 3.0 < d.high_points
    # hand computation of Agresti-Min: cells + 0.5, n + 2
    m = 102.0
    diff = (5.5 - 2.5) / m
    half = 1.959964 * np.sqrt(((5.5 + 2.5) - (5.5 - 2.5) ** 2 / m) / m ** 2)
    assert d.low_points == pytest.approx(100 * (diff - half)) and d.high_points == pytest.approx(100 * (diff + half))


def test_no_flips_gives_an_interval_not_a_point():
    same = np.array([1, 0] * 50, bool)
    d = paired_drop(same, same)
    assert d.drop_points == 0 and d.low_points < 0 < d.high_points
    with pytest.raises(ValueError):
        paired_drop(same, same[:10])


def test_resolution_and_images_needed_agree():
    n = images_to_resolve(1.0, flip_rate=0.04)
    assert resolution_points(n, 0.04) == pytest.approx(1.0, rel=0.01)
    assert resolution_points(1000, 0.04) > 1.0  # the case: 1,000 images cannot resolve 1 point
    assert resolution_points(10, 0.0) == pytest.approx(20.0)  # never finer than two images
