"""Paired accuracy changes with their uncertainty, and what an image set can resolve.

A pruning step is judged on the same images as the model before it, so the right comparison is
paired: only the images that flip (right -> wrong: ``lost``; wrong -> right: ``gained``) carry
information. The interval is the Agresti-Min adjusted Wald interval for a difference of matched
proportions (Agresti & Min, "Simple improved confidence intervals for comparing matched proportions",
Statistics in Medicine 24, 2005): add 0.5 to each cell of the 2x2 table, then Wald. It stays honest
with zero flips, where the plain Wald interval collapses to a point.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

Z95 = 1.959964


@dataclass
class PairedDrop:
    """Accuracy drop in percentage points (positive = worse) with its 95 % interval and the flip counts."""

    drop_points: float
    low_points: float
    high_points: float
    lost: int
    gained: int
    n: int

    def to_dict(self) -> dict:
        return {"drop_points": self.drop_points, "ci_low_points": self.low_points, "ci_high_points": self.high_points,
                "lost": self.lost, "gained": self.gained, "n": self.n}

    def label(self) -> str:
        return (f"{self.drop_points:+.2f} points (95 % CI {self.low_points:+.2f} to {self.high_points:+.2f}; "
                f"{self.lost} images lost, {self.gained} gained of {self.n})")


def paired_drop(before_correct: np.ndarray, after_correct: np.ndarray, z: float = Z95) -> PairedDrop:
    """Drop from ``before`` to ``after`` (bool per image, same images in the same order)."""
    b = np.asarray(before_correct, dtype=bool)
    a = np.asarray(after_correct, dtype=bool)
    if b.shape != a.shape or b.ndim != 1:
        raise ValueError(f"paired_drop needs two equal 1-D arrays; got {b.shape} and {a.shape}.")
    n = len(b)
    lost = int(np.sum(b & ~a))
    gained = int(np.sum(~b & a))
    drop = 100.0 * (lost - gained) / n if n else 0.0
    # Agresti-Min: 0.5 added to each of the four cells, so n grows by 2
    lo_, ga_, m = lost + 0.5, gained + 0.5, n + 2.0
    d = (lo_ - ga_) / m
    var = ((lo_ + ga_) - (lo_ - ga_) ** 2 / m) / m ** 2
    half = z * math.sqrt(max(var, 0.0))
    return PairedDrop(drop, 100.0 * (d - half), 100.0 * (d + half), lost, gained, n)


def images_to_resolve(threshold_points: float, flip_rate: float, z: float = Z95) -> int:
    """Images needed for the 95 % interval of a paired drop to be no wider than the threshold (half-width
    ``threshold / 2``), when a fraction ``flip_rate`` of the images flips either way in a step."""
    if threshold_points <= 0:
        return math.inf  # type: ignore[return-value]
    t = threshold_points / 100.0
    return int(math.ceil(flip_rate * (2.0 * z / t) ** 2))


def resolution_points(n: int, flip_rate: float, z: float = Z95) -> float:
    """Smallest threshold (points) that ``n`` images resolve at ``flip_rate``: twice the interval's half-width,
    and never less than two images' worth."""
    if n <= 0:
        return math.inf
    return max(100.0 * 2.0 * z * math.sqrt(flip_rate / n), 200.0 / n)
