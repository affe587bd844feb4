"""Export re-measures what it ships: a step's recorded figure must reproduce on the images it was measured on.

A run folder may be edited or damaged on disk (``docs/threat-model.md``). Hashes catch a step file replaced
alone; a step replaced *and* its record's hash rewritten, or weights that were never what the record says,
are caught here: before a bundle is written, the exported step is evaluated again on the run's selection
images (its recorded split, ``core.sources.load_run_dataset``) and its accuracy compared with the
``metric`` its history record holds. A figure that does not reproduce is refused; nothing is written.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn

from .data import ImageSet
from .errors import PruneScopeError
from .models import InputSpec


class NotReproducedError(PruneScopeError):
    """The step's recorded figure does not reproduce on the images it was measured on; nothing was exported."""


@dataclass
class Reproduction:
    """``recorded`` and ``measured`` accuracy (fractions 0..1) of one step on ``n_images`` selection images,
    and the ``tolerance`` (fraction) within which they must agree."""

    step: int
    recorded: float
    measured: float
    n_images: int
    tolerance: float

    @property
    def reproduced(self) -> bool:
        return abs(self.measured - self.recorded) <= self.tolerance + 1e-12

    def to_dict(self) -> dict:
        return {**asdict(self), "reproduced": self.reproduced}


def tolerance(n_images: int) -> float:
    """How far a re-measured accuracy may be from the recorded one (fraction): 3 images' worth or half a
    point, whichever is larger. The same model on the same images gives the same figure up to a few images
    whose top-2 logits tie within float error (another device, another thread count); scrambled weights of
    the same shapes score near chance, far outside this."""
    return max(3.0 / max(n_images, 1), 0.005)


def check_finite(model: nn.Module, what: str) -> None:
    """Refuse (:class:`NotReproducedError`) a model whose weights or buffers hold NaN or inf: its outputs would
    be NaN, which passes any tolerance a self-test could set."""
    for name, tensor in list(model.state_dict().items()):
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise NotReproducedError(f"{what} holds NaN or infinite weights ({bad} of {tensor.numel()} values of "
                                     f"{name}); such a model computes nothing, so it was not exported.")


def reproduce_step(model: nn.Module, images: ImageSet, spec: InputSpec, step: int, recorded) -> Reproduction:
    """Evaluate ``model`` (step ``step`` of a run) on ``images`` (the run's selection images) and compare with
    the ``recorded`` accuracy of its history record. Raises :class:`NotReproducedError` (one line) when the
    figure does not reproduce within :func:`tolerance`, or when there is nothing to compare."""
    from .evaluate import evaluate_accuracy

    check_finite(model, f"Step {step}")
    if len(images) == 0:
        raise NotReproducedError(f"The run has no selection images to re-measure step {step} on; it was not "
                                 "exported.")
    if not isinstance(recorded, (int, float)) or isinstance(recorded, bool) or not math.isfinite(recorded):
        raise NotReproducedError(f"Step {step}'s record holds no accuracy to reproduce ({recorded!r}); it was not "
                                 "exported.")
    measured = evaluate_accuracy(model, images, spec).accuracy
    result = Reproduction(step, float(recorded), float(measured), len(images), tolerance(len(images)))
    if not result.reproduced:
        raise NotReproducedError(
            f"Step {step} does not reproduce its recorded figure: the run records {100 * result.recorded:.2f} % on "
            f"its {result.n_images} selection images, its weights score {100 * result.measured:.2f} % on them now "
            f"(tolerance {100 * result.tolerance:.2f} points). Its weights or its record were changed since the run "
            "wrote them; nothing was exported.")
    return result
