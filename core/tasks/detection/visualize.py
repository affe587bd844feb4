"""Pictures of detections: boxes drawn on images (PIL), and the per-group detection CAR chart.

No Streamlit here: the pages call these and show the result.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw

from .evaluate import EvalSettings, detect, predict_raw

GROUND_TRUTH = (40, 200, 60)
PREDICTED = (230, 50, 50)


def to_pil(image_u8) -> Image.Image:
    """A uint8 [3, H, W] tensor / array as an RGB PIL image."""
    arr = image_u8.numpy() if hasattr(image_u8, "numpy") else np.asarray(image_u8)
    return Image.fromarray(np.ascontiguousarray(arr[:3].transpose(1, 2, 0)).astype(np.uint8), "RGB")


def draw_boxes(image, boxes: np.ndarray, labels: Sequence[int], scores: Sequence[float] | None = None,
               class_names: Sequence[str] = (), colour=PREDICTED, scale: int = 2, base: Image.Image | None = None
               ) -> Image.Image:
    """Boxes (normalised x1y1x2y2, labels 1-based into ``class_names``) drawn on ``image`` (uint8 [3, H, W]),
    enlarged ``scale`` times so the labels stay readable; ``base`` draws onto an image already drawn on."""
    img = base if base is not None else to_pil(image)
    if base is None and scale != 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    draw = ImageDraw.Draw(img)
    w, h = img.size
    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    for i, (box, label) in enumerate(zip(boxes, labels)):
        x1, y1, x2, y2 = (float(np.clip(v, 0, 1)) for v in box)
        draw.rectangle([x1 * w, y1 * h, x2 * w, y2 * h], outline=tuple(colour), width=2)
        name = class_names[int(label) - 1] if 0 < int(label) <= len(class_names) else str(int(label))
        text = name if scores is None else f"{name} {float(scores[i]):.2f}"
        tx, ty = x1 * w + 2, max(y1 * h - 11, 0)
        draw.rectangle([tx - 1, ty, tx + 6 * len(text) + 1, ty + 10], fill=tuple(colour))
        draw.text((tx, ty - 1), text, fill=(255, 255, 255))
    return img


def ground_truth_and_predictions(image, gt_boxes, gt_labels, det, class_names: Sequence[str],
                                 min_score: float = 0.3, scale: int = 2) -> Image.Image:
    """One image with its ground truth (green) and the detections scoring at least ``min_score`` (red)."""
    img = draw_boxes(image, gt_boxes, gt_labels, None, class_names, GROUND_TRUTH, scale)
    keep = np.asarray(det.scores) >= min_score
    return draw_boxes(image, np.asarray(det.boxes)[keep], np.asarray(det.labels)[keep], np.asarray(det.scores)[keep],
                      class_names, PREDICTED, scale, base=img)


def detection_images(model, dset, mean, std, indices: Sequence[int], min_score: float = 0.3,
                     scale: int = 2) -> list[Image.Image]:
    """The images ``indices`` of ``dset`` with ground truth and ``model``'s detections drawn."""
    sub = dset.subset(list(indices))
    raw = predict_raw(model, sub.images, mean, std)
    dets = detect(raw, model.anchors(tuple(sub.images.shape[-2:])), EvalSettings(), model.box_coder_weights)
    return [ground_truth_and_predictions(sub.images[i], sub.boxes[i], sub.labels[i], dets[i], dset.class_names,
                                         min_score, scale) for i in range(len(sub))]


def fig_group_car(car, sort: bool = True):
    """Bars: mAP points lost per filter of one group (a ``core.tasks.detection.analysis.GroupCar``)."""
    import plotly.graph_objects as go

    points = [c * 100 for c in car.car]
    order = sorted(range(len(points)), key=lambda i: points[i]) if sort else list(range(len(points)))
    fig = go.Figure(go.Bar(x=[str(i) for i in order], y=[points[i] for i in order], marker_color="#1f77b4",
                           hovertemplate="filter %{x}: %{y:.3f} mAP points<extra></extra>"))
    fig.update_layout(title=f"Detection CAR of {car.root} ({car.n_images} images)", xaxis_title="Filter",
                      yaxis_title="mAP@0.5 drop (points)", height=340, margin={"t": 50, "b": 40})
    fig.update_xaxes(type="category", showticklabels=len(points) <= 64)
    return fig
