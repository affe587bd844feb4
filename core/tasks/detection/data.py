"""Object-detection data sets in Pascal VOC layout: safe unpacking, validation report, splits, arrays.

A data set arrives as a zip or a folder holding ``JPEGImages/`` (images) and ``Annotations/`` (one
VOC XML per image, matched by file stem), optionally ``ImageSets/Main/{train,val}.txt``. As for
classification data (``core.data``), whatever could hurt is refused before anything is written (the
same zip checks), and whatever is merely wrong in one file (a missing partner, malformed XML, a
corrupt JPEG, a box outside the image) is skipped or repaired and *listed by file* in the report, so
one bad annotation never costs the user the whole upload.

Output conventions (shared with ``core.tasks.detection.postprocess`` and ``metrics``): images are uint8
``[N, 3, H, W]`` resized to the model input without keeping the aspect ratio (as SSD does); boxes are
float32 ``[k, 4]`` **normalised x1y1x2y2** in [0, 1]; labels are int64 **1-based** indices into
``class_names`` (0 is the detector's background). VOC pixel coordinates are 1-based and inclusive, so
``xmin`` maps to ``(xmin - 1) / width`` and ``xmax`` to ``xmax / width``.
"""
from __future__ import annotations

import io
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence
from xml.etree import ElementTree

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from ...data import (IGNORED_NAMES, IMAGE_EXTENSIONS, Limits, check_split_options, discard_on_refusal, find_dataset_root,
                    materialise)
from ...errors import DataError
from ...models import check_input_size

CLIP_TOLERANCE_PX = 1.0
"""Boxes outside the image by at most this much are clipped silently: exporters disagree on 0- vs 1-based pixels."""
_DANGEROUS_XML = (b"<!doctype", b"<!entity")


@dataclass
class DetectionReport:
    """What validation found, by file; shown in the UI and CLI as it is."""

    num_images: int = 0
    num_objects: int = 0
    class_counts: dict[str, int] = field(default_factory=dict)
    difficult_objects: int = 0
    missing_annotation: list[str] = field(default_factory=list)
    missing_image: list[str] = field(default_factory=list)
    malformed_xml: list[str] = field(default_factory=list)
    corrupt_images: list[str] = field(default_factory=list)
    skipped_files: list[str] = field(default_factory=list)
    clipped_boxes: list[str] = field(default_factory=list)
    rejected_boxes: list[str] = field(default_factory=list)
    unknown_classes: dict[str, int] = field(default_factory=dict)
    images_without_objects: list[str] = field(default_factory=list)
    converted: dict[str, int] = field(default_factory=dict)
    presplit: bool = False
    split: str = ""
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {k: (dict(v) if isinstance(v, dict) else list(v) if isinstance(v, list) else v)
                for k, v in self.__dict__.items()}

    def problem_summary(self, per_kind: int = 3) -> str:
        """The problems found, a few files per kind: the error must say what to fix when no report
        can be shown (the load failed before returning it)."""
        kinds = [("corrupt images", self.corrupt_images), ("malformed XML", self.malformed_xml),
                 ("images without annotation", self.missing_annotation),
                 ("annotations without image", self.missing_image), ("rejected boxes", self.rejected_boxes)]
        parts = [f"{name}: {len(files)} ({', '.join(files[:per_kind])}{', …' if len(files) > per_kind else ''})"
                 for name, files in kinds if files]
        return ("Found " + "; ".join(parts) + ".") if parts else "No image/annotation pair was found."


@dataclass
class DetectionSet:
    """Images at the model's input size with their boxes; one list entry per image."""

    images: torch.Tensor  # uint8 [N, 3, H, W]
    boxes: list[np.ndarray]  # float32 [k, 4], normalised x1y1x2y2
    labels: list[np.ndarray]  # int64 [k], 1-based into class_names
    difficult: list[np.ndarray]  # bool [k]
    class_names: list[str]
    ids: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def num_objects(self) -> int:
        return int(sum(len(b) for b in self.boxes))

    def subset(self, idxs: Sequence[int] | np.ndarray) -> "DetectionSet":
        idxs = np.asarray(idxs, dtype=np.int64).reshape(-1)
        ids = [self.ids[i] for i in idxs] if self.ids else []
        return DetectionSet(self.images[torch.from_numpy(idxs)], [self.boxes[i] for i in idxs],
                            [self.labels[i] for i in idxs], [self.difficult[i] for i in idxs], self.class_names, ids)


@dataclass
class DetectionData:
    train: DetectionSet
    val: DetectionSet
    class_names: list[str]
    report: DetectionReport
    input_size: tuple[int, int] = (0, 0)  # (height, width)
    source: str = ""

    @property
    def num_classes(self) -> int:
        """Object classes plus the background: the detector's ``num_classes``."""
        return len(self.class_names) + 1


@dataclass
class _Object:
    name: str
    box: tuple  # VOC pixel (xmin, ymin, xmax, ymax), 1-based inclusive
    difficult: bool


@dataclass
class _Annotation:
    objects: list[_Object]
    declared_size: tuple[int, int] | None  # (width, height) from <size>, if any


# ----------------------------------------------------------------------------- the entry point


def load_voc_dataset(source: str | Path | bytes, input_size: tuple[int, int] | int,
                     class_names: Sequence[str] | None = None, val_fraction: float = 0.2, seed: int = 0,
                     limits: Limits | None = None) -> DetectionData:
    """Load, validate and split a VOC data set: a zip (path or bytes) or a folder (``sample:NAME``: ``core.sources``).

    ``class_names`` fixes the label order (a trained detector's); objects of other classes are then
    dropped and counted. Without it the classes are the sorted names found in the annotations.
    """
    size = (input_size, input_size) if isinstance(input_size, int) else tuple(input_size)
    check_input_size(*size)
    check_split_options(val_fraction, seed)
    limits = limits or Limits()
    folder, created, label = materialise(source, limits, "a folder in Pascal VOC layout")
    with discard_on_refusal(folder, created):
        return _load_voc_folder(folder, label, size, class_names, val_fraction, seed, limits)


def _load_voc_folder(folder: Path, label: str, size: tuple[int, int], class_names: Sequence[str] | None,
                     val_fraction: float, seed: int, limits: Limits) -> DetectionData:
    root = find_voc_root(folder)
    report = DetectionReport()
    pairs = pair_files(root, report, limits)
    annotations = parse_annotations(pairs, root, report)
    if class_names is not None:
        names = list(class_names)
        if not names:
            raise DataError("The class list is empty: a detector needs at least one object class.")
    else:
        names = sorted({o.name for a in annotations.values() for o in a.objects if o.name})
        if not names:
            raise DataError("No object class found: no annotation has an <object> with a <name>. "
                            "Nothing to detect; check the Annotations/ folder.")
    full = decode_dataset(pairs, annotations, names, size, root, report)
    if len(full) == 0:
        raise DataError("No usable image: every image was corrupt or lacked a readable annotation. "
                        + report.problem_summary())
    train_idx, val_idx = split_indices(root, full.ids, val_fraction, seed, report)
    if len(val_idx) == 0 or len(train_idx) == 0:
        raise DataError(f"The {'validation' if len(val_idx) == 0 else 'training'} split is empty "
                        f"({len(full)} usable image(s)): at least 2 usable images are needed, one per split.")
    _summarise(full, names, report)
    return DetectionData(full.subset(train_idx), full.subset(val_idx), names, report, size, label)


def _summarise(full: DetectionSet, names: list[str], report: DetectionReport) -> None:
    report.num_images = len(full)
    report.num_objects = full.num_objects
    counts = np.bincount(np.concatenate([np.zeros(0, np.int64), *full.labels]), minlength=len(names) + 1)
    report.class_counts = {n: int(c) for n, c in zip(names, counts[1:])}
    report.difficult_objects = int(sum(int(d.sum()) for d in full.difficult))
    empty = [n for n, c in report.class_counts.items() if c == 0]
    if empty:
        report.warnings.append(f"Classes with no usable box: {', '.join(empty)}.")


# ----------------------------------------------------------------------------- layout


def _child_dir(folder: Path, name: str) -> Path | None:
    for p in folder.iterdir():
        if p.is_dir() and p.name.lower() == name.lower():
            return p
    return None


def find_voc_root(folder: Path) -> Path:
    """The folder holding ``Annotations/`` and ``JPEGImages/`` (also inside e.g. ``VOCdevkit/VOC2007/``)."""
    start = find_dataset_root(folder)
    frontier = [start]
    for _ in range(4):
        for d in frontier:
            if _child_dir(d, "Annotations") and _child_dir(d, "JPEGImages"):
                return d
        frontier = [p for d in frontier for p in sorted(d.iterdir())
                    if p.is_dir() and p.name not in IGNORED_NAMES and not p.name.startswith(".")]
    found = sorted(p.name for p in start.iterdir() if p.name not in IGNORED_NAMES and not p.name.startswith("."))
    raise DataError("Not a Pascal VOC data set: expected folders 'Annotations/' (XML) and 'JPEGImages/' (images) "
                    f"side by side; found: {', '.join(found[:10]) or 'nothing'}.")


def pair_files(root: Path, report: DetectionReport, limits: Limits) -> list[tuple[str, Path, Path]]:
    """(id, image, annotation) of every image with an annotation; unpaired files are listed in the report."""
    images = _files_by_stem(_child_dir(root, "JPEGImages"), IMAGE_EXTENSIONS, root, report)
    xmls = _files_by_stem(_child_dir(root, "Annotations"), {".xml"}, root, report)
    report.missing_annotation = [str(images[s].relative_to(root)) for s in sorted(set(images) - set(xmls))]
    report.missing_image = [str(xmls[s].relative_to(root)) for s in sorted(set(xmls) - set(images))]
    ids = sorted(set(images) & set(xmls))
    if len(ids) > limits.max_images:
        raise DataError(f"The data set has {len(ids)} annotated images; the limit is {limits.max_images}.")
    return [(i, images[i], xmls[i]) for i in ids]


def _files_by_stem(folder: Path, extensions: set[str], root: Path, report: DetectionReport) -> dict[str, Path]:
    found: dict[str, Path] = {}
    for f in sorted(folder.rglob("*")):
        rel = f.relative_to(folder)
        if not f.is_file() or any(p in IGNORED_NAMES or p.startswith(".") for p in rel.parts):
            continue
        if f.suffix.lower() not in extensions:
            report.skipped_files.append(f"{f.relative_to(root)} (not a {'/'.join(sorted(extensions))} file)")
            continue
        stem = rel.with_suffix("").as_posix()
        if stem in found:
            report.skipped_files.append(f"{f.relative_to(root)} (a second file for '{stem}'; "
                                        f"{found[stem].name} is used)")
            continue
        found[stem] = f
    return found


# ----------------------------------------------------------------------------- annotations


def parse_annotations(pairs: list[tuple[str, Path, Path]], root: Path,
                      report: DetectionReport) -> dict[str, _Annotation]:
    """Parsed XML by id; malformed files are listed and left out."""
    out = {}
    for ident, _, xml_path in pairs:
        try:
            out[ident] = parse_voc_xml(xml_path.read_bytes())
        except ValueError as exc:
            report.malformed_xml.append(f"{xml_path.relative_to(root)} ({exc})")
    return out


def parse_voc_xml(data: bytes) -> _Annotation:
    """Objects of one VOC annotation; raises ValueError with the reason when the file is unusable.

    DTDs and entity declarations are refused outright: VOC files never need them, and they are how
    XML bombs and external-entity reads get in.
    """
    if any(tag in data.lower() for tag in _DANGEROUS_XML):
        raise ValueError("contains a DTD or entity declaration, refused")
    try:
        root = ElementTree.fromstring(data)
    except ElementTree.ParseError as exc:
        raise ValueError(f"not well-formed XML: {exc}") from None
    if root.tag != "annotation":
        raise ValueError(f"root element is <{root.tag}>, expected <annotation>")
    objects = []
    for obj in root.findall("object"):
        name = (obj.findtext("name") or "").strip()
        difficult = (obj.findtext("difficult") or "0").strip().lower() in ("1", "true", "yes")
        bb = obj.find("bndbox")
        box = None
        if bb is not None:
            try:
                box = tuple(float(bb.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax"))
            except (TypeError, ValueError):
                box = None
        objects.append(_Object(name, box, difficult))
    return _Annotation(objects, _declared_size(root))


def _declared_size(root: ElementTree.Element) -> tuple[int, int] | None:
    try:
        return int(float(root.findtext("size/width"))), int(float(root.findtext("size/height")))
    except (TypeError, ValueError):
        return None


def normalise_boxes(ann: _Annotation, width: int, height: int, names: list[str], file: str,
                    report: DetectionReport) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(boxes, labels, difficult) of one image; bad boxes rejected, boxes partly outside clipped, all counted."""
    index = {n: i + 1 for i, n in enumerate(names)}
    boxes, labels, difficult = [], [], []
    for k, obj in enumerate(ann.objects):
        where = f"{file}: object {k + 1} '{obj.name}'"
        if not obj.name:
            report.rejected_boxes.append(f"{file}: object {k + 1} (no class name)")
            continue
        if obj.name not in index:
            report.unknown_classes[obj.name] = report.unknown_classes.get(obj.name, 0) + 1
            continue
        if obj.box is None:
            report.rejected_boxes.append(f"{where} (missing or non-numeric <bndbox> coordinates)")
            continue
        x1, y1, x2, y2 = obj.box[0] - 1.0, obj.box[1] - 1.0, obj.box[2], obj.box[3]  # continuous pixels
        if not (x2 > x1 and y2 > y1):
            report.rejected_boxes.append(f"{where} (zero or negative area: {_fmt(obj.box)})")
            continue
        cx1, cy1, cx2, cy2 = max(x1, 0.0), max(y1, 0.0), min(x2, float(width)), min(y2, float(height))
        if not (cx2 > cx1 and cy2 > cy1):
            report.rejected_boxes.append(f"{where} (entirely outside the {width}x{height} image: {_fmt(obj.box)})")
            continue
        overshoot = max(-x1, -y1, x2 - width, y2 - height)
        if overshoot > CLIP_TOLERANCE_PX:
            report.clipped_boxes.append(f"{where} (clipped to the {width}x{height} image: {_fmt(obj.box)})")
        boxes.append([cx1 / width, cy1 / height, cx2 / width, cy2 / height])
        labels.append(index[obj.name])
        difficult.append(obj.difficult)
    return (np.asarray(boxes, dtype=np.float32).reshape(-1, 4), np.asarray(labels, dtype=np.int64),
            np.asarray(difficult, dtype=bool))


def _fmt(box: tuple) -> str:
    return "(" + ", ".join(f"{v:g}" for v in box) + ")"


# ----------------------------------------------------------------------------- images


def decode_dataset(pairs: list[tuple[str, Path, Path]], annotations: dict[str, _Annotation], names: list[str],
                   size: tuple[int, int], root: Path, report: DetectionReport) -> DetectionSet:
    """Every image that decodes, resized to ``size`` (H, W), with its validated boxes."""
    arrays, boxes, labels, difficult, ids = [], [], [], [], []
    for ident, img_path, xml_path in pairs:
        ann = annotations.get(ident)
        if ann is None:
            continue
        rel = str(img_path.relative_to(root))
        try:
            arr, (w, h) = read_image(img_path, size, report)
        except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
            report.corrupt_images.append(f"{rel} ({type(exc).__name__})")
            continue
        if ann.declared_size and ann.declared_size != (w, h):
            report.warnings.append(f"{xml_path.relative_to(root)}: <size> says {ann.declared_size[0]}x"
                                   f"{ann.declared_size[1]} but the image is {w}x{h}; boxes read against the image.")
        b, lab, d = normalise_boxes(ann, w, h, names, str(xml_path.relative_to(root)), report)
        if len(b) == 0:
            report.images_without_objects.append(rel)
        arrays.append(arr)
        boxes.append(b)
        labels.append(lab)
        difficult.append(d)
        ids.append(ident)
    images = torch.from_numpy(np.stack(arrays)) if arrays else torch.zeros((0, 3, *size), dtype=torch.uint8)
    return DetectionSet(images, boxes, labels, difficult, names, ids)


def read_image(path: Path, size: tuple[int, int],
               report: DetectionReport | None = None) -> tuple[np.ndarray, tuple[int, int]]:
    """(uint8 [3, H, W] resized to ``size`` without keeping the aspect ratio, original (width, height))."""
    with Image.open(path) as img:
        img.load()
        original = img.size
        if img.mode != "RGB":
            if report is not None:
                report.converted[img.mode] = report.converted.get(img.mode, 0) + 1
            img = _to_rgb(img)
        h, w = size
        if img.size != (w, h):
            img = img.resize((w, h), Image.BILINEAR)
        return np.asarray(img, dtype=np.uint8).transpose(2, 0, 1).copy(), original


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in ("RGBA", "LA", "P"):
        rgba = img.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return img.convert("RGB")


# ----------------------------------------------------------------------------- splits


def split_indices(root: Path, ids: list[str], val_fraction: float, seed: int,
                  report: DetectionReport) -> tuple[np.ndarray, np.ndarray]:
    """Train/val indices: from ``ImageSets/Main/{train,val}.txt`` when both exist, else a seeded random split."""
    listed = _split_files(root)
    if listed is not None:
        position = {ident: i for i, ident in enumerate(ids)}
        train_ids, val_ids, names = listed
        report.presplit = True
        report.split = f"ImageSets/Main/{names[0]} and {names[1]}"
        both = set(train_ids) & set(val_ids)
        if both:
            report.warnings.append(f"{len(both)} image(s) listed in both {names[0]} and {names[1]}; kept in val only.")
        unusable = [i for i in list(train_ids) + list(val_ids) if i not in position]
        if unusable:
            report.warnings.append(f"{len(unusable)} id(s) in the split files have no usable image and annotation, "
                                   f"first: {', '.join(unusable[:5])}.")
        val = sorted(position[i] for i in dict.fromkeys(val_ids) if i in position)
        train = sorted(position[i] for i in dict.fromkeys(train_ids) if i in position and i not in both)
        unlisted = len(ids) - len(set(train) | set(val))
        if unlisted:
            report.warnings.append(f"{unlisted} usable image(s) are in neither split file and are not used.")
        return np.asarray(train, dtype=np.int64), np.asarray(val, dtype=np.int64)
    report.split = f"random, val_fraction {val_fraction}, seed {seed}"
    return random_split(len(ids), val_fraction, seed)


def random_split(n: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded split with at least one image on each side when there are two or more."""
    order = np.random.default_rng(seed).permutation(n)
    k = int(round(n * val_fraction))
    k = min(max(k, 1), n - 1) if n >= 2 else 0
    return np.sort(order[k:]), np.sort(order[:k])


def _split_files(root: Path) -> tuple[list[str], list[str], tuple[str, str]] | None:
    sets = _child_dir(root, "ImageSets")
    main = _child_dir(sets, "Main") if sets else None
    if main is None:
        return None
    for train_name, val_name in (("train.txt", "val.txt"), ("trainval.txt", "test.txt")):
        t, v = main / train_name, main / val_name
        if t.is_file() and v.is_file():
            return _read_ids(t), _read_ids(v), (train_name, val_name)
    return None


def _read_ids(path: Path) -> list[str]:
    return [line.split()[0] for line in path.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()]


# ----------------------------------------------------------------------------- writing VOC zips


def annotation_xml(filename: str, width: int, height: int, objects: Sequence[tuple[str, Sequence[float], bool]]) -> str:
    """A VOC annotation; ``objects`` are (class name, (xmin, ymin, xmax, ymax) VOC pixels, difficult)."""
    ann = ElementTree.Element("annotation")
    ElementTree.SubElement(ann, "folder").text = "JPEGImages"
    ElementTree.SubElement(ann, "filename").text = filename
    sz = ElementTree.SubElement(ann, "size")
    for tag, v in (("width", width), ("height", height), ("depth", 3)):
        ElementTree.SubElement(sz, tag).text = str(v)
    for name, box, diff in objects:
        obj = ElementTree.SubElement(ann, "object")
        ElementTree.SubElement(obj, "name").text = name
        ElementTree.SubElement(obj, "difficult").text = "1" if diff else "0"
        bb = ElementTree.SubElement(obj, "bndbox")
        for tag, v in zip(("xmin", "ymin", "xmax", "ymax"), box):
            ElementTree.SubElement(bb, tag).text = f"{v:g}"
    ElementTree.indent(ann)
    return ElementTree.tostring(ann, encoding="unicode") + "\n"


def to_voc_pixels(box: Sequence[float], width: int, height: int) -> tuple[int, int, int, int]:
    """Normalised x1y1x2y2 -> VOC 1-based inclusive integer pixels; the inverse of the loader's mapping."""
    xmin, ymin = int(round(box[0] * width)) + 1, int(round(box[1] * height)) + 1
    xmax, ymax = int(round(box[2] * width)), int(round(box[3] * height))
    return xmin, ymin, max(xmax, xmin), max(ymax, ymin)


def voc_zip_bytes(images: Sequence[np.ndarray], boxes: Sequence[np.ndarray], labels: Sequence[np.ndarray],
                  class_names: Sequence[str], difficult: Sequence[np.ndarray] | None = None,
                  ids: Sequence[str] | None = None, splits: dict[str, Sequence[str]] | None = None,
                  image_format: str = "jpg", prefix: str = "") -> bytes:
    """A byte-for-byte reproducible VOC zip of HWC uint8 images with normalised boxes and 1-based labels.

    ``splits`` maps split names (e.g. 'train', 'val') to ids, written as ``ImageSets/Main/<name>.txt``;
    ``image_format`` 'jpg' (quality 95, what VOC ships) or 'png' (lossless, for exact round trips).
    """
    ids = list(ids) if ids is not None else [f"{i:06d}" for i in range(len(images))]
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for i, (img, ident) in enumerate(zip(images, ids)):
            h, w = img.shape[:2]
            name = f"{ident}.{image_format}"
            _write(zf, f"{prefix}JPEGImages/{name}", _encode_image(img, image_format), compress=False)
            diff = difficult[i] if difficult is not None else np.zeros(len(labels[i]), dtype=bool)
            objects = [(class_names[int(lab) - 1], to_voc_pixels(b, w, h), bool(d))
                       for b, lab, d in zip(boxes[i], labels[i], diff)]
            _write(zf, f"{prefix}Annotations/{ident}.xml", annotation_xml(name, w, h, objects).encode())
        for split, members in (splits or {}).items():
            _write(zf, f"{prefix}ImageSets/Main/{split}.txt", "".join(f"{m}\n" for m in members).encode())
    return buf.getvalue()


def write_voc_zip(path: str | Path, *args, **kwargs) -> Path:
    """``voc_zip_bytes`` written to ``path`` atomically (same arguments)."""
    from ...workspace import atomic_write_bytes

    path = Path(path)
    atomic_write_bytes(path, voc_zip_bytes(*args, **kwargs))
    return path


def _encode_image(img: np.ndarray, fmt: str) -> bytes:
    out = io.BytesIO()
    if fmt in ("jpg", "jpeg"):
        Image.fromarray(img, "RGB").save(out, format="JPEG", quality=95)
    elif fmt == "png":
        Image.fromarray(img, "RGB").save(out, format="PNG")
    else:
        raise ValueError(f"image_format must be 'jpg' or 'png', got {fmt!r}")
    return out.getvalue()


def _write(zf: zipfile.ZipFile, name: str, data: bytes, compress: bool = True) -> None:
    info = zipfile.ZipInfo(name, date_time=(2024, 1, 1, 0, 0, 0))
    info.external_attr = 0o644 << 16
    info.compress_type = zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED
    zf.writestr(info, data)
