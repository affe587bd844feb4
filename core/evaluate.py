"""Accuracy, per-class accuracy, confusion matrix, MACs and parameters of a classifier."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .data import ImageSet, normalize
from .device import model_device
from .errors import SettingsError, one_line
from .models import InputSpec
from .shortcuts import is_shortcut_embedding


@dataclass
class Accuracy:
    """``correct``: bool (N,), whether each image (in the order of the image set) was classified right:
    what a paired comparison of two models on the same images needs (``core.stats``); not in ``to_dict``."""

    accuracy: float
    per_class: dict[str, float]
    confusion: list[list[int]]
    n: int
    correct: torch.Tensor | None = field(default=None, repr=False, compare=False)

    @property
    def metric(self) -> float:
        """The task-neutral name of the figure a pruning step is decided on (``core.tasks.Decision``)."""
        return self.accuracy

    def to_dict(self) -> dict:
        return {"accuracy": self.accuracy, "per_class": self.per_class, "confusion": self.confusion, "n": self.n}


@torch.no_grad()
def predict_logits(model: nn.Module, images: torch.Tensor, spec: InputSpec, batch_size: int = 256) -> torch.Tensor:
    """Logits ``[N, classes]`` (on the CPU) for uint8 images ``[N, C, H, W]``, in eval mode, batched to bound
    memory, computed on the model's device."""
    was_training = model.training
    model.eval()
    device = model_device(model)
    out = []
    try:
        for i in range(0, len(images), batch_size):
            batch = images[i:i + batch_size]
            try:
                y = model(normalize(batch.to(device), spec))
            except (RuntimeError, ValueError, IndexError, TypeError) as exc:  # e.g. a 1x1 input through pooling
                if "out of memory" in str(exc).lower():
                    raise
                raise SettingsError(f"The model does not run on {spec.channels}×{spec.height}×{spec.width} images "
                                    f"({one_line(exc)}); check the input size.") from None
            out.append(check_logits(y, len(batch)).float().cpu())
    finally:
        model.train(was_training)
    if not out:
        return torch.zeros((0, 0))
    return torch.cat(out)


def check_logits(out, n: int) -> torch.Tensor:
    """``out`` when it is what a classifier is scored on, one (n, classes) logits tensor for n images; else
    :class:`SettingsError` in one line (issue 28): a tuple or dict, or a (n, C, 1, 1) map, would otherwise be
    scored with argmax over the wrong axis (a model right on every image read 50 %)."""
    if not isinstance(out, torch.Tensor):
        raise SettingsError(f"The model's forward returns a {type(out).__name__}, not one tensor of logits (N, "
                            "classes); PruneScope scores classifiers that return their logits alone. Return them "
                            "alone from forward (e.g. a wrapper returning out[0] or out['logits']).")
    if out.ndim != 2 or out.shape[0] != n or out.shape[1] < 1:
        raise SettingsError(f"The model returns a tensor of shape {tuple(out.shape)} for {n} image(s), not (N, "
                            "classes) logits; PruneScope does not guess which axis holds the classes. End forward "
                            "with the logits flattened, e.g. x.flatten(1) for a (N, C, 1, 1) output.")
    return out


CONFUSION_LIMIT = 2000  # classes above which the k×k confusion matrix is not built (20,000 classes: 3.2 GB)


def accuracy_from_predictions(pred: torch.Tensor, labels: torch.Tensor, class_names: list[str]) -> Accuracy:
    """Accuracy, per-class accuracy and the confusion matrix (rows: true class, columns: predicted) of ``pred``
    against ``labels``; above :data:`CONFUSION_LIMIT` classes the matrix is left empty ([]) and per-class
    figures are counted directly, so memory stays linear in the class count."""
    k = len(class_names)
    if k > CONFUSION_LIMIT:
        total = torch.bincount(labels, minlength=k)
        right = torch.bincount(labels[pred == labels], minlength=k)
        per_class = {name: float(right[i]) / int(total[i]) if int(total[i]) else float("nan")
                     for i, name in enumerate(class_names)}
        correct = pred == labels
        acc = float(correct.float().mean()) if len(labels) else float("nan")
        return Accuracy(acc, per_class, [], int(len(labels)), correct)
    conf = torch.zeros((k, k), dtype=torch.long)
    conf.index_put_((labels, pred.clamp(0, k - 1)), torch.ones_like(labels), accumulate=True)
    per_class = {}
    for i, name in enumerate(class_names):
        total = int(conf[i].sum())
        per_class[name] = float(conf[i, i]) / total if total else float("nan")
    correct = pred == labels
    acc = float(correct.float().mean()) if len(labels) else float("nan")
    return Accuracy(acc, per_class, conf.tolist(), int(len(labels)), correct)


def evaluate_accuracy(model: nn.Module, data: ImageSet, spec: InputSpec, batch_size: int = 256) -> Accuracy:
    logits = predict_logits(model, data.images, spec, batch_size)
    return accuracy_from_predictions(logits.argmax(1), data.labels, data.class_names)


def count_macs_params(model: nn.Module, spec: InputSpec) -> tuple[int, int]:
    """Multiply-accumulates of conv and linear layers for one image, and the parameter count.

    Counted from the real forward pass (hooks, :func:`layer_macs`), so it follows whatever shape the model
    really has. The frozen 1x1 embeddings that stand in for zero-padded shortcuts (``core.shortcuts``) are data
    movement, not learned layers: their MACs and weights count as the pad they replace does (zero), so
    a model shows the same figures before and after its graph is built, on every page.
    """
    macs = sum(layer_macs(model, spec).values())
    embedded = {id(m.weight) for m in model.modules() if is_shortcut_embedding(m)}
    params = sum(p.numel() for p in model.parameters() if id(p) not in embedded)
    return int(macs), int(params)


def layer_macs(model: nn.Module, spec: InputSpec) -> dict[str, int]:
    """Module name -> multiply-accumulates of that conv or linear layer for one image (all its calls), from one
    real forward pass of a zero image; frozen shortcut embeddings (``core.shortcuts``) left out (zero)."""
    macs: dict[str, int] = {}

    def hook(name: str):
        def count(m: nn.Module, inp, out):
            if isinstance(m, nn.Conv2d):
                kh, kw = m.kernel_size
                per_output = (m.in_channels // m.groups) * kh * kw
            else:
                per_output = m.in_features
            macs[name] = macs.get(name, 0) + out.numel() // out.shape[0] * per_output
        return count

    handles = [m.register_forward_hook(hook(name)) for name, m in model.named_modules()
               if isinstance(m, (nn.Conv2d, nn.Linear)) and not is_shortcut_embedding(m)]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(spec.shape(1)))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return macs
