"""Pruning criteria as small classes in one registry, after Torch-Pruning's ``tp.importance.Importance``.

A criterion answers two questions: which filters of a channel group go first (``score``: one number
per filter, lower = removed first) and, across groups, which candidate cluster goes first (``rank``).
The task supplies what needs its data (``ScoreContext``): the exact ablation cost of single filters
and of whole clusters (CAR), and gradients for Taylor. The CLI's ``--criterion`` choices, the Prune
page's choices and ``PruneConfig.validate`` all read ``REGISTRY``; a new criterion is one decorated
class here (see docs/extending.md, "Adding a criterion").
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Hashable

import numpy as np
import torch_pruning as tp

from .errors import SettingsError
from .groups import ChannelGroup, PruningGraph
from .car import exact_budget
from .tasks.registry import task_names, task_plugin

# What a task's ScoreContext can supply (``core.tasks.registry.TaskPlugin.provides``) and a criterion ``needs``.
NEEDS = ("filter_costs", "cluster_costs", "gradients")


@dataclass
class Cluster:
    """A candidate removal: ``filters`` (indices into the current width) of one channel ``group``.

    ``macs_saved``: MACs the removal saves (>= 1); ``cost``: its measured metric loss (a fraction,
    e.g. 0.01 = one point), None where only screened; ``rank``: lower goes first; ``loss_up``: the
    screening loss increase, where the task screens (detection).
    """

    group: ChannelGroup
    filters: list[int]
    macs_saved: float
    cost: float | None = None
    rank: float = 0.0
    loss_up: float | None = None

    def ablation(self):
        """The emulated removal of these filters (what their consumers read is zeroed)."""
        return self.group.ablation(self.filters)


def new_width(width: int, cluster: int) -> int | None:
    """Width after removing one cluster: the next multiple of ``cluster`` below ``width`` (None if < cluster)."""
    target = ((width - 1) // cluster) * cluster
    return target if target >= cluster else None


def lowest_clusters(groups: list[ChannelGroup], scores: dict, cluster: int,
                    key: Callable[[ChannelGroup], Hashable]) -> list[Cluster]:
    """Per group that can lose a cluster, its lowest-scoring filters down to the next multiple of ``cluster``."""
    out = []
    for g in groups:
        target = new_width(g.width, cluster)
        if target is None:
            continue
        k = g.width - target
        filters = sorted(np.argsort(scores[key(g)], kind="stable")[:k].tolist())
        out.append(Cluster(g, filters, max(k * g.macs_per_filter, 1.0)))
    return out


@dataclass
class ScoreContext:
    """What a criterion may use to score the filters of ``groups`` in ``graph.model``.

    ``key(group)`` is how the caller keys the returned scores. ``filter_costs(groups)`` (task-supplied)
    is the measured cost of removing each filter alone, keyed like ``key``; ``cluster_costs(clusters)``
    the measured cost of removing each candidate cluster; ``accumulate_gradients()`` fills ``.grad``
    of the model's weights with the task loss on a few training batches. A criterion that needs one
    the task does not supply is not offered for that task (``Criterion.needs``).
    """

    graph: PruningGraph
    groups: list[ChannelGroup]
    rng: np.random.Generator
    key: Callable[[ChannelGroup], Hashable] = lambda g: g.gid
    filter_costs: Callable[[list[ChannelGroup]], dict] | None = None
    cluster_costs: Callable[[list[Cluster]], np.ndarray] | None = None
    accumulate_gradients: Callable[[], None] | None = None
    cluster_eps: float = 0.0  # added to a measured cluster cost so that zero-cost clusters still prefer more MACs


class Criterion:
    """One way of ranking filters. Subclass, set ``name`` / ``label`` (and ``needs``), decorate with ``@register``.

    ``needs``: what of ``ScoreContext`` it uses, among ``NEEDS``; it is offered for exactly the tasks that provide
    all of it (``core.tasks.registry.TaskPlugin.provides``), so a new task or criterion touches no list here.
    """

    name: str = ""
    label: str = ""
    needs: frozenset[str] = frozenset()

    @property
    def measures_removals(self) -> bool:
        """Whether it needs the task's measured removals (a scorer of emulated removals, an analysis to seed)."""
        return bool(self.needs & {"filter_costs", "cluster_costs"})

    def scoring_work(self, config, n_filters: int, n_groups: int, images: int, step_index: int) -> tuple[str, float]:
        """What scoring one step costs, for the time estimate (``core.estimate``): a rate's name and how many of it
        (``("ablation_image", n)``: n emulated-removal image passes; ``("train_step", n)``: n training mini-batches;
        ``("", 0)``: nothing worth timing). Default: nothing (a weight statistic)."""
        return "", 0.0

    def score(self, ctx: ScoreContext) -> dict:
        """Per group (keyed by ``ctx.key``), one score per filter, shape [group.width]; lower = removed first."""
        raise NotImplementedError

    def rank(self, clusters: list[Cluster], scores: dict, ctx: ScoreContext) -> None:
        """Set ``cost`` (measured loss, or None) and ``rank`` (lower = removed first) on every candidate cluster.

        Default: the cluster's filter scores, normalised by the group's mean |score| so that groups are
        comparable, summed and divided by the MACs the cluster saves. Used by classification; detection
        ranks every criterion's clusters by its own loss screen and exact mAP (``core.tasks.detection.task``).
        """
        for c in clusters:
            s = scores[ctx.key(c.group)]
            norm = s / (np.mean(np.abs(s)) + 1e-12)
            c.cost = None
            c.rank = float(np.sum(norm[c.filters])) / c.macs_saved


class TorchPruningCriterion(Criterion):
    """A criterion that is one ``tp.importance.Importance`` applied to each group's full pruning group."""

    def importance(self) -> tp.importance.Importance:
        raise NotImplementedError

    def score(self, ctx: ScoreContext) -> dict:
        importance = self.importance()
        out = {}
        for g in ctx.groups:
            module = ctx.graph.module(g.root)
            pruner = ctx.graph.dg.get_pruner_of_module(module)
            full = ctx.graph.dg.get_pruning_group(module, pruner.prune_out_channels, list(range(g.width)))
            scores = importance(full)
            out[ctx.key(g)] = np.zeros(g.width) if scores is None else scores.detach().float().numpy()
        return out


REGISTRY: dict[str, Criterion] = {}


def register(cls: type[Criterion]) -> type[Criterion]:
    """Class decorator: make ``cls`` a choice everywhere a criterion is chosen (CLI, Prune page, validation)."""
    if not cls.name or not set(cls.needs) <= set(NEEDS):
        raise ValueError(f"A criterion needs a name and needs among {NEEDS}; got {cls.name!r}, {sorted(cls.needs)!r}.")
    REGISTRY[cls.name] = cls()
    return cls


def names(task: str | None = None) -> tuple[str, ...]:
    """The registered criteria (for ``task`` only, if given), in registration order."""
    return tuple(n for n, c in REGISTRY.items() if task is None or offered(c, task))


def tasks_of(criterion: Criterion) -> tuple[str, ...]:
    """The registered tasks ``criterion`` is offered for."""
    return tuple(t for t in task_names() if offered(criterion, t))


def offered(criterion: Criterion, task: str) -> bool:
    """Whether ``task`` supplies everything ``criterion`` needs (an unknown task: nothing is offered)."""
    try:
        return criterion.needs <= task_plugin(task).provides
    except SettingsError:
        return False


def label(name: str) -> str:
    return REGISTRY[name].label if name in REGISTRY else name


def get(name: str, task: str = "classification") -> Criterion:
    """The criterion ``name`` for ``task``; SettingsError naming the choices otherwise."""
    if name not in REGISTRY:
        raise SettingsError(f"Unknown criterion '{name}'. Choose one of: {', '.join(names(task))}.")
    if not offered(REGISTRY[name], task):
        raise SettingsError(f"The {name} criterion is not available for {task}; choose one of: "
                            f"{', '.join(names(task))}.")
    return REGISTRY[name]


@register
class CAR(Criterion):
    """Classification Accuracy Reduction (Abbasi-Asl & Yu 2017): the measured metric loss of each removal."""

    name = "car"
    label = "CAR (exact accuracy loss)"
    needs = frozenset({"filter_costs", "cluster_costs"})

    def scoring_work(self, config, n_filters: int, n_groups: int, images: int, step_index: int) -> tuple[str, float]:
        """Every filter's single removal on a re-scoring step (fast mode: at most its exact budget), plus one
        removal per candidate cluster, each on ``images`` images."""
        rescored = n_filters if step_index % config.rescore_every == 0 else 0
        if getattr(config, "car", "exact") == "fast":
            rescored = min(rescored, exact_budget(n_filters, config.finetune_steps, config.batch_size, images))
        return "ablation_image", float((rescored + n_groups) * images)

    def score(self, ctx: ScoreContext) -> dict:
        return ctx.filter_costs(ctx.groups)

    def rank(self, clusters: list[Cluster], scores: dict, ctx: ScoreContext) -> None:
        drops = ctx.cluster_costs(clusters)
        for c, d in zip(clusters, drops):
            c.cost = float(d)
            c.rank = (max(float(d), 0.0) + ctx.cluster_eps) / c.macs_saved


@register
class L1(TorchPruningCriterion):
    """Filter weight magnitude (Li et al. 2017), summed over the coupled channel group by Torch-Pruning."""

    name = "l1"
    label = "L1 norm (weight magnitude)"

    def importance(self) -> tp.importance.Importance:
        return tp.importance.GroupMagnitudeImportance(p=1)


@register
class Taylor(TorchPruningCriterion):
    """First-order Taylor expansion of the loss (Molchanov et al. 2019): |weight x gradient| per group."""

    name = "taylor"
    label = "Taylor (gradient × activation)"
    needs = frozenset({"gradients"})
    gradient_passes = 4  # the mini-batches the task accumulates gradients on (core.tasks.classification.task)

    def scoring_work(self, config, n_filters: int, n_groups: int, images: int, step_index: int) -> tuple[str, float]:
        return "train_step", float(self.gradient_passes)

    def importance(self) -> tp.importance.Importance:
        return tp.importance.GroupTaylorImportance()

    def score(self, ctx: ScoreContext) -> dict:
        ctx.accumulate_gradients()
        scores = super().score(ctx)
        ctx.graph.model.zero_grad(set_to_none=True)
        return scores


@register
class Random(Criterion):
    """Uniformly random order: the baseline every other criterion must beat."""

    name = "random"
    label = "Random (a baseline)"

    def score(self, ctx: ScoreContext) -> dict:
        return {ctx.key(g): ctx.rng.random(g.width) for g in ctx.groups}

    def rank(self, clusters: list[Cluster], scores: dict, ctx: ScoreContext) -> None:
        for c in clusters:
            c.cost, c.rank = None, float(ctx.rng.random())
