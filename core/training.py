"""The one training path: the optimiser loop and the image augmentation that every fine-tune uses.

A pruning step's fine-tuning (each task's ``finetune``, a few mini-batches), the recovery fine-tune
(``core.recovery.recover``, whole epochs) and the control run all train through :func:`train_steps`, and
every classifier batch is augmented by :func:`shift_images` (plus an optional mirror, :func:`augment`).
Each caller draws its random numbers from its own generator (the loop's numpy ``Generator``, the recovery's
seeded ``torch.Generator``), so a fixed seed gives the same figures as it always did.
"""
from __future__ import annotations

import threading
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F


def train_steps(model, opt: torch.optim.Optimizer, steps: int, batch_loss: Callable[[], torch.Tensor],
                cancel: threading.Event | None = None, progress: Callable[[float, str], None] | None = None,
                after_step: Callable[[], None] | None = None) -> list[float]:
    """``steps`` optimiser steps on ``batch_loss()`` (a fresh mini-batch's loss each call), stopping early on
    ``cancel``; leaves the model in eval mode. The caller sets the train mode it wants (e.g. frozen BatchNorm)
    before calling. ``after_step``: called after each optimiser step (a learning-rate schedule's ``step``).

    Returns each finished step's loss (fewer than ``steps`` when cancelled)."""
    losses: list[float] = []
    for i in range(steps):
        if cancel is not None and cancel.is_set():
            break
        loss = batch_loss()
        opt.zero_grad(set_to_none=True)
        loss.backward()
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
