"""VOC mAP@0.5: hand-computed cases and a brute-force reimplementation of the devkit."""
from __future__ import annotations

import numpy as np
import pytest

from core.tasks.detection.metrics import iou_matrix, mean_average_precision

A = [0.1, 0.1, 0.3, 0.3]
B = [0.5, 0.5, 0.7, 0.7]
C = [0.1, 0.6, 0.3, 0.8]
FAR = [0.8, 0.0, 0.9, 0.1]  # overlaps nothing above


def _arr(boxes):
    return np.asarray(boxes, dtype=np.float32).reshape(-1, 4)


def _map(preds, gts, num_classes=2, difficult=None):
    """preds: per image list of (box, score, label); gts: per image list of (box, label)."""
    pb = [_arr([p[0] for p in img]) for img in preds]
    ps = [np.asarray([p[1] for p in img], dtype=np.float32) for img in preds]
    pl = [np.asarray([p[2] for p in img], dtype=np.int64) for img in preds]
    gb = [_arr([g[0] for g in img]) for img in gts]
    gl = [np.asarray([g[1] for g in img], dtype=np.int64) for img in gts]
    gd = difficult or [np.zeros(len(img), dtype=bool) for img in gts]
    return mean_average_precision(pb, ps, pl, gb, gl, gd, num_classes)


def test_perfect_predictions_give_one():
    gts = [[(A, 1), (B, 2)], [(C, 1)]]
    preds = [[(A, 0.9, 1), (B, 0.8, 2)], [(C, 0.7, 1)]]
    m, per_class = _map(preds, gts, num_classes=3)
    assert m == pytest.approx(1.0)
    assert per_class == {1: pytest.approx(1.0), 2: pytest.approx(1.0)}


def test_false_positives_ranked_above_true_positives_exact_ap():
    # 3 ground-truth boxes of class 1 (A, B in image 0; C in image 1). Ranked detections:
    #   rank 1: A   0.95  TP  -> precision 1/1, recall 1/3
    #   rank 2: FAR 0.90  FP  -> precision 1/2, recall 1/3
    #   rank 3: FAR 0.85  FP  -> precision 1/3, recall 1/3
    #   rank 4: C   0.80  TP  -> precision 2/4, recall 2/3
    #   B is never detected   -> recall stops at 2/3
    # Envelope: p(r<=1/3) = 1, p(1/3<r<=2/3) = 1/2, p(r>2/3) = 0.
    # AP = 1/3 * 1 + 1/3 * 1/2 + 1/3 * 0 = 1/2.
    gts = [[(A, 1), (B, 1)], [(C, 1)]]
    preds = [[(A, 0.95, 1), (FAR, 0.90, 1)], [(FAR, 0.85, 1), (C, 0.80, 1)]]
    m, per_class = _map(preds, gts)
    assert per_class[1] == pytest.approx(0.5)
    assert m == pytest.approx(0.5)


def test_one_fp_above_one_tp():
    # 1 GT. FP at 0.9 (precision 0, recall 0), then TP at 0.8 (precision 1/2, recall 1).
    # AP = 1 * 1/2 = 0.5: the false positive ranked above halves the precision at full recall.
    m, _ = _map([[(FAR, 0.9, 1), (A, 0.8, 1)]], [[(A, 1)]])
    assert m == pytest.approx(0.5)


def test_duplicates_count_as_false_positives():
    # GT A and B. Detections: A 0.9 (TP: p 1, r 1/2), A again 0.8 (duplicate -> FP: p 1/2, r 1/2),
    # B 0.7 (TP: p 2/3, r 1). AP = 1/2 * 1 + 1/2 * 2/3 = 5/6. Were the duplicate ignored, AP would be 1.
    shifted = [0.11, 0.1, 0.31, 0.3]  # IoU with A is 0.82: still matches A, which is taken
    m, _ = _map([[(A, 0.9, 1), (shifted, 0.8, 1), (B, 0.7, 1)]], [[(A, 1), (B, 1)]])
    assert m == pytest.approx(5 / 6)


def test_difficult_ground_truth_is_neither_tp_nor_fp_nor_missed():
    # GT: A (normal), B (difficult). A detection of B at 0.9 is ignored (not FP), and not detecting B
    # would not lower recall either. Only A counts: TP at rank 2 with precision 1/1 -> AP 1.
    gts = [[(A, 1), (B, 1)]]
    difficult = [np.array([False, True])]
    m, _ = _map([[(B, 0.9, 1), (A, 0.8, 1)]], gts, difficult=difficult)
    assert m == pytest.approx(1.0)
    m, _ = _map([[(A, 0.8, 1)]], gts, difficult=difficult)
    assert m == pytest.approx(1.0)
    # Without the difficult flag the same detections give: B TP, A TP -> 1.0 and A alone -> recall 1/2 -> 0.5.
    m, _ = _map([[(A, 0.8, 1)]], gts)
    assert m == pytest.approx(0.5)


def test_class_without_ground_truth_is_left_out_of_the_mean():
    # Class 2 has only false positives but no ground truth: it has no AP and does not drag the mean to 0.5.
    m, per_class = _map([[(A, 0.9, 1), (B, 0.8, 2)]], [[(A, 1)]], num_classes=3)
    assert per_class == {1: pytest.approx(1.0)}
    assert m == pytest.approx(1.0)


def test_wrong_label_is_a_false_positive_of_its_own_class_and_a_miss_of_the_true_one():
    m, per_class = _map([[(A, 0.9, 2)]], [[(A, 1), (B, 2)]], num_classes=3)
    assert per_class == {1: 0.0, 2: 0.0}
    assert m == 0.0


def test_iou_threshold_is_strict_as_in_the_devkit():
    gt = [0.0, 0.0, 0.5, 0.5]
    half = [0.0, 0.0, 0.5, 0.25]  # IoU exactly 0.125 / 0.25 = 0.5: not > 0.5, so a miss
    assert iou_matrix(_arr(half), _arr(gt))[0, 0] == 0.5
    m, _ = _map([[(half, 0.9, 1)]], [[(gt, 1)]])
    assert m == 0.0
    slightly_more = [0.0, 0.0, 0.5, 0.26]
    m, _ = _map([[(slightly_more, 0.9, 1)]], [[(gt, 1)]])
    assert m == pytest.approx(1.0)


def test_no_ground_truth_at_all_gives_nan():
    m, per_class = _map([[(A, 0.9, 1)]], [[]])
    assert np.isnan(m) and per_class == {}


def test_mismatched_lengths_raise():
    with pytest.raises(ValueError, match="one entry per image"):
        mean_average_precision([_arr([A])], [np.ones(1)], [np.ones(1, np.int64)], [], [], None, 2)


# ----------------------------------------------------------------------------- brute force


def _devkit_ap(preds, gts, gt_diff, label, thr=0.5):
    """A literal port of the VOC devkit's voc_eval loop, and AP as a sum over true positives of the
    best precision at that rank or later (equal to the all-point envelope, computed differently)."""
    dets = [(s, i, b) for i, (bs, ss, ls) in enumerate(preds) for b, s, lab in zip(bs, ss, ls) if lab == label]
    dets.sort(key=lambda d: -d[0])  # Python's sort is stable, as the metric's
    gt = [[(b, d) for b, lab, d in zip(gb, gl, gd) if lab == label] for (gb, gl), gd in zip(gts, gt_diff)]
    npos = sum(1 for img in gt for _, d in img if not d)
    used = [[False] * len(img) for img in gt]
    flags = []
    for _, i, box in dets:
        ovmax, jmax = -1.0, -1
        for j, (g, _) in enumerate(gt[i]):
            iw = min(box[2], g[2]) - max(box[0], g[0])
            ih = min(box[3], g[3]) - max(box[1], g[1])
            if iw > 0 and ih > 0:
                inter = iw * ih
                uni = (box[2] - box[0]) * (box[3] - box[1]) + (g[2] - g[0]) * (g[3] - g[1]) - inter
                if inter / uni > ovmax:
                    ovmax, jmax = inter / uni, j
        if ovmax > thr:
            if gt[i][jmax][1]:
                flags.append(None)
            elif not used[i][jmax]:
                used[i][jmax] = True
                flags.append(True)
            else:
                flags.append(False)
        else:
            flags.append(False)
    if npos == 0:
        return None
    precisions, tp, fp = [], 0, 0
    for f in flags:
        tp += f is True
        fp += f is False
        precisions.append(tp / (tp + fp) if tp + fp else 0.0)
    return sum(max(precisions[k:]) / npos for k, f in enumerate(flags) if f is True)


@pytest.mark.parametrize("seed", range(6))
def test_matches_a_brute_force_devkit_port(seed):
    rng = np.random.default_rng(seed)
    num_classes = 4
    preds, gts, diffs = [], [], []
    for _ in range(12):
        k = rng.integers(0, 6)
        xy = rng.uniform(0, 0.7, (k, 2))
        gb = np.concatenate([xy, xy + rng.uniform(0.05, 0.3, (k, 2))], 1).astype(np.float64)
        gl = rng.integers(1, num_classes, k)
        gd = rng.random(k) < 0.2
        # detections: jittered copies of GT (some duplicated, some mislabelled) and random boxes
        src = rng.integers(0, max(k, 1), rng.integers(0, 2 * k + 1)) if k else np.zeros(0, int)
        jb = gb[src] + rng.normal(0, 0.03, (len(src), 4)) if k else np.zeros((0, 4))
        jl = np.where(rng.random(len(src)) < 0.85, gl[src] if k else 0, rng.integers(1, num_classes, len(src)))
        r = rng.integers(0, 4)
        rxy = rng.uniform(0, 0.7, (r, 2))
        rb = np.concatenate([rxy, rxy + rng.uniform(0.05, 0.3, (r, 2))], 1)
        pb = np.concatenate([jb, rb])
        pl = np.concatenate([jl, rng.integers(1, num_classes, r)]).astype(np.int64)
        ps = rng.random(len(pb))
        preds.append((pb, ps, pl))
        gts.append((gb, gl))
        diffs.append(gd)
    m, per_class = mean_average_precision([p[0] for p in preds], [p[1] for p in preds], [p[2] for p in preds],
                                          [g[0] for g in gts], [g[1] for g in gts], diffs, num_classes)
    expected = {c: _devkit_ap(preds, gts, diffs, c) for c in range(1, num_classes)}
    expected = {c: v for c, v in expected.items() if v is not None}
    assert set(per_class) == set(expected)
    for c in expected:
        assert per_class[c] == pytest.approx(expected[c], abs=1e-12)
    assert m == pytest.approx(np.mean(list(expected.values())), abs=1e-12)
    assert 0 < m < 1, "the random case should be neither trivial nor hopeless"
