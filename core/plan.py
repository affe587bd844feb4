"""Per-layer control of a pruning run: groups left untouched, and how much of its width a group may lose.

A :class:`PrunePlan` is consulted by the pruning loop before a candidate cluster is tried: a group in
``exclude`` is never pruned; a group with ``max_fraction[root] = 0.25`` never goes below 75 % of its
*original* width (rounded up to a whole filter). Plans are keyed by group root (the layer the dependency
graph names the group by, stable across steps) but accept any layer of a group, so a user can write
``layer3.0.conv2`` for the residual stream rooted at the frozen shortcut embedding ``layer3.0.shortcut``.

:func:`plan_from_sensitivity` seeds a plan from the CAR analysis' per-layer sensitivity curves (accuracy
with the lowest-CAR 10 %, 20 %, ... of one group removed, that group alone, without fine-tuning):
each group may lose the largest fraction whose measured drop stays within ``max_points``.
"""
from __future__ import annotations

import json

import math
from dataclasses import dataclass, field

from .car import CarResult
from .criteria import Cluster, new_width
from .errors import SettingsError
from .groups import ChannelGroup, group_display_name, group_label


@dataclass
class PrunePlan:
    """``exclude``: group roots never pruned; ``max_fraction``: group root -> the largest fraction (0..1) of
    its original width it may lose; ``notes``: group root -> why the plan set it (for people)."""

    exclude: set[str] = field(default_factory=set)
    max_fraction: dict[str, float] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)
    source: str = ""

    def to_dict(self) -> dict:
        return {"exclude": sorted(self.exclude), "max_fraction": dict(sorted(self.max_fraction.items())),
                "notes": dict(self.notes), "source": self.source}

    @classmethod
    def from_dict(cls, d: dict | None) -> "PrunePlan":
        """A plan from its JSON form, type-checked: ``exclude`` a list of layer names (a string would be read
        letter by letter), ``max_fraction`` an object of layer name -> number. Raises ``SettingsError``."""
        d = d or {}
        if not isinstance(d, dict):
            raise SettingsError(f"A pruning plan is a JSON object with 'exclude' and 'max_fraction'; got a "
                                f"{type(d).__name__}.")
        exclude = d.get("exclude") or []
        if not isinstance(exclude, list) or not all(isinstance(n, str) for n in exclude):
            raise SettingsError(f"The pruning plan's 'exclude' must be a list of layer names, e.g. [\"layer1.0.conv1\"]; "
                                f"got {json.dumps(exclude)[:80]}.")
        fractions = d.get("max_fraction") or {}
        if not isinstance(fractions, dict) or not all(
                isinstance(k, str) and isinstance(v, (int, float)) and not isinstance(v, bool)
                for k, v in fractions.items()):
            raise SettingsError("The pruning plan's 'max_fraction' must map layer names to numbers, e.g. "
                                f"{{\"layer3.0.conv2\": 0.25}}; got {json.dumps(fractions)[:80]}.")
        notes = d.get("notes") or {}
        return cls(exclude=set(exclude), max_fraction={k: float(v) for k, v in fractions.items()},
                   notes=dict(notes) if isinstance(notes, dict) else {}, source=str(d.get("source", "")))

    @property
    def empty(self) -> bool:
        return not self.exclude and not self.max_fraction

    def validate(self, groups: list[ChannelGroup | dict]) -> "PrunePlan":
        """The plan with every name resolved to its group's root; raises ``SettingsError`` naming unknown
        layers (with the valid ones) and fractions outside 0..1.

        A name may be a group's root, its display name, or any layer of the group (its producers).
        """
        lookup = _name_lookup(groups)
        unknown = sorted({n for n in [*self.exclude, *self.max_fraction] if n not in lookup})
        if unknown:
            valid = ", ".join(group_label(g) for g in groups)
            raise SettingsError(f"The pruning plan names {len(unknown)} layer(s) that are not a prunable group of this "
                                f"model: {', '.join(unknown)}. Valid groups: {valid}.")
        bad = {n: f for n, f in self.max_fraction.items()
               if not (isinstance(f, (int, float)) and math.isfinite(f) and 0.0 <= f <= 1.0)}
        if bad:
            raise SettingsError("A group's largest cut is a fraction of its original width from 0 to 1; got "
                                + ", ".join(f"{n}: {f}" for n, f in sorted(bad.items())) + ".")
        fractions: dict[str, float] = {}
        for name, f in self.max_fraction.items():  # two names of one group: the stricter cap holds
            root = lookup[name]
            fractions[root] = min(f, fractions.get(root, 1.0))
        return PrunePlan({lookup[n] for n in self.exclude}, fractions,
                         {lookup.get(n, n): v for n, v in self.notes.items()}, self.source)

    def min_width(self, root: str, original_width: int) -> int:
        """The narrowest the group rooted at ``root`` may become (its full width if excluded)."""
        if root in self.exclude:
            return original_width
        cap = self.max_fraction.get(root)
        if cap is None:
            return 1
        return max(1, math.ceil(original_width * (1.0 - cap) - 1e-9))

    def allows(self, cluster: Cluster, original_width: int) -> bool:
        """Whether removing ``cluster`` keeps its group within the plan (``original_width``: the group's
        width before the run's first step)."""
        group = cluster.group
        return group.width - len(cluster.filters) >= self.min_width(group.root, original_width)

    def filter_candidates(self, candidates: list[Cluster], original_widths: dict[str, int]) -> list[Cluster]:
        """The candidates the plan allows, in their order. ``original_widths``: layer name -> width before the
        first step (e.g. ``PruningGraph.widths()`` of the original); a group is looked up by its root, then
        by any of its producers."""
        return [c for c in candidates if self.allows(c, original_width(c.group, original_widths))]

    def describe(self, groups: list[ChannelGroup | dict] | None = None) -> list[str]:
        """One line per planned group, by the name a user knows it by, e.g. ``'layer3.0.conv2 (+3 coupled):
        at most 25 % of its 64 filters (keeps >= 48)'``. Without ``groups`` the roots are shown."""
        by_root = {(g["root"] if isinstance(g, dict) else g.root): g for g in groups or []}

        def name(root: str) -> str:
            return group_label(by_root[root]) if root in by_root else root

        def width(root: str) -> int | None:
            g = by_root.get(root)
            return None if g is None else (g["width"] if isinstance(g, dict) else g.width)

        lines = [f"{name(r)}: excluded (never pruned)" + _note(self.notes.get(r)) for r in sorted(self.exclude)]
        for r, f in sorted(self.max_fraction.items()):
            if r in self.exclude:
                continue
            w = width(r)
            kept = f" of its {w} filters (keeps >= {self.min_width(r, w)})" if w else " of its width"
            lines.append(f"{name(r)}: at most {f * 100:.0f} %{kept}" + _note(self.notes.get(r)))
        return lines or ["no per-layer limits: every group may be pruned"]


def _note(text: str | None) -> str:
    return f" — {text}" if text else ""


def _name_lookup(groups: list[ChannelGroup | dict]) -> dict[str, str]:
    """Every name a user may use for a group -> its root."""
    out: dict[str, str] = {}
    for g in groups:
        root = g["root"] if isinstance(g, dict) else g.root
        producers = g["producers"] if isinstance(g, dict) else g.producers
        for n in [*producers, group_display_name(g), root]:
            out[n] = root
    return out


def original_width(group: ChannelGroup, original_widths: dict[str, int]) -> int:
    """The group's width before the run: by its root, else by any of its layers, else its current width."""
    for name in [group.root, *group.producers]:
        if name in original_widths:
            return int(original_widths[name])
    return group.width


def largest_safe_fraction(curve: list[tuple[float, float]], baseline: float, max_points: float) -> float:
    """The largest fraction of a sensitivity curve ``[(fraction removed, accuracy)]`` before the first one
    whose drop from ``baseline`` exceeds ``max_points`` (percentage points). Reading up to the first
    breach, not the largest within, keeps a noisy curve that recovers after a breach from allowing more."""
    safe = 0.0
    for fraction, accuracy in sorted(curve):
        if (baseline - accuracy) * 100.0 > max_points + 1e-9:
            break
        safe = fraction
    return safe


def plan_from_sensitivity(car: CarResult, max_points: float, cluster: int) -> PrunePlan:
    """A plan read off the CAR analysis: each group may lose the largest fraction of its filters whose
    removal (the lowest-CAR ones, that group alone, no fine-tuning) cost at most ``max_points`` accuracy
    points on the analysis images. A group that cannot lose even one cluster of ``cluster`` filters within
    that budget is excluded. Groups without a sensitivity curve (too narrow to cut) and groups the analysis
    left alone are not in the plan. Raises ``SettingsError`` when the analysis has no sensitivity part.
    """
    if not (isinstance(max_points, (int, float)) and math.isfinite(max_points) and max_points >= 0):
        raise SettingsError(f"The sensitivity budget is accuracy points >= 0; got {max_points}.")
    if cluster < 1:
        raise SettingsError(f"The cluster size must be at least 1; got {cluster}.")
    if not car.sensitivity:
        raise SettingsError("This CAR analysis has no per-layer sensitivity curves; run it with sensitivity on.")
    plan = PrunePlan(source=f"sensitivity: largest cut per layer within {max_points:g} points, cluster {cluster}")
    for g in car.groups:
        curve = car.sensitivity.get(g["gid"])
        if g.get("left_alone") or not curve or len(curve) < 2:
            continue
        root, width = g["root"], g["width"]
        fraction = largest_safe_fraction(curve, car.baseline_accuracy, max_points)
        first = new_width(width, cluster)
        if first is None:
            continue  # cannot lose a cluster at all: nothing to limit
        if width - first > fraction * width + 1e-9:
            plan.exclude.add(root)
            plan.notes[root] = (f"removing even its lowest-CAR {curve[1][0] * 100:.0f} % costs more than "
                                f"{max_points:g} points" if fraction == 0 else
                                f"{fraction * 100:.0f} % is within {max_points:g} points, less than one cluster "
                                f"({width - first} of {width} filters)")
            continue
        if fraction < 1.0:
            plan.max_fraction[root] = fraction
            plan.notes[root] = f"removing {fraction * 100:.0f} % costs at most {max_points:g} points"
    return plan
