"""Paired drops: flip counts, the Agresti-Min interval, and what an image set can resolve."""
from __future__ import annotations

import numpy as np
import pytest

from core.stats import (accuracy_flip_rate, images_to_resolve, paired_drop, paired_figures, resolution_points,
                        resolution_warning)


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
    assert resolution_points(1000, 0.04) > 1.0  # the issue's case: 1,000 images cannot resolve 1 point
    assert resolution_points(10, 0.0) == pytest.approx(20.0)  # never finer than two images


def test_resolution_warning_for_the_issues_case_names_the_images_that_would_resolve_it():
    # 1,000 images at 80 %: flip rate 0.16, interval 2 * 1.96 * sqrt(0.16 / 1000) = 4.96 points wide
    msg = resolution_warning(1.0, 1000, 0.8)
    assert msg is not None and "1000 selection images" in msg and "4.96 points" in msg
    need = images_to_resolve(1.0, 0.16)
    assert need == 24_586 and f"{need:,}" in msg
    assert resolution_points(need, 0.16) <= 1.0 < resolution_points(need - 1, 0.16)
    assert resolution_warning(5.0, 1000, 0.8) is None, "5 points is resolved by 1,000 images"
    assert resolution_warning(1.0, 1000, 0.8, flip_rate=0.001) is None, "a measured low flip rate resolves it"


def test_resolution_warning_edges():
    assert resolution_warning(0.0, 10_000, 0.9) is not None and "single images" in resolution_warning(0.0, 100, 0.9)
    assert accuracy_flip_rate(float("nan")) == accuracy_flip_rate(0.5) == 0.25
    assert accuracy_flip_rate(1.0) > 0, "a perfect model still gets a finite resolution"
    # vgg_digits: 359 images at 99.7 % resolve about 1.13 points
    assert "1,839 selection images" in resolution_warning(0.5, 359, 0.997)
    assert resolution_warning(1.2, 359, 0.997) is None
    # a perfect model on 100 images: the binding limit is two images' worth (2 points), so 200 images resolve 1
    assert "200 selection images" in resolution_warning(1.0, 100, 1.0)


def test_paired_figures_per_role_skip_missing_roles():
    base = {"selection": np.array([1, 1, 1, 0], bool), "test": np.array([], bool)}
    step = {"selection": np.array([1, 0, 1, 1], bool), "test": np.array([], bool)}
    figs = paired_figures(base, step)
    assert set(figs) == {"selection"} and figs["selection"]["lost"] == 1 and figs["selection"]["gained"] == 1
    assert figs["selection"]["drop_points"] == 0.0
    with pytest.raises(ValueError):
        paired_figures({"selection": np.ones(4, bool)}, {"selection": np.ones(3, bool)})
