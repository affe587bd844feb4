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


def accuracy_flip_rate(accuracy: float) -> float:
    """The flip rate assumed when none was measured: ``p (1 - p)``, the variance of one image's correctness.

    With it, the paired interval of a step is as wide as the standard error of the accuracy itself
    (1,000 images at 80 %: about 1.3 points), the scale on which a threshold decided by chance shows;
    an unknown or undefined accuracy takes the widest case, 0.5.
    """
    p = accuracy if isinstance(accuracy, (int, float)) and math.isfinite(accuracy) and 0 <= accuracy <= 1 else 0.5
    return max(p * (1.0 - p), 1e-4)


def resolution_warning(max_drop_points: float, n_selection: int, accuracy: float,
                       flip_rate: float | None = None) -> str | None:
    """One line when a threshold of ``max_drop_points`` is finer than ``n_selection`` images at ``accuracy``
    (0..1) can resolve (:func:`resolution_points`), saying how many images would resolve it; None when it
    is resolved. ``flip_rate`` (fraction of images flipping either way in a step) defaults to
    :func:`accuracy_flip_rate`; pass a measured one when a run has it."""
    rate = accuracy_flip_rate(accuracy) if flip_rate is None else flip_rate
    if max_drop_points <= 0:
        return (f"A threshold of {max_drop_points:g} points lets no image flip for the worse: every step is decided "
                "by single images, which no number of selection images resolves.")
    resolvable = resolution_points(n_selection, rate)
    if max_drop_points >= resolvable:
        return None
    need = max(images_to_resolve(max_drop_points, rate), int(math.ceil(200.0 / max_drop_points)))
    return (f"A {max_drop_points:g}-point threshold is finer than {n_selection} selection images can resolve "
            f"(about {resolvable:.2f} points at 95 % confidence with {100 * rate:.1f} % of the images flipping per "
            f"step): steps are then accepted or refused partly by chance. About {need:,} selection images would "
            "resolve it.")


def paired_figures(baseline_correct: dict[str, np.ndarray], step_correct: dict[str, np.ndarray]) -> dict[str, dict]:
    """Per role (``selection``, ``test``, ...) the paired drop of a step from the baseline, as
    :meth:`PairedDrop.to_dict`; roles missing on either side or without images are left out (an old run
    without a test split has only ``selection``). Raises ``ValueError`` when a role's vectors differ in
    length (they must be the same images in the same order)."""
    out = {}
    for role, before in baseline_correct.items():
        after = step_correct.get(role)
        if after is None or len(before) == 0:
            continue
        out[role] = paired_drop(np.asarray(before), np.asarray(after)).to_dict()
    return out
