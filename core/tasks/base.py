"""What a pruning task is to the one pruning loop (``core.engine``): only what differs between tasks.

The loop owns the flow (measure the original, score, form candidate clusters, remove / fine-tune /
measure / undo, record, stop). A task supplies the metric and the work that needs its data and loss:

- ``classification`` (``core.tasks.classification.task``): top-1 accuracy, exact CAR, cross-entropy;
- ``detection`` (``core.tasks.detection.task``): mAP@0.5 of an SSD, MultiBox-loss screen + exact mAP.

This package's ``__init__`` imports no task, so that each task module can import the engine.
"""
from __future__ import annotations

import threading
from typing import Callable, Protocol

import numpy as np
from torch import nn

from ..criteria import Cluster, ScoreContext
from ..groups import ChannelGroup, PruningGraph

ProgressFn = Callable[[float, str], None]


class Decision(Protocol):
    """A task's decision measurement of one model (e.g. ``core.evaluate.Accuracy`` on the selection images)."""

    @property
    def metric(self) -> float:
        """The selection metric, 0..1."""


class Task(Protocol):
    """One pruning task, as the loop in ``core.engine`` calls it.

    ``name``: ``classification`` | ``detection`` (the criteria registry's task names);
    ``metric_name``: what the records' ``metric`` holds (``accuracy``, ``mAP@0.5``), a fraction
    0..1 shown as ``metric_unit`` (``%``); drops are in points (metric x 100).
    ``config`` is the run's ``PruneConfig`` (or a subclass with the task's own settings).
    """

    name: str
    metric_name: str
    metric_unit: str
    config: object
    input_shape: tuple[int, ...]  # [1, C, H, W]: the example input of the pruning graph
    partial_rescore: bool  # between full re-scores, score only the groups whose width changed

    def output_layers(self, model: nn.Module) -> list[str] | None:
        """Layers whose outputs are never pruned (a detector's head outputs); None: the classifier output only."""

    def decision(self, model: nn.Module) -> Decision:
        """What accepting or undoing a step reads, and nothing more: the selection metric (``.metric``,
        0..1). The loop measures the rest of a record only for a step it keeps."""

    def measure(self, model: nn.Module, decision: Decision | None = None) -> dict:
        """One record's figures: ``metric`` (0..1), ``per_class`` (class -> 0..1), ``macs``, ``params``,
        ``latency_ms`` (None when switched off). ``decision``: this very model's ``decision(model)``,
        reused instead of measured again."""

    def analyse(self, model: nn.Module, cancel: threading.Event, progress: ProgressFn) -> dict | None:
        """A full analysis of the original stored as ``car.json`` when ``config.analyse_car``; None: none."""

    def scorer(self, model: nn.Module) -> object | None:
        """The per-step measuring context of the current model (emulated removals), or None when the
        criterion and the ranking need none."""

    def score_context(self, graph: PruningGraph, groups: list[ChannelGroup], scorer, rng: np.random.Generator,
                      cancel: threading.Event, progress: ProgressFn | None) -> ScoreContext:
        """What a criterion may use to score filters (keyed by group root)."""

    def rank(self, graph: PruningGraph, clusters: list[Cluster], scores: dict, scorer, rng: np.random.Generator,
             cancel: threading.Event, progress: ProgressFn | None) -> list[Cluster]:
        """``clusters`` ordered best first (``cost`` set where measured)."""

    def finetune(self, model: nn.Module, rng: np.random.Generator, cancel: threading.Event,
                 progress: ProgressFn | None) -> None:
        """A few mini-batches of the task's loss after a removal; leaves the model in eval mode."""

    def step_extra(self, clusters: list[Cluster]) -> dict:
        """Task-specific fields of an accepted step's record (e.g. detection's screening loss increase);
        ``clusters``: what the step removed (several for a multi-cluster step)."""
