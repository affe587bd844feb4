"""The sample detection data set, generated reproducibly on demand (nothing is downloaded).

``counting``: 128x128 RGB scenes with 1-6 objects each, three classes, in the spirit of the
head-counting set the cluster-pruning paper used for SSD:

- ``head``: a skin-toned face ellipse under a darker hair cap, with two eyes (upright);
- ``square`` and ``triangle``: filled polygons of a random saturated colour and rotation.

Backgrounds are deliberately cluttered so that detection is not colour thresholding: a two-colour
gradient, low-frequency colour blotches, distractor strokes, plain ellipses of any colour (a
skin-coloured blob without hair is *not* a head) and pixel noise. Objects span about 13-44 px
(0.1-0.34 of the side), never overlap by more than IoU 0.1, and lie fully inside the image.

Everything is drawn with numpy (anti-aliased by 4x supersampling) from ``numpy.random.default_rng``
seeded per split with ``(seed, split)``, so the same seed always gives the same bytes and the val
set does not change when the train set grows. Boxes are normalised x1y1x2y2, labels 1-based into
the sorted class names, as everywhere in ``core.tasks.detection``.
"""
from __future__ import annotations

import colorsys
import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ...errors import DataError
from .data import DetectionData, DetectionReport, DetectionSet, write_voc_zip

SIZE = 128
DATA_SEED = 0
_SS = 4  # supersampling factor of the rasteriser
_C = (np.arange(SIZE * _SS, dtype=np.float64) + 0.5) / _SS  # sample coordinates in pixel units
_PY, _PX = np.meshgrid(_C, _C, indexing="ij")


@dataclass(frozen=True)
class SampleDetectionInfo:
    name: str
    description: str
    class_names: tuple[str, ...]
    n_train: int
    n_val: int
    size: int = SIZE


SAMPLE_DETECTION_SETS = {
    "counting": SampleDetectionInfo(
        "counting",
        "Generated counting scenes, 128x128 RGB, 1-6 objects per image: heads (skin ellipse with hair cap and eyes), "
        "squares and triangles of random colour and rotation, on cluttered backgrounds (gradients, blotches, strokes, "
        "plain ellipses as distractors, noise). 2000 train / 300 val images.",
        ("head", "square", "triangle"),
        n_train=2000,
        n_val=300,
    ),
}
_MODEL_TO_SET = {"ssd_counting": "counting"}  # fallback while detection_manifest.json is being written


# ----------------------------------------------------------------------------- public API


def load_sample_detection(name: str = "counting", input_size: tuple[int, int] | int | None = None,
                          seed: int = DATA_SEED) -> DetectionData:
    """The sample as ``DetectionData`` (its fixed train/val split), resized to ``input_size`` (H, W) if given."""
    info = SAMPLE_DETECTION_SETS[detection_set_name(name)]
    if input_size is None:
        input_size = SIZE
    size = (input_size, input_size) if isinstance(input_size, int) else tuple(input_size)
    splits = [_as_set(*_generate_cached(info.name, seed, split, n), info, size)
              for split, n in (("train", info.n_train), ("val", info.n_val))]
    report = DetectionReport(split=f"generated: {info.n_train} train / {info.n_val} val, seed {seed}")
    report.num_images = info.n_train + info.n_val
    report.num_objects = splits[0].num_objects + splits[1].num_objects
    labels = np.concatenate([*splits[0].labels, *splits[1].labels])
    counts = np.bincount(labels, minlength=len(info.class_names) + 1)[1:]
    report.class_counts = {c: int(n) for c, n in zip(info.class_names, counts)}
    return DetectionData(splits[0], splits[1], list(info.class_names), report, size, f"sample:{name}")


def make_sample_scenes(name: str = "counting", split: str = "train", n: int | None = None,
                       seed: int = DATA_SEED) -> tuple[np.ndarray, list[np.ndarray], list[np.ndarray]]:
    """(uint8 images [n, 128, 128, 3], boxes per image, labels per image) of one split, as generated."""
    info = SAMPLE_DETECTION_SETS[detection_set_name(name)]
    n = n if n is not None else (info.n_train if split == "train" else info.n_val)
    images, boxes, labels = _generate_cached(info.name, seed, split, n)
    return images.copy(), [b.copy() for b in boxes], [lab.copy() for lab in labels]


def write_sample_voc_zip(name: str, path: str | Path, image_format: str = "jpg", seed: int = DATA_SEED) -> Path:
    """The sample as a VOC zip (``ImageSets/Main/{train,val}.txt`` keep its split), the form a user uploads."""
    info = SAMPLE_DETECTION_SETS[detection_set_name(name)]
    images, boxes, labels, ids, splits = [], [], [], [], {}
    for split, n in (("train", info.n_train), ("val", info.n_val)):
        imgs, bxs, labs = _generate_cached(info.name, seed, split, n)
        split_ids = [f"{split}_{i:05d}" for i in range(n)]
        images += list(imgs)
        boxes += bxs
        labels += labs
        ids += split_ids
        splits[split] = split_ids
    return write_voc_zip(path, images, boxes, labels, list(info.class_names), ids=ids, splits=splits,
                         image_format=image_format)


def detection_set_name(name: str) -> str:
    """The sample set behind ``name``: a set name, or a sample detector's name from its manifest."""
    if name in SAMPLE_DETECTION_SETS:
        return name
    try:
        from .sample_model import detector_entry

        ds = detector_entry(name).get("dataset")
        if ds in SAMPLE_DETECTION_SETS:
            return ds
    except Exception:  # no manifest yet, or no such model: fall through to the fixed table
        pass
    if name in _MODEL_TO_SET:
        return _MODEL_TO_SET[name]
    raise DataError(f"No sample detection data set named '{name}'. Available: {', '.join(SAMPLE_DETECTION_SETS)}.")


def _as_set(images: np.ndarray, boxes, labels, info: SampleDetectionInfo, size: tuple[int, int]) -> DetectionSet:
    if size != (SIZE, SIZE):
        h, w = size
        images = np.stack([np.asarray(Image.fromarray(a, "RGB").resize((w, h), Image.BILINEAR)) for a in images])
    chw = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))
    difficult = [np.zeros(len(lab), dtype=bool) for lab in labels]
    return DetectionSet(chw, [b.copy() for b in boxes], [lab.copy() for lab in labels], difficult,
                        list(info.class_names), [f"{i:05d}" for i in range(len(images))])


# ----------------------------------------------------------------------------- generation


@functools.lru_cache(maxsize=4)
def _generate_cached(name: str, seed: int, split: str, n: int):
    images, boxes, labels = _generate(name, seed, split, n)
    images.setflags(write=False)
    return images, tuple(boxes), tuple(labels)


def _generate(name: str, seed: int, split: str, n: int) -> tuple[np.ndarray, list[np.ndarray], list[np.ndarray]]:
    if name != "counting":
        raise DataError(f"No sample detection data set named '{name}'.")
    rng = np.random.default_rng([seed, {"train": 0, "val": 1}[split]])
    images = np.empty((n, SIZE, SIZE, 3), dtype=np.uint8)
    boxes, labels = [], []
    for i in range(n):
        images[i], b, lab = _scene(rng)
        boxes.append(b)
        labels.append(lab)
    return images, boxes, labels


def _scene(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    img = _background(rng)
    placed: list[np.ndarray] = []
    labels: list[int] = []
    for _ in range(rng.integers(1, 7)):
        label = int(rng.integers(1, 4))  # 1 head, 2 square, 3 triangle
        r, rot = rng.uniform(7.0, 22.0), rng.uniform(0, 2 * np.pi)
        ext = _extent(label, r, rot)
        for _attempt in range(20):
            cx = rng.uniform(1 - ext[0], SIZE - 1 - ext[2])
            cy = rng.uniform(1 - ext[1], SIZE - 1 - ext[3])
            box = ext + np.array([cx, cy, cx, cy])
            if all(_iou(box, p) <= 0.1 for p in placed):
                img = _draw_object(img, label, cx, cy, r, rot, rng)
                placed.append(box)
                labels.append(label)
                break
    img = img * 255.0 + rng.normal(0, rng.uniform(2, 8), img.shape)
    boxes = np.clip(np.asarray(placed, dtype=np.float64) / SIZE, 0, 1).astype(np.float32).reshape(-1, 4)
    return np.clip(np.round(img), 0, 255).astype(np.uint8), boxes, np.asarray(labels, dtype=np.int64)


def _hsv(h: float, s: float, v: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(h % 1.0, s, v))


def _background(rng: np.random.Generator) -> np.ndarray:
    """Gradient + colour blotches + strokes + plain ellipses: clutter with edges, colours and blobs."""
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float64) / (SIZE - 1)
    c0 = _hsv(rng.random(), rng.uniform(0.0, 0.5), rng.uniform(0.15, 0.7))
    c1 = _hsv(rng.random(), rng.uniform(0.0, 0.5), rng.uniform(0.15, 0.7))
    ang = rng.uniform(0, 2 * np.pi)
    g = np.cos(ang) * xx + np.sin(ang) * yy
    g = ((g - g.min()) / max(g.max() - g.min(), 1e-9))[..., None]
    img = c0 * (1 - g) + c1 * g  # a new array: painting below is in place
    blotch = rng.uniform(-0.15, 0.15, (6, 6, 3))
    img = img + np.asarray(Image.fromarray(((blotch + 0.5) * 255).astype(np.uint8), "RGB")
                           .resize((SIZE, SIZE), Image.BICUBIC), dtype=np.float64) / 255.0 - 0.5
    for _ in range(rng.integers(3, 10)):
        x0, y0 = rng.uniform(0, SIZE, 2)
        length, a = rng.uniform(10, 70), rng.uniform(0, 2 * np.pi)
        cov = _segment(x0, y0, x0 + length * np.cos(a), y0 + length * np.sin(a), rng.uniform(0.8, 3.0))
        img = _paint(img, cov, _hsv(rng.random(), rng.uniform(0.0, 1.0), rng.uniform(0.1, 1.0)), rng.uniform(0.5, 0.9))
    for _ in range(rng.integers(0, 4)):
        rx, ry = rng.uniform(3, 12, 2)
        cx, cy = rng.uniform(0, SIZE, 2)
        cov = _ellipse(cx, cy, rx, ry)
        img = _paint(img, cov, _hsv(rng.random(), rng.uniform(0.2, 0.8), rng.uniform(0.3, 1.0)), 1.0)
    return np.clip(img, 0, 1)


def _paint(img: np.ndarray, cov: "_Coverage", colour: np.ndarray, alpha: float) -> np.ndarray:
    """Blend ``colour`` over ``img`` (in place, within the coverage window only: scenes are many)."""
    win, c = cov
    if c is not None:
        a = c[..., None] * alpha
        img[win] = img[win] * (1 - a) + colour * a
    return img


def _extent(label: int, r: float, rot: float) -> np.ndarray:
    """Tight box of the object relative to its centre (dx1, dy1, dx2, dy2), exactly what ``_draw_object`` paints."""
    if label == 1:
        rx, ry = _head_radii(r)
        return np.array([-rx, -ry, rx, ry])
    verts = _regular(0.0, 0.0, r, _SIDES[label], rot)
    return np.concatenate([verts.min(0), verts.max(0)])


_SIDES = {2: 4, 3: 3}


def _head_radii(r: float) -> tuple[float, float]:
    return 0.8 * r, r  # the hair ellipse: heads are taller than wide


def _draw_object(img: np.ndarray, label: int, cx: float, cy: float, r: float, rot: float,
                 rng: np.random.Generator) -> np.ndarray:
    if label == 1:
        return _draw_head(img, cx, cy, r, rng)
    colour = _hsv(rng.random(), rng.uniform(0.55, 1.0), rng.uniform(0.55, 1.0))
    verts = _regular(cx, cy, r, _SIDES[label], rot)
    cov = _coverage(lambda px, py: _convex(verts, px, py), *verts.min(0), *verts.max(0))
    return _paint(img, cov, colour, 1.0)


def _draw_head(img: np.ndarray, cx: float, cy: float, r: float, rng: np.random.Generator) -> np.ndarray:
    rx, ry = _head_radii(r)
    hair = _hsv(rng.uniform(0.02, 0.12), rng.uniform(0.2, 0.8), rng.uniform(0.05, 0.35))
    skin = _hsv(rng.uniform(0.02, 0.11), rng.uniform(0.25, 0.6), rng.uniform(0.5, 0.95))
    img = _paint(img, _ellipse(cx, cy, rx, ry), hair, 1.0)
    fy = cy + 0.15 * ry
    img = _paint(img, _ellipse(cx, fy, 0.86 * rx, 0.84 * ry), skin, 1.0)
    eye = max(0.09 * rx, 0.6)
    for side in (-1, 1):
        img = _paint(img, _ellipse(cx + side * 0.35 * rx, fy - 0.1 * ry, eye, eye), hair * 0.5, 1.0)
    return img


# ----------------------------------------------------------------------------- rasteriser


_Coverage = tuple  # (window slices (rows, cols), per-pixel coverage 0..1 in that window, or None when empty)


def _coverage(mask_fn, x_min: float, y_min: float, x_max: float, y_max: float) -> _Coverage:
    """Per-pixel coverage 0..1 of ``mask_fn(px, py)``, sampled only inside its bounding box."""
    x0, x1 = max(int(np.floor(x_min)) - 1, 0), min(int(np.ceil(x_max)) + 1, SIZE)
    y0, y1 = max(int(np.floor(y_min)) - 1, 0), min(int(np.ceil(y_max)) + 1, SIZE)
    if x1 <= x0 or y1 <= y0:
        return (slice(0, 0), slice(0, 0)), None
    mask = mask_fn(_PX[y0 * _SS:y1 * _SS, x0 * _SS:x1 * _SS], _PY[y0 * _SS:y1 * _SS, x0 * _SS:x1 * _SS])
    cov = mask.reshape(y1 - y0, _SS, x1 - x0, _SS).sum(axis=(1, 3), dtype=np.int32) / (_SS * _SS)
    return (slice(y0, y1), slice(x0, x1)), cov


def _ellipse(cx: float, cy: float, rx: float, ry: float) -> _Coverage:
    return _coverage(lambda px, py: ((px - cx) / rx) ** 2 + ((py - cy) / ry) ** 2 <= 1.0,
                     cx - rx, cy - ry, cx + rx, cy + ry)


def _segment(x0: float, y0: float, x1: float, y1: float, width: float) -> _Coverage:
    dx, dy, h = x1 - x0, y1 - y0, width / 2

    def fn(px, py):
        t = np.clip(((px - x0) * dx + (py - y0) * dy) / max(dx * dx + dy * dy, 1e-9), 0.0, 1.0)
        return (px - x0 - t * dx) ** 2 + (py - y0 - t * dy) ** 2 <= h * h

    return _coverage(fn, min(x0, x1) - h, min(y0, y1) - h, max(x0, x1) + h, max(y0, y1) + h)


def _regular(cx: float, cy: float, r: float, n: int, rot: float) -> np.ndarray:
    a = rot + np.arange(n) * 2 * np.pi / n
    return np.stack([cx + r * np.cos(a), cy + r * np.sin(a)], axis=1)


def _convex(vertices: np.ndarray, px: np.ndarray, py: np.ndarray) -> np.ndarray:
    """Inside test of a convex polygon (vertices counter-clockwise in (x, y))."""
    inside = np.ones(px.shape, dtype=bool)
    for (x0, y0), (x1, y1) in zip(vertices, np.roll(vertices, -1, axis=0)):
        inside &= (x1 - x0) * (py - y0) - (y1 - y0) * (px - x0) >= 0
    return inside


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)
