"""What a model reads, inferred where the model or the file does not say it: input channels from the first
layer, input size from the data, 16-bit pixels scaled to the 8-bit range the pipeline works in.

Nothing here is silent: every inference returns a sentence for the Load page and the CLI, and every
value can be overridden (``--input-size``, ``--mean``/``--std``, the Load page's fields).
"""
from __future__ import annotations

from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image
from torch import nn

if TYPE_CHECKING:  # models imports this module
    from .models import InputSpec

# Pillow modes that hold more than 8 bits per pixel (16-bit PNG/TIFF grey, 32-bit integer, float).
HIGH_BIT_MODES = {"I;16", "I;16L", "I;16B", "I;16N", "I", "F"}
_UINT16_MAX = 65535.0


# ----------------------------------------------------------------------------- channels


def first_layer_channels(model: nn.Module) -> int | None:
    """Input channels of the model's first convolution (its first layer in definition order), or None."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            return int(m.in_channels)
    return None


def match_first_layer(spec: InputSpec, model: nn.Module) -> tuple[InputSpec, list[str]]:
    """``spec`` with the channel count the first convolution reads (1 = grey, 3 = RGB) and a mean/std of one
    value per channel; notes say what changed. A 3-value mean/std becomes its average for a grey model
    (ImageNet's gives 0.449 / 0.226), which is what grey-scale copies of RGB statistics amount to."""
    channels = first_layer_channels(model)
    notes: list[str] = []
    if channels is None:
        return spec, notes
    if channels == spec.channels:
        if len(spec.mean) == len(spec.std) == channels:
            return spec, notes
        # one value given for several channels (or the reverse): the same statistics for every channel
        return replace(spec, mean=per_channel(spec.mean, channels), std=per_channel(spec.std, channels)), notes
    if channels not in (1, 3):
        return spec, [f"The first convolution reads {channels} channels; images have 1 (grey) or 3 (RGB), so "
                      "evaluation will fail unless the model converts them itself."]
    mean, std = per_channel(spec.mean, channels), per_channel(spec.std, channels)
    spec = replace(spec, channels=channels, mean=mean, std=std, colour_order="grey" if channels == 1 else "RGB")
    kind = "grey-scale (1 channel)" if channels == 1 else "RGB (3 channels)"
    notes.append(f"The first convolution reads {channels} channel(s): images are converted to {kind}, with mean "
                 f"{_fmt(mean)} and std {_fmt(std)}. Override with --mean/--std (one value per channel) or the "
                 "Load page's fields.")
    return spec, notes


def per_channel(values: tuple[float, ...], channels: int) -> tuple[float, ...]:
    if len(values) == channels:
        return tuple(values)
    if channels == 1:
        return (round(float(np.mean(values)), 4),)
    return tuple(float(values[0]) for _ in range(channels))


def _fmt(values: tuple[float, ...]) -> str:
    return "(" + ", ".join(f"{v:g}" for v in values) + ")"


# ----------------------------------------------------------------------------- size


def size_is_open(spec: InputSpec) -> bool:
    """True when nothing fixed the input size yet (a model given as code or a pickle): the data decides."""
    return spec.height <= 0 or spec.width <= 0


def infer_input_size(paths: list[Path], spec: InputSpec) -> tuple[InputSpec, str]:
    """``spec`` with the size of the data set's images: the only size if all share one, else the most common
    one (said plainly, with how many images have it). Reads image headers only."""
    sizes: Counter = Counter()
    for path in paths:
        try:
            with Image.open(path) as img:
                sizes[img.size] += 1  # (width, height)
        except Exception:  # unreadable files are reported when decoded; they do not vote
            continue
    if not sizes:
        return replace(spec, height=224, width=224), "Input size 224×224 assumed (no readable image to measure)."
    (w, h), n = sizes.most_common(1)[0]
    total = sum(sizes.values())
    spec = replace(spec, height=h, width=w)
    if n == total:
        note = (f"Input size {h}×{w} taken from the data (all {total} images are {h}×{w}; the model does not fix "
                "its input size). Override with --input-size H W or the Load page's fields.")
    else:
        note = (f"Input size {h}×{w} taken from the data: the most common size ({n} of {total} images; "
                f"{len(sizes)} different sizes); the others are resized and centre-cropped to it. Override with "
                "--input-size H W or the Load page's fields.")
    return spec, note


# ----------------------------------------------------------------------------- bit depth


class BitDepthLog:
    """Per mode: how many images were rescaled and the pixel values they really held, for the report."""

    def __init__(self) -> None:
        self.count: Counter = Counter()
        self.low: dict[str, float] = {}
        self.high: dict[str, float] = {}

    def add(self, mode: str, lo: float, hi: float) -> None:
        self.count[mode] += 1
        self.low[mode] = min(lo, self.low.get(mode, lo))
        self.high[mode] = max(hi, self.high.get(mode, hi))

    def sentences(self) -> list[str]:
        out = []
        for mode, n in self.count.items():
            lo, hi = self.low[mode], self.high[mode]
            top = _full_scale(mode, hi)
            out.append(f"{n} image(s) with more than 8 bits per pixel ({mode}; values {lo:g}–{hi:g}) were scaled "
                       f"from 0–{top:g} to 0–255 (value × 255 / {top:g}), not clipped.")
            if hi <= 4095 and top == _UINT16_MAX:
                out.append(f"The {mode} images never exceed {hi:g}: if they hold 12-bit or smaller values in 16-bit "
                           "files, they look dark after this scaling; convert them to 8 bit yourself to choose.")
        return out


def _full_scale(mode: str, hi: float) -> float:
    """The top of the range a high-bit-depth image's values are scaled from: 16-bit files by 65535;
    32-bit integer images (how Pillow opens some 16-bit PNGs) by 65535 unless they stay within 8 bits;
    float images by 1 when they stay within [0, 1]."""
    if mode == "F":
        return 1.0 if hi <= 1.0 else _UINT16_MAX if hi <= _UINT16_MAX else hi
    if mode == "I":
        return 255.0 if hi <= 255 else _UINT16_MAX if hi <= _UINT16_MAX else hi
    return _UINT16_MAX


def to_8bit(img: Image.Image, log: BitDepthLog | None = None) -> Image.Image:
    """A grey 8-bit ("L") copy of a high-bit-depth image, scaled by the format's real range. Pillow's own
    ``convert`` clips such images at 255, which turns almost every pixel of a 16-bit photo white."""
    arr = np.asarray(img, dtype=np.float64)
    lo, hi = (float(arr.min()), float(arr.max())) if arr.size else (0.0, 0.0)
    top = _full_scale(img.mode, hi)
    if log is not None:
        log.add(img.mode, lo, hi)
    scaled = np.clip(np.rint(arr * (255.0 / top)), 0, 255).astype(np.uint8)
    return Image.fromarray(scaled, mode="L")
