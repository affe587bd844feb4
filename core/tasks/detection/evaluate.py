"""A detector's mAP on a data set: raw forward in torch, decoding + NMS + mAP in numpy.

The forward pass stops at the raw output on purpose: everything after it is the same numpy code the
OpenVINO IR and the deploy script use (``postprocess``), so the mAP measured here is the mAP the
exported model has, up to the runtime's numerical differences.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from .data import DetectionSet
from .metrics import mean_average_precision
from .postprocess import SSD_BOX_CODER_WEIGHTS, Detections, postprocess


@dataclass(frozen=True)
class EvalSettings:
    """Post-processing used for mAP; VOC-style SSD evaluation keeps low-score detections (0.01)."""

    score_thresh: float = 0.01
    nms_iou: float = 0.45
    max_det: int = 100
    iou: float = 0.5

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class MapResult:
    map: float
    per_class: dict[str, float]
    n_images: int
    settings: dict = field(default_factory=dict)

    @property
    def metric(self) -> float:
        """The task-neutral name of the figure a pruning step is decided on (``core.tasks.Decision``)."""
        return self.map


def normalize_images(images_u8: torch.Tensor, mean, std) -> torch.Tensor:
    """uint8 [N, 3, H, W] -> the float input the detector was trained on."""
    x = images_u8.float().div_(255.0)
    return (x - torch.tensor(mean).view(1, -1, 1, 1)) / torch.tensor(std).view(1, -1, 1, 1)


@torch.no_grad()
def predict_raw(model: nn.Module, images_u8: torch.Tensor, mean, std, batch_size: int = 64) -> np.ndarray:
    """Raw outputs [N, A, 4 + C] as numpy, in eval mode, batched to bound memory."""
    was_training = model.training
    model.eval()
    try:
        outs = [model(normalize_images(images_u8[i:i + batch_size], mean, std)).float().numpy()
                for i in range(0, len(images_u8), batch_size)]
    finally:
        model.train(was_training)
    return np.concatenate(outs) if outs else np.zeros((0, 0, 0), np.float32)


def detect(raw: np.ndarray, anchors: np.ndarray, settings: EvalSettings = EvalSettings(),
           weights=SSD_BOX_CODER_WEIGHTS) -> list[Detections]:
    return postprocess(raw, anchors, settings.score_thresh, settings.nms_iou, settings.max_det, weights)


def map_of_detections(dets: list[Detections], data: DetectionSet, settings: EvalSettings = EvalSettings()) -> MapResult:
    mean, per_label = mean_average_precision(
        [d.boxes for d in dets], [d.scores for d in dets], [d.labels for d in dets],
        data.boxes, data.labels, data.difficult, len(data.class_names) + 1, settings.iou)
    per_class = {data.class_names[label - 1]: ap for label, ap in per_label.items()}
    return MapResult(mean, per_class, len(data), settings.to_dict())


def evaluate_map(model: nn.Module, data: DetectionSet, mean, std, settings: EvalSettings = EvalSettings(),
                 batch_size: int = 64) -> MapResult:
    """mAP@``settings.iou`` (VOC rules) of ``model`` (an ``SSDDetector``) on ``data``."""
    raw = predict_raw(model, data.images, mean, std, batch_size)
    anchors = model.anchors(tuple(data.images.shape[-2:]))
    return map_of_detections(detect(raw, anchors, settings, model.box_coder_weights), data, settings)
