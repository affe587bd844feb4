"""What a run may claim about the model it ships, judged on images that decided nothing.

A pruning run takes many accept/undo decisions on its *selection* images; after them the selection
figure of the last step is biased (the winner's curse: a real ResNet-56 read 0.0 points lost on its
selection images after 47 decisions and lost 1.95 on 8,000 unseen ones). So the figure claimed for the
shipped step is its **test** drop with its paired 95 % interval (``core.stats``), and the step itself
passes a final acceptance on the test images (:func:`core.runs.select_step`, which reads the steps' test drops
as one non-decreasing curve of the compression). Beside the drop from the
original as given stands the drop from the **control**: the original given the same fine-tuning and
recoveries (``control.json``), since fine-tuning on the user's images also adapts a model to them.

Per-image correctness travels in the records as packed bits (:func:`pack_correct`), so that any two
models of a run (a step and the control) can be compared image by image, after the run, without
re-evaluating either.
"""
from __future__ import annotations

import base64

import numpy as np

from .stats import paired_drop


def pack_correct(correct: dict[str, np.ndarray]) -> dict[str, dict]:
    """Per role, a bool vector (one entry per image, in the data set's order) as ``{"n", "bits"}``
    (``bits``: base64 of ``numpy.packbits``; 1,000 images take 168 characters)."""
    return {role: {"n": int(len(v)), "bits": base64.b64encode(np.packbits(np.asarray(v, dtype=bool))).decode()}
            for role, v in correct.items()}


def unpack_correct(packed: dict | None, role: str) -> np.ndarray | None:
    """The bool vector of ``role`` packed by :func:`pack_correct`; None when absent or damaged."""
    item = (packed or {}).get(role)
    try:
        n = int(item["n"])
        bits = np.unpackbits(np.frombuffer(base64.b64decode(item["bits"]), dtype=np.uint8))
    except (KeyError, TypeError, ValueError):
        return None
    return bits[:n].astype(bool) if len(bits) >= n else None


def lineage(history: list[dict], upto: int | None = None) -> list[dict]:
    """The records (step 0 left out) on the path of the model of step ``upto`` (default: the last step) from the
    original, in order. An undone stretch (``core.engine.stretch_step``) is not on it: its walk (the ``stretch``
    records that await its recovery) and its recovery (``undone``) are dropped, since the model went back to the
    step before the walk. A recovery starts from the step it names (``recovered_from``): one appended after the
    run (``python -m core recover --step N``) drops the steps after N; so does the first step the loop took after
    going back to step N (``from_step``: ``core.engine.Fallback``). A recovery appended after the run to a step such
    a return left behind starts from that step's own path."""
    path: list[dict] = []
    for record in history:
        if upto is not None and record.get("step", 0) > upto:
            break
        if record.get("step", 0) == 0:
            continue
        if record.get("undone"):
            while path and path[-1].get("stretch") and path[-1].get("recovered_from") is None:
                path.pop()
            continue
        source = record.get("recovered_from")
        source = record.get("from_step") if source is None else source
        if source is not None and (source == 0 or any(r.get("step") == source for r in path)):
            while path and path[-1].get("step", 0) > source:
                path.pop()
        elif source is not None:  # a step a return dropped from the path (a recovery appended to it after the run)
            path = lineage(history, upto=source)
        path.append(record)
    return path


def training_received(history: list[dict], finetune_steps: int, upto: int | None = None) -> dict:
    """The training the model of step ``upto`` (default: the last step) received on its path from the
    original (:func:`lineage`): ``finetune_batches`` (one fine-tuning of ``finetune_steps`` mini-batches per
    pruning step; undone candidates' fine-tuning was undone with them) and ``recovery_epochs`` (per recovery, in
    order). What the control (the original trained alike) is given: an undone stretch's walk and recovery are
    not, since the model that ships lost them (on our ResNet-20 upload they were 6 of the control's 66 epochs)."""
    batches, epochs = 0, []
    for record in lineage(history, upto):
        if record.get("recovered_from") is not None:
            epochs.append(int((record.get("recovery") or {}).get("epochs") or 0))
        else:
            batches += int(finetune_steps)
    return {"finetune_batches": batches, "recovery_epochs": epochs}


def _drop(before: np.ndarray | None, after: np.ndarray | None) -> dict | None:
    if before is None or after is None or len(before) != len(after) or not len(before):
        return None
    return paired_drop(before, after).to_dict()


def shipped_claim(history: list[dict], step: int, control: dict | None = None) -> dict:
    """What may be claimed about ``step`` of a run: its test drop with the 95 % interval from the original
    as given (``test``), the same from the control when the run has one (``vs_control``, and the control's
    own change from the original, ``control_vs_original``), and the selection drop for reference only
    (``selection_biased``: decided on, so not evidence). Every drop is in points, positive = worse; a
    figure the run lacks (no test split, a run made before packed correctness) is None."""
    base = next(r for r in history if r["step"] == 0)
    record = next(r for r in history if r["step"] == step)
    paired = record.get("paired") or {}
    base_bits, bits = base.get("correct"), record.get("correct")
    test = paired.get("test") if step else _drop(unpack_correct(base_bits, "test"), unpack_correct(base_bits, "test"))
    claim = {"step": step, "test": test, "selection_biased": paired.get("selection"),
             "vs_control": None, "control_vs_original": None}
    if control:
        control_test = unpack_correct(control.get("correct"), "test")
        claim["vs_control"] = _drop(control_test, unpack_correct(bits, "test"))
        claim["control_vs_original"] = _drop(unpack_correct(base_bits, "test"), control_test)
    return claim


def describe_claim(claim: dict) -> str:
    """One line for the CLI and the pages: the test drop with its interval, and against the control."""
    test = claim.get("test")
    if not test:
        return f"step {claim['step']}: no test images, so no unbiased figure (the selection figure was decided on)"
    line = (f"step {claim['step']}: {test['drop_points']:+.2f} test points vs the original "
            f"(95 % CI {test['ci_low_points']:+.2f} to {test['ci_high_points']:+.2f}, {test['n']} images that decided nothing)")
    vs = claim.get("vs_control")
    if vs:
        line += (f"; {vs['drop_points']:+.2f} (CI {vs['ci_low_points']:+.2f} to {vs['ci_high_points']:+.2f}) vs the "
                 "original given the same fine-tuning")
    return line
