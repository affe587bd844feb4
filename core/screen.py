"""Fast CAR: a first-order screen of every filter, exact CAR only where it can decide.

Exact CAR needs one suffix pass per filter (a ResNet-56 on 400 images: ~28 T MACs). The screen needs
one forward and two backward passes in all: every consumer input gets a per-image, per-channel gate
``g = 1``; removing filter ``f`` sets its gates to 0, so to first order (a Taylor expansion around
``g = 1``, as in Molchanov et al., "Importance Estimation for Neural Network Pruning", CVPR 2019) the
logit margin ``m_i = z_i,y - max_k!=y z_i,k`` of image ``i`` changes by ``-dm_i/dg_f`` and its loss by
``-dL_i/dg_f``. An image is predicted to flip when its margin changes sign, which gives a *screened
CAR* in the same unit as exact CAR (accuracy as a fraction), with the loss change as a tie-break.

A first-order change is only an estimate, and its error grows with its size: an image whose predicted
new margin is just past zero flips about half the time. So each image counts with the probability that
its margin changes sign under a Gaussian error of ``SCREEN_RELATIVE_ERROR`` times the estimated change
(0 gives the hard count, exact where the margin is linear in the gate). Measured on the real CIFAR-10
ResNet-20 and ResNet-56 against exact CAR of every filter (400 held-out images, ``bench/real_cifar.py``):
0.25 found the exact lowest 10 % best on both (recall 0.84 / 0.96 with 5 % of the filters measured
exactly, Spearman rho 0.92 / 0.95; the hard count: 0.77 / 0.85; 0.5: 0.82 / 0.96), and kept it on another
400 images (0.80 / 0.96; hard: 0.66 / 0.92). ``bench/real_cifar.py`` prints this comparison.

The screen only ranks. ``core.rescore.car_scores`` then measures exact CAR for the lowest-screened filters of
each group plus a margin (the filters that can decide a candidate cluster), and keeps the screened value
for the rest, ranked after every exact one of their group. Which figures are exact is recorded.
"""
from __future__ import annotations

import math
import threading
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .ablation import channel_axis
from .device import model_device
from .errors import CancelledError
from .groups import ChannelGroup

_CHUNK = 128
SCREEN_RELATIVE_ERROR = 0.25  # the first-order margin change's assumed error, as a fraction of itself


@dataclass
class Screen:
    """Screened CAR and loss increase per filter, per group id (arrays of the group's width)."""

    car: dict[int, np.ndarray]
    loss_up: dict[int, np.ndarray]
    baseline_accuracy: float
    n_images: int
    margin: np.ndarray | None = None  # [N] logit margin per image (positive = classified right)
    margin_change: dict[int, np.ndarray] | None = None  # gid -> [N, width] first-order margin change
    per_class: dict[int, np.ndarray] | None = None  # gid -> [width, classes] screened drop of each class's accuracy


@dataclass
class FastScores:
    """Per group id: the score per filter (lower = removed first) and which scores are exact CAR."""

    scores: dict[int, np.ndarray]
    exact: dict[int, np.ndarray]  # bool per filter
    car: dict[int, np.ndarray]  # exact CAR where exact, screened CAR elsewhere (fraction of images)
    n_exact: int
    n_filters: int


class _Gates:
    """Forward pre-hooks multiplying each consumer's input by a per-image, per-channel gate of ones."""

    def __init__(self, model: nn.Module, consumers: list[str]):
        self.model, self.names = model, consumers
        self.gates: dict[str, torch.Tensor] = {}
        self.handles = []

    def __enter__(self) -> "_Gates":
        for name in self.names:
            module = self.model.get_submodule(name)
            self.handles.append(module.register_forward_pre_hook(self._hook(name, module)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()

    def _hook(self, name: str, module: nn.Module):
        def hook(_module, args):
            x = args[0]
            axis = channel_axis(module, x) % x.dim()
            if name not in self.gates:
                self.gates[name] = torch.ones((x.shape[0], x.shape[axis]), dtype=x.dtype, device=x.device,
                                              requires_grad=True)
            shape = [1] * x.dim()
            shape[0], shape[axis] = x.shape[0], x.shape[axis]
            return (x * self.gates[name].reshape(shape),) + tuple(args[1:])
        return hook


def _margins(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``z_y - max_{k != y} z_k`` per image: positive exactly when the image is classified right."""
    true = logits.gather(1, labels.view(-1, 1)).squeeze(1)
    other = logits.scatter(1, labels.view(-1, 1), float("-inf")).max(1).values
    return true - other


def _filter_matrix(group: ChannelGroup, consumer: str, in_channels: int) -> torch.Tensor:
    """``[in_channels, width]``: 1 where the consumer's input channel reads the group's filter."""
    a = torch.zeros((in_channels, group.width))
    for f, idxs in enumerate(group.consumers.get(consumer, [])):
        if idxs:
            a[idxs, f] = 1.0
    return a


def right_probability(margin: torch.Tensor, change: torch.Tensor, relative_error: float) -> torch.Tensor:
    """Probability that an image is classified right after a removal, from its margin ``[n, 1]`` and the
    first-order margin change ``[n, width]``: the new margin is taken as Gaussian around ``margin + change``
    with standard deviation ``relative_error * |change|``; ``relative_error=0`` gives the hard 0/1 test."""
    after = margin + change
    if relative_error <= 0:
        return (after > 0).to(torch.float64)
    spread = relative_error * change.abs()
    p = torch.special.ndtr(after.to(torch.float64) / spread.to(torch.float64).clamp(min=1e-12))
    return torch.where(spread > 0, p, (after > 0).to(torch.float64))


def screen_filters(model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor, groups: list[ChannelGroup],
                   cancel: threading.Event | None = None, chunk: int = _CHUNK,
                   relative_error: float = SCREEN_RELATIVE_ERROR) -> Screen:
    """First-order screened CAR of every filter of ``groups``.

    ``inputs``: normalised images ``[N, C, H, W]``; ``labels``: ``[N]`` class indices. Cost: one forward
    and two backward passes over the images. The model must be in eval mode (BatchNorm frozen) so that
    images are independent and per-image gate gradients are exact per-image derivatives.
    ``relative_error``: see :func:`right_probability` (0: count hard first-order flips).
    """
    model.eval()
    device = model_device(model)
    consumers = sorted({c for g in groups for c in g.consumers})
    n = len(inputs)
    flips = {g.gid: torch.zeros(g.width, dtype=torch.float64) for g in groups}
    loss_up = {g.gid: torch.zeros(g.width, dtype=torch.float64) for g in groups}
    base_correct = 0
    margins, changes = [], {g.gid: [] for g in groups}
    class_flips: dict[int, torch.Tensor] = {}
    class_counts: torch.Tensor | None = None
    matrices: dict[tuple[int, str], torch.Tensor] = {}
    params = [p for p in model.parameters()]
    saved = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)  # only the gates need gradients
    try:
        for start in range(0, n, chunk):
            if cancel is not None and cancel.is_set():
                raise CancelledError("Cancelled.")
            x, y = inputs[start:start + chunk].to(device), labels[start:start + chunk].to(device)
            with _Gates(model, consumers) as gates:
                logits = model(x)
                if isinstance(logits, (tuple, list)):
                    logits = logits[0]
                margin = _margins(logits, y)
                loss = F.cross_entropy(logits, y, reduction="none")
                names = list(gates.gates)
                tensors = [gates.gates[k] for k in names]
                dm = torch.autograd.grad(margin.sum(), tensors, retain_graph=True, allow_unused=True)
                dl = torch.autograd.grad(loss.sum(), tensors, allow_unused=True)
            grads_m = {k: g for k, g in zip(names, dm) if g is not None}
            grads_l = {k: g for k, g in zip(names, dl) if g is not None}
            m = margin.detach().cpu()  # sums are kept on the CPU; the gradients come from the model's device
            correct = m > 0
            onehot = F.one_hot(y.cpu(), logits.shape[1]).to(torch.float64)  # [n, classes]
            class_counts = onehot.sum(0) if class_counts is None else class_counts + onehot.sum(0)
            margins.append(m.float())
            base_correct += int(correct.sum())
            for g in groups:
                d_m = torch.zeros((len(x), g.width), dtype=x.dtype, device=device)
                d_l = torch.zeros((len(x), g.width), dtype=x.dtype, device=device)
                for c in g.consumers:
                    if c not in grads_m:
                        continue
                    key = (g.gid, c)
                    if key not in matrices:
                        matrices[key] = _filter_matrix(g, c, grads_m[c].shape[1]).to(device, x.dtype)
                    d_m += grads_m[c] @ matrices[key]
                    d_l += grads_l[c] @ matrices[key]
                d_m, d_l = d_m.cpu(), d_l.cpu()
                changes[g.gid].append((-d_m).float())
                # removing f: gate 1 -> 0, first-order margin change -dm/dg
                after = right_probability(m.unsqueeze(1), -d_m, relative_error)
                lost = correct.unsqueeze(1).to(torch.float64) - after  # [n, width]
                flips[g.gid] += lost.sum(0)
                class_flips[g.gid] = class_flips.get(g.gid, 0) + lost.T @ onehot
                loss_up[g.gid] += (-d_l).sum(0)
    finally:
        for p, s in zip(params, saved):
            p.requires_grad_(s)
    return Screen(car={k: (v / n).numpy() for k, v in flips.items()},
                  loss_up={k: (v / n).numpy() for k, v in loss_up.items()},
                  baseline_accuracy=base_correct / max(n, 1), n_images=n,
                  margin=torch.cat(margins).numpy() if margins else np.zeros(0),
                  margin_change={k: torch.cat(v).numpy() for k, v in changes.items() if v},
                  per_class={k: (v / class_counts.clamp(min=1)).numpy() for k, v in class_flips.items()}
                  if class_counts is not None else None)


def shortlist(screen_scores: np.ndarray, remove: int, margin: float = 1.0, min_extra: int = 4) -> np.ndarray:
    """Indices of the filters whose exact CAR can decide a cluster of ``remove`` filters.

    The ``remove`` lowest-screened filters plus ``max(min_extra, margin * remove)`` more (capped at the
    group's width), so that a screen that misorders a few filters near the cut still lets exact CAR choose.
    """
    k = min(len(screen_scores), remove + max(min_extra, math.ceil(margin * remove)))
    return np.argsort(screen_scores, kind="stable")[:k]


def tiebreak(car: np.ndarray, loss_up: np.ndarray, n_images: int) -> np.ndarray:
    """CAR with ties broken by the loss increase, scaled below one image's worth (0.5 / N) so that it
    only orders filters of equal CAR (on a small image set most filters change no prediction)."""
    return car + (0.5 / max(n_images, 1)) * (loss_up - loss_up.min()) / (np.ptp(loss_up) + 1e-12)


def screened_order_scores(screen: Screen, groups: list[ChannelGroup]) -> dict[int, np.ndarray]:
    """Per group, screened CAR with ties broken by the screened loss increase."""
    return {g.gid: tiebreak(screen.car[g.gid], screen.loss_up[g.gid], screen.n_images) for g in groups}


def combine(screened: dict[int, np.ndarray], exact: dict[int, tuple[np.ndarray, np.ndarray]],
            screen_car: dict[int, np.ndarray], groups: list[ChannelGroup]) -> FastScores:
    """Merge exact scores (``gid -> (indices, exact scores, exact CAR)``) into the screened ranking.

    Filters without an exact score keep their screened order but rank after every exact filter of
    their group: the screen put them there, and exact CAR found the shortlisted ones cheap enough.
    """
    scores, is_exact, car = {}, {}, {}
    n_exact = 0
    for g in groups:
        s = screened[g.gid].astype(float).copy()
        c = screen_car[g.gid].astype(float).copy()
        mask = np.zeros(g.width, dtype=bool)
        if g.gid in exact:
            idx, ex_scores, ex_car = exact[g.gid]
            mask[idx] = True
            rest = ~mask
            if rest.any():
                top = float(np.max(ex_scores)) if len(ex_scores) else 0.0
                s[rest] = top + 1.0 + (s[rest] - s[rest].min())
            s[idx] = ex_scores
            c[idx] = ex_car
            n_exact += int(mask.sum())
        scores[g.gid], is_exact[g.gid], car[g.gid] = s, mask, c
    return FastScores(scores, is_exact, car, n_exact, sum(g.width for g in groups))


def global_shortlist(screened: dict[int, np.ndarray], groups: list[ChannelGroup], fraction: float) -> dict[int, np.ndarray]:
    """The ``fraction`` of all filters with the lowest screened scores, as indices per group id.

    Used where filters are ranked across layers (the Analyse page's lowest-CAR list): exact CAR is
    measured for the filters that could be among the least important, the screen stands for the rest.
    """
    flat = [(float(s), g.gid, f) for g in groups for f, s in enumerate(screened[g.gid])]
    flat.sort(key=lambda t: t[0])
    k = int(math.ceil(fraction * len(flat)))
    out: dict[int, list[int]] = {}
    for _, gid, f in flat[:k]:
        out.setdefault(gid, []).append(f)
    return {gid: np.array(sorted(v)) for gid, v in out.items()}
