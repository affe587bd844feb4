"""Training targets and the SSD MultiBox loss, in torch (training and fine-tuning only).

Matching follows torchvision's SSD (``SSDMatcher``): an anchor is positive for the ground-truth box
it overlaps most when that IoU is at least 0.5, and every ground-truth box also claims its single best
anchor whatever the IoU, so that no object is left without a positive anchor (small or oddly shaped
objects would otherwise never be trained). Box targets use the same coder as
``core.tasks.detection.postprocess.decode``, so ``decode(encode(box)) == box``.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .postprocess import SSD_BOX_CODER_WEIGHTS

IOU_THRESHOLD = 0.5
NEG_POS_RATIO = 3


class MultiboxTargets(NamedTuple):
    """Per-anchor targets of a batch: box deltas [N, A, 4] and class index [N, A] (0 = background)."""

    loc: torch.Tensor
    cls: torch.Tensor


def cxcywh_to_xyxy(boxes: torch.Tensor) -> torch.Tensor:
    return torch.cat([boxes[..., :2] - boxes[..., 2:] / 2, boxes[..., :2] + boxes[..., 2:] / 2], dim=-1)


def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IoU [len(a), len(b)] of x1y1x2y2 boxes."""
    area_a = (a[:, 2] - a[:, 0]).clamp(min=0) * (a[:, 3] - a[:, 1]).clamp(min=0)
    area_b = (b[:, 2] - b[:, 0]).clamp(min=0) * (b[:, 3] - b[:, 1]).clamp(min=0)
    lt = torch.maximum(a[:, None, :2], b[None, :, :2])
    rb = torch.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(dim=2)
    union = area_a[:, None] + area_b[None, :] - inter
    return inter / union.clamp(min=1e-12)


def encode_boxes(boxes_xyxy: torch.Tensor, anchors_cxcywh: torch.Tensor, weights=SSD_BOX_CODER_WEIGHTS) -> torch.Tensor:
    """Deltas [k, 4] of boxes relative to their anchors (row by row); the inverse of ``postprocess.decode``."""
    wx, wy, ww, wh = weights
    w = (boxes_xyxy[:, 2] - boxes_xyxy[:, 0]).clamp(min=1e-6)
    h = (boxes_xyxy[:, 3] - boxes_xyxy[:, 1]).clamp(min=1e-6)
    cx = boxes_xyxy[:, 0] + w / 2
    cy = boxes_xyxy[:, 1] + h / 2
    a = anchors_cxcywh
    return torch.stack([wx * (cx - a[:, 0]) / a[:, 2], wy * (cy - a[:, 1]) / a[:, 3],
                        ww * torch.log(w / a[:, 2]), wh * torch.log(h / a[:, 3])], dim=1)


def match_anchors(gt_boxes: torch.Tensor, anchors_cxcywh: torch.Tensor, iou_threshold: float = IOU_THRESHOLD) -> torch.Tensor:
    """Index of the matched ground-truth box per anchor [A], or -1 for background."""
    num_anchors = anchors_cxcywh.shape[0]
    if gt_boxes.numel() == 0:
        return torch.full((num_anchors,), -1, dtype=torch.long)
    iou = box_iou(gt_boxes, cxcywh_to_xyxy(anchors_cxcywh))  # [k, A]
    best_iou, matched = iou.max(dim=0)
    matched = torch.where(best_iou >= iou_threshold, matched, torch.full_like(matched, -1))
    best_anchor = iou.argmax(dim=1)  # each GT claims its best anchor, even below the threshold
    matched[best_anchor] = torch.arange(len(gt_boxes))
    return matched


def encode(gt_boxes, gt_labels, anchors, weights=SSD_BOX_CODER_WEIGHTS,
           iou_threshold: float = IOU_THRESHOLD) -> tuple[torch.Tensor, torch.Tensor]:
    """Targets of one image: deltas [A, 4] (zero on background anchors) and labels [A] (0 = background).

    ``gt_boxes`` [k, 4] normalised x1y1x2y2, ``gt_labels`` [k] 1-based, ``anchors`` [A, 4] normalised cx cy w h.
    """
    anchors = torch.as_tensor(np.asarray(anchors), dtype=torch.float32)
    boxes = torch.as_tensor(np.asarray(gt_boxes, dtype=np.float32).reshape(-1, 4))
    labels = torch.as_tensor(np.asarray(gt_labels, dtype=np.int64).reshape(-1))
    matched = match_anchors(boxes, anchors, iou_threshold)
    positive = matched >= 0
    cls = torch.zeros(len(anchors), dtype=torch.long)
    loc = torch.zeros(len(anchors), 4)
    if positive.any():
        cls[positive] = labels[matched[positive]]
        loc[positive] = encode_boxes(boxes[matched[positive]], anchors[positive], weights)
    return loc, cls


def encode_batch(boxes: Sequence, labels: Sequence, anchors, weights=SSD_BOX_CODER_WEIGHTS,
                 iou_threshold: float = IOU_THRESHOLD) -> MultiboxTargets:
    """``encode`` for every image of a batch, stacked."""
    pairs = [encode(b, lab, anchors, weights, iou_threshold) for b, lab in zip(boxes, labels)]
    return MultiboxTargets(torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs]))


def multibox_loss(raw: torch.Tensor, targets: MultiboxTargets, neg_pos_ratio: int = NEG_POS_RATIO) -> torch.Tensor:
    """SSD loss: smooth-L1 on positive anchors + cross-entropy on positives and the hardest negatives.

    Negatives are the background anchors with the highest classification loss, ``neg_pos_ratio``
    per positive in each image (all negatives would drown the few positives). Both terms are divided
    by the number of positives in the batch, as in the SSD paper and torchvision.
    """
    loc_pred, cls_logits = raw[..., :4], raw[..., 4:]
    positive = targets.cls > 0
    num_pos = positive.sum(dim=1, keepdim=True)
    loc_loss = F.smooth_l1_loss(loc_pred[positive], targets.loc[positive], reduction="sum")
    ce = F.cross_entropy(cls_logits.reshape(-1, cls_logits.shape[-1]), targets.cls.reshape(-1),
                         reduction="none").view_as(targets.cls)
    negative = _hardest_negatives(ce, positive, neg_pos_ratio * num_pos)
    cls_loss = ce[positive].sum() + ce[negative].sum()
    return (loc_loss + cls_loss) / num_pos.sum().clamp(min=1)


def _hardest_negatives(ce: torch.Tensor, positive: torch.Tensor, quota: torch.Tensor) -> torch.Tensor:
    """Mask of the ``quota`` (per image) background anchors with the highest loss."""
    neg_loss = ce.detach().clone()
    neg_loss[positive] = -float("inf")
    order = neg_loss.argsort(dim=1, descending=True)
    rank = order.argsort(dim=1)
    return (rank < quota) & ~positive
