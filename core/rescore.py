"""Filter scores of the pruning loop: exact or fast CAR, each measurement made once and reused.

Exact CAR of every filter at every step cannot fit a usable flow on a CPU (ResNet-56: 1,120 filters x
400 images per step). Three rules keep the loop from doing the same work twice:

1. **The original's analysis is reused** for step 1 when it was computed on the same model state and the
   same score images (``core.fingerprint``): its exact CAR and loss increase seed the book, so step 1
   measures nothing it already knows.
2. **Only changed groups are rescored** between steps: a group whose width changed (the one just pruned)
   loses its scores; the others keep theirs until a full rescore every ``full_every`` steps (fine-tuning
   drifts every weight a little). Stale single-filter scores only choose *which* filters form a group's
   candidate cluster; whether a cluster is accepted is decided by its joint removal measured exactly on
   the current model (the CAR criterion's ``rank``) and by the fine-tuned accuracy.
3. **Fast mode** screens every filter to first order (``core.screen``: one forward and two backward
   passes) and measures exact CAR only for the filters that can decide a group's next cluster: the
   lowest-screened ``remove`` of the group plus a margin (``core.screen.shortlist``).

Scores are in accuracy fractions (0.01 = one point), lower = removed first, ties broken by the loss
increase (``core.screen.tiebreak``). Every score says whether it is exact or screened.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from .car import CarResult, CarScorer, filter_ablation
from .criteria import new_width
from .groups import ChannelGroup
from .screen import combine, screen_filters, screened_order_scores, shortlist, tiebreak

Progress = Callable[[float, str], None]
SCORE_METHODS = ("exact", "fast")


@dataclass
class ScoreReport:
    """What one scoring pass did, for the step record and the progress log."""

    method: str
    rescored_groups: list[str] = field(default_factory=list)
    measured: int = 0  # filters whose exact CAR was measured in this pass
    reused: int = 0  # exact CAR values taken from the book (earlier steps or the original's analysis)
    screened: int = 0  # filters of rescored groups whose score is a first-order estimate
    exact: int = 0  # filters of all groups whose current score is exact
    total: int = 0
    from_analysis: int = 0  # exact values seeded from the original's analysis and used in this pass

    def to_dict(self) -> dict:
        return {"method": self.method, "rescored_groups": self.rescored_groups, "measured": self.measured,
                "reused": self.reused, "screened": self.screened, "exact": self.exact, "total": self.total,
                "from_analysis": self.from_analysis}

    def describe(self) -> str:
        parts = [f"rescored {len(self.rescored_groups)} group(s)" if self.rescored_groups else "no group rescored",
                 f"{self.measured} filter(s) measured exactly"]
        if self.reused:
            parts.append(f"{self.reused} reused" + (f" ({self.from_analysis} from the original's analysis)"
                                                    if self.from_analysis else ""))
        if self.screened:
            parts.append(f"{self.screened} screened")
        return ", ".join(parts)


class ScoreBook:
    """Exact single-filter CAR (and loss increase) per group root, and each group's current scores.

    Keyed by group root (stable across rebuilds of the pruning graph, unlike group ids) and filter index
    within the group's current width. ``forget(root)`` after a group is pruned (its indices shift);
    ``clear()`` for a full rescore.
    """

    def __init__(self) -> None:
        self.entries: dict[str, dict[int, tuple[float, float]]] = {}
        self.scores: dict[str, np.ndarray] = {}
        self.exact_mask: dict[str, np.ndarray] = {}
        self.seeded: dict[str, set[int]] = {}  # filters whose entry came from the original's analysis
        self.widths: dict[str, int] = {}  # the width each root had when its entries were measured
        self.fingerprint: dict | None = None  # the model state and images every entry was measured on

    def fresh(self, group: ChannelGroup) -> bool:
        s = self.scores.get(group.root)
        return s is not None and len(s) == group.width

    def forget(self, root: str) -> None:
        for d in (self.entries, self.scores, self.exact_mask, self.seeded, self.widths):
            d.pop(root, None)

    def clear(self) -> None:
        for d in (self.entries, self.scores, self.exact_mask, self.seeded, self.widths):
            d.clear()
        self.fingerprint = None

    def known(self, group: ChannelGroup) -> dict[int, tuple[float, float]]:
        """The group's measured filters; entries measured at another width are dropped (indices shifted)."""
        if self.widths.get(group.root, group.width) != group.width:
            self.forget(group.root)
        self.widths[group.root] = group.width
        return self.entries.setdefault(group.root, {})

    def seed_from_analysis(self, result: CarResult) -> int:
        """Take the exact CAR and loss increase of ``result`` (an analysis of the original).

        They are used only while the scorer's fingerprint (model state and score images) equals the
        analysis' (``car_scores`` clears the book otherwise). Returns how many filters were taken (0 for
        an analysis without fingerprint or loss increase, written before they were recorded).
        """
        self.clear()
        if not result.fingerprint or not result.loss_up:
            return 0
        self.fingerprint = dict(result.fingerprint)
        taken = 0
        for g in result.groups:
            gid, root = g["gid"], g["root"]
            car, loss = result.car.get(gid), result.loss_up.get(gid)
            if car is None or loss is None:
                continue
            self.widths[root] = g["width"]
            known = self.entries.setdefault(root, {})
            for f in range(g["width"]):
                if result.is_exact(gid, f):
                    known[f] = (float(car[f]), float(loss[f]))
                    self.seeded.setdefault(root, set()).add(f)
                    taken += 1
        return taken


def car_scores(scorer: CarScorer, groups: list[ChannelGroup], book: ScoreBook, method: str,
               cluster: int | None = None, cancel: threading.Event | None = None, progress: Progress | None = None,
               margin: float = 1.0, max_exact: int | None = None) -> tuple[dict[int, np.ndarray], ScoreReport]:
    """Per group id, a score per filter (lower = removed first), measuring only what the book lacks.

    ``method="exact"``: exact CAR of every filter of each group to rescore (the one implementation of
    exact single-filter CAR in the pruning loop; ``cluster`` is not used). ``method="fast"``: a
    first-order screen of the groups to rescore, exact CAR for each group's shortlist (the filters
    that can form its next cluster of size ``cluster``, plus ``margin`` times as many); other filters
    keep their screened rank, after every exact filter of their group (``core.screen.combine``).
    ``max_exact`` (fast mode): the most filters measured exactly in this call, given to the groups whose
    screened next cluster is cheapest (:func:`budgeted_picks`); the others keep their screened order.
    Returns the scores and a report of what was measured, reused and screened. What the book holds
    is used only for the very model state and images it was measured on (``CarScorer.fingerprint``).
    Errors: ValueError for an unknown ``method`` or fast mode without ``cluster`` (a programming error:
    ``PruneConfig.validate`` checks both before a run).
    """
    if method not in SCORE_METHODS or (method == "fast" and not cluster):
        raise ValueError(f"car_scores needs a method among {SCORE_METHODS} (fast with a cluster size); "
                         f"got {method!r}, cluster={cluster!r}.")
    report = ScoreReport(method=method, total=sum(g.width for g in groups))
    fingerprint = scorer.fingerprint()
    if book.fingerprint != fingerprint:  # another model state or other images: nothing measured still holds
        book.clear()
        book.fingerprint = fingerprint
    stale = [g for g in groups if not book.fresh(g)]
    report.rescored_groups = [g.root for g in stale]
    picks, screened = _picks(scorer, stale, book, method, cluster, margin, cancel, progress)
    if screened is not None and max_exact is not None:
        picks = budgeted_picks(picks, screened[0], stale, book, cluster, max_exact)
    _measure_missing(scorer, stale, picks, book, report, cancel, progress)
    n = len(scorer.labels)
    for g in stale:
        known = book.known(g)
        idx = np.array(sorted(known), dtype=int)
        car = np.array([known[f][0] for f in idx])
        loss = np.array([known[f][1] for f in idx])
        if screened is None:
            book.scores[g.root] = tiebreak(car, loss, n)
            book.exact_mask[g.root] = np.ones(g.width, dtype=bool)
        else:  # a group that cannot lose a cluster has no shortlist: its screen alone orders it
            exact = {g.gid: (idx, tiebreak(car, loss, n), car)} if len(idx) else {}
            fast = combine({g.gid: screened[0][g.gid]}, exact, {g.gid: screened[1].car[g.gid]}, [g])
            book.scores[g.root], book.exact_mask[g.root] = fast.scores[g.gid], fast.exact[g.gid]
            report.screened += int((~fast.exact[g.gid]).sum())
    report.exact = int(sum(book.exact_mask[g.root].sum() for g in groups))
    return {g.gid: book.scores[g.root] for g in groups}, report


def budgeted_picks(picks: dict[str, np.ndarray], order: dict[int, np.ndarray], groups: list[ChannelGroup],
                   book: ScoreBook, cluster: int, max_exact: int) -> dict[str, np.ndarray]:
    """``picks`` cut to at most ``max_exact`` new exact measurements: groups in order of their screened next
    cluster's cost (the sum of its ``remove`` lowest screened scores, cheapest first) keep their shortlist,
    lowest-screened filters first, while the budget lasts; past it a group keeps only what the book knows. A step's scoring then costs no more
    than a fixed share, however many groups a full re-score covers (a ResNet-56's shortlists were 43 % of
    its filters at every full re-score, 3.5-6.5 min on 2 cores)."""
    def cluster_cost(g: ChannelGroup) -> float:
        target = new_width(g.width, cluster)
        remove = g.width - target if target is not None else 0
        return float(np.sort(order[g.gid])[:remove].sum()) if remove else float("inf")

    out, spent = {}, 0
    for g in sorted(groups, key=cluster_cost):
        known = book.known(g)
        keep = []
        for f in (int(f) for f in picks.get(g.root, ())):  # lowest screened first
            if f in known:
                keep.append(f)
            elif spent < max_exact:
                keep.append(f)
                spent += 1
        out[g.root] = np.array(keep, dtype=int)
    return out


def _picks(scorer: CarScorer, stale: list[ChannelGroup], book: ScoreBook, method: str, cluster: int, margin: float,
           cancel, progress) -> tuple[dict[str, np.ndarray], tuple | None]:
    """Which filters of each stale group need an exact CAR, and the screen (fast mode) they came from."""
    if method == "exact" or not stale:
        return {g.root: np.arange(g.width) for g in stale}, None
    if progress:
        progress(0.0, f"screening {sum(g.width for g in stale)} filters of {len(stale)} group(s) (first order)")
    screen = screen_filters(scorer.model, scorer.inputs, scorer.labels, stale, cancel=cancel)
    order = screened_order_scores(screen, stale)
    picks = {}
    for g in stale:
        target = new_width(g.width, cluster)
        remove = g.width - target if target is not None else 0
        picks[g.root] = shortlist(order[g.gid], remove, margin=margin) if remove else np.array([], dtype=int)
    return picks, (order, screen)


def _measure_missing(scorer: CarScorer, stale: list[ChannelGroup], picks: dict[str, np.ndarray], book: ScoreBook,
                     report: ScoreReport, cancel, progress) -> None:
    """Exact CAR and loss increase of every picked filter the book does not know yet."""
    ablations, keys, by_root = [], [], {g.root: g for g in stale}
    for g in stale:
        known = book.known(g)
        for f in picks[g.root].tolist():
            if f in known:
                report.reused += 1
                report.from_analysis += int(f in book.seeded.get(g.root, ()))
            else:
                ablations.append(filter_ablation(g, [f]))
                keys.append((g.root, f))
    report.measured = len(ablations)
    if not ablations:
        return
    total = len(ablations) * len(scorer.labels)
    report_progress = (lambda d: progress(d / total, f"exact CAR: {d // max(len(scorer.labels), 1)} of "
                                                     f"{len(ablations)} filters")) if progress else None
    correct, loss_up = scorer.accuracies_and_loss(ablations, progress=report_progress, cancel=cancel)
    car = scorer.baseline_accuracy - correct.float().mean(1).numpy()
    for (root, f), c, lu in zip(keys, car.tolist(), loss_up.tolist()):
        book.known(by_root[root])[f] = (c, lu)
