"""Image data sets: safe unpacking of uploads, ImageFolder discovery, validation report, splits, tensors.

A data set arrives as a zip or a folder in ImageFolder layout (``class/image``), optionally already
split into ``train/`` and ``val/``. Everything that could hurt (paths escaping the folder, zip bombs)
is refused before anything is written; everything that is merely odd (a stray text file, one corrupt
JPEG) is skipped and listed in the report, so one bad file never costs the user the whole upload.
"""
from __future__ import annotations

import hashlib
import io
import shutil
import stat
import zipfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from .errors import DataError
from .models import InputSpec
from .workspace import uploads_dir

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
SPLIT_NAMES = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val", "test": "val"}
IGNORED_NAMES = {"__MACOSX", ".DS_Store", "Thumbs.db", "desktop.ini"}


@dataclass
class Limits:
    """Upper bounds checked before unpacking; defaults suit a laptop-sized review tool."""

    max_uncompressed_bytes: int = 2 * 1024**3
    max_files: int = 100_000
    max_ratio: float = 200.0  # compressed-to-uncompressed ratio above which an entry is a bomb
    max_images: int = 50_000


@dataclass
class DataReport:
    """What the validation found; shown in the UI and CLI as it is."""

    num_classes: int = 0
    class_counts: dict[str, int] = field(default_factory=dict)
    skipped_non_images: list[str] = field(default_factory=list)
    corrupt_images: list[str] = field(default_factory=list)
    converted: dict[str, int] = field(default_factory=dict)
    presplit: bool = False
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {
            "num_classes": self.num_classes,
            "class_counts": self.class_counts,
            "skipped_non_images": self.skipped_non_images,
            "corrupt_images": self.corrupt_images,
            "converted": self.converted,
            "presplit": self.presplit,
            "warnings": self.warnings,
        }


@dataclass
class ImageSet:
    """Decoded images at the model's input size, as uint8 (N, C, H, W), with integer labels."""

    images: torch.Tensor
    labels: torch.Tensor
    class_names: list[str]

    def __len__(self) -> int:
        return int(self.labels.numel())

    def subset(self, n: int | None, seed: int = 0) -> "ImageSet":
        """A stratified subset of ``n`` images (all of them when ``n`` is None or large)."""
        if n is None or n >= len(self):
            return self
        idx = stratified_indices(self.labels.numpy(), n, seed)
        return ImageSet(self.images[idx], self.labels[idx], self.class_names)


@dataclass
class DataSet:
    train: ImageSet
    val: ImageSet
    class_names: list[str]
    input: InputSpec
    report: DataReport
    source: str = ""

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


# ----------------------------------------------------------------------------- preprocessing


def normalize(images_u8: torch.Tensor, spec: InputSpec) -> torch.Tensor:
    """uint8 (N, C, H, W) -> float input the model was trained on."""
    x = images_u8.float().div_(255.0)
    mean = torch.tensor(spec.mean, dtype=x.dtype).view(1, -1, 1, 1)
    std = torch.tensor(spec.std, dtype=x.dtype).view(1, -1, 1, 1)
    return (x - mean) / std


def image_to_array(img: Image.Image, spec: InputSpec, report: DataReport | None = None) -> np.ndarray:
    """Convert mode, resize the shorter side and centre-crop to the model's input size: (C, H, W) uint8."""
    want = "L" if spec.channels == 1 else "RGB"
    if img.mode != want:
        if report is not None:
            report.converted[img.mode] = report.converted.get(img.mode, 0) + 1
        if img.mode in ("RGBA", "LA", "P") and want == "RGB":
            img = img.convert("RGBA")
            bg = Image.new("RGBA", img.size, (255, 255, 255, 255))
            img = Image.alpha_composite(bg, img)
        img = img.convert(want)
    w, h = img.size
    scale = max(spec.width / w, spec.height / h)
    nw, nh = max(spec.width, round(w * scale)), max(spec.height, round(h * scale))
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), Image.BILINEAR)
    left, top = (nw - spec.width) // 2, (nh - spec.height) // 2
    img = img.crop((left, top, left + spec.width, top + spec.height))
    arr = np.asarray(img, dtype=np.uint8)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return arr.transpose(2, 0, 1).copy()


# ----------------------------------------------------------------------------- splits


def stratified_indices(labels: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    """``n`` indices drawn class by class in proportion, reproducibly."""
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    picked = []
    for c in classes:
        members = np.flatnonzero(labels == c)
        k = max(1, round(n * len(members) / len(labels)))
        picked.append(rng.permutation(members)[:k])
    idx = np.sort(np.concatenate(picked))
    return idx[:n] if len(idx) > n else idx


def stratified_split(labels: np.ndarray, val_fraction: float = 0.2, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Train/val indices with every class in both (when it has at least 2 images)."""
    rng = np.random.default_rng(seed)
    train, val = [], []
    for c in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == c))
        k = int(round(len(members) * val_fraction))
        k = min(max(k, 1), len(members) - 1) if len(members) >= 2 else 0
        val.append(members[:k])
        train.append(members[k:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(val))


# ----------------------------------------------------------------------------- zip safety


def safe_extract_zip(data: bytes | Path, dest: Path | None = None, limits: Limits | None = None) -> Path:
    """Unpack a zip after checking every entry; refuse the whole archive if any entry is unsafe.

    The destination is named by the archive's hash, never by a name taken from the upload.
    """
    limits = limits or Limits()
    raw = data.read_bytes() if isinstance(data, Path) else data
    try:
        zf = zipfile.ZipFile(io.BytesIO(raw))
    except zipfile.BadZipFile:
        raise DataError("The upload is not a valid zip archive.") from None
    infos = zf.infolist()
    _check_zip_entries(infos, limits)
    dest = dest or uploads_dir() / f"data-{hashlib.sha256(raw).hexdigest()[:16]}"
    if dest.exists() and (dest / ".complete").exists():
        return dest
    tmp = dest.with_name(dest.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    written = 0
    try:
        for info in infos:
            if info.is_dir():
                continue
            target = tmp.joinpath(*PurePosixPath(info.filename).parts)
            target.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(info) as src, open(target, "wb") as out:
                while chunk := src.read(1 << 20):
                    written += len(chunk)
                    if written > limits.max_uncompressed_bytes:  # sizes in headers can lie
                        raise DataError("The archive expands beyond the size limit while unpacking; refused.")
                    out.write(chunk)
        (tmp / ".complete").touch()
        shutil.rmtree(dest, ignore_errors=True)
        tmp.rename(dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


def _check_zip_entries(infos: list[zipfile.ZipInfo], limits: Limits) -> None:
    if len(infos) > limits.max_files:
        raise DataError(f"The archive has {len(infos)} entries; the limit is {limits.max_files}.")
    total = 0
    for info in infos:
        name = info.filename
        parts = PurePosixPath(name.replace("\\", "/")).parts
        if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":") or ".." in parts:
            raise DataError(f"Unsafe path in the archive: '{name}' (absolute or containing '..'). Nothing was unpacked.")
        mode = info.external_attr >> 16
        if stat.S_ISLNK(mode):
            raise DataError(f"The archive contains a symbolic link ('{name}'); refused. Nothing was unpacked.")
        total += info.file_size
        if info.compress_size and info.file_size / max(info.compress_size, 1) > limits.max_ratio and info.file_size > 10_000_000:
            raise DataError(f"'{name}' expands {info.file_size / info.compress_size:.0f}-fold: refused as a zip bomb.")
    if total > limits.max_uncompressed_bytes:
        raise DataError(
            f"The archive would expand to {total / 1e9:.1f} GB; the limit is {limits.max_uncompressed_bytes / 1e9:.1f} GB. "
            "Nothing was unpacked."
        )


# ----------------------------------------------------------------------------- folder discovery


def _visible_children(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.name not in IGNORED_NAMES and not p.name.startswith("."))


def find_dataset_root(folder: Path) -> Path:
    """Descend through single wrapper folders (a zip of 'mydata/' holds 'mydata/class/...')."""
    root = folder
    for _ in range(5):
        kids = _visible_children(root)
        dirs = [k for k in kids if k.is_dir()]
        files = [k for k in kids if k.is_file()]
        if len(dirs) == 1 and not files:
            root = dirs[0]
        else:
            break
    return root


def discover_layout(root: Path) -> dict[str, Path] | None:
    """The train/val folders if the data set is pre-split, else None."""
    dirs = {p.name.lower(): p for p in _visible_children(root) if p.is_dir()}
    splits = {SPLIT_NAMES[k]: v for k, v in dirs.items() if k in SPLIT_NAMES}
    if "train" in splits and "val" in splits and len(dirs) <= 3:
        return {"train": splits["train"], "val": splits["val"]}
    return None


def scan_class_folders(root: Path, report: DataReport, limits: Limits) -> tuple[list[str], list[tuple[Path, str]]]:
    """(class names, [(file, class)]) of an ImageFolder; non-image files are listed, not fatal."""
    class_dirs = [p for p in _visible_children(root) if p.is_dir()]
    loose = [p for p in _visible_children(root) if p.is_file()]
    for f in loose:
        report.skipped_non_images.append(f"{f.name} (not inside a class folder)")
    items: list[tuple[Path, str]] = []
    for d in class_dirs:
        for f in sorted(d.rglob("*")):
            if not f.is_file() or any(part in IGNORED_NAMES or part.startswith(".") for part in f.relative_to(d).parts):
                continue
            if f.suffix.lower() in IMAGE_EXTENSIONS:
                items.append((f, d.name))
            else:
                report.skipped_non_images.append(str(f.relative_to(root)))
    if len(items) > limits.max_images:
        raise DataError(f"The data set has {len(items)} images; the limit is {limits.max_images}.")
    return [d.name for d in class_dirs], items


def decode_images(items: list[tuple[Path, str]], class_names: list[str], spec: InputSpec, root: Path,
                  report: DataReport) -> ImageSet:
    arrays, labels = [], []
    index = {c: i for i, c in enumerate(class_names)}
    for path, cls in items:
        try:
            with Image.open(path) as img:
                img.load()
                arrays.append(image_to_array(img, spec, report))
                labels.append(index[cls])
        except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
            report.corrupt_images.append(f"{path.relative_to(root)} ({type(exc).__name__})")
    if not arrays:
        images = torch.zeros((0, spec.channels, spec.height, spec.width), dtype=torch.uint8)
    else:
        images = torch.from_numpy(np.stack(arrays))
    return ImageSet(images, torch.tensor(labels, dtype=torch.long), class_names)


# ----------------------------------------------------------------------------- the entry point


def load_dataset(
    source: str | Path | bytes,
    spec: InputSpec,
    expected_classes: int | None = None,
    val_fraction: float = 0.2,
    seed: int = 0,
    limits: Limits | None = None,
) -> DataSet:
    """Load, validate and split a data set: a zip (path or bytes) or a folder (``sample:NAME``: ``core.sources``)."""
    limits = limits or Limits()
    report = DataReport()
    if isinstance(source, bytes):
        folder, label = safe_extract_zip(source, limits=limits), "upload.zip"
    else:
        path = Path(source)
        if not path.exists():
            raise DataError(f"Data set not found: {path}")
        if path.is_file():
            if not zipfile.is_zipfile(path):
                raise DataError(f"{path.name} is neither a zip archive nor a folder of class folders.")
            folder = safe_extract_zip(path, limits=limits)
        else:
            folder = path
        label = str(path)
    root = find_dataset_root(folder)
    layout = discover_layout(root)
    if layout:
        report.presplit = True
        names_tr, items_tr = scan_class_folders(layout["train"], report, limits)
        names_va, items_va = scan_class_folders(layout["val"], report, limits)
        if set(names_va) - set(names_tr):
            raise DataError(f"val/ has classes that train/ lacks: {', '.join(sorted(set(names_va) - set(names_tr)))}.")
        class_names = sorted(names_tr)
        _check_class_count(len(class_names), expected_classes)
        train = decode_images(items_tr, class_names, spec, root, report)
        val = decode_images(items_va, class_names, spec, root, report)
    else:
        class_names, items = scan_class_folders(root, report, limits)
        class_names = sorted(class_names)
        _check_class_count(len(class_names), expected_classes)
        full = decode_images(items, class_names, spec, root, report)
        if len(full) == 0:
            raise DataError("No readable images were found in the class folders.")
        tr, va = stratified_split(full.labels.numpy(), val_fraction, seed)
        train = ImageSet(full.images[tr], full.labels[tr], class_names)
        val = ImageSet(full.images[va], full.labels[va], class_names)
    report.num_classes = len(class_names)
    counts = torch.bincount(torch.cat([train.labels, val.labels]), minlength=len(class_names)).tolist()
    report.class_counts = dict(zip(class_names, counts))
    empty = [c for c, n in report.class_counts.items() if n == 0]
    if empty:
        report.warnings.append(f"Classes with no readable image: {', '.join(empty)}.")
    if len(val) == 0:
        raise DataError("The validation split is empty: every class needs at least 2 readable images.")
    return DataSet(train, val, class_names, spec, report, label)


def _check_class_count(found: int, expected: int | None) -> None:
    if found < 2:
        raise DataError(
            f"The data set has {found} class folder(s); at least 2 are needed (ImageFolder layout: one folder per class)."
        )
    if expected is not None and found != expected:
        raise DataError(f"The data set has {found} classes but the model outputs {expected}. They must match.")
