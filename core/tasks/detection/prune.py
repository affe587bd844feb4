"""Greedy cluster pruning of SSD detectors, scored by mAP: the detection entry point of the one loop.

``run_detection_pruning`` binds a detector and its VOC data to ``core.tasks.detection.DetectionTask``
(screen by MultiBox-loss increase, decide by exact emulated mAP) and runs ``core.engine.run_task``.
The run folder is the classification one (``core.runs``): records hold mAP under ``metric``,
``config.json`` says ``task: detection``, ``metric_name: mAP@0.5`` and holds the detector config
that rebuilds every step.
"""
from __future__ import annotations

import threading
from dataclasses import asdict
from pathlib import Path

from torch import nn

from ...engine import Callbacks, PruneConfig, run_task
from ...errors import SettingsError
from ...models import InputSpec, LoadedModel, ModelSpec
from .task import DetectionPruneConfig, DetectionScorer, DetectionTask
from .data import DetectionData
from .evaluate import EvalSettings
from .models import output_layer_names

__all__ = ["DetectionPruneConfig", "DetectionScorer", "as_detection_config", "detection_spec", "output_layer_names",
           "run_detection_pruning"]


def as_detection_config(config: PruneConfig) -> DetectionPruneConfig:
    """A plain ``PruneConfig`` keeps its values; detection-only settings take their defaults."""
    if isinstance(config, DetectionPruneConfig):
        return config
    return DetectionPruneConfig(**asdict(config))


def detection_spec(model: nn.Module, info: dict) -> ModelSpec:
    """The ``ModelSpec`` a run folder stores for a detector (``info``: mean, std, class_names, source)."""
    h, w = model.input_size
    ispec = InputSpec(height=int(h), width=int(w), mean=tuple(info.get("mean", (0.5,) * 3)),
                      std=tuple(info.get("std", (0.5,) * 3)))
    names = info.get("class_names")
    return ModelSpec(arch=model.config["arch"], num_classes=int(model.num_classes), input=ispec,
                     class_names=list(names) if names else None, source=str(info.get("source", "")))


def run_detection_pruning(model: nn.Module, info: dict, data: DetectionData, config: PruneConfig, run_dir: Path,
                          callbacks: Callbacks | None = None, cancel: threading.Event | None = None,
                          data_options: dict | None = None, started: float | None = None) -> dict:
    """Prune an ``SSDDetector`` into ``run_dir``; returns the run summary (``core.engine.run_summary``).

    ``info``: ``mean``, ``std`` (the detector's normalisation), ``class_names``, ``source`` (e.g. a
    sample detector's manifest entry). Progress goes to ``callbacks.progress(fraction, message)``,
    each accepted step to ``callbacks.step(record)``; setting ``cancel`` stops after the current phase
    and keeps the completed steps. Safe to call from a worker thread (touches no UI). ``started``: when the
    user's wait began (``time.time()``), which the time budget counts from (``core.engine.run_task``).
    """
    config = as_detection_config(config)
    config.validate()
    spec = detection_spec(model, info)
    if tuple(data.val.images.shape[-2:]) != tuple(model.input_size):
        raise SettingsError(f"The data is at {tuple(data.val.images.shape[-2:])} but the detector expects "
                            f"{tuple(model.input_size)}; load the data at the detector's input size.")
    task = DetectionTask(spec.input, data, config)
    run_config = {"data_source": data.source, "class_names": data.class_names,
                  "detector_config": dict(model.config), "eval_settings": EvalSettings().to_dict(),
                  "data_options": data_options or {"val_fraction": 0.2, "seed": 0}}
    return run_task(task, LoadedModel(model, spec), run_config, run_dir, callbacks, cancel, started=started)
