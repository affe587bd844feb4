"""Pascal VOC mean average precision (mAP@0.5), with numpy only.

mAP is what CAR measures for a detector (its drop when a filter goes), so it must be exact and
deterministic: the same detections always give the same number, ties included. The rules are those
of the VOC devkit (``voc_eval.py``, VOC2010+ "all-point" AP):

- per class, every detection of all images is ranked by descending score (ties keep input order);
- a detection is a true positive when its best-overlapping ground-truth box of the same class and
  image has IoU **> iou** (strictly, as the devkit) and that box is not matched yet; a second
  detection of an already matched box is a false positive (duplicates are punished);
- when the best-overlapping box is marked *difficult*, the detection is ignored: neither TP nor FP,
  and difficult boxes do not count in the recall denominator;
- AP is the area under the precision envelope (precision made monotonically decreasing) over recall;
- classes without any non-difficult ground truth have no AP and are left out of the mean.

Boxes are normalised x1y1x2y2, IoU uses continuous coordinates (no +1 pixel convention).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np


def iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU [len(a), len(b)] of x1y1x2y2 boxes."""
    a = np.asarray(a, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(b, dtype=np.float64).reshape(-1, 4)
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=2)
    area_a = np.prod(np.clip(a[:, 2:] - a[:, :2], 0, None), axis=1)
    area_b = np.prod(np.clip(b[:, 2:] - b[:, :2], 0, None), axis=1)
    union = area_a[:, None] + area_b[None, :] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def average_precision(tp: np.ndarray, fp: np.ndarray, num_gt: int) -> float:
    """All-point interpolated AP of detections already sorted by descending score (1 = TP/FP, 0 = ignored)."""
    if num_gt == 0:
        return float("nan")
    tp_cum, fp_cum = np.cumsum(tp), np.cumsum(fp)
    recall = tp_cum / num_gt
    precision = tp_cum / np.maximum(tp_cum + fp_cum, np.finfo(np.float64).eps)
    mrec = np.concatenate([[0.0], recall, [1.0]])
    mpre = np.concatenate([[0.0], precision, [0.0]])
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]  # precision envelope
    steps = np.flatnonzero(mrec[1:] != mrec[:-1])
    return float(np.sum((mrec[steps + 1] - mrec[steps]) * mpre[steps + 1]))


def match_detections(scores: np.ndarray, image_of: np.ndarray, boxes: np.ndarray, gt_boxes: list[np.ndarray],
                     gt_difficult: list[np.ndarray], iou: float) -> tuple[np.ndarray, np.ndarray]:
    """(tp, fp) flags of one class's detections in descending score order, greedy as the VOC devkit.

    The devkit only ever looks at a detection's best-overlapping box, so its sequential loop reduces
    to: the first detection (by rank) that claims a box is TP, later claimants are FP. Vectorised that
    way, because CAR evaluates mAP once per filter and this must stay fast.
    """
    order = np.argsort(-scores, kind="stable")
    best_gt, best_iou = _best_overlaps(boxes, image_of, gt_boxes)
    best_gt, best_iou, img = best_gt[order], best_iou[order], image_of[order]
    hit = best_iou > iou
    difficult = np.zeros(len(order), dtype=bool)
    difficult[hit] = [gt_difficult[i][g] for i, g in zip(img[hit], best_gt[hit])]
    claims = hit & ~difficult
    offsets = np.concatenate([[0], np.cumsum([len(g) for g in gt_boxes])])
    key = np.where(claims, offsets[img] + best_gt, -1)  # one id per ground-truth box of the data set
    first = np.zeros(len(order), dtype=bool)
    if claims.any():
        _, first_rank = np.unique(key[claims], return_index=True)
        first[np.flatnonzero(claims)[first_rank]] = True
    tp = first.astype(np.float64)
    fp = (~hit | (claims & ~first)).astype(np.float64)
    return tp, fp


def _best_overlaps(boxes: np.ndarray, image_of: np.ndarray, gt_boxes: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Per detection: index of its best-overlapping ground-truth box in its image, and that IoU (0 if none)."""
    best_gt = np.zeros(len(boxes), dtype=np.int64)
    best_iou = np.zeros(len(boxes))
    for i in np.unique(image_of):
        dets = np.flatnonzero(image_of == i)
        if len(gt_boxes[i]) == 0:
            continue
        overlaps = iou_matrix(boxes[dets], gt_boxes[i])
        best_gt[dets] = overlaps.argmax(axis=1)
        best_iou[dets] = overlaps.max(axis=1)
    return best_gt, best_iou


def mean_average_precision(pred_boxes: Sequence[np.ndarray], pred_scores: Sequence[np.ndarray],
                           pred_labels: Sequence[np.ndarray], gt_boxes: Sequence[np.ndarray],
                           gt_labels: Sequence[np.ndarray], gt_difficult: Sequence[np.ndarray] | None,
                           num_classes: int, iou: float = 0.5) -> tuple[float, dict[int, float]]:
    """(mAP, {label: AP}) over object labels 1..num_classes-1 (num_classes counts the background).

    Each argument is a list with one array per image. Labels absent from the ground truth (or only
    present as difficult) are not in the dict and not in the mean; mAP is NaN when no label has any.
    """
    n = len(gt_boxes)
    if not (len(pred_boxes) == len(pred_scores) == len(pred_labels) == len(gt_labels) == n):
        raise ValueError("predictions and ground truth must have one entry per image, all of the same length")
    if gt_difficult is None:
        gt_difficult = [np.zeros(len(np.asarray(lab).reshape(-1)), dtype=bool) for lab in gt_labels]
    per_class: dict[int, float] = {}
    for label in range(1, num_classes):
        ap = _class_ap(label, pred_boxes, pred_scores, pred_labels, gt_boxes, gt_labels, gt_difficult, iou)
        if not np.isnan(ap):
            per_class[label] = ap
    mean = float(np.mean(list(per_class.values()))) if per_class else float("nan")
    return mean, per_class


def _class_ap(label, pred_boxes, pred_scores, pred_labels, gt_boxes, gt_labels, gt_difficult, iou) -> float:
    gts, diffs = [], []
    for b, lab, d in zip(gt_boxes, gt_labels, gt_difficult):
        keep = np.asarray(lab).reshape(-1) == label
        gts.append(np.asarray(b, dtype=np.float64).reshape(-1, 4)[keep])
        diffs.append(np.asarray(d, dtype=bool).reshape(-1)[keep])
    num_gt = int(sum((~d).sum() for d in diffs))
    if num_gt == 0:
        return float("nan")
    boxes, scores, image_of = [], [], []
    for i, (b, s, lab) in enumerate(zip(pred_boxes, pred_scores, pred_labels)):
        keep = np.asarray(lab).reshape(-1) == label
        boxes.append(np.asarray(b, dtype=np.float64).reshape(-1, 4)[keep])
        scores.append(np.asarray(s, dtype=np.float64).reshape(-1)[keep])
        image_of.append(np.full(int(keep.sum()), i))
    tp, fp = match_detections(np.concatenate(scores), np.concatenate(image_of).astype(int),
                              np.concatenate(boxes), gts, diffs, iou)
    return average_precision(tp, fp, num_gt)
