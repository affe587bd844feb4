"""What to change when the threshold and the selection images stop a run: the remedies a page or the CLI offers.

Two situations end in the same question: a threshold finer than the selection images resolve
(:func:`resolution_remedies`, said before a run starts), and a run that finished without keeping a pruning
step (:func:`no_kept_step`, said after). Both answer with what the run's own records and the data set show:
the closest candidate the threshold undid (``closest_rejected`` in the run's status, ``core.engine``), the
cost of fine-tuning alone (``finetune.json``), how many images the upload can still give to the selection
role, and what that costs in time. The words are the glossary's (``core.glossary``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from .eta import format_duration
from .stats import accuracy_flip_rate, images_to_resolve, resolution_points


# where each setting is changed, in the words of the interface that shows the advice
CONTROLS = {
    "app": {"threshold": "Prune: acceptable drop", "selection": "Load: a larger selection share, or a larger upload",
            "recovery": "Prune: recovery when stalled, e.g. 2 epochs"},
    "cli": {"threshold": "--max-drop", "selection": "--val-fraction, or a larger data set",
            "recovery": "--recover-epochs 2"},
}


@dataclass
class Advice:
    """A headline, why it happened, and what to change (one line each)."""

    headline: str
    why: list[str] = field(default_factory=list)
    changes: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        return [self.headline, *self.why, *(f"- {c}" for c in self.changes)]


def _seconds(x: float) -> str:
    """A duration that stays readable below a second ('0.4 s', not '0 s')."""
    return f"{x:.1f} s" if x < 10 else format_duration(x)


def points(x: float) -> str:
    """'1 point', '1.5 points'."""
    return f"{x:g} point" + ("" if x == 1 else "s")


def coarser_threshold(drop_points: float) -> float:
    """The smallest threshold on the 0.1-point grid of the settings that a drop of ``drop_points`` fits in."""
    return math.ceil(round(drop_points * 10.0, 6)) / 10.0


def selection_growth(n_selection: int, n_images: int | None, val_fraction: float | None, layout: str,
                     need: int, rate: float) -> str:
    """Where more selection images come from for this data set (``layout``: ``unsplit``, ``presplit`` or
    ``sample``): a larger selection share of an unsplit upload (Load, in steps of 5 % up to 50 %: how many it
    gives and what they resolve), a larger held-out folder, or an upload of one's own for a bundled sample."""
    if layout == "sample":
        return f"a bundled sample's split is fixed; {need:,} need an upload of your own (Load: selection share)"
    if layout == "presplit":
        return f"{need:,} would need a larger val/ folder (half of it selects, half reports as test images)"
    if n_images and val_fraction:
        share = min(math.ceil(need / n_images * 20.0) / 20.0, 0.5)
        gives = int(round(share * n_images))
        if gives > n_selection:
            return (f"a selection share of {share:.0%} on the Load page gives {gives:,} of the {n_images:,} images in "
                    f"this upload (now {val_fraction:.0%}: {n_selection:,}), resolving about "
                    f"{resolution_points(gives, rate):.1f} points"
                    + ("" if gives >= need else f"; {need:,} would need a larger upload"))
        return f"{need:,} would need a larger upload (it holds {n_images:,} images)"
    return f"{need:,} would need a larger upload"


def resolution_remedies(max_drop: float, n_selection: int, accuracy: float | None, n_images: int | None = None,
                        val_fraction: float | None = None, layout: str = "unsplit",
                        eval_seconds: float | None = None) -> list[str]:
    """What helps when a ``max_drop``-point threshold is finer than ``n_selection`` selection images resolve
    (``core.stats.resolution_warning``): more selection images (from this data set, :func:`selection_growth`), a
    threshold they do resolve, and the time the larger selection costs (``eval_seconds``: one evaluation of
    the ``n_selection`` images, measured with the baseline; every decision of a run is one). Empty when the
    threshold is resolved."""
    rate = accuracy_flip_rate(accuracy)
    resolvable = resolution_points(n_selection, rate)
    if max_drop >= resolvable or max_drop <= 0 or n_selection <= 0:
        return []
    need = max(images_to_resolve(max_drop, rate), int(math.ceil(200.0 / max_drop)))
    more = selection_growth(n_selection, n_images, val_fraction, layout, need, rate)
    out = [f"More selection images: {more}."]
    out.append(f"A coarser threshold: {coarser_threshold(resolvable):.1f} points is what {n_selection:,} selection "
               "images resolve (a step is then decided by the model, not by which images happened to flip).")
    factor = need / n_selection
    if eval_seconds:
        out.append(f"The time it costs: every decision of a run measures all selection images; {need:,} instead of "
                   f"{n_selection:,} make each one about {_seconds(eval_seconds * factor)} instead of "
                   f"{_seconds(eval_seconds)} on this machine ({factor:.1f}×).")
    else:
        out.append(f"The time it costs: every decision of a run measures all selection images, so {need:,} instead "
                   f"of {n_selection:,} make each one {factor:.1f}× as long.")
    return out


def no_kept_step(status: dict, prune: dict, n_selection: int | None = None, accuracy: float | None = None,
                 finetune: dict | None = None, recovered: bool = False, interface: str = "app") -> Advice:
    """Why a finished run kept no pruning step and what to change: the closest candidate the threshold undid
    (``status["closest_rejected"]``: its drop against the allowance), the cost of fine-tuning alone
    (``finetune``: the run's ``finetune.json``), and the settings that would change the outcome (a coarser
    threshold, more selection images, recovery epochs). ``prune``: the run's settings (``config.json``);
    ``interface``: whose words name the settings (``app`` or ``cli``, :data:`CONTROLS`)."""
    where = CONTROLS[interface]
    state = status.get("state", "done")
    reason = status.get("message") or ""
    if state == "done":
        headline = "The run finished without keeping a pruning step" + (f": it stopped because {reason}." if reason
                                                                       else ".")
    else:
        headline = f"The run ended ({state}) before it kept a pruning step" + (f": {reason}" if reason else ".")
    advice = Advice(headline)
    if recovered:
        advice.why.append("Its recorded step is the original after a recovery fine-tune: no filter was removed.")
    max_drop = float(prune.get("max_drop") if prune.get("max_drop") is not None else 1.0)
    closest = status.get("closest_rejected")
    if closest:
        advice.why.append(f"The closest candidate, {closest['clusters']} at step {closest['step']}, lost "
                          f"{closest['drop_points']:.2f} points on the selection images; the acceptable drop is "
                          f"{points(closest['max_drop'])}.")
    elif state == "done":
        advice.why.append("No candidate was measured against the threshold (none could be removed).")
    tuned = _finetune_cost(finetune)
    if tuned is not None:
        lr, cost = tuned
        if cost > 0:
            advice.why.append(f"Fine-tuning alone (learning rate {lr:g}, nothing removed) cost the original {cost:.2f} "
                              f"of those points.")
    if closest and closest["drop_points"] > max_drop:
        advice.changes.append(f"A coarser threshold: {coarser_threshold(closest['drop_points']):.1f} points would have "
                              f"kept that candidate ({where['threshold']}).")
    if n_selection:
        rate = accuracy_flip_rate(accuracy)
        resolved = resolution_points(n_selection, rate)
        line = (f"More selection images: with {n_selection:,} one image is {100.0 / n_selection:.2f} points and a "
                f"drop is resolved to about {resolved:.1f} points")
        if resolved > max_drop > 0:
            need = max(images_to_resolve(max_drop, rate), int(math.ceil(200.0 / max_drop)))
            line += f"; about {need:,} resolve {max_drop:g} ({where['selection']})"
        advice.changes.append(line + ".")
    epochs = int(prune.get("recover_epochs") or 0)
    if epochs == 0:
        advice.changes.append(f"Recovery epochs: with recovery when stalled ({where['recovery']}) the run fine-tunes "
                              "when no candidate fits and tries again from there.")
    else:
        advice.changes.append(f"Recovery epochs: more than {epochs} per recovery, or more fine-tuning mini-batches per "
                              f"step (now {prune.get('finetune_steps', '—')}), give a removal more time to heal.")
    return advice


def _finetune_cost(finetune: dict | None) -> tuple[float, float] | None:
    """(learning rate used, the unpruned model's selection drop from fine-tuning at it) of a ``finetune.json``."""
    if not finetune or finetune.get("lr") is None:
        return None
    for t in finetune.get("tried", []):
        if t.get("lr") == finetune["lr"] and t.get("selection_drop_points") is not None:
            return float(finetune["lr"]), float(t["selection_drop_points"])
    return None


def run_advice(run, interface: str = "app") -> Advice | None:
    """:func:`no_kept_step` for a run folder (a ``core.runs.Run``) that ended without a pruning step: its status,
    settings, selection images (step 0's paired figures) and fine-tuning check (``finetune.json``, read as absent
    when damaged); None for a run that kept a step or is still going."""
    from .runs import removals
    from .workspace import read_json

    hist = run.history
    status = run.status
    if not hist or status.get("state") in ("running", "cancelling") or any(removals(r) for r in hist[1:]):
        return None
    base = hist[0]
    try:
        finetune = read_json(run.dir / "finetune.json")
    except (OSError, ValueError):
        finetune = None
    return no_kept_step(status, run.config.get("prune") or {},
                        ((base.get("paired") or {}).get("selection") or {}).get("n"), base.get("metric"),
                        finetune if isinstance(finetune, dict) else None,
                        any(r.get("recovered_from") is not None for r in hist), interface)
