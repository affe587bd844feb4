"""A third task in one module, as docs/extending.md ("Adding a task") describes: image regression.

A CNN with one output predicts a number per image; the metric is R² on the validation images, clipped to
0..1 (a fraction like accuracy, so drops are points). Importing this module registers the task
(``core.tasks.registry.register_task``); nothing else in the tool changes: the one loop
(``core.engine.run_task``) prunes it, the criteria it can use are those that need nothing it lacks (it supplies
no measured removals and no gradients: L1 and random), ``prunescope prune --help`` lists it under ``--task``,
and its runs open through ``core.runs.Run`` (rebuilt from the architecture recorded in the run).

Used by ``tests/tasks/test_add_a_task.py``.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from core import criteria
from core.criteria import Cluster, ScoreContext
from core.engine import PruneConfig, group_key
from core.evaluate import count_macs_params
from core.models import InputSpec
from core.runs import rebuild_classifier
from core.tasks.registry import TaskPlugin, register_task
from core.training import train_steps

NAME = "regression"


@dataclass
class RegressionPruneConfig(PruneConfig):
    """``PruneConfig`` for regression: L1 (the task measures no removals), no analysis, no recovery, no control."""

    criterion: str = "l1"
    analyse_car: bool = False
    recover_epochs: int = 0
    control: bool = False
    latency: bool = False

    task = NAME


@dataclass
class R2:
    """What a step's accept or undo reads: R² on the validation images, clipped to 0..1."""

    metric: float


def r2_score(pred: torch.Tensor, target: torch.Tensor) -> float:
    """1 - residual / total sum of squares, clipped to 0..1; ``pred`` and ``target`` [N, 1]."""
    residual = float(((pred - target) ** 2).sum())
    total = float(((target - target.mean()) ** 2).sum())
    return float(np.clip(1.0 - residual / max(total, 1e-12), 0.0, 1.0))


class RegressionTask:
    """Image regression for the one loop (the ``core.tasks.base.Task`` protocol): MSE loss, R² metric.

    ``train`` / ``val``: (images [N, C, H, W] float, already normalised; targets [N, 1] float)."""

    name = NAME
    metric_name = "R2"
    metric_unit = "%"
    partial_rescore = True

    def __init__(self, spec: InputSpec, train: tuple[torch.Tensor, torch.Tensor],
                 val: tuple[torch.Tensor, torch.Tensor], config: RegressionPruneConfig):
        self.spec, self.train, self.val, self.config = spec, train, val, config
        self.input_shape = spec.shape(1)

    def output_layers(self, model: nn.Module) -> None:
        return None  # only the model's output layer stays whole

    def decision(self, model: nn.Module) -> R2:
        x, y = self.val
        with torch.no_grad():
            return R2(r2_score(model.eval()(x), y))

    def measure(self, model: nn.Module, decision: R2 | None = None) -> dict:
        macs, params = count_macs_params(model, self.spec)
        return {"metric": (decision or self.decision(model)).metric, "per_class": {}, "macs": macs,
                "params": params, "latency_ms": None}

    def analyse(self, model: nn.Module, cancel: threading.Event, progress) -> None:
        return None  # no car.json

    def scorer(self, model: nn.Module) -> None:
        return None  # no measured removals: criteria that need them are not offered (TaskPlugin.provides)

    def score_context(self, graph, groups, scorer, rng, cancel, progress) -> ScoreContext:
        return ScoreContext(graph, groups, rng, key=group_key)

    def rank(self, graph, clusters: list[Cluster], scores: dict, scorer, rng, cancel, progress) -> list[Cluster]:
        ctx = self.score_context(graph, [c.group for c in clusters], scorer, rng, cancel, progress)
        criteria.get(self.config.criterion, NAME).rank(clusters, scores, ctx)
        return sorted(clusters, key=lambda c: c.rank)

    def finetune(self, model: nn.Module, rng: np.random.Generator, cancel: threading.Event, progress) -> None:
        x, y = self.train
        opt = torch.optim.SGD(model.parameters(), lr=self.config.finetune_lr, momentum=0.9)
        model.train()

        def batch_loss() -> torch.Tensor:
            idx = torch.as_tensor(rng.integers(0, len(x), self.config.batch_size))
            return F.mse_loss(model(x[idx]), y[idx])

        train_steps(model, opt, self.config.finetune_steps, batch_loss, cancel, progress)

    def step_extra(self, clusters: list[Cluster]) -> dict:
        return {}


# The registry entry: a run of this task rebuilds its model from the architecture it records, as a
# classifier's does; it has no CLI commands and no export entry of its own (the tool says so when asked).
PLUGIN = register_task(TaskPlugin(name=NAME, label="Image regression (R²)", metric_name="R2",
                                  config_class=RegressionPruneConfig, provides=frozenset(),
                                  rebuild_model=rebuild_classifier))
