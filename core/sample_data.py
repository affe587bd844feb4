"""The data sets of the bundled sample models, generated reproducibly on demand (nothing is downloaded).

- ``digits``: scikit-learn's handwritten digits (1797 real 8x8 grey scans, classes "0".."9"),
  upscaled bilinearly to 32x32 and replicated to RGB.
- ``cifar10``: 2,000 real CIFAR-10 images (200 per class, 32x32 JPEG; Krizhevsky, 2009), a fixed
  subset of the 5,000 images held out from training the bundled ResNet-20, shipped as
  ``sample_models/cifar10_sample.zip`` (written by ``sample_models/train_cifar.py --write-sample``).
- ``shapes``: a generated colour-and-shape set, 32x32 RGB, 8 classes of 600 images. Four classes
  are circles told apart *only by colour* (blue/green/red/yellow_circle); four are shapes of a
  random colour (cross, square, star, triangle). Every image has a random position, size and
  rotation, a noisy two-colour gradient background and random distractor strokes behind the object.
  It is drawn with numpy only (anti-aliased by supersampling) from one ``numpy.random.default_rng(seed)``,
  so the same seed gives the same bytes.

Images are ordered class by class, and class names are sorted, exactly as ``core.data.load_dataset``
orders an ImageFolder: the zip written by :func:`write_imagefolder_zip` loads back to the same
arrays, the same labels and therefore the same train/val split.

Test images (issue 14) must be unseen by the bundled model, and the selection (val) images stay the
ones the manifest accuracy was measured on, so each sample takes its test images where it has unseen
ones (``SampleDatasetInfo.test_from``):

- ``cifar10``: every image is held out from the ResNet-20's training, so the test images come from the
  non-selection pool, as for an unsplit upload (:func:`core.data.three_way_split`: 400 of the 1,600;
  the pruning loop then fine-tunes on the other 1,200).
- ``shapes``: the generator makes unseen images of the same distribution: ``test_fraction`` x 4,800
  (960) newly generated with data seed ``DATA_SEED + 1``; train and selection are unchanged.
- ``digits``: every image outside the selection split trained ``vgg_digits``, and there are no others
  (1,797 scans in all), so there is no test split by default; an explicit ``test_fraction`` splits the
  selection images (:func:`core.data.held_out_split`), which changes the selection figures.

``seed`` of :func:`load_sample_dataset` is the *split* seed (as for an uploaded data set); the images
themselves are always generated with ``data_seed`` (0, the seed the bundled samples were trained on),
so that the default split is the one their manifest accuracy was measured on.
"""
from __future__ import annotations

import colorsys
import functools
import io
import zipfile
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .data import (UNSPLIT_TEST_FRACTION, DataReport, DataSet, ImageSet, SplitSettings, empty_like, held_out_split,
                   image_to_array, three_way_split)
from .errors import DataError, PruneScopeError
from .models import InputSpec
from .preprocess import size_is_open

SIZE = 32  # native side of every sample image
DATA_SEED = 0  # seed the bundled sample models were trained with


@dataclass(frozen=True)
class SampleDatasetInfo:
    name: str
    description: str
    class_names: tuple[str, ...]
    size: int = SIZE
    test_from: str = "pool"  # pool | generated | selection: where unseen test images come from (module docstring)
    test_fraction: float = UNSPLIT_TEST_FRACTION  # default share (of all images; of the selection for 'selection')


SHAPE_COLOURS = {"blue_circle": 2 / 3, "green_circle": 1 / 3, "red_circle": 0.0, "yellow_circle": 1 / 6}
"""Hue (0..1, HSV) of each colour-defined class; these classes differ in nothing but this hue."""
SHAPE_FORMS = ("cross", "square", "star", "triangle")
"""Shape-defined classes; their colour is random (any hue), so only the form tells them apart."""
SHAPES_PER_CLASS = 600

SAMPLE_DATASETS: dict[str, SampleDatasetInfo] = {
    "digits": SampleDatasetInfo(
        "digits",
        "scikit-learn handwritten digits: 1797 real 8x8 grey scans (UCI optdigits test set), 10 classes, "
        "upscaled bilinearly to 32x32 RGB.",
        tuple(str(i) for i in range(10)),
        test_from="selection", test_fraction=0.0,
    ),
    "shapes": SampleDatasetInfo(
        "shapes",
        "Generated colour-and-shape set: 8 classes x 600 images, 32x32 RGB. blue/green/red/yellow_circle differ "
        "only by colour; cross/square/star/triangle have random colours. Random position, size and rotation, "
        "noisy gradient backgrounds with distractor strokes.",
        tuple(sorted(list(SHAPE_COLOURS) + list(SHAPE_FORMS))),
        test_from="generated",
    ),
}
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
CIFAR10_ZIP = Path(__file__).resolve().parent.parent / "sample_models" / "cifar10_sample.zip"
SAMPLE_DATASETS["cifar10"] = SampleDatasetInfo(
    "cifar10",
    "2,000 real CIFAR-10 images (200 per class, 32x32 JPEG), held out from the training of the bundled "
    "CIFAR-10 ResNet-20.",
    CIFAR10_CLASSES,
)
# Fallback when sample_models/manifest.json is absent (e.g. while the samples are being trained).
_MODEL_TO_DATASET = {"vgg_digits": "digits", "resnet_shapes": "shapes", "cifar10": "cifar10"}


# ----------------------------------------------------------------------------- public API


def make_sample_images(name: str, seed: int = DATA_SEED, use_cache: bool = True) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(uint8 images N x 32 x 32 x 3, int64 labels N, class names) of a sample data set, ordered by class."""
    name = dataset_name(name)
    images, labels = (_generate_cached if use_cache else _generate)(name, int(seed))
    return images.copy(), labels.copy(), list(SAMPLE_DATASETS[name].class_names)


def dataset_name(name: str) -> str:
    """The sample data set behind ``name``: a data set name, or a sample model name from the manifest."""
    if name in SAMPLE_DATASETS:
        return name
    try:
        from .models import sample_entry

        ds = sample_entry(name).get("dataset")
        if ds in SAMPLE_DATASETS:
            return ds
    except PruneScopeError:
        pass
    if name in _MODEL_TO_DATASET:
        return _MODEL_TO_DATASET[name]
    raise DataError(
        f"No sample data set named '{name}'. Available: {', '.join(SAMPLE_DATASETS)} "
        f"(or a sample model name such as {', '.join(_MODEL_TO_DATASET)})."
    )


def load_sample_dataset(name: str, spec: InputSpec, val_fraction: float = 0.2, seed: int = 0,
                        data_seed: int = DATA_SEED, test_fraction: float | None = None) -> DataSet:
    """A sample data set at ``spec``'s input size: train and selection (val) by
    ``core.data.stratified_split(labels, val_fraction, seed)``, test as the module docstring says
    (``test_fraction`` None: the sample's default; 0: none).

    With the defaults the selection split is exactly the one the manifest accuracies were measured on.
    """
    ds_name = dataset_name(name)
    info = SAMPLE_DATASETS[ds_name]
    arr, labels, class_names = make_sample_images(ds_name, data_seed)
    notes = []
    if size_is_open(spec):  # a model that does not fix its input size reads the sample at its own size
        spec = replace(spec, height=int(arr.shape[1]), width=int(arr.shape[2]))
        notes.append(f"Input size {spec.height}×{spec.width} taken from the data (the sample's image size).")
    full = _image_set(arr, labels, class_names, spec, [f"{ds_name}/{i}" for i in range(len(labels))])
    split = SplitSettings(val_fraction, seed, test_fraction)
    share = split.test_share(info.test_fraction)
    train, val, test, test_from = _sample_roles(info, full, split, share, data_seed, spec)
    counts = np.bincount(labels, minlength=len(class_names)).tolist()
    report = DataReport(num_classes=len(class_names), class_counts=dict(zip(class_names, counts)), notes=notes)
    record = split.record(f"sample {ds_name}", test_from, share)
    return DataSet(train, val, class_names, spec, report, f"sample:{name}", test=test, split=record)


def _image_set(arr: np.ndarray, labels: np.ndarray, class_names: list[str], spec: InputSpec, ids: list[str]) -> ImageSet:
    """(N, 32, 32, 3) uint8 sample images at ``spec``'s size and colour mode."""
    if (spec.channels, spec.height, spec.width) == (3, arr.shape[1], arr.shape[2]):
        chw = np.ascontiguousarray(arr.transpose(0, 3, 1, 2))
    else:
        chw = np.stack([image_to_array(Image.fromarray(a, "RGB"), spec) for a in arr])
    return ImageSet(torch.from_numpy(chw), torch.from_numpy(np.asarray(labels, dtype=np.int64)), class_names, ids)


def _sample_roles(info: SampleDatasetInfo, full: ImageSet, split: SplitSettings, share: float, data_seed: int,
                  spec: InputSpec) -> tuple[ImageSet, ImageSet, ImageSet, str]:
    """(train, selection, test, where the test images came from) of a sample; see the module docstring."""
    labels = full.labels.numpy()
    if info.test_from == "pool":
        tr, va, te = three_way_split(labels, split.val_fraction, share, split.seed)
        return full.take(tr), full.take(va), full.take(te), "images outside the selection split" if share else "none"
    tr, va, _ = three_way_split(labels, split.val_fraction, 0.0, split.seed)
    train, val = full.take(tr), full.take(va)
    if share <= 0:
        return train, val, empty_like(val), "none"
    if info.test_from == "selection":
        sel, te = held_out_split(val.labels.numpy(), share, split.seed)
        return train, val.take(sel), val.take(te), "selection split (no other unseen images)"
    per_class = max(1, round(share * len(labels) / len(info.class_names)))
    images, test_labels = _generated_test(data_seed + 1, per_class)
    test = _image_set(images.copy(), test_labels.copy(), full.class_names, spec,
                      [f"{info.name}-seed{data_seed + 1}/{i}" for i in range(len(test_labels))])
    return train, val, test, f"newly generated, data seed {data_seed + 1}"


def write_imagefolder_zip(name: str, path: str | Path, seed: int = DATA_SEED) -> Path:
    """Write the data set as an ImageFolder zip (``class_name/00001.png``), the form a user uploads.

    The archive is byte-for-byte reproducible (fixed timestamps, fixed order).
    """
    arr, labels, class_names = make_sample_images(name, seed)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    counters = [0] * len(class_names)
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as zf:  # PNG is compressed already
        for img, lab in zip(arr, labels):
            counters[lab] += 1
            buf = io.BytesIO()
            Image.fromarray(img, "RGB").save(buf, format="PNG")
            info = zipfile.ZipInfo(f"{class_names[lab]}/{counters[lab]:05d}.png", date_time=(2024, 1, 1, 0, 0, 0))
            info.external_attr = 0o644 << 16
            zf.writestr(info, buf.getvalue())
    tmp.replace(path)
    return path


# ----------------------------------------------------------------------------- generation


@functools.lru_cache(maxsize=4)
def _generate_cached(name: str, seed: int) -> tuple[np.ndarray, np.ndarray]:
    images, labels = _generate(name, seed)
    images.setflags(write=False)
    labels.setflags(write=False)
    return images, labels


@functools.lru_cache(maxsize=2)
def _generated_test(seed: int, per_class: int) -> tuple[np.ndarray, np.ndarray]:
    """Shapes images never used to train the bundled model (another data seed): the sample's test images."""
    images, labels, _ = _shapes(seed, per_class)
    images.setflags(write=False)
    labels.setflags(write=False)
    return images, labels


def _generate(name: str, seed: int) -> tuple[np.ndarray, np.ndarray]:
    if name == "digits":
        return _digits()
    if name == "shapes":
        images, labels, _ = _shapes(seed)
        return images, labels
    if name == "cifar10":
        return _cifar10_zip(CIFAR10_ZIP)
    raise DataError(f"No sample data set named '{name}'.")


def _cifar10_zip(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """The bundled CIFAR-10 subset: ``class/NNNN.jpg`` entries, classes and files in sorted order
    (the order ``core.data.load_dataset`` reads the same zip in)."""
    if not path.exists():
        raise DataError(f"The CIFAR-10 sample's images are missing ({path.name}); "
                        "run python sample_models/train_cifar.py --write-sample to write them.")
    index = {c: i for i, c in enumerate(CIFAR10_CLASSES)}
    with zipfile.ZipFile(path) as zf:
        names = sorted((n for n in zf.namelist() if n.lower().endswith(".jpg")),
                       key=lambda n: (index[n.split("/")[-2]], n))
        images = np.stack([np.asarray(Image.open(io.BytesIO(zf.read(n))).convert("RGB")) for n in names])
    labels = np.array([index[n.split("/")[-2]] for n in names], dtype=np.int64)
    return images, labels


def _digits() -> tuple[np.ndarray, np.ndarray]:
    """sklearn digits (no randomness: the seed is irrelevant), stable-sorted by class."""
    from sklearn.datasets import load_digits

    d = load_digits()
    order = np.argsort(d.target, kind="stable")
    grey = np.round(d.images[order] * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    up = np.stack([np.asarray(Image.fromarray(g, "L").resize((SIZE, SIZE), Image.BILINEAR)) for g in grey])
    return np.repeat(up[..., None], 3, axis=3), d.target[order].astype(np.int64)


_SS = 4  # supersampling factor of the rasteriser (anti-aliasing)
_C = (np.arange(SIZE * _SS, dtype=np.float64) + 0.5) / _SS  # sample coordinates in pixel units
_PY, _PX = np.meshgrid(_C, _C, indexing="ij")


def _coverage(mask_fn, x_min: float, x_max: float, y_min: float, y_max: float) -> np.ndarray:
    """Per-pixel coverage 0..1 (SIZE x SIZE) of ``mask_fn(px, py)``, sampled only inside its bounding box."""
    x0, x1 = max(int(np.floor(x_min)) - 1, 0), min(int(np.ceil(x_max)) + 1, SIZE)
    y0, y1 = max(int(np.floor(y_min)) - 1, 0), min(int(np.ceil(y_max)) + 1, SIZE)
    cov = np.zeros((SIZE, SIZE))
    if x1 <= x0 or y1 <= y0:
        return cov
    win = (slice(y0 * _SS, y1 * _SS), slice(x0 * _SS, x1 * _SS))
    mask = mask_fn(_PX[win], _PY[win])
    cov[y0:y1, x0:x1] = mask.reshape(y1 - y0, _SS, x1 - x0, _SS).sum(axis=(1, 3), dtype=np.int32) / (_SS * _SS)
    return cov


def _convex(vertices: np.ndarray, px: np.ndarray, py: np.ndarray) -> np.ndarray:
    """Inside test of a convex polygon (vertices counter-clockwise in (x, y)) at sample points (px, py)."""
    inside = np.ones(px.shape, dtype=bool)
    for (x0, y0), (x1, y1) in zip(vertices, np.roll(vertices, -1, axis=0)):
        inside &= (x1 - x0) * (py - y0) - (y1 - y0) * (px - x0) >= 0
    return inside


def _regular(cx: float, cy: float, r: float, n: int, rot: float) -> np.ndarray:
    a = rot + np.arange(n) * 2 * np.pi / n
    return np.stack([cx + r * np.cos(a), cy + r * np.sin(a)], axis=1)


def _shape_coverage(form: str, cx: float, cy: float, r: float, rot: float) -> np.ndarray:
    """Coverage of one object; ``r`` is its outer radius, ``rot`` its rotation (radians)."""
    if form == "circle":
        rc = 0.8 * r

        def fn(px, py):
            return (px - cx) ** 2 + (py - cy) ** 2 <= rc * rc
    elif form == "square":
        verts = _regular(cx, cy, 0.95 * r, 4, rot)

        def fn(px, py):
            return _convex(verts, px, py)
    elif form == "triangle":
        verts = _regular(cx, cy, r, 3, rot)

        def fn(px, py):
            return _convex(verts, px, py)
    elif form == "cross":
        c, s = np.cos(rot), np.sin(rot)
        arm, half = 0.9 * r, 0.27 * r

        def fn(px, py):
            u = (px - cx) * c + (py - cy) * s
            v = -(px - cx) * s + (py - cy) * c
            return ((np.abs(u) <= arm) & (np.abs(v) <= half)) | ((np.abs(v) <= arm) & (np.abs(u) <= half))
    elif form == "star":
        outer = _regular(cx, cy, r, 5, rot)
        inner = _regular(cx, cy, 0.42 * r, 5, rot + np.pi / 5)

        def fn(px, py):
            mask = _convex(inner, px, py)
            for i in range(5):  # each tip: triangle of the tip and the two inner vertices beside it
                mask |= _convex(np.stack([inner[i - 1], outer[i], inner[i]]), px, py)
            return mask
    else:
        raise ValueError(form)
    return _coverage(fn, cx - r, cx + r, cy - r, cy + r)


def _segment_coverage(x0: float, y0: float, x1: float, y1: float, width: float) -> np.ndarray:
    dx, dy = x1 - x0, y1 - y0
    h = width / 2

    def fn(px, py):
        t = np.clip(((px - x0) * dx + (py - y0) * dy) / max(dx * dx + dy * dy, 1e-9), 0.0, 1.0)
        return (px - x0 - t * dx) ** 2 + (py - y0 - t * dy) ** 2 <= h * h

    return _coverage(fn, min(x0, x1) - h, max(x0, x1) + h, min(y0, y1) - h, max(y0, y1) + h)


def _hsv(h: float, s: float, v: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(h % 1.0, s, v))


def _shapes(seed: int, per_class: int = SHAPES_PER_CLASS) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(images, labels, object coverage masks) of the shapes set; everything from one seeded RNG."""
    rng = np.random.default_rng(seed)
    class_names = SAMPLE_DATASETS["shapes"].class_names
    n = per_class * len(class_names)
    images = np.empty((n, SIZE, SIZE, 3), dtype=np.uint8)
    masks = np.empty((n, SIZE, SIZE), dtype=np.float32)
    labels = np.repeat(np.arange(len(class_names), dtype=np.int64), per_class)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float64) / (SIZE - 1)
    for i, lab in enumerate(labels):
        cls = class_names[lab]
        # background: two muted colours in a linear gradient of random direction
        c0 = _hsv(rng.random(), rng.uniform(0.0, 0.4), rng.uniform(0.08, 0.45))
        c1 = _hsv(rng.random(), rng.uniform(0.0, 0.4), rng.uniform(0.08, 0.45))
        ang = rng.uniform(0, 2 * np.pi)
        g = np.cos(ang) * xx + np.sin(ang) * yy
        g = (g - g.min()) / max(g.max() - g.min(), 1e-9)
        img = c0 * (1 - g[..., None]) + c1 * g[..., None]
        # distractor strokes of any colour, behind the object
        for _ in range(rng.integers(2, 6)):
            x0, y0 = rng.uniform(0, SIZE, 2)
            length, a = rng.uniform(5, 18), rng.uniform(0, 2 * np.pi)
            cov = _segment_coverage(x0, y0, x0 + length * np.cos(a), y0 + length * np.sin(a), rng.uniform(0.7, 1.6))
            col = _hsv(rng.random(), rng.uniform(0.2, 1.0), rng.uniform(0.3, 1.0))
            alpha = cov[..., None] * rng.uniform(0.5, 0.9)
            img = img * (1 - alpha) + col * alpha
        # the object
        r = rng.uniform(7.0, 11.5)
        cx, cy = rng.uniform(r + 0.5, SIZE - r - 0.5, 2)
        rot = rng.uniform(0, 2 * np.pi)
        if cls in SHAPE_COLOURS:
            form = "circle"
            col = _hsv(SHAPE_COLOURS[cls] + rng.normal(0, 0.02), rng.uniform(0.7, 1.0), rng.uniform(0.7, 1.0))
        else:
            form = cls
            col = _hsv(rng.random(), rng.uniform(0.55, 1.0), rng.uniform(0.75, 1.0))
        cov = _shape_coverage(form, cx, cy, r, rot)
        img = img * (1 - cov[..., None]) + col * cov[..., None]
        img = img * 255.0 + rng.normal(0, rng.uniform(3, 10), img.shape)
        images[i] = np.clip(np.round(img), 0, 255).astype(np.uint8)
        masks[i] = cov
    return images, labels, masks
