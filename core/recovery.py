"""Recovery fine-tuning after pruning: N epochs over the train split, optionally distilled from the original.

The 40 mini-batches between pruning steps only let a network adapt to one removal; published
structured-pruning results (e.g. Torch-Pruning's ResNet-56 on CIFAR-10) come from a longer training
after the last cut. This is that training, sized for a local machine: SGD with Nesterov momentum and a
cosine schedule (Loshchilov & Hutter, SGDR, 2017) over ``epochs`` passes of the train split, the same
label-preserving augmentation as the pruning loop's fine-tuning (random shift, plus a horizontal flip
where the caller allows it), and optionally knowledge distillation from the unpruned model (Hinton,
Vinyals & Dean, "Distilling the Knowledge in a Neural Network", 2015):
``loss = (1 - alpha) * CE(student, y) + alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T))``.

After every epoch the model is scored on the *selection* images (never the test images); the best
epoch's weights are kept, also when the job is cancelled part-way.
"""
from __future__ import annotations

import copy
import math
import threading
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .data import ImageSet, normalize
from .errors import SettingsError
from .models import InputSpec


@dataclass
class RecoveryConfig:
    """Settings of a recovery fine-tune. ``lr`` is the peak learning rate of the cosine schedule."""

    epochs: int = 3
    lr: float = 0.01
    batch_size: int = 64
    weight_decay: float = 5e-4
    shift: int = 2  # random translation, pixels
    hflip: bool = False  # only where a mirrored image keeps its class (not digits or text)
    distill: bool = False
    kd_alpha: float = 0.5
    kd_temperature: float = 4.0
    seed: int = 0

    def validate(self) -> None:
        if self.epochs < 1:
            raise SettingsError(f"Recovery needs at least 1 epoch; got {self.epochs}.")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise SettingsError(f"The recovery learning rate must be a positive number; got {self.lr}.")
        if self.batch_size < 1:
            raise SettingsError(f"The recovery batch size must be at least 1; got {self.batch_size}.")
        if not 0 <= self.kd_alpha <= 1 or self.kd_temperature <= 0:
            raise SettingsError("Distillation needs 0 <= alpha <= 1 and a positive temperature.")


@dataclass
class RecoveryResult:
    """Per epoch the selection metric; which epoch was kept; whether the job stopped early."""

    epochs: list[dict] = field(default_factory=list)  # {"epoch", "selection", "train_loss", "seconds"}
    best_epoch: int = 0  # 0 = the model as it came in
    start_selection: float = 0.0
    cancelled: bool = False

    def to_dict(self) -> dict:
        return {"epochs": self.epochs, "best_epoch": self.best_epoch, "start_selection": self.start_selection,
                "cancelled": self.cancelled}


def augment(x: torch.Tensor, gen: torch.Generator, shift: int, hflip: bool) -> torch.Tensor:
    """Random translation by up to ``shift`` pixels (zero padded) and an optional horizontal flip."""
    n, _, h, w = x.shape
    if shift > 0:
        padded = F.pad(x, (shift, shift, shift, shift))
        dy = torch.randint(0, 2 * shift + 1, (n,), generator=gen)
        dx = torch.randint(0, 2 * shift + 1, (n,), generator=gen)
        rows = (dy.view(n, 1) + torch.arange(h).view(1, h)).view(n, 1, h, 1)
        cols = (dx.view(n, 1) + torch.arange(w).view(1, w)).view(n, 1, 1, w)
        x = padded[torch.arange(n).view(n, 1, 1, 1), torch.arange(x.shape[1]).view(1, -1, 1, 1), rows, cols]
    if hflip:
        flip = torch.rand(n, generator=gen) < 0.5
        x = x.clone()
        x[flip] = x[flip].flip(3)
    return x


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor, alpha: float,
                      temperature: float) -> torch.Tensor:
    """Hinton et al.'s KD loss; ``T^2`` keeps the soft term's gradients on the scale of the hard one."""
    hard = F.cross_entropy(student, labels)
    if alpha == 0:
        return hard
    soft = F.kl_div(F.log_softmax(student / temperature, 1), F.softmax(teacher / temperature, 1),
                    reduction="batchmean") * temperature ** 2
    return (1 - alpha) * hard + alpha * soft


def recover(model: nn.Module, train: ImageSet, spec: InputSpec, config: RecoveryConfig,
            select: Callable[[nn.Module], float], teacher: nn.Module | None = None,
            device: torch.device | None = None, cancel: threading.Event | None = None,
            progress: Callable[[int, int, str], None] | None = None) -> RecoveryResult:
    """Fine-tune ``model`` in place for ``config.epochs`` epochs; on return it holds the best epoch's weights.

    ``select(model) -> float`` scores the model on the selection images (higher is better, e.g.
    accuracy); ``teacher`` is required when ``config.distill``. ``progress(done, total, message)``
    counts mini-batches over all epochs. Cancelling stops at the next mini-batch and keeps the best
    epoch measured so far (the incoming model if none finished).
    """
    config.validate()
    if config.distill and teacher is None:
        raise SettingsError("Distillation needs the original model as the teacher.")
    if len(train) == 0:
        raise SettingsError("Recovery needs training images; the train split is empty.")
    device = device or torch.device("cpu")
    model.to(device)
    if teacher is not None:
        teacher = teacher.to(device).eval()
    gen = torch.Generator().manual_seed(config.seed)
    steps_per_epoch = max(1, len(train) // config.batch_size)
    total = steps_per_epoch * config.epochs
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=config.lr, momentum=0.9, nesterov=True, weight_decay=config.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total)
    result = RecoveryResult(start_selection=float(select(model.eval())))
    best_score, best_state = result.start_selection, copy.deepcopy(model.state_dict())
    done = 0
    for epoch in range(1, config.epochs + 1):
        model.train()
        order = torch.randperm(len(train), generator=gen)
        losses = []
        for b in range(steps_per_epoch):
            if cancel is not None and cancel.is_set():
                result.cancelled = True
                break
            idx = order[b * config.batch_size:(b + 1) * config.batch_size]
            x = augment(normalize(train.images[idx], spec), gen, config.shift, config.hflip).to(device)
            y = train.labels[idx].to(device)
            out = model(x)
            if config.distill:
                with torch.no_grad():
                    t_out = teacher(x)
                loss = distillation_loss(out, t_out, y, config.kd_alpha, config.kd_temperature)
            else:
                loss = F.cross_entropy(out, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.item())
            done += 1
            if progress:
                progress(done, total, f"recovery epoch {epoch}/{config.epochs}")
        if result.cancelled:
            break
        score = float(select(model.eval()))
        result.epochs.append({"epoch": epoch, "selection": score, "train_loss": float(np.mean(losses))})
        if score > best_score:
            best_score, best_state, result.best_epoch = score, copy.deepcopy(model.state_dict()), epoch
    model.load_state_dict(best_state)
    model.eval()
    return result
