"""Image data sets: safe unpacking of uploads, ImageFolder discovery, validation report, splits, tensors.

A data set arrives as a zip or a folder in ImageFolder layout (``class/image``), optionally already
split into ``train/`` and ``val/`` (and ``test/``).

The images have three roles (issue 14), so that a reported figure was never used to make a decision:

- *train*: fine-tuning during pruning and the recovery fine-tune;
- *selection* (``DataSet.val``, alias ``DataSet.selection``): CAR scoring, the choice of each step's
  cluster and the accuracy threshold;
- *test*: reported beside the selection figures and never read by any decision.

Unsplit data: the selection split is exactly the held-out ``val_fraction`` of earlier versions (same
indices for the same seed), and the test images are a further stratified ``test_fraction`` of all
images taken from the rest, so a run made before the test split still scores the same images.
``train/`` + ``val/`` (or ``test/`` alone beside ``train/``): the held-out folder is split stratified into
selection and test (``test_fraction`` of it, default one half: equal halves give both figures the
same standard error, and every class keeps at least one selection image); ``train/`` + ``val/`` +
``test/``: the folders are the roles. ``test_fraction=0`` is the layout of runs made before the test
split (see :func:`split_options`). Everything that could hurt (paths escaping the folder, zip bombs)
is refused before anything is written; everything that is merely odd (a stray text file, one corrupt
JPEG) is skipped and listed in the report, so one bad file never costs the user the whole upload.
"""
from __future__ import annotations

import hashlib
import io
import math
import os
import re
import shutil
import stat
import struct
import unicodedata
import uuid
import warnings
import zipfile
import zlib
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np
import torch
from PIL import Image

from .errors import DataError, SettingsError, one_line
from .models import MAX_INPUT_SIDE, InputSpec
from .preprocess import HIGH_BIT_MODES, BitDepthLog, infer_input_size, size_is_open, to_8bit
from .workspace import uploads_dir

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
SPLIT_NAMES = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}
UNSPLIT_TEST_FRACTION = 0.2  # share of all images that become test images when the data is not pre-split
HELD_OUT_TEST_FRACTION = 0.5  # share of a pre-split held-out folder (val/) that becomes test images
TEST_SEED_STREAM = 1  # the test draw uses its own random stream: the selection draw stays as it always was
IGNORED_NAMES = {"__MACOSX", ".DS_Store", "Thumbs.db", "desktop.ini"}


@dataclass
class Limits:
    """Upper bounds checked before unpacking; defaults suit a laptop-sized review tool."""

    max_uncompressed_bytes: int = 2 * 1024**3
    max_files: int = 100_000
    max_ratio: float = 200.0  # compressed-to-uncompressed ratio above which an entry, or the whole, is a bomb
    bomb_floor_bytes: int = 10_000_000  # below this an entry (or the whole) is too small to harm, whatever its ratio
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
    # what was inferred or done to the pixels (input size from the data, 16-bit scaling): said, not a problem
    notes: list[str] = field(default_factory=list)
    bit_depth: BitDepthLog = field(default_factory=BitDepthLog, repr=False, compare=False)

    def notices(self, limit: int = 5) -> list[str]:
        """One line per thing the user should know (warnings, skipped and corrupt files, conversions), for
        interfaces that print text; long lists are cut after ``limit`` names."""
        lines = list(self.warnings)
        for what, names in (("not an image, skipped", self.skipped_non_images),
                            ("unreadable image, skipped", self.corrupt_images)):
            if names:
                shown = ", ".join(names[:limit]) + (f", … ({len(names) - limit} more)" if len(names) > limit else "")
                lines.append(f"{len(names)} file(s) {what}: {shown}")
        if self.converted:
            lines.append("Converted to the model's colour mode: "
                         + ", ".join(f"{n} {mode} image(s)" for mode, n in sorted(self.converted.items())))
        return lines

    def to_dict(self) -> dict:
        return {
            "num_classes": self.num_classes,
            "class_counts": self.class_counts,
            "skipped_non_images": self.skipped_non_images,
            "corrupt_images": self.corrupt_images,
            "converted": self.converted,
            "presplit": self.presplit,
            "warnings": self.warnings,
            "notes": self.notes,
        }


@dataclass
class ImageSet:
    """Decoded images at the model's input size, as uint8 (N, C, H, W), with integer labels."""

    images: torch.Tensor
    labels: torch.Tensor
    class_names: list[str]
    # where each image came from (a file path relative to the data set's root, or a sample's index):
    # what the split record hashes, so that a run names the exact images behind its figures
    ids: list[str] | None = field(default=None, repr=False, compare=False)

    def __len__(self) -> int:
        return int(self.labels.numel())

    def take(self, idx) -> "ImageSet":
        """The images at ``idx`` (indices or a boolean mask), with their ids."""
        idx = torch.as_tensor(idx)
        if idx.dtype == torch.bool:
            idx = torch.nonzero(idx).flatten()
        ids = [self.ids[i] for i in idx.tolist()] if self.ids is not None else None
        return ImageSet(self.images[idx], self.labels[idx], self.class_names, ids)

    def subset(self, n: int | None, seed: int = 0) -> "ImageSet":
        """A stratified subset of ``n`` images (all of them when ``n`` is None or large)."""
        if n is None or n >= len(self):
            return self
        return self.take(stratified_indices(self.labels.numpy(), n, seed))

    def digest(self) -> str:
        """sha256 of the ids in order (of the pixels and labels when there are no ids): equal digests, equal images."""
        h = hashlib.sha256()
        if self.ids is not None:
            h.update("\n".join(self.ids).encode("utf-8"))
        else:
            h.update(self.images.contiguous().numpy().tobytes())
            h.update(self.labels.numpy().astype("<i8").tobytes())
        return h.hexdigest()


def empty_like(images: ImageSet) -> ImageSet:
    """An image set of no images with the shape and classes of ``images``."""
    return ImageSet(images.images[:0], images.labels[:0], images.class_names, [])


@dataclass
class DataSet:
    """The images of a data set in their three roles; ``val`` is the *selection* role (see the module
    docstring). ``test`` is empty (never None) when the data set has no test split; ``split`` holds
    how the roles were drawn (see :meth:`split_record`)."""

    train: ImageSet
    val: ImageSet
    class_names: list[str]
    input: InputSpec
    report: DataReport
    source: str = ""
    test: ImageSet | None = None
    split: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.test is None:
            self.test = empty_like(self.val)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def selection(self) -> ImageSet:
        """The images that make every decision: CAR scores, the step choice, the threshold (``val``)."""
        return self.val

    def split_record(self, files: bool = False) -> dict:
        """How the roles were drawn, enough to reproduce every figure: the settings (seed, fractions,
        where the test images came from), the count of each role and the sha256 of its image ids
        (:meth:`ImageSet.digest`); ``files=True`` adds the id lists themselves."""
        roles = {"train": self.train, "selection": self.val, "test": self.test}
        record = {**self.split, "counts": {r: len(s) for r, s in roles.items()},
                  "sha256": {r: s.digest() for r, s in roles.items()}}
        if files:
            record["files"] = {r: list(s.ids or []) for r, s in roles.items()}
        return record


# ----------------------------------------------------------------------------- preprocessing


def normalize(images_u8: torch.Tensor, spec: InputSpec) -> torch.Tensor:
    """uint8 (N, C, H, W) -> float input the model was trained on."""
    x = images_u8.float().div_(255.0)
    mean = torch.tensor(spec.mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    std = torch.tensor(spec.std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x - mean) / std


def image_to_array(img: Image.Image, spec: InputSpec, report: DataReport | None = None) -> np.ndarray:
    """Convert mode, resize the shorter side and centre-crop to the model's input size: (C, H, W) uint8."""
    want = "L" if spec.channels == 1 else "RGB"
    if img.mode != want:
        if report is not None:
            report.converted[img.mode] = report.converted.get(img.mode, 0) + 1
        if img.mode in HIGH_BIT_MODES:
            img = to_8bit(img, report.bit_depth if report is not None else None)
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
    """Exactly ``min(n, len(labels))`` indices, drawn class by class in proportion, reproducibly.

    Rounding each class's share on its own gives one image too few or too many (10 classes of 2999 and
    n = 300: 30 each, 299 together was the issue-16 report), so the shares are apportioned by largest
    remainder (see :func:`class_allocation`).
    """
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    members = [np.flatnonzero(labels == c) for c in classes]
    counts = class_allocation([len(m) for m in members], min(int(n), len(labels)))
    picked = [rng.permutation(m)[:k] for m, k in zip(members, counts)]
    return np.sort(np.concatenate(picked)) if picked else np.zeros(0, dtype=np.int64)


def class_allocation(sizes: list[int], n: int) -> list[int]:
    """How many of ``n`` images each class of ``sizes`` gives: shares ``n * size / total`` rounded by largest
    remainder (Hamilton's method, exact integer arithmetic), so the counts add up to ``n`` and each is within
    one image of its share. When ``n`` is at least the number of classes every class gives one image or more,
    taken from the classes furthest above their share. Requires ``0 <= n <= sum(sizes)``.
    """
    total = sum(sizes)
    if total == 0:
        return [0] * len(sizes)
    counts = [n * s // total for s in sizes]
    by_remainder = sorted(range(len(sizes)), key=lambda i: (-(n * sizes[i] % total), i))
    for i in by_remainder[: n - sum(counts)]:
        counts[i] += 1
    if n >= len(sizes):
        for empty in [i for i, k in enumerate(counts) if k == 0 and sizes[i] > 0]:
            donor = max((i for i, k in enumerate(counts) if k > 1), key=lambda i: counts[i] * total - n * sizes[i])
            counts[donor] -= 1
            counts[empty] += 1
    return counts


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


def _sorted_cat(parts: list[np.ndarray]) -> np.ndarray:
    return np.sort(np.concatenate(parts)).astype(np.int64) if parts else np.zeros(0, dtype=np.int64)


def held_out_split(labels: np.ndarray, test_fraction: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Selection/test indices of a held-out folder: ``floor(test_fraction * n)`` of each class to test, the
    rest (at least one image) to selection, so every class stays measurable where the threshold is decided."""
    rng = np.random.default_rng([seed, TEST_SEED_STREAM])
    selection, test = [], []
    for c in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == c))
        k = min(int(math.floor(len(members) * test_fraction + 1e-9)), len(members) - 1)
        test.append(members[:k])
        selection.append(members[k:])
    return _sorted_cat(selection), _sorted_cat(test)


def three_way_split(labels: np.ndarray, val_fraction: float = 0.2, test_fraction: float = UNSPLIT_TEST_FRACTION,
                    seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Train/selection/test indices of an unsplit data set.

    The selection indices are :func:`stratified_split`'s val indices for the same seed, so they do
    not depend on ``test_fraction``; the test images are ``round(test_fraction * n)`` of each class
    drawn from the rest on a separate random stream, leaving every class at least one training image.
    """
    train, selection = stratified_split(labels, val_fraction, seed)
    if test_fraction <= 0:
        return train, selection, np.zeros(0, dtype=np.int64)
    rng = np.random.default_rng([seed, TEST_SEED_STREAM])
    keep, test = [], []
    for c in np.unique(labels):
        pool = rng.permutation(train[labels[train] == c])
        k = min(int(round(np.sum(labels == c) * test_fraction)), max(len(pool) - 1, 0))
        test.append(pool[:k])
        keep.append(pool[k:])
    return _sorted_cat(keep), selection, _sorted_cat(test)


def split_options(data_options: dict | None) -> dict:
    """``val_fraction``, ``seed`` and ``test_fraction`` for the loaders from a run's recorded ``data_options``.

    A run made before the test split recorded no ``test_fraction``: it reloads with ``test_fraction=0``,
    which gives exactly the selection (val) images it was scored and pruned on, and no test images
    (its training images included every non-selection image, so none is unseen by its fine-tuning).
    """
    options = data_options or {}
    return {"val_fraction": options.get("val_fraction", 0.2), "seed": options.get("seed", 0),
            "test_fraction": options.get("test_fraction", 0.0)}


# ----------------------------------------------------------------------------- zip safety

COMPLETE_MARKER = ".complete"
# Errors the zip reader raises on a damaged archive (bad CRC, truncated or corrupt deflate stream,
# unsupported compression or encryption, nonsense in the headers).
_ZIP_ERRORS = (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError, RuntimeError, ValueError, struct.error,
               OverflowError, UnicodeDecodeError)


def safe_extract_zip(data: bytes | Path, dest: Path | None = None, limits: Limits | None = None) -> Path:
    """Unpack a zip after checking every entry and the whole; refuse the archive if anything is unsafe.

    The destination is named by the archive's hash, never by a name taken from the upload. The
    archive is unpacked into a private temporary folder, checked against its directory, and published
    with one atomic rename, so a folder at ``dest`` is always complete; two processes unpacking the
    same archive both get it. A refusal (unsafe entry, damaged data, full disk) leaves nothing behind.
    Raises :class:`DataError` with one line saying why.
    """
    return _extract_zip(data, dest, limits)[0]


def _extract_zip(data: bytes | Path, dest: Path | None, limits: Limits | None) -> tuple[Path, bool]:
    """(the unpacked folder, whether this call published it)."""
    limits = limits or Limits()
    raw = data.read_bytes() if isinstance(data, Path) else data
    zf = _open_zip(raw)
    infos = _read_directory(zf)
    _check_zip_entries(infos, limits, len(raw))
    dest = dest or uploads_dir() / f"data-{hashlib.sha256(raw).hexdigest()[:16]}"
    if (dest / COMPLETE_MARKER).exists():
        return dest, False
    dest.parent.mkdir(parents=True, exist_ok=True)
    _check_free_space(dest.parent, sum(i.file_size for i in infos))
    tmp = dest.parent / f".{dest.name}.partial-{uuid.uuid4().hex[:8]}"
    try:
        tmp.mkdir()
        _unpack(zf, infos, tmp, limits)
        _verify_unpacked(infos, tmp)
        (tmp / COMPLETE_MARKER).touch()
        return dest, _publish(tmp, dest)
    except DataError:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    except _ZIP_ERRORS as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise DataError(f"The archive is damaged ({one_line(exc)}); nothing was unpacked.") from None
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise DataError(f"The archive could not be unpacked into {dest.parent} ({one_line(exc)}); "
                        "nothing was kept.") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _open_zip(raw: bytes) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(io.BytesIO(raw))
    except _ZIP_ERRORS as exc:
        raise DataError(f"The upload is not a valid zip archive ({one_line(exc)}).") from None


def _read_directory(zf: zipfile.ZipFile) -> list[zipfile.ZipInfo]:
    try:
        return zf.infolist()
    except _ZIP_ERRORS as exc:  # pragma: no cover - the directory is parsed when the archive is opened
        raise DataError(f"The archive's directory is damaged ({one_line(exc)}).") from None


def _check_free_space(folder: Path, needed: int) -> None:
    free = shutil.disk_usage(folder).free
    if needed > free:
        raise DataError(f"The archive expands to {needed / 1e9:.2f} GB but only {free / 1e9:.2f} GB are free in "
                        f"{folder}; nothing was unpacked.")


def _entry_target(root: Path, info: zipfile.ZipInfo) -> Path:
    return root.joinpath(*PurePosixPath(info.filename).parts)


def _unpack(zf: zipfile.ZipFile, infos: list[zipfile.ZipInfo], root: Path, limits: Limits) -> None:
    written = 0
    for info in infos:
        if info.is_dir():
            continue
        target = _entry_target(root, info)
        target.parent.mkdir(parents=True, exist_ok=True)
        with zf.open(info) as src, open(target, "wb") as out:
            while chunk := src.read(1 << 20):
                written += len(chunk)
                if written > limits.max_uncompressed_bytes:  # sizes in headers can lie
                    raise DataError("The archive expands beyond the size limit while unpacking; refused, nothing kept.")
                out.write(chunk)


def _verify_unpacked(infos: list[zipfile.ZipInfo], root: Path) -> None:
    """Every file of the archive's directory is on disk with its size (the last entry of a repeated name wins)."""
    expected = {_entry_target(root, i): i.file_size for i in infos if not i.is_dir()}
    for path, size in expected.items():
        if not path.is_file() or path.stat().st_size != size:
            raise DataError(f"Unpacking '{path.relative_to(root).as_posix()}' did not give the {size} bytes the "
                            "archive lists; refused, nothing kept.")


def _publish(tmp: Path, dest: Path) -> bool:
    """Rename the verified folder into place; False when another process published the same archive first."""
    for _ in range(3):
        try:
            os.rename(tmp, dest)  # atomic; fails while a non-empty folder is there
            return True
        except OSError:
            if (dest / COMPLETE_MARKER).exists():
                shutil.rmtree(tmp, ignore_errors=True)
                return False
            stale = dest.parent / f".{dest.name}.stale-{uuid.uuid4().hex[:8]}"
            try:  # an incomplete folder left by an older version or a crash: set it aside
                os.rename(dest, stale)
            except FileNotFoundError:
                pass
            shutil.rmtree(stale, ignore_errors=True)
    raise DataError(f"Could not publish the unpacked archive at {dest}: the folder keeps changing. Try again.")


def _is_bomb(size: int, packed: int, limits: Limits) -> bool:
    return size >= limits.bomb_floor_bytes and size / max(packed, 1) > limits.max_ratio


def _check_zip_entries(infos: list[zipfile.ZipInfo], limits: Limits, archive_bytes: int | None = None) -> None:
    """Refuse unsafe names, links, single-entry and many-entry bombs, from the directory alone (nothing written)."""
    if len(infos) > limits.max_files:
        raise DataError(f"The archive has {len(infos)} entries; the limit is {limits.max_files}. Nothing was unpacked.")
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
        if _is_bomb(info.file_size, info.compress_size, limits):
            raise DataError(f"'{name}' expands {info.file_size / max(info.compress_size, 1):.0f}-fold: refused as a "
                            "zip bomb. Nothing was unpacked.")
    if total > limits.max_uncompressed_bytes:
        raise DataError(
            f"The archive would expand to {total / 1e9:.1f} GB; the limit is {limits.max_uncompressed_bytes / 1e9:.1f} GB. "
            "Nothing was unpacked."
        )
    packed = archive_bytes if archive_bytes is not None else sum(i.compress_size for i in infos)
    if _is_bomb(total, packed, limits):
        raise DataError(f"The archive's {len(infos)} entries expand {total / max(packed, 1):.0f}-fold in total "
                        f"({packed / 1e6:.2f} MB to {total / 1e6:.0f} MB): refused as a zip bomb. Nothing was unpacked.")


# ----------------------------------------------------------------------------- folder uploads

# Characters that some common file system (NTFS, APFS, ext4) cannot hold in a name; all others stay,
# so class folders named in any script keep their names.
_UNSAFE_NAME_CHARS = re.compile(r'[\x00-\x1f\x7f<>:"/\\|?*]')
MAX_NAME_BYTES = 200  # below the 255-byte limit of most file systems, leaving room for a suffix


def safe_name_part(part: str, tag: str = "", keep_extension: bool = True) -> str:
    """One path part with only what a file system cannot hold replaced by '_' (never empty, '.' or '..'),
    at most :data:`MAX_NAME_BYTES` bytes in UTF-8 with ``tag`` (e.g. ``~2``, to keep two names apart) put
    before its extension. A long name is cut in its stem, never in its extension: ``.png`` stays, so the
    file is still read as an image (issue 28: 70 CJK characters are 210 bytes)."""
    part = unicodedata.normalize("NFC", part)
    safe = _UNSAFE_NAME_CHARS.sub("_", part).strip(" .") or "_"
    stem, dot, ext = safe.rpartition(".")
    if not keep_extension or not dot or not stem or len(ext.encode("utf-8")) > 16 or not ext.isascii():
        stem, ext = safe, ""
    suffix = f"{tag}.{ext}" if ext else tag
    budget = MAX_NAME_BYTES - len(suffix.encode("utf-8"))
    while len(stem.encode("utf-8")) > budget:
        stem = stem[:-1]
    return (stem.rstrip(" .") or "_") + suffix


def folder_upload_to_zip(files: list[tuple[str, bytes]], keep_parts: int = 3) -> bytes:
    """A zip of uploaded files (a folder upload), keeping the last ``keep_parts`` parts of each name.

    '..', '.' and empty parts are dropped and each part keeps its characters except those a file
    system cannot hold; two different folders never merge (a second one that would get the same safe
    name gets '~2'), and two files of the same name are both kept. The zip then goes through the same
    safe extraction as an uploaded zip.
    """
    buf = io.BytesIO()
    folders: dict[tuple[str, ...], tuple[str, ...]] = {}  # original folder parts -> safe folder parts
    taken: set[tuple[str, ...]] = set()
    seen: set[str] = set()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as zf:
        for name, data in files:
            parts = [p for p in re.split(r"[\\/]+", name or "") if p not in ("", ".", "..")][-keep_parts:]
            if not parts:
                continue
            folder = _safe_folder(tuple(parts[:-1]), folders, taken)
            leaf, n = safe_name_part(parts[-1]), 1
            arc = "/".join(folder + (leaf,))
            while arc in seen:  # two names equal once made safe (or cut): the second gets ~2, never a longer name
                n += 1
                leaf = safe_name_part(parts[-1], f"~{n}")
                arc = "/".join(folder + (leaf,))
            seen.add(arc)
            zf.writestr(arc, data)
    return buf.getvalue()


def _safe_folder(parts: tuple[str, ...], folders: dict, taken: set) -> tuple[str, ...]:
    if not parts:
        return ()
    if parts not in folders:
        parent = _safe_folder(parts[:-1], folders, taken)
        candidate, n = parent + (safe_name_part(parts[-1], keep_extension=False),), 1
        while candidate in taken:
            n += 1
            candidate = parent + (safe_name_part(parts[-1], f"~{n}", keep_extension=False),)
        folders[parts] = candidate
        taken.add(candidate)
    return folders[parts]


# ----------------------------------------------------------------------------- folder discovery


def _visible_children(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.name not in IGNORED_NAMES and not p.name.startswith("."))


def find_dataset_root(folder: Path) -> Path:
    """Descend through single wrapper folders (a zip of 'mydata/' holds 'mydata/class/...').

    A single folder of images without subfolders is a class folder, not a wrapper: a data set of one
    class must be reported as one class folder, not descended into and counted as none.
    """
    root = folder
    for _ in range(5):
        kids = _visible_children(root)
        dirs = [k for k in kids if k.is_dir()]
        files = [k for k in kids if k.is_file()]
        if len(dirs) == 1 and not files and not _is_class_folder(dirs[0]):
            root = dirs[0]
        else:
            break
    return root


def _is_class_folder(folder: Path) -> bool:
    kids = _visible_children(folder)
    return not any(p.is_dir() for p in kids) and any(p.suffix.lower() in IMAGE_EXTENSIONS for p in kids)


def discover_layout(root: Path) -> dict[str, Path] | None:
    """The split folders if the data set is pre-split, else None: ``train`` and ``val`` (the held-out
    folder: ``val/``, or ``test/`` when there is no ``val/``), plus ``test`` when both ``val/`` and ``test/`` exist."""
    dirs = {p.name.lower(): p for p in _visible_children(root) if p.is_dir()}
    splits = {SPLIT_NAMES[k]: v for k, v in dirs.items() if k in SPLIT_NAMES}
    held_out = splits.get("val") or splits.get("test")
    if "train" not in splits or held_out is None or len(dirs) > 3:
        return None
    layout = {"train": splits["train"], "val": held_out}
    if "val" in splits and "test" in splits:
        layout["test"] = splits["test"]
    return layout


def scan_class_folders(root: Path, report: DataReport, limits: Limits) -> tuple[list[str], list[tuple[Path, str]]]:
    """(class names, [(file, class)]) of an ImageFolder; non-image files are listed, not fatal."""
    links = [p for p in _visible_children(root) if p.is_symlink()]
    if links:  # a class folder linked to /usr/share or /etc would be read in silently (issue 28)
        raise DataError(f"{links[0].name} in the data set is a symbolic link (to {os.readlink(links[0])}); class "
                        "folders must be real folders, so the data set was refused. Copy the images in instead.")
    class_dirs = [p for p in _visible_children(root) if p.is_dir()]
    loose = [p for p in _visible_children(root) if p.is_file()]
    for f in loose:
        report.skipped_non_images.append(f"{f.name} (not inside a class folder)")
    items: list[tuple[Path, str]] = []
    for d in class_dirs:
        for f in _walk_files(d):  # links are never followed: a linked file or folder is listed as skipped
            if any(part in IGNORED_NAMES or part.startswith(".") for part in f.relative_to(d).parts):
                continue
            if f.is_symlink():
                report.skipped_non_images.append(f"{f.relative_to(root)} (a symbolic link, not followed)")
            elif f.suffix.lower() in IMAGE_EXTENSIONS:
                items.append((f, d.name))
            else:
                report.skipped_non_images.append(f"{f.relative_to(root)} (not an image: "
                                                 f"{f.suffix.lower() or 'no extension'})")
    if len(items) > limits.max_images:
        raise DataError(f"The data set has {len(items)} images; the limit is {limits.max_images}.")
    return [d.name for d in class_dirs], items


def _walk_files(folder: Path) -> list[Path]:
    """Every file under ``folder`` and every symbolic link (to a file or a folder, not followed), sorted."""
    out = []
    for top, dirs, files in os.walk(folder, followlinks=False):
        out += [Path(top) / f for f in files]
        out += [Path(top) / d for d in dirs if (Path(top) / d).is_symlink()]
    return sorted(out)


def decode_images(items: list[tuple[Path, str]], class_names: list[str], spec: InputSpec, root: Path,
                  report: DataReport) -> ImageSet:
    arrays, labels, ids = [], [], []
    index = {c: i for i, c in enumerate(class_names)}
    for path, cls in items:
        try:
            with warnings.catch_warnings(record=True) as caught:  # Pillow's and numpy's warnings: report lines
                warnings.simplefilter("always")
                with Image.open(path) as img:
                    if img.size[0] * img.size[1] > MAX_DECODE_PIXELS:  # checked from the header, before decoding
                        report.corrupt_images.append(f"{path.relative_to(root)} (too large to decode: "
                                                     f"{img.size[0]}×{img.size[1]} pixels)")
                        continue
                    img.load()
                    arrays.append(image_to_array(img, spec, report))
                    labels.append(index[cls])
                    ids.append(path.relative_to(root).as_posix())
            _note_warnings(caught, path.relative_to(root).as_posix(), report)
        except Exception as exc:  # Pillow's decoders raise many kinds on damaged files; one bad file is skipped, not fatal
            report.corrupt_images.append(f"{path.relative_to(root)} ({type(exc).__name__})")
    if not arrays:
        images = torch.zeros((0, spec.channels, spec.height, spec.width), dtype=torch.uint8)
    else:
        images = torch.from_numpy(np.stack(arrays))
    return ImageSet(images, torch.tensor(labels, dtype=torch.long), class_names, ids)


MAX_DECODE_PIXELS = 40_000_000  # one image above this (e.g. 10000×10000) is skipped, never decoded (issue 28)


def _note_warnings(caught: list, name: str, report: DataReport) -> None:
    """Warnings an image raised while decoded (a palette with transparency, a truncated EXIF block), as one
    warning line per kind in the report (the first image named, then a count), never raw on stderr."""
    for w in caught:
        if issubclass(w.category, (DeprecationWarning, PendingDeprecationWarning, FutureWarning)):
            continue  # about library code, not about the user's images
        kind = f"{w.category.__name__}: {' '.join(str(w.message).split())[:160]}"
        counts = report.__dict__.setdefault("_warning_counts", {})
        if kind not in counts:
            counts[kind] = 1
            report.warnings.append(f"{kind} (first in {name})")
        else:
            counts[kind] += 1


# ----------------------------------------------------------------------------- the entry point


def load_dataset(
    source: str | Path | bytes,
    spec: InputSpec,
    expected_classes: int | None = None,
    val_fraction: float = 0.2,
    seed: int = 0,
    limits: Limits | None = None,
    class_order: list[str] | None = None,
    test_fraction: float | None = None,
) -> DataSet:
    """Load, validate and split a data set: a zip (path or bytes) or a folder (``sample:NAME``: ``core.sources``).

    The roles are drawn as the module docstring says; ``test_fraction`` None takes the layout's default
    (:data:`UNSPLIT_TEST_FRACTION` of all images, :data:`HELD_OUT_TEST_FRACTION` of a held-out folder),
    0 gives no test split (the layout of runs made before it). ``DataSet.split_record()`` says what was done.

    Settings are checked before anything is read; a refused zip leaves no unpacked files behind.
    Raises :class:`DataError` (unusable data) or :class:`SettingsError` (bad split settings).
    ``class_order``: the folder names in the order of the model's outputs (label j = ``class_order[j]``);
    by default the sorted folder names, as torchvision's ImageFolder orders them.
    """
    limits = limits or Limits()
    check_split_options(val_fraction, seed, test_fraction)
    folder, created, label = materialise(source, limits)
    with discard_on_refusal(folder, created):
        return _load_folder(folder, label, spec, expected_classes, SplitSettings(val_fraction, seed, test_fraction),
                            limits, class_order)


@dataclass(frozen=True)
class SplitSettings:
    """The split a loader was asked for; ``test_fraction`` None means the layout's default."""

    val_fraction: float = 0.2
    seed: int = 0
    test_fraction: float | None = None

    def test_share(self, default: float) -> float:
        return default if self.test_fraction is None else float(self.test_fraction)

    def record(self, layout: str, test_from: str, test_fraction: float) -> dict:
        return {"layout": layout, "seed": self.seed, "val_fraction": self.val_fraction,
                "test_fraction": test_fraction, "test_from": test_from}


def check_split_options(val_fraction: float, seed: int = 0, test_fraction: float | None = None) -> None:
    """Refuse a held-out fraction outside (0, 1), a test fraction outside [0, 1) or leaving no training
    images, or a non-integer seed, before any work starts. ``test_fraction`` None: the layout's default."""
    if not (isinstance(val_fraction, (int, float)) and math.isfinite(val_fraction) and 0 < val_fraction < 1):
        raise SettingsError(f"The validation fraction must be between 0 and 1 (e.g. 0.2 for 20%); got {val_fraction}.")
    if test_fraction is not None:
        if not (isinstance(test_fraction, (int, float)) and math.isfinite(test_fraction) and 0 <= test_fraction < 1):
            raise SettingsError(f"The test fraction must be at least 0 and below 1 (e.g. 0.2 for 20%); "
                                f"got {test_fraction}.")
        if val_fraction + test_fraction >= 1:
            raise SettingsError(f"The validation ({val_fraction:g}) and test ({test_fraction:g}) fractions together "
                                "leave no training images; their sum must be below 1.")
    if not isinstance(seed, int) or seed < 0:
        raise SettingsError(f"The seed must be a whole number >= 0; got {seed}.")


def materialise(source: str | Path | bytes, limits: Limits, layout: str = "a folder of class folders"
                ) -> tuple[Path, bool, str]:
    """(folder of the data set, whether this call unpacked it, label for reports) for a zip (bytes or
    path) or a folder; ``layout`` names the expected folder layout in the message for other files."""
    if isinstance(source, bytes):
        folder, created = _extract_zip(source, None, limits)
        return folder, created, "upload.zip"
    path = Path(source)
    if not path.exists():
        raise DataError(f"Data set not found: {path}")
    if path.is_file():
        if not zipfile.is_zipfile(path):
            raise DataError(f"{path.name} is neither a zip archive nor {layout}.")
        folder, created = _extract_zip(path, None, limits)
        return folder, created, str(path)
    return path, False, str(path)


@contextmanager
def discard_on_refusal(folder: Path, created: bool):
    """Remove ``folder`` when the data set in it is refused and this call unpacked it: a refusal keeps nothing."""
    try:
        yield
    except DataError:
        if created:
            shutil.rmtree(folder, ignore_errors=True)
        raise


def _load_folder(folder: Path, label: str, spec: InputSpec, expected_classes: int | None, split: SplitSettings,
                 limits: Limits, class_order: list[str] | None = None) -> DataSet:
    report = DataReport()
    root = find_dataset_root(folder)
    layout = discover_layout(root)
    if layout:
        report.presplit = True
        scanned = {role: scan_class_folders(path, report, limits) for role, path in layout.items()}
        names_tr = scanned["train"][0]
        for role in ("val", "test"):
            extra = set(scanned.get(role, ([], []))[0]) - set(names_tr)
            if extra:
                raise DataError(f"{layout[role].name}/ has classes that train/ lacks: {', '.join(sorted(extra))}.")
        class_names = _ordered(sorted(names_tr), class_order)
        _check_found(label, class_names, [item for _, items in scanned.values() for item in items], report,
                     expected_classes)
        spec = _settle_size(spec, [item for _, items in scanned.values() for item in items], report)
        decoded = {role: decode_images(items, class_names, spec, root, report) for role, (_, items) in scanned.items()}
        train, val, test, record = _presplit_roles(decoded, layout, split)
    else:
        class_names, items = scan_class_folders(root, report, limits)
        class_names = _ordered(sorted(class_names), class_order)
        _check_found(label, class_names, items, report, expected_classes)
        spec = _settle_size(spec, items, report)
        full = decode_images(items, class_names, spec, root, report)
        if len(full) == 0:
            raise DataError("No readable images were found in the class folders.")
        share = split.test_share(UNSPLIT_TEST_FRACTION)
        tr, va, te = three_way_split(full.labels.numpy(), split.val_fraction, share, split.seed)
        train, val, test = full.take(tr), full.take(va), full.take(te)
        record = split.record("unsplit", "images outside the selection split" if share > 0 else "none", share)
    report.notes += report.bit_depth.sentences()
    report.num_classes = len(class_names)
    counts = torch.bincount(torch.cat([train.labels, val.labels, test.labels]), minlength=len(class_names)).tolist()
    report.class_counts = dict(zip(class_names, counts))
    empty = [c for c, n in report.class_counts.items() if n == 0]
    if empty:  # a class the model scores but the data never shows: no figure of it would mean anything
        raise DataError(f"{len(empty)} class folder(s) hold no readable image ({', '.join(empty[:10])}"
                        f"{' …' if len(empty) > 10 else ''}); fix or remove them (the data report lists the "
                        "unreadable files). Nothing was kept.")
    report.warnings += _unmeasurable_classes(class_names, val.labels, report.class_counts, empty)
    if len(val) == 0:
        raise DataError("The validation split is empty: every class needs at least 2 readable images.")
    return DataSet(train, val, class_names, spec, report, label, test=test, split=record)


def _presplit_roles(decoded: dict[str, ImageSet], layout: dict[str, Path], split: SplitSettings
                    ) -> tuple[ImageSet, ImageSet, ImageSet, dict]:
    """(train, selection, test, split settings) of a pre-split data set (see the module docstring)."""
    train, held = decoded["train"], decoded["val"]
    names = "/".join(layout[r].name for r in ("train", "val", "test") if r in layout)
    share = split.test_share(HELD_OUT_TEST_FRACTION)
    if "test" in decoded and share > 0:  # the upload's own test folder, whatever the share
        return train, held, decoded["test"], split.record(names, f"{layout['test'].name}/ folder", share)
    if share <= 0:  # the layout before the test split: the whole held-out folder selects
        return train, held, empty_like(held), split.record(names, "none", 0.0)
    sel, te = held_out_split(held.labels.numpy(), share, split.seed)
    return train, held.take(sel), held.take(te), split.record(names, f"{layout['val'].name}/ folder", share)


def _unmeasurable_classes(class_names: list[str], val_labels: torch.Tensor, counts: dict[str, int],
                          empty: list[str]) -> list[str]:
    """A warning for classes with images but none in validation: their accuracy is undefined (shown empty,
    ``null`` in --json), so a model that fails them entirely would not show it."""
    in_val = torch.bincount(val_labels, minlength=len(class_names)).tolist()
    unmeasured = [f"{c} ({counts[c]} image{'s' if counts[c] != 1 else ''})" for c, n in zip(class_names, in_val)
                  if n == 0 and c not in empty]
    if not unmeasured:
        return []
    return [f"{len(unmeasured)} class(es) have no selection image, so their accuracy cannot be measured (shown "
            f"empty; null in --json): {', '.join(unmeasured[:10])}. Give every class at least 2 images "
            "(pre-split data: at least 1 in val/)."]


def _ordered(found: list[str], order: list[str] | None) -> list[str]:
    if not order:
        return found
    if sorted(order) != sorted(found):
        raise DataError(f"The class order ({', '.join(order[:10])}) must name each class folder once; the folders "
                        f"are: {', '.join(found[:10])}.")
    return list(order)


def _settle_size(spec: InputSpec, items: list[tuple[Path, str]], report: DataReport) -> InputSpec:
    """The input size from the images when the model left it open (see :func:`core.preprocess.size_is_open`)."""
    if not size_is_open(spec):
        return spec
    spec, note = infer_input_size([p for p, _ in items], spec)
    if max(spec.height, spec.width) > MAX_INPUT_SIDE:  # the limit applies to inferred sizes too (issue 28)
        raise DataError(f"The images are {spec.height}×{spec.width} pixels, over the {MAX_INPUT_SIDE}-pixel input "
                        "side this tool works with; give the model's input size (--input-size H W, or the Load "
                        "page's fields) and the images are resized to it. Nothing was kept.")
    report.notes.append(note)
    return spec


def found_text(where: str, class_names: list[str], items: list[tuple[Path, str]], report: DataReport,
               limit: int = 10) -> str:
    """What a data set holds, said before any verdict on it: images per class folder, then the files skipped and
    why (``report.skipped_non_images``), e.g. "Found in cats.zip: 0 images in 2 class folders (a: 0, b: 0);
    3 files skipped: a/notes.txt (not an image: .txt), ...". One line."""
    counts: dict[str, int] = {}
    for _, cls in items:
        counts[cls] = counts.get(cls, 0) + 1
    name = Path(where).name if where and where != "upload.zip" else (where or "the data set")
    text = f"Found in {name}: {len(items):,} image(s) in {len(class_names)} class folder(s)"
    if class_names:
        shown = ", ".join(f"{c}: {counts.get(c, 0):,}" for c in class_names[:limit])
        text += f" ({shown}{f', … {len(class_names) - limit} more' if len(class_names) > limit else ''})"
    skipped = report.skipped_non_images
    if skipped:
        text += (f"; {len(skipped)} file(s) skipped: " + ", ".join(skipped[:limit])
                 + (f", … {len(skipped) - limit} more" if len(skipped) > limit else ""))
    return text + "."


def _check_found(where: str, class_names: list[str], items: list[tuple[Path, str]], report: DataReport,
                 expected: int | None) -> None:
    """Refuse a data set without images, or whose classes do not fit the model, saying first what was found
    (:func:`found_text`), then what is wrong."""
    if not items:
        name = Path(where).name if where and where != "upload.zip" else (where or "the data set")
        raise DataError(f"No images found in {name}. {found_text(where, class_names, items, report)} Images are "
                        f"files ending in {', '.join(sorted(IMAGE_EXTENSIONS))} inside one folder per class.")
    try:
        _check_class_count(len(class_names), expected)
    except DataError as exc:
        raise DataError(f"{found_text(where, class_names, items, report)} {exc}") from None


def _check_class_count(found: int, expected: int | None) -> None:
    if found < 2:
        raise DataError(
            f"The data set has {found} class folder(s); at least 2 are needed (ImageFolder layout: one folder per class)."
        )
    if expected is not None and found != expected:
        raise DataError(f"The data set has {found} classes but the model outputs {expected}. They must match.")
