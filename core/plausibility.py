"""Is the baseline plausible? A trained model that scores near chance is almost always fed wrongly (input size,
normalisation, class order) or is the wrong checkpoint; nothing after Load means anything until that is fixed.

Chance is what guessing uniformly among the model's outputs scores (1/3 for a 3-output model whatever the class
balance). An accuracy near chance says the model sees noise; one far *below* chance says it answers
systematically wrong, which points at the class order.

When the baseline is near or below chance, the current preprocessing and the common normalisations (ImageNet,
CIFAR-10, none, [-1, 1]) are tried, each also with the class order the confusion matrix suggests (the one-to-one
mapping of model outputs to folder classes that maximises agreement, by the Hungarian method), on a few
hundred validation images. The choice is made on one half of those images; the choice and the current setting
are then measured on the other half, and a fix is offered only when it beats the current setting there by a
clear margin, so the figure offered is not the figure that chose it and never worse than what is in use.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import nn

from .data import DataSet, ImageSet, stratified_indices
from .evaluate import predict_logits
from .models import IMAGENET_MEAN, IMAGENET_STD, InputSpec
from .preprocess import per_channel

# name -> (mean, std) per RGB channel; grey models get their channel average
NORMALISATIONS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "ImageNet mean/std": (IMAGENET_MEAN, IMAGENET_STD),
    "CIFAR-10 mean/std": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "none (pixels in [0, 1])": ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),
    "[-1, 1] (mean 0.5, std 0.5)": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
}
CHECK_IMAGES = 400
CURRENT = "current"  # the label of the preprocessing in use, tried first among the candidates


@dataclass
class Fix:
    """A preprocessing that scores clearly better: its normalisation and, if it differs, the class order
    (folder class names in the order of the model's outputs)."""

    label: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    class_order: list[str] | None
    accuracy: float  # measured on the held-out half of the checked images
    n: int
    current_accuracy: float = float("nan")  # the current setting on the same held-out images

    def cli_flags(self) -> str:
        """The command-line options that apply this fix."""
        flags = f"--mean {' '.join(f'{v:g}' for v in self.mean)} --std {' '.join(f'{v:g}' for v in self.std)}"
        if self.class_order is not None:
            flags += f" --class-order {','.join(self.class_order)}"
        return flags


@dataclass
class Plausibility:
    accuracy: float
    chance: float
    near_chance: bool
    below_chance: bool = False
    causes: list[str] = field(default_factory=list)
    tried: list[dict] = field(default_factory=list)  # label, class order changed, accuracy on the choosing half
    fix: Fix | None = None

    def to_dict(self) -> dict:
        d = asdict(self)
        d["message"] = self.message()
        return d

    @property
    def suspect(self) -> bool:
        """Near or far below chance: either way the baseline means nothing until the cause is fixed."""
        return self.near_chance or self.below_chance

    def cli_lines(self) -> list[str]:
        """What the CLI prints on stderr: the warning and, if one was found, the flags to rerun with."""
        if not self.suspect:
            return []
        lines = [f"warning: {self.message()}"]
        if self.fix is not None:
            lines.append(f"suggestion: rerun with {self.fix.cli_flags()}")
        return lines

    def message(self) -> str:
        if not self.suspect:
            return ""
        if self.below_chance:
            text = (f"Baseline accuracy {self.accuracy:.1%} is far below chance ({self.chance:.1%}): the model answers "
                    "systematically wrong, which usually means its outputs are matched to the wrong class folders. ")
        else:
            text = (f"Baseline accuracy {self.accuracy:.1%} is near chance ({self.chance:.1%}): the model is probably "
                    "fed wrongly or is not the trained checkpoint. ")
        text += f"Likely causes: {'; '.join(self.causes)}."
        if self.fix is not None:
            text += (f" Best found: {describe_fix(self.fix)}, {self.fix.accuracy:.1%} on {self.fix.n} held-out images "
                     f"(the current setting: {self.fix.current_accuracy:.1%}).")
        else:
            text += " None of the common normalisations or class orders helps."
        return text


def describe_fix(fix: Fix) -> str:
    if fix.label == CURRENT:
        return f"class order {fix.class_order} (normalisation unchanged)"
    parts = [f"normalisation {fix.label} (mean {list(fix.mean)}, std {list(fix.std)})"]
    if fix.class_order is not None:
        parts.append(f"class order {fix.class_order}")
    return " with ".join(parts)


def chance_level(labels: torch.Tensor, num_outputs: int) -> float:
    """What guessing uniformly among the model's ``num_outputs`` outputs scores on ``labels``: 1/num_outputs
    when every label is one of the outputs, whatever the class balance."""
    m = max(int(num_outputs), 1)
    if labels.numel() == 0:
        return 1.0 / m
    return float((labels < m).sum()) / labels.numel() / m


def _margin(p: float, n: int) -> float:
    """5 points or two binomial standard errors of a rate ``p`` on ``n`` images, whichever is wider."""
    return max(0.05, 2 * math.sqrt(p * (1 - p) / n)) if n else math.inf


CLASS_ORDER_LIMIT = 2000


def _tells_apart(chance: float, n: int) -> bool:
    """Whether ``n`` images can tell a model from guessing at all: a perfect score must lie outside the margin
    around chance (one image of two classes cannot: 100 % would read 'near chance')."""
    return n > 0 and 1.0 - chance > _margin(chance, n)


def near_chance(accuracy: float, chance: float, n: int) -> bool:
    """Within :func:`_margin` of chance (either side); never said when ``n`` images cannot tell."""
    if n == 0 or math.isnan(accuracy) or not _tells_apart(chance, n):
        return False
    return abs(accuracy - chance) <= _margin(chance, n)


def below_chance(accuracy: float, chance: float, n: int) -> bool:
    """Further below chance than :func:`_margin`: systematically wrong answers, not noise."""
    if n == 0 or math.isnan(accuracy) or not _tells_apart(chance, n):
        return False
    return accuracy < chance - _margin(chance, n)


def check_plausibility(model: nn.Module, data: DataSet, spec: InputSpec, accuracy: float,
                       n_images: int = CHECK_IMAGES) -> Plausibility:
    """Say whether ``accuracy`` (the baseline on ``data.val``) is near or far below chance and, if so, look for
    a fix that beats the current ``spec`` and class order on held-out images (``accuracy`` itself, measured
    elsewhere, never decides the offer)."""
    k = len(data.class_names)
    chance = chance_level(data.val.labels, _num_outputs(model, data.val, spec))
    n = len(data.val)
    result = Plausibility(accuracy, chance, near_chance(accuracy, chance, n), below_chance(accuracy, chance, n))
    if not result.suspect:
        return result
    result.causes = _likely_causes(spec, data, result.below_chance)
    choose, hold = _halves(data.val.subset(n_images))
    if len(choose) == 0 or len(hold) == 0:
        return result
    best = None
    for label, trial in _candidates(spec):
        pred = predict_logits(model, choose.images, trial).argmax(1)
        # the class order is searched up to CLASS_ORDER_LIMIT classes (a k×k assignment; 20,000 would be 3.2 GB)
        order = best_class_order(pred, choose.labels, k) if k <= CLASS_ORDER_LIMIT else None
        plain = _agreement(pred, choose.labels)
        mapped = _agreement(_mapped(pred, order, k), choose.labels)
        use_order = mapped > plain
        score = mapped if use_order else plain
        result.tried.append({"normalisation": label, "class_order_changed": use_order, "accuracy": score})
        if best is None or score > best[0]:  # ties keep the earlier candidate: the current setting first
            best = (score, label, trial, order if use_order else None)
    _, label, trial, order = best
    if label == CURRENT and order is None:
        return result
    held = _agreement(_mapped(predict_logits(model, hold.images, trial).argmax(1), order, k), hold.labels)
    current = _agreement(predict_logits(model, hold.images, spec).argmax(1), hold.labels)
    if held > current + _margin(current, len(hold)):
        names = [data.class_names[int(i)] for i in order] if order is not None else None
        result.fix = Fix(label, tuple(trial.mean), tuple(trial.std), names, held, len(hold), current)
    return result


def _candidates(spec: InputSpec) -> list[tuple[str, InputSpec]]:
    """The current preprocessing first, then each common normalisation that differs from it."""
    out = [(CURRENT, spec)]
    for label, (mean, std) in NORMALISATIONS.items():
        trial = replace(spec, mean=per_channel(mean, spec.channels), std=per_channel(std, spec.channels))
        if not (np.allclose(trial.mean, spec.mean) and np.allclose(trial.std, spec.std)):
            out.append((label, trial))
    return out


def _num_outputs(model: nn.Module, images: ImageSet, spec: InputSpec) -> int:
    """How many classes the model scores: the width of its output for one image."""
    if len(images) == 0:
        return len(images.class_names)
    return int(predict_logits(model, images.images[:1], spec).shape[1])


def _mapped(pred: torch.Tensor, order: torch.Tensor | None, k: int) -> torch.Tensor:
    return pred if order is None else order[pred.clamp(0, k - 1)]


def _agreement(pred: torch.Tensor, labels: torch.Tensor) -> float:
    return float((pred == labels).float().mean())


def quick_check(model: nn.Module, data: DataSet, spec: InputSpec, n_images: int = CHECK_IMAGES) -> Plausibility:
    """:func:`check_plausibility` of the accuracy on up to ``n_images`` validation images: cheap enough to run
    before any long command, so a wrongly fed model is said before analysis or pruning starts."""
    subset = data.val.subset(n_images)
    pred = predict_logits(model, subset.images, spec).argmax(1)
    accuracy = float((pred == subset.labels).float().mean()) if len(subset) else float("nan")
    return check_plausibility(model, data, spec, accuracy, n_images)


def best_class_order(pred: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    """For each model output j, the folder class it most plausibly means: the one-to-one assignment that
    maximises agreement in the confusion matrix (Hungarian method). Returns a (k,) index tensor."""
    conf = np.zeros((k, k), dtype=np.int64)
    np.add.at(conf, (pred.clamp(0, k - 1).numpy(), labels.numpy()), 1)  # rows: output, cols: folder class
    rows, cols = linear_sum_assignment(conf, maximize=True)
    order = np.arange(k)
    order[rows] = cols
    return torch.from_numpy(order)


def _halves(images: ImageSet) -> tuple[ImageSet, ImageSet]:
    """Two stratified halves: one chooses, the other measures."""
    if len(images) < 4:
        return images, ImageSet(images.images[:0], images.labels[:0], images.class_names)
    idx = stratified_indices(images.labels.numpy(), len(images) // 2, seed=1)
    mask = np.zeros(len(images), dtype=bool)
    mask[idx] = True
    a, b = torch.from_numpy(np.flatnonzero(mask)), torch.from_numpy(np.flatnonzero(~mask))
    return (ImageSet(images.images[a], images.labels[a], images.class_names),
            ImageSet(images.images[b], images.labels[b], images.class_names))


def _likely_causes(spec: InputSpec, data: DataSet, below: bool = False) -> list[str]:
    """The usual suspects, likeliest first: the class order leads when the model is systematically wrong."""
    names = data.class_names
    how = "in sorted order" if list(names) == sorted(names) else "in the order given (not sorted)"
    order = (f"class order (the model's outputs are matched to the class folders {how}: "
             f"{', '.join(names[:6])}{'…' if len(names) > 6 else ''})")
    causes = [f"input size (the model sees {spec.height}×{spec.width}; set the size it was trained at)",
              f"normalisation (now mean {list(spec.mean)}, std {list(spec.std)})", order,
              "a wrong or untrained checkpoint (e.g. the weights of another run, or random initial weights)"]
    return [order] + [c for c in causes if c != order] if below else causes


# ----------------------------------------------------------------------------- applying a fix


def apply_fix(fix: Fix, spec: InputSpec, data: DataSet) -> tuple[InputSpec, DataSet]:
    """The input spec with the fix's normalisation and the data set relabelled in the fix's class order."""
    spec = replace(spec, mean=tuple(fix.mean), std=tuple(fix.std))
    if fix.class_order is None:
        return spec, replace(data, input=spec)
    return spec, replace(reorder_classes(data, fix.class_order), input=spec)


def reorder_classes(data: DataSet, order: list[str]) -> DataSet:
    """``data`` with class ``order[j]`` as label j (the model's j-th output); images are unchanged."""
    if sorted(order) != sorted(data.class_names):
        raise ValueError(f"class order {order} is not a permutation of {data.class_names}")
    new_index = torch.tensor([order.index(name) for name in data.class_names])

    def relabel(s: ImageSet) -> ImageSet:
        return ImageSet(s.images, new_index[s.labels], list(order))

    return replace(data, train=relabel(data.train), val=relabel(data.val), class_names=list(order))
