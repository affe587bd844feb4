"""Greedy cluster pruning of a classifier: the classification entry point of the one loop (``core.engine``).

``run_pruning`` binds a classifier and its image set to ``core.tasks.classification.task.ClassificationTask``
and runs ``core.engine.run_task``. The engine's public names (``PruneConfig``, ``Callbacks``,
``Progress``, ``run_summary``, ``read_structure``) and classification's ``car_with_tiebreak`` are
importable from here too, where the CLI, the pages, the benches and the tests have always found them.
Exact single-filter CAR has one implementation, ``core.rescore.car_scores``.
"""
from __future__ import annotations

import threading
from pathlib import Path

from .car import CarResult
from .data import DataSet
from .engine import Callbacks, Progress, PruneConfig, read_structure, run_summary, run_task
from .models import LoadedModel
from .tasks.classification.task import ClassificationTask, car_with_tiebreak

__all__ = ["Callbacks", "Progress", "PruneConfig", "car_with_tiebreak", "read_structure",
           "run_pruning", "run_summary"]


def run_pruning(loaded: LoadedModel, data: DataSet, config: PruneConfig, run_dir: Path,
                callbacks: Callbacks | None = None, cancel: threading.Event | None = None,
                data_source: str | None = None, original_bytes: bytes | None = None,
                data_options: dict | None = None, analysis: CarResult | None = None,
                started: float | None = None) -> dict:
    """Run greedy cluster pruning of a classifier into ``run_dir``; returns ``core.engine.run_summary``.

    Every step is on disk when reported; ``original_bytes`` (a trusted pickle) is kept in the run so
    that its steps can be rebuilt. ``analysis``: a finished CAR analysis of this model (the app's
    Analyse job), used instead of a new one when it was made on the very score images. ``started``: when the
    user's wait began (``time.time()``), which the time budget counts from (``core.engine.run_task``). Errors:
    ``SettingsError`` for bad settings or an unprunable model.
    """
    task = ClassificationTask(loaded.spec.input, data, config, analysis=analysis)
    run_config = {"data_source": data_source or data.source, "class_names": data.class_names,
                  "data_options": data_options or {"val_fraction": 0.2, "seed": 0}}
    return run_task(task, loaded, run_config, run_dir, callbacks, cancel, original_bytes, started)
