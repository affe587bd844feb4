"""The one training path: the optimiser loop and the image augmentation that every fine-tune uses.

A pruning step's fine-tuning (each task's ``finetune``, a few mini-batches), the recovery fine-tune
(``core.recovery.recover``, whole epochs) and the control run all train through :func:`train_steps`, and
every classifier batch is augmented by :func:`shift_images` (plus an optional mirror, :func:`augment`).
Each caller draws its random numbers from its own generator (the loop's numpy ``Generator``, the recovery's
seeded ``torch.Generator``), so a fixed seed gives the same figures as it always did.
"""
from __future__ import annotations

import contextlib
import threading
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from .errors import SettingsError

# Training arithmetic: "fp32" everywhere, or "bf16" mixed precision (torch.autocast: convolutions and matrix
# products in bfloat16, the weights, their gradients and the optimiser in float32; models in channels-last memory
# layout while they train). "auto": bf16 where the device computes bfloat16 natively (a CPU with AVX512-BF16 or
# AMX, a CUDA GPU that reports bf16 support), fp32 elsewhere, where bf16 is emulated and slower. Only training
# changes: every accuracy a decision or a report reads is measured in float32. Why: on our 2-core AVX512-BF16
# CPU a KD training step of a pruned ResNet-56 ran 1.61x faster in bf16 and its 6-epoch recovery 1.52-1.70x,
# reaching the same accuracy on unseen images within the spread of two fp32 seeds (bench/train_precision.py).
PRECISIONS = ("auto", "fp32", "bf16")


def native_bf16(device: torch.device | str) -> bool:
    """Whether ``device`` computes bfloat16 in hardware: CUDA's own report, or the CPU's AVX512-BF16 / AMX flags."""
    device = torch.device(device)
    if device.type == "cuda":
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    if device.type != "cpu":
        return False
    cpu = getattr(torch, "cpu", None)
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(cpu, name, lambda: False)()) for name in probes)


def check_precision(name: str) -> None:
    """Raise ``SettingsError`` unless ``name`` is one of :data:`PRECISIONS` (the settings' one check)."""
    if name not in PRECISIONS:
        raise SettingsError(f"Unknown training precision '{name}'. Choose one of: {', '.join(PRECISIONS)}.")


def resolve_precision(name: str | None, device: torch.device | str) -> str:
    """``auto`` | ``fp32`` | ``bf16`` -> the precision training uses on ``device`` (``fp32`` or ``bf16``).

    Raises ``SettingsError`` for another name. An explicit ``bf16`` is kept on a device without native bfloat16
    (it is correct there, only slower)."""
    name = (name or "auto").lower()
    check_precision(name)
    if name == "auto":
        return "bf16" if native_bf16(device) else "fp32"
    return name


@contextlib.contextmanager
def training_precision(model: torch.nn.Module, precision: str = "fp32"):
    """Inside: ``model`` in channels-last layout when ``precision`` is ``bf16`` (oneDNN's and cuDNN's fast bf16
    convolutions use it); after: back in the contiguous layout every other path (tracing, export, saving)
    expects. The parameters stay the same objects (``Module.to`` assigns ``.data``), so an optimiser built on
    them keeps working. ``fp32`` changes nothing."""
    if precision != "bf16":
        yield
        return
    model.to(memory_format=torch.channels_last)
    try:
        yield
    finally:
        model.to(memory_format=torch.contiguous_format)


def autocast(device: torch.device | str, precision: str = "fp32"):
    """The forward pass's context for ``precision``: ``torch.autocast`` to bfloat16 for ``bf16``, nothing else
    for ``fp32``."""
    device = torch.device(device)
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def train_steps(model, opt: torch.optim.Optimizer, steps: int, batch_loss: Callable[[], torch.Tensor],
                cancel: threading.Event | None = None, progress: Callable[[float, str], None] | None = None,
                after_step: Callable[[], None] | None = None, precision: str = "fp32") -> list[float]:
    """``steps`` optimiser steps on ``batch_loss()`` (a fresh mini-batch's loss each call), stopping early on
    ``cancel``; leaves the model in eval mode. The caller sets the train mode it wants (e.g. frozen BatchNorm)
    before calling. ``after_step``: called after each optimiser step (a learning-rate schedule's ``step``).
    ``precision``: ``fp32`` or ``bf16`` (:func:`resolve_precision`; ``batch_loss`` runs under :func:`autocast`,
    the backward pass and the optimiser step outside it, as ``torch.autocast`` asks).

    Returns each finished step's loss (fewer than ``steps`` when cancelled). Raises ``ValueError`` for any other
    precision (``auto`` must be resolved first: read as fp32 it would silently train slower)."""
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"train_steps needs a resolved precision, fp32 or bf16; got '{precision}'.")
    losses: list[float] = []
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    with training_precision(model, precision):
        for i in range(steps):
            if cancel is not None and cancel.is_set():
                break
            with autocast(device, precision):
                loss = batch_loss()
            opt.zero_grad(set_to_none=True)
            loss.float().backward()
            opt.step()
            if after_step is not None:
                after_step()
            losses.append(float(loss.detach()))
            if progress:
                progress((i + 1) / steps, f"fine-tuning ({i + 1}/{steps})")
    model.eval()
    return losses


def shift_images(x: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor, shift: int) -> torch.Tensor:
    """Each image of ``x`` [N, C, H, W] translated by its own offset: ``dy`` / ``dx`` [N] in 0..2*shift
    (``shift`` is no move), the uncovered border zero. Label-preserving for any image; one gather, no loop."""
    n, c, h, w = x.shape
    if shift <= 0:
        return x
    padded = F.pad(x, (shift, shift, shift, shift))
    rows = (dy.view(n, 1) + torch.arange(h).view(1, h)).view(n, 1, h, 1).to(x.device)
    cols = (dx.view(n, 1) + torch.arange(w).view(1, w)).view(n, 1, 1, w).to(x.device)
    batch = torch.arange(n, device=x.device).view(n, 1, 1, 1)
    return padded[batch, torch.arange(c, device=x.device).view(1, -1, 1, 1), rows, cols]


def augment(x: torch.Tensor, gen: torch.Generator, shift: int, hflip: bool) -> torch.Tensor:
    """A random translation by up to ``shift`` pixels (:func:`shift_images`) and, with ``hflip``, a mirror of
    half the images, drawn from ``gen`` (the recovery's)."""
    n = x.shape[0]
    if shift > 0:
        dy = torch.randint(0, 2 * shift + 1, (n,), generator=gen)
        dx = torch.randint(0, 2 * shift + 1, (n,), generator=gen)
        x = shift_images(x, dy, dx, shift)
    if hflip:
        flip = torch.rand(n, generator=gen) < 0.5
        x = x.clone()
        x[flip] = x[flip].flip(3)
    return x


def augment_np(x: torch.Tensor, rng: np.random.Generator, shift: int = 2) -> torch.Tensor:
    """A random translation by up to ``shift`` pixels drawn from ``rng`` (the pruning loop's numpy generator):
    the step fine-tuning's augmentation."""
    if shift <= 0:
        return x
    offs = rng.integers(0, 2 * shift + 1, size=(len(x), 2))
    return shift_images(x, torch.as_tensor(offs[:, 0]), torch.as_tensor(offs[:, 1]), shift)
