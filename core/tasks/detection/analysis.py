"""CAR for detectors, one layer group at a time: the mAP lost when each filter alone is removed.

A detector's per-filter CAR costs one decode + NMS + mAP per filter, so the app measures it for the
filters of one chosen group on a validation subset (the pruning run scores every filter by the cheaper
MultiBox-loss increase and decides clusters by exact mAP, see ``core.tasks.detection.task``). Removal is
emulated exactly as in pruning: the consumers' inputs of the filter are zeroed
(``core.ablation.AblationEngine`` through ``DetectionScorer.maps``).
"""
from __future__ import annotations

import copy
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
from torch import nn

from ...errors import CancelledError, SettingsError
from ...evaluate import count_macs_params
from ...groups import PruningGraph
from ...models import InputSpec
from .task import DetectionScorer
from .data import DetectionSet
from .evaluate import evaluate_map
from .models import output_layer_names


@dataclass
class GroupCar:
    """mAP drop (fraction; x100 = points) per filter of one group, on ``n_images`` validation images."""

    root: str
    gid: int
    width: int
    baseline_map: float
    car: list[float]
    n_images: int
    seconds: float
    macs_per_filter: float = 0.0
    extra: dict = field(default_factory=dict)


def detector_input(model: nn.Module, mean, std) -> InputSpec:
    h, w = model.input_size
    return InputSpec(height=int(h), width=int(w), mean=tuple(mean), std=tuple(std))


def detector_groups(model: nn.Module) -> list[dict]:
    """Every prunable group of a detector (the head's output convs excluded): root, width, MACs per filter."""
    graph = PruningGraph(copy.deepcopy(model).eval(), (1, 3, *model.input_size),
                         output_layers=output_layer_names(model))
    return [g.to_dict() for g in graph.groups()]


def detector_cost(model: nn.Module, mean, std) -> tuple[float, float]:
    """(MACs, parameters) of one image at the detector's input size."""
    return count_macs_params(model, detector_input(model, mean, std))


def measure_detector_baseline(model: nn.Module, data, mean, std) -> dict:
    """The Load page's baseline of a detector on its validation images: mAP@0.5 (also under ``metric`` and
    ``accuracy``, the keys the pages read for either task), per-class AP, image count, MACs and parameters."""
    result = evaluate_map(model, data.val, mean, std)
    macs, params = detector_cost(model, mean, std)
    return {"metric": result.map, "map": result.map, "accuracy": result.map, "per_class": result.per_class,
            "n": result.n_images, "macs": macs, "params": params}


def group_car(model: nn.Module, root: str, val: DetectionSet, mean, std, n_images: int = 64, chunk: int = 4,
              progress: Callable[[float, str], None] | None = None,
              cancel: threading.Event | None = None) -> GroupCar:
    """mAP drop of removing each filter of group ``root`` alone, on the first ``n_images`` validation images."""
    t0 = time.perf_counter()
    model = copy.deepcopy(model).eval()
    spec = detector_input(model, mean, std)
    graph = PruningGraph(model, spec.shape(1), output_layers=output_layer_names(model))
    groups = {g.root: g for g in graph.groups()}
    if root not in groups:
        raise SettingsError(f"'{root}' is not a prunable layer group of this detector.")
    g = groups[root]
    subset = val.subset(np.arange(min(n_images, len(val))))
    if progress:
        progress(0.0, f"preparing {len(subset)} validation images")
    scorer = DetectionScorer(graph.model, spec, subset, subset)
    maps: list[float] = []
    for start in range(0, g.width, chunk):
        if cancel is not None and cancel.is_set():
            raise CancelledError("Cancelled by the user.")
        filters = range(start, min(start + chunk, g.width))
        maps += scorer.maps([g.ablation([f]) for f in filters], cancel)
        if progress:
            progress(len(maps) / g.width, f"filter {len(maps)} of {g.width} of {root}")
    car = [float(scorer.base_map - m) for m in maps]
    return GroupCar(root, g.gid, g.width, float(scorer.base_map), car, len(subset), time.perf_counter() - t0,
                    g.macs_per_filter)
