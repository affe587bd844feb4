"""Turn an SSD's raw output into detections, with numpy only.

This module imports nothing but numpy on purpose: it is copied as it is into the deploy script that
runs next to the NCS2 / OpenVINO runtime, where torch is not installed. Everything a detector's graph
leaves out (decoding, softmax, NMS) happens here, so the exported graph stays one static tensor.

Conventions shared by the whole ``core.tasks.detection`` package:

- raw model output: ``[N, A, 4 + C]`` float; columns 0..3 are box-regression deltas
  ``(dx, dy, dw, dh)`` relative to anchor ``a``, columns 4.. are class logits with the
  **background at class index 0** (so object labels are ``1..C-1``).
- anchors: ``[A, 4]`` float, **normalised (cx, cy, w, h)** in [0, 1] units of the input image.
- deltas follow torchvision's ``BoxCoder`` with weights ``(wx, wy, ww, wh)``, for SSD ``(10, 10, 5, 5)``:
  ``dx = wx * (gx - ax) / aw``, ``dw = ww * log(gw / aw)`` (same for y/h).
- boxes handed to users: **normalised (x1, y1, x2, y2)** in [0, 1].
"""
from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

SSD_BOX_CODER_WEIGHTS = (10.0, 10.0, 5.0, 5.0)
BBOX_XFORM_CLIP = math.log(1000.0 / 16)  # torchvision's cap on dw/dh before exp(), so boxes never overflow


class Detections(NamedTuple):
    """The detections of one image: boxes [k, 4] normalised x1y1x2y2, scores [k], labels [k] (1-based)."""

    boxes: np.ndarray
    scores: np.ndarray
    labels: np.ndarray


def decode(raw: np.ndarray, anchors: np.ndarray, weights=SSD_BOX_CODER_WEIGHTS) -> np.ndarray:
    """Boxes (normalised x1y1x2y2, not clipped) from deltas.

    Only ``raw[..., :4]`` is read, so the whole raw output can be passed without slicing.
    """
    deltas = np.asarray(raw, dtype=np.float32)[..., :4]
    anchors = np.asarray(anchors, dtype=np.float32)
    wx, wy, ww, wh = (float(w) for w in weights)
    dx, dy = deltas[..., 0] / wx, deltas[..., 1] / wy
    dw = np.minimum(deltas[..., 2] / ww, BBOX_XFORM_CLIP)
    dh = np.minimum(deltas[..., 3] / wh, BBOX_XFORM_CLIP)
    cx = dx * anchors[:, 2] + anchors[:, 0]
    cy = dy * anchors[:, 3] + anchors[:, 1]
    w = np.exp(dw) * anchors[:, 2]
    h = np.exp(dh) * anchors[:, 3]
    return np.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], axis=-1)


def softmax(logits: np.ndarray, axis: int = -1) -> np.ndarray:
    shifted = logits - logits.max(axis=axis, keepdims=True)  # exp of large logits would overflow
    e = np.exp(shifted)
    return e / e.sum(axis=axis, keepdims=True)


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU matrix [len(a), len(b)] of x1y1x2y2 boxes (continuous coordinates, no +1 pixel convention)."""
    a = np.asarray(a, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(b, dtype=np.float64).reshape(-1, 4)
    area_a = np.clip(a[:, 2] - a[:, 0], 0, None) * np.clip(a[:, 3] - a[:, 1], 0, None)
    area_b = np.clip(b[:, 2] - b[:, 0], 0, None) * np.clip(b[:, 3] - b[:, 1], 0, None)
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    wh = np.clip(rb - lt, 0, None)
    inter = wh[..., 0] * wh[..., 1]
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


def nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float) -> np.ndarray:
    """Indices kept by greedy NMS in descending score order; a box goes when its IoU with a kept one exceeds the threshold."""
    order = np.argsort(-scores, kind="stable")
    keep = []
    while order.size:
        i = order[0]
        keep.append(i)
        if order.size == 1:
            break
        ious = box_iou(boxes[i], boxes[order[1:]])[0]
        order = order[1:][ious <= iou_threshold]
    return np.asarray(keep, dtype=np.int64)


def postprocess(raw: np.ndarray, anchors: np.ndarray, score_thresh: float = 0.01, nms_iou: float = 0.45,
                max_det: int = 100, weights=SSD_BOX_CODER_WEIGHTS, topk_per_class: int = 400) -> list[Detections]:
    """Detections per image from raw output ``[N, A, 4 + C]`` (or one image's ``[A, 4 + C]``).

    Per object class: softmax score above ``score_thresh``, at most ``topk_per_class`` best
    candidates, NMS at ``nms_iou``; then the ``max_det`` best of all classes. This is torchvision
    SSD's ``postprocess_detections`` order of operations, so results agree with a torchvision SSD.
    Boxes are clipped to the image, [0, 1].
    """
    raw = np.asarray(raw, dtype=np.float32)
    if raw.ndim == 2:
        raw = raw[None]
    if raw.ndim != 3 or raw.shape[2] < 6 or raw.shape[1] != len(anchors):
        raise ValueError(f"raw output must be [N, A={len(anchors)}, 4 + C] with C >= 2; got {list(raw.shape)}")
    boxes_all = np.clip(decode(raw, anchors, weights), 0.0, 1.0)
    probs_all = softmax(raw[..., 4:])
    return [_detect_one(b, p, score_thresh, nms_iou, max_det, topk_per_class) for b, p in zip(boxes_all, probs_all)]


def _detect_one(boxes: np.ndarray, probs: np.ndarray, score_thresh: float, nms_iou: float, max_det: int,
                topk_per_class: int) -> Detections:
    out_boxes, out_scores, out_labels = [], [], []
    for label in range(1, probs.shape[1]):
        scores = probs[:, label]
        idx = np.flatnonzero(scores > score_thresh)
        if idx.size > topk_per_class:
            idx = idx[np.argsort(-scores[idx], kind="stable")[:topk_per_class]]
        if idx.size == 0:
            continue
        kept = idx[nms(boxes[idx], scores[idx], nms_iou)]
        out_boxes.append(boxes[kept])
        out_scores.append(scores[kept])
        out_labels.append(np.full(kept.size, label, dtype=np.int64))
    if not out_boxes:
        return Detections(np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros(0, np.int64))
    boxes, scores, labels = np.concatenate(out_boxes), np.concatenate(out_scores), np.concatenate(out_labels)
    best = np.argsort(-scores, kind="stable")[:max_det]
    return Detections(boxes[best].astype(np.float32), scores[best].astype(np.float32), labels[best])
