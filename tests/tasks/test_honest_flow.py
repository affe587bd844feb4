"""The flow a user runs by default (issue 23): recoveries when the threshold stalls the run, a time budget
that keeps the finished steps, the control (the original given the same training), the final acceptance
of the shipped step on the test images, and fast CAR's exact share capped inside the loop."""
from __future__ import annotations

import dataclasses
import time

import numpy as np
import pytest
import torch

import core.engine as engine
from core.claim import lineage, pack_correct, shipped_claim, training_received, unpack_correct
from core.models import load_model
from core.prune import PruneConfig, run_pruning
from core.car import exact_budget
from core.engine import control_step
from core.runs import Run, removals, select_step
from core.sources import load_dataset
from tests.helpers import quick_config

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def digits():
    torch.set_num_threads(1)
    loaded = load_model("sample:vgg_digits")
    return loaded, load_dataset("sample:vgg_digits", loaded.spec.input, test_fraction=0.3)


def fake_metric(monkeypatch, per_cluster: float, per_recovery: float) -> dict:
    """Make each step's decision read the original's selection accuracy minus ``per_cluster`` points per
    cluster removed so far plus ``per_recovery`` per recovery made (vgg_digits: one conv per group, so a
    cluster is 8 filters); the real fine-tuning, recovery and measurement still run."""
    real_decide, real_original, real_recover = engine.finetune_and_decide, engine.measure_original, engine.recover_step
    state = {"recoveries": 0}

    def conv_filters(model) -> int:
        return sum(m.out_channels for m in model.modules() if isinstance(m, torch.nn.Conv2d))

    def measure_original(graph, task, writer, cb, cancel):
        record = real_original(graph, task, writer, cb, cancel)
        state.update(filters=conv_filters(graph.model), metric=record["metric"])
        return record

    def faked(model, decision):
        gone = round((state["filters"] - conv_filters(model)) / 8)
        lost = per_cluster * gone - per_recovery * state["recoveries"]
        return dataclasses.replace(decision, accuracy=state["metric"] - lost / 100)

    def decide(task, model, rng, cancel, cb, step):
        return faked(model, real_decide(task, model, rng, cancel, cb, step))

    def recover_step(*args, **kw):
        state["recoveries"] += 1
        return real_recover(*args, **kw)

    def recovered(task, model):
        return faked(model, task.decision(model))

    monkeypatch.setattr(engine, "finetune_and_decide", decide)
    monkeypatch.setattr(engine, "decision_drop", lambda task, decision, base: (base - decision.metric) * 100)
    monkeypatch.setattr(engine, "test_refusal", lambda base, record, max_drop: None)  # the test images agree
    monkeypatch.setattr(engine, "measure_original", measure_original)
    monkeypatch.setattr(engine, "recover_step", recover_step)
    monkeypatch.setattr(engine, "recovered_decision", recovered)
    return state


def faked_run(digits, tmp_path, monkeypatch, per_cluster: float, per_recovery: float, **settings):
    """A run of the digits sample under :func:`fake_metric` with ``quick_config(max_drop=1.0, recover_epochs=1,
    max_steps=10, **settings)``; returns (the run, its history, the fake's state)."""
    loaded, data = digits
    state = fake_metric(monkeypatch, per_cluster, per_recovery)
    run_pruning(loaded, data, quick_config(**{"max_steps": 10, "max_drop": 1.0, "recover_epochs": 1, **settings}),
                tmp_path / "run")
    run = Run(tmp_path / "run")
    return run, run.history, state


def test_a_stalled_run_recovers_goes_on_and_the_recovery_is_a_step_on_the_curve(digits, tmp_path, monkeypatch):
    """0.35 points per cluster, 0.6 back per recovery, threshold 1.0: steps 1-2 keep a cluster each (0.7); the
    third (1.05) is undone, so step 3 is a recovery of step 2; steps 4-5 keep two more (0.45, 0.8); the next
    (1.15) is undone and, with one recovery allowed, the loop stops: its last pruning step is recovered once
    more (step 6), and only recovered steps ship."""
    run, hist, _ = faked_run(digits, tmp_path, monkeypatch, 0.35, 0.6, max_recoveries=1, stretch=False)
    assert [r.get("recovered_from") for r in hist] == [None, None, None, 2, None, None, 5]
    assert all(r["awaits_recovery"] for r in hist if r["step"] in (1, 2, 4, 5))
    assert select_step(hist, 100.0) == 6 and hist[6]["macs"] == hist[5]["macs"], \
        "the final recovery of the last pruning step ships, not step 5 of the same MACs"
    assert select_step([{**r, "recovered_from": None} if r["step"] == 6 else r for r in hist[:6]], 100.0) == 3, \
        "without it the last recovered step ships, never a pruning step"
    recovered = hist[3]
    assert recovered["removed"] is None and recovered["recovery"]["epochs"] == 1 and recovered["recovery"]["best_epoch"] == 1
    assert recovered["widths"] == hist[2]["widths"] and recovered["macs"] == hist[2]["macs"]
    assert recovered["test_metric"] is not None and "test" in recovered["paired"]
    assert hist[4]["macs"] < hist[3]["macs"], "the run went on from the recovered model"
    elapsed = [r["elapsed"] for r in hist[1:]]
    assert elapsed == sorted(elapsed), "steps and recoveries count elapsed time from the same start"
    assert run.rebuild_step(3) is not None and run.rebuild_step(5)(torch.zeros(1, 3, 32, 32)).shape == (1, 10)
    assert run.status["message"].startswith("the next clusters would exceed")


def test_a_step_the_test_images_refuse_is_recovered_and_the_walk_goes_on(digits, tmp_path, monkeypatch):
    """Selection passes every step (0.1 points a cluster); the test images refuse step 2 only: step 3 is a
    recovery of step 2 and the run goes on from it; with no recovery left it stops there."""
    loaded, data = digits
    fake_metric(monkeypatch, 0.1, 0.0)
    monkeypatch.setattr(engine, "test_refusal", lambda base, record, max_drop: (
        "the test images refuse step 2" if record["step"] == 2 else None))
    config = quick_config(max_steps=5, max_drop=1.0, recover_epochs=1, max_recoveries=1)
    run_pruning(loaded, data, config, tmp_path / "run")
    hist = Run(tmp_path / "run").history
    assert [r.get("recovered_from") for r in hist][:4] == [None, None, None, 2]
    assert hist[4]["macs"] < hist[3]["macs"], "the run went on from the recovered model"
    run_pruning(loaded, data, dataclasses.replace(config, max_recoveries=0), tmp_path / "spent")
    spent = Run(tmp_path / "spent")
    assert [r["step"] for r in spent.history] == [0, 1, 2, 3] and spent.history[3]["recovered_from"] == 2, \
        "no recovery left in the walk, but the step it ends on is recovered before the run ends"
    assert "refuse step 2" in spent.status["message"] and "recoveries spent" in spent.status["message"]


def test_a_refused_step_its_recovery_does_not_bring_back_is_followed_by_a_stretch(digits, tmp_path, monkeypatch):
    """The test images refuse step 2 and its recovery (step 3) too: the next step tries no plain candidate but is a
    stretch (its removal, then its longer recovery), and the walk goes on from it. When the test images refuse the
    stretch's recovery as well, the run ends there. Without stretches, or with no recovery left, the run ends at
    the recovery, as before."""
    loaded, data = digits
    fake_metric(monkeypatch, 0.1, 0.0)
    monkeypatch.setattr(engine, "test_refusal", lambda base, record, max_drop: (
        f"the test images refuse step {record['step']}" if record["step"] in (2, 3) else None))
    config = quick_config(max_steps=8, max_drop=1.0, recover_epochs=1, max_recoveries=3, stretch=True)
    run_pruning(loaded, data, config, tmp_path / "run")
    hist = Run(tmp_path / "run").history
    assert hist[3]["recovered_from"] == 2 and not hist[3].get("stretch")
    assert hist[4].get("stretch") and hist[4]["removed"] and hist[4]["macs"] < hist[3]["macs"], \
        "after the refusal the next step is a stretch's removal"
    recovered = next(r for r in hist[5:] if r.get("recovered_from") is not None)
    assert recovered["stretch"] and recovered["recovery"]["epochs"] == engine.STRETCH_EPOCHS
    assert hist[-1]["macs"] < recovered["macs"], "the walk went on from the kept stretch"
    run_pruning(loaded, data, dataclasses.replace(config, stretch=False), tmp_path / "plain")
    plain = Run(tmp_path / "plain")
    assert [r["step"] for r in plain.history] == [0, 1, 2, 3]
    assert "refuse step 2" in plain.status["message"] and "did not bring it back" in plain.status["message"]
    monkeypatch.setattr(engine, "test_refusal", lambda base, record, max_drop: (
        f"the test images refuse step {record['step']}" if record["step"] >= 2 else None))
    run_pruning(loaded, data, config, tmp_path / "again")
    again = Run(tmp_path / "again")
    last = again.history[-1]
    assert last["recovered_from"] is not None and last["stretch"], "the stretch's recovery is the run's last step"
    assert again.status["message"].startswith(f"the test images refuse step {last['step']}: the recovery of the stretch")
    run_pruning(loaded, data, dataclasses.replace(config, max_recoveries=1), tmp_path / "spent")
    spent = Run(tmp_path / "spent")
    assert [r["step"] for r in spent.history] == [0, 1, 2, 3], "no recovery left for a stretch: the run ends there"
    assert "did not bring it back" in spent.status["message"] and "recoveries spent" in spent.status["message"]


def test_a_second_refusal_goes_back_to_the_last_step_the_test_images_accepted(digits, tmp_path, monkeypatch):
    """The test images refuse step 2 and accept its recovery (step 3); they refuse step 4, its recovery (5) and the
    recovery (7) of the stretch taken from there (6): the loop goes back to step 3's model, with a smaller next
    stretch, and walks on from it. The claim's path and the control leave steps 4-7 out; the records keep them."""
    loaded, data = digits
    fake_metric(monkeypatch, 0.1, 0.0)
    monkeypatch.setattr(engine, "test_refusal", lambda base, record, max_drop: (
        f"the test images refuse step {record['step']}" if record["step"] in (2, 4, 5, 7) else None))
    config = quick_config(max_steps=11, max_drop=1.0, recover_epochs=1, max_recoveries=6, stretch=True)
    run_pruning(loaded, data, config, tmp_path / "run")
    run = Run(tmp_path / "run")
    hist = run.history
    assert [r.get("recovered_from") for r in hist[:8]] == [None, None, None, 2, None, 4, None, 6]
    assert hist[7]["stretch"] and not hist[7].get("undone"), "the selection images kept the stretch; the test refused it"
    assert hist[8].get("from_step") == 3 and hist[8]["stretch"], "a stretch from step 3's model, not from step 7's"
    assert hist[8]["widths"] != hist[7]["widths"] and hist[8]["macs"] < hist[3]["macs"]
    assert all(hist[8]["widths"][n] <= w for n, w in hist[3]["widths"].items()), "it removed from step 3's widths"
    assert hist[9]["recovered_from"] == 8 and hist[9]["stretch"]
    assert hist[3]["macs"] - hist[8]["macs"] <= hist[5]["macs"] - hist[6]["macs"], \
        "the next stretch is no larger than the refused one (its walk halved, down to one move)"
    assert [r["step"] for r in lineage(hist, upto=9)] == [1, 2, 3, 8, 9]
    assert training_received(hist, config.finetune_steps, upto=9)["recovery_epochs"] == [1, engine.STRETCH_EPOCHS]
    assert run.rebuild_step(9)(torch.zeros(1, 3, 32, 32)).shape == (1, 10)
    removed = [c for r in lineage(hist, upto=9) for c in removals(r)]
    assert len({(c["group"], f) for c in removed for f in c["filters_original"]}) == \
        sum(len(c["filters_original"]) for c in removed), "the channel maps went back too: no filter removed twice"
    assert not run.status["message"].startswith("the test images refuse step 7")


def test_after_a_back_off_the_budget_counts_the_control_of_the_path_the_loop_went_back_to(digits, tmp_path,
                                                                                          monkeypatch):
    """Between the back-off and the first record that names it, the control's estimate (what every budget gate
    keeps for the run's end) counts the training of step 3's path, not of the abandoned step 7's."""
    loaded, data = digits
    fake_metric(monkeypatch, 0.1, 0.0)
    monkeypatch.setattr(engine, "test_refusal", lambda base, record, max_drop: (
        f"the test images refuse step {record['step']}" if record["step"] in (2, 4, 5, 7) else None))
    counted, real = [], engine.training_received

    def training_received(history, finetune_steps, upto=None):
        received = real(history, finetune_steps, upto)
        counted.append((len(history), upto, received))
        return received

    monkeypatch.setattr(engine, "training_received", training_received)
    config = quick_config(max_steps=11, max_drop=1.0, recover_epochs=1, max_recoveries=6, stretch=True,
                          time_budget=60.0, control=True)
    run_pruning(loaded, data, config, tmp_path / "run")
    hist = Run(tmp_path / "run").history
    assert hist[8].get("from_step") == 3
    pending = [(upto, received) for n, upto, received in counted if n == 8]  # records 0-7 written, none names step 3
    assert pending and all(upto == 3 and received["recovery_epochs"] == [1] for upto, received in pending[-1:]), pending


def test_a_refused_stretch_at_the_mac_target_ends_the_run_there(digits, tmp_path, monkeypatch):
    """A stretch taken at a plain stall (no refusal before it) that reaches the MAC target and whose recovery the
    test images refuse ends the run at the target, as before: only a second refusal goes back."""
    loaded, data = digits
    fake_metric(monkeypatch, 0.35, 1.2)
    decide, recovered = engine.finetune_and_decide, engine.recovered_decision  # the fake's reads stay <= 100 %
    monkeypatch.setattr(engine, "finetune_and_decide", lambda *a: dataclasses.replace(
        decide(*a), accuracy=min(decide(*a).accuracy, 1.0)))
    monkeypatch.setattr(engine, "recovered_decision", lambda *a: dataclasses.replace(
        recovered(*a), accuracy=min(recovered(*a).accuracy, 1.0)))
    monkeypatch.setattr(engine, "test_refusal", lambda base, record, max_drop: (
        f"the test images refuse step {record['step']}" if record["step"] == 9 else None))
    config = quick_config(mac_target=0.40, max_steps=16, max_drop=1.0, recover_epochs=1, max_recoveries=4,
                          stretch=True)
    run = run_pruning(loaded, data, config, tmp_path / "run")
    hist = Run(tmp_path / "run").history
    assert hist[9]["stretch"] and hist[9]["recovered_from"] == 8 and hist[9]["macs"] <= 0.40 * hist[0]["macs"]
    assert hist[-1]["step"] == 9
    assert not any(r.get("from_step") is not None for r in hist)
    assert Run(tmp_path / "run").status["message"].startswith("MAC target reached"), run


def test_a_recovery_appended_to_a_step_a_back_off_left_behind_keeps_that_steps_path():
    """``python -m core recover --step 7`` after a run that went back from step 7 to step 3: the new recovery's
    path is step 7's (and so is the control's training), not step 3's."""
    def step(n, **k):
        return {"step": n, **k}

    def rec(n, source, epochs, **k):
        return {"step": n, "recovered_from": source, "recovery": {"epochs": epochs}, **k}

    hist = [step(0), step(1, awaits_recovery=True), step(2, awaits_recovery=True), rec(3, 2, 1),
            step(4, awaits_recovery=True), rec(5, 4, 1), step(6, stretch=True, awaits_recovery=True),
            rec(7, 6, 3, stretch=True, undone=False), step(8, stretch=True, awaits_recovery=True, from_step=3),
            rec(9, 8, 3, stretch=True, undone=False), rec(10, 7, 2)]
    assert [r["step"] for r in lineage(hist, upto=9)] == [1, 2, 3, 8, 9]
    assert [r["step"] for r in lineage(hist, upto=10)] == [1, 2, 3, 4, 5, 6, 7, 10]
    assert training_received(hist, 40, upto=10)["recovery_epochs"] == [1, 1, 3, 2]


def test_a_stretch_the_recovery_brings_back_is_kept_and_the_run_goes_on(digits, tmp_path, monkeypatch):
    """0.35 points per cluster, 1.2 back per recovery, threshold 1.0: steps 1-2 keep a cluster each (0.7); the
    third (1.05) is undone, so step 3 is a stretch: a step's worth of clusters removed past the threshold (one
    cluster here: 1.05), recovered as step 4 (kept); the run goes on from it with fewer MACs, until the next stall
    with no recovery left."""
    run, hist, _ = faked_run(digits, tmp_path, monkeypatch, 0.35, 1.2, max_recoveries=1, stretch=True)
    assert hist[3].get("stretch") and hist[3]["removed"] and hist[3]["macs"] < hist[2]["macs"]
    assert hist[4]["recovered_from"] == 3 and hist[4]["stretch"] and hist[4]["macs"] == hist[3]["macs"]
    assert hist[4]["recovery"]["epochs"] == engine.STRETCH_EPOCHS, "a stretch recovers longer than a plain recovery"
    assert hist[5]["macs"] < hist[4]["macs"] and hist[5].get("recovered_from") is None, "went on from the stretch"
    assert run.rebuild_step(3)(torch.zeros(1, 3, 32, 32)).shape == (1, 10)
    assert run.rebuild_step(hist[-1]["step"])(torch.zeros(1, 3, 32, 32)).shape == (1, 10)
    assert select_step(hist, 1.0) != 3, "the stretch's own step reads past the threshold and is never shipped"


def test_a_stretch_walks_several_steps_within_its_allowance_then_recovers_once(digits, tmp_path, monkeypatch):
    """0.35 points per cluster, 3.0 back per recovery, threshold 1.0, a stretch allowed 3x the threshold and half
    the MACs: from the stall at step 3 the walk takes steps while they stay within 3.0 points (each fine-tuned and
    decided as the loop's), one recovery (3x the epochs) follows its last step, and the run goes on from it.
    None of the walk's steps ships; the recovered one does."""
    run, hist, _ = faked_run(digits, tmp_path, monkeypatch, 0.35, 3.0, max_recoveries=1, stretch=True,
                             stretch_macs=0.5, stretch_allowance=3.0, max_steps=12)
    recovered = next(r for r in hist if r.get("recovered_from") is not None)
    walk = hist[3:recovered["step"]]
    assert len(walk) >= 2 and all(r.get("stretch") and r["removed"] is not None for r in walk), \
        "the stretch walked more than one step before its recovery"
    assert [r["step"] for r in walk] == list(range(3, recovered["step"])) and recovered["recovered_from"] == walk[-1]["step"]
    assert all(a["macs"] > b["macs"] for a, b in zip(hist[2:], walk)), "each step of the walk removed more"
    assert recovered["stretch"] and not recovered["undone"] and recovered["recovery"]["epochs"] == engine.STRETCH_EPOCHS
    assert run.rebuild_step(walk[-1]["step"])(torch.zeros(1, 3, 32, 32)).shape == (1, 10)
    shipped = select_step(hist, 1.0)
    assert shipped not in [r["step"] for r in walk] and shipped >= recovered["step"]


def test_a_stretch_that_does_not_come_back_returns_to_the_model_before_it(digits, tmp_path, monkeypatch):
    """Recoveries win nothing back: the stretch (one more cluster, 1.05 after its recovery) stays past the
    threshold, so the run goes back to step 2's model and recovers that (step 5, from step 2), and with no
    further step bought it stops. The steps after step 2 read as that model: its widths, its MACs."""
    run, hist, state = faked_run(digits, tmp_path, monkeypatch, 0.35, 0.0, max_recoveries=3, stretch=True)
    assert [r["step"] for r in hist][:6] == [0, 1, 2, 3, 4, 5]
    assert hist[3]["stretch"] and hist[4]["recovered_from"] == 3
    assert hist[5]["recovered_from"] == 2 and hist[5]["widths"] == hist[2]["widths"] and hist[5]["macs"] == hist[2]["macs"]
    assert run.rebuild_step(5)(torch.zeros(1, 3, 32, 32)).shape == (1, 10)
    assert state["recoveries"] >= 2
    assert select_step(hist, 1.0) not in (3, 4)


def test_the_test_refusal_reads_the_test_drop_against_the_threshold():
    base = {"step": 0, "test_metric": 0.90}
    assert engine.test_refusal(base, {"step": 3, "test_metric": 0.895}, 1.0) is None
    assert "2.00 points lost" in engine.test_refusal(base, {"step": 3, "test_metric": 0.88}, 1.0)
    assert engine.test_refusal({"step": 0, "test_metric": None}, {"step": 3, "test_metric": 0.1}, 1.0) is None


def test_a_recovery_that_buys_no_step_ends_the_run(digits, tmp_path, monkeypatch):
    run, _, state = faked_run(digits, tmp_path, monkeypatch, 0.35, 0.0, max_recoveries=3, stretch=False)  # recoveries win nothing back
    assert [r.get("recovered_from") for r in run.history] == [None, None, None, 2]
    assert state["recoveries"] == 1 and "the recovery before bought no further step" in run.status["message"]


def test_with_no_room_for_a_stretch_a_recovery_that_buys_no_step_ends_the_run(digits, tmp_path, monkeypatch):
    """Stretches on, but the budget has no room for one: the stall at step 3 is recovered (step 3, from step 2), the
    recovery buys no step, and the run ends there rather than recover the same model again (a ResNet-56 upload
    recovered its 2.14x model three times in a row at the end of its budget, each read on the selection images)."""
    monkeypatch.setattr(engine, "stretch_fits", lambda task, writer, clock, epochs=None, before=0.0: False)
    monkeypatch.setattr(engine, "plain_step_crowds_out_stretch", lambda *args: None)  # the scripted room decides
    run, _, state = faked_run(digits, tmp_path, monkeypatch, 0.35, 0.0, max_recoveries=3, stretch=True)
    assert [r.get("recovered_from") for r in run.history] == [None, None, None, 2]
    assert state["recoveries"] == 1
    assert "the recovery before bought no further step, and the budget has no room for a stretch" in run.status["message"]


def test_a_stretch_s_recovered_model_is_not_recovered_again_where_no_stretch_fits(digits, tmp_path, monkeypatch):
    """0.35 points per cluster, 0.1 back per recovery: the stretch (step 3, 1.05) is recovered to 0.95 (step 4,
    kept), the next cluster (1.3) is undone at once, and the budget has no room for another stretch: the run ends
    at step 4 rather than recover step 4's model again. A ResNet-56 upload's plain recovery of its last stretch's
    recovered model moved it from 0.97 to 1.23 points lost on 3,000 unseen images and, as one more look at the
    test images at the same MACs, was the step shipped."""
    room = iter([True])  # room for the first stretch only
    monkeypatch.setattr(engine, "stretch_fits", lambda task, writer, clock, epochs=None, before=0.0: next(room, False))
    monkeypatch.setattr(engine, "plain_step_crowds_out_stretch", lambda *args: None)  # the scripted room decides
    run, hist, state = faked_run(digits, tmp_path, monkeypatch, 0.35, 0.1, max_recoveries=3, stretch=True)
    assert hist[3]["stretch"] and hist[4]["recovered_from"] == 3 and not hist[4]["undone"]
    assert hist[-1]["step"] == 4 and state["recoveries"] == 1, "no recovery after the stretch's"
    assert "the recovery before bought no further step, and the budget has no room for a stretch" in run.status["message"]
    assert select_step(hist, 1.0) == 4


def test_an_undone_stretch_from_a_recovered_model_is_tried_again_with_a_recovery_twice_as_long(digits, tmp_path,
                                                                                               monkeypatch):
    """0.35 points per cluster, 0.02 back per recovery; no room for a stretch at the first stall, room after. Steps
    1-2 keep a cluster each (0.7); the stall is recovered (step 3, 0.68); the next cluster (1.03) is undone; the
    stretch from that recovered model (step 4) recovers to 1.01 in 3 epochs (step 5, undone). Before, the run ended
    there. Now the same stretch is tried again from step 3's model, without another plain recovery: its 6-epoch
    recovery (step 7) reads 0.99 and is kept, and the run goes on from it."""
    room = iter([False])
    monkeypatch.setattr(engine, "stretch_fits", lambda task, writer, clock, epochs=None, before=0.0: next(room, True))
    monkeypatch.setattr(engine, "plain_step_crowds_out_stretch", lambda *args: None)  # the scripted room decides
    run, hist, state = faked_run(digits, tmp_path, monkeypatch, 0.35, 0.02, max_recoveries=5, stretch=True,
                                 step_macs=0.04, stretch_macs=0.04)
    assert hist[3]["recovered_from"] == 2 and hist[4]["stretch"] and hist[4]["removed"]
    assert hist[5]["recovered_from"] == 4 and hist[5]["undone"] and hist[5]["recovery"]["epochs"] == engine.STRETCH_EPOCHS
    assert hist[6]["stretch"] and hist[6]["removed"] and hist[6].get("recovered_from") is None, \
        "the stretch is tried again at once, not after a recovery of the same model"
    assert hist[6]["macs"] == hist[4]["macs"] and hist[6]["widths"] == hist[4]["widths"], "from step 3's model again"
    assert hist[7]["recovered_from"] == 6 and not hist[7]["undone"]
    assert hist[7]["recovery"]["epochs"] == 2 * engine.STRETCH_EPOCHS
    assert len(hist) > 8 and hist[8]["macs"] < hist[7]["macs"], "went on from the kept stretch"
    assert run.rebuild_step(7)(torch.zeros(1, 3, 32, 32)).shape == (1, 10)


def test_an_undone_two_cluster_stretch_at_the_longest_recovery_is_tried_again_with_one_cluster(digits, tmp_path,
                                                                                               monkeypatch):
    """0.35 points per cluster, 0.02 back per recovery, stretches of 10 % of the MACs (two clusters here). After the
    plain recovery (step 3) the two-cluster stretch is undone with 3 recovery epochs (steps 4-5) and with 6, the
    most (steps 6-7); then, where the run used to end with its budget unused (our ResNet-20 upload: 2.4 of 15
    minutes), the stretch is tried once more from step 3's model with one cluster: 0.97 points, kept (steps 8-9);
    the stretch after it walks two clusters again."""
    from core.runs import removals
    room = iter([False])
    monkeypatch.setattr(engine, "stretch_fits", lambda task, writer, clock, epochs=None, before=0.0: next(room, True))
    monkeypatch.setattr(engine, "plain_step_crowds_out_stretch", lambda *args: None)  # the scripted room decides
    _, hist, _ = faked_run(digits, tmp_path, monkeypatch, 0.35, 0.02, max_recoveries=6, stretch=True,
                           step_macs=0.1, stretch_macs=0.1)
    walks = {r["step"]: len(removals(r)) for r in hist if r.get("stretch") and r.get("recovered_from") is None}
    assert walks == {4: 2, 6: 2, 8: 1, 10: 2}
    assert [(hist[s]["recovered_from"], hist[s]["undone"], hist[s]["recovery"]["epochs"]) for s in (5, 7, 9)] == \
        [(4, True, 3), (6, True, 6), (8, False, 6)]
    assert hist[4]["macs"] == hist[6]["macs"] < hist[8]["macs"] < hist[3]["macs"], "each from step 3's model"


def test_a_stretch_undone_halves_its_walk_then_doubles_its_recovery_once_then_walks_one_cluster():
    config = PruneConfig(step_macs=0.04, recover_epochs=2)
    size = engine.StretchSize.first(PruneConfig(step_macs=0.04, stretch_macs=0.16, recover_epochs=2))
    assert (size.macs, size.epochs) == (0.16, 6)
    retry = [size.resize(False, config, taken=2) for _ in range(5)]
    assert retry == [False, False, True, True, False] and (size.macs, size.epochs) == (0.0, 12)
    assert not size.resize(True, config) and (size.macs, size.epochs) == (0.04, 12), "a kept one-cluster walk grows back"
    assert not size.resize(None, config) and (size.macs, size.epochs) == (0.04, 12), "nothing walked, nothing changes"
    assert not size.resize(False, config, taken=1) and size.macs == 0.04, "one cluster was the least it could take"
    unbounded = engine.StretchSize(0.04, 6)  # no step size: the walk halves on, the recovery never grows
    assert not any(unbounded.resize(False, PruneConfig(step_macs=None, recover_epochs=2), 2) for _ in range(3))
    assert unbounded.epochs == 6 and unbounded.macs == pytest.approx(0.005)


def test_what_follows_an_undone_stretch_is_known_before_its_recovery_and_the_size_is_left_as_it_is():
    """``StretchSize.after_undone``: from a model that is not a recovery a plain recovery follows; from a recovery,
    the retry :meth:`resize` would make (its epochs), or nothing where the run ends; the size itself is unchanged."""
    config = PruneConfig(step_macs=0.04, recover_epochs=2)
    size = engine.StretchSize(0.04, 6)
    assert size.after_undone(config, False, 1) == (2, False), "a plain recovery of the model before"
    assert size.after_undone(config, True, 1) == (12, True), "a retry with the recovery doubled"
    assert (size.macs, size.epochs) == (0.04, 6)
    longest = engine.StretchSize(0.04, 12)
    assert longest.after_undone(config, True, 2) == (12, True), "a two-cluster walk is retried as one cluster"
    assert longest.after_undone(config, True, 1) == (0, False), "nothing is left to try: the run ends"
    assert engine.StretchSize(0.16, 6).after_undone(config, True, 3) == (0, False), "a halved walk: the run ends"


def test_the_last_stretch_s_recovery_takes_what_the_budget_leaves_up_to_three_times_as_long(monkeypatch):
    """A stretch recovers ``STRETCH_EPOCHS`` x ``recover_epochs`` (here 6) epochs, each 10 s and another 10 s in
    the control; a run with room for another stretch after this one (the re-scoring and slack, each at the slowest
    step so far, the next stretch's step at the mean, and at least a last stretch's 12 epochs: 30 + 30 + 30 + 240 s)
    keeps 6, a run that has
    none spends the rest of its budget on this recovery, at most three times the epochs, less what would follow
    should it be undone (when that fits) and one epoch spare, and a run without a budget or a timed recovery keeps 6."""
    class Task:
        config = PruneConfig(recover_epochs=2, time_budget=10.0)

        def control(self):  # the run makes the control: each epoch counts twice
            pass

        def recover(self):
            pass

    class Clock(engine.RunClock):
        def __init__(self, elapsed: float, budget_s: float | None = 600.0, steps: tuple = (30.0,)):
            super().__init__(None if budget_s is None else budget_s / 60)
            self.at = elapsed
            self.step_seconds, self.recovery_seconds, self.recovery_epochs = list(steps), [60.0], [6]

        def elapsed(self) -> float:
            return self.at

    reserve = {"s": 0.0}
    monkeypatch.setattr(engine, "reserve_after_recovery", lambda task, writer, clock: reserve["s"])
    monkeypatch.setattr(engine, "recovery_epoch_seconds", lambda task, writer, clock: 2 * clock.recovery_estimate(1))
    task, usual = Task(), engine.STRETCH_EPOCHS * 2
    assert engine.LAST_STRETCH_EPOCHS == 3
    assert engine.stretch_recovery_epochs(task, None, Clock(0.0)) == usual, "room for another stretch"
    assert engine.least_final_epochs(task.config) == 2 * usual
    assert engine.stretch_recovery_epochs(task, None, Clock(600 - 120 - 330)) == usual, "330 s: just room for one"
    assert engine.stretch_recovery_epochs(task, None, Clock(600 - 120 - 250)) == usual + 11, \
        "250 s left: another stretch with the usual 6 epochs (210 s) fits, not with a last stretch's 12 (330 s)"
    assert engine.stretch_recovery_epochs(task, None, Clock(600 - 120 - 100)) == usual + 4, \
        "380 s in: 120 s for the usual 6 epochs, 100 s left = one epoch spare and 4 more epochs at 20 s"
    assert engine.stretch_recovery_epochs(task, None, Clock(600 - 120 - 170)) == usual + 7, \
        "170 s left: the next stretch (270 s) does not fit; 20 s spare"
    slow = (30.0, 200.0)  # a slow re-scoring step: another stretch needs 200 + 200 + 115 + 240 s
    assert engine.stretch_recovery_epochs(task, None, Clock(600 - 120 - 400, steps=slow)) == 3 * usual, \
        "400 s left would hold 19 more (less than another stretch's 755 s); capped at three times"
    assert engine.stretch_recovery_epochs(task, None, Clock(590.0)) == usual, "never fewer than the usual"
    # should this stretch be undone: a retry (its step, 30 s, and at least a last stretch's 12 epochs, 240 s; the
    # gate it passes, stretch_fits) or a plain recovery (2 epochs)
    assert engine.stretch_recovery_epochs(task, None, Clock(600 - 120 - 310), undone=(6, True)) == usual + 1, \
        "310 s left: 270 s kept for the retry, 20 s spare, 20 s for one more epoch"
    assert engine.stretch_recovery_epochs(task, None, Clock(600 - 120 - 170), undone=(2, False)) == usual + 5, \
        "170 s left: 40 s kept for the plain recovery, 20 s spare, 110 s for five more epochs"
    assert engine.stretch_recovery_epochs(task, None, Clock(600 - 120 - 100), undone=(6, True)) == usual + 4, \
        "100 s left: no retry would fit after it, so nothing is kept for one"
    reserve["s"] = 100.0  # what the run keeps for its end is not spent
    assert engine.stretch_recovery_epochs(task, None, Clock(600 - 120 - 200)) == usual + 4
    reserve["s"] = 500.0  # a control dearer than the spare epoch: 6 % of its estimate (30 s) is kept spare instead
    assert engine.CONTROL_DRIFT == 0.06
    assert engine.stretch_recovery_epochs(task, None, Clock(600 - 120 - 600)) == usual + 3, \
        "100 s left after the control's 500: 30 s spare (not 20), 70 s for three more epochs"
    assert engine.stretch_recovery_epochs(task, None, Clock(0.0, budget_s=None)) == usual
    untimed = Clock(500.0)
    untimed.recovery_seconds = []
    assert engine.stretch_recovery_epochs(task, None, untimed) == usual


def test_a_stretch_is_taken_at_once_where_the_budget_holds_it_but_not_a_plain_step_before_it(monkeypatch):
    """From a recovered model, with the budget holding a stretch (a 30-s step, 6 epochs of 10 s and the control's
    repeat, 150 s, counted at a last stretch's 12 epochs: 270 s) but not the slowest step (40 s) before it, the loop tries no candidate first; with room for both,
    or for neither, or from a model that is not a recovery, or with stretches off, it tries one as always."""
    class Task:
        config = PruneConfig(recover_epochs=2, time_budget=10.0)

        def control(self):
            pass

        def recover(self):
            pass

    class Clock(engine.RunClock):
        def __init__(self, elapsed: float):
            super().__init__(10.0)
            self.at = elapsed
            self.step_seconds, self.recovery_seconds, self.recovery_epochs = [20.0, 40.0], [60.0], [6]

        def elapsed(self) -> float:
            return self.at

    monkeypatch.setattr(engine, "reserve_after_recovery", lambda task, writer, clock: 0.0)
    monkeypatch.setattr(engine, "recovery_epoch_seconds", lambda task, writer, clock: 2 * clock.recovery_estimate(1))
    recovered, task = {"step": 4, "recovered_from": 3}, Task()
    crowded = engine.plain_step_crowds_out_stretch
    assert crowded(task, None, Clock(600 - 290), recovered, 6), "290 s: the stretch (270 s) fits, not with 40 s more"
    assert crowded(task, None, Clock(600 - 310), recovered, 6) is None, "310 s: room for both"
    assert crowded(task, None, Clock(600 - 260), recovered, 6) is None, "260 s: no stretch fits either"
    assert crowded(task, None, Clock(600 - 290), {"step": 4}, 6) is None, "not a recovered model"
    task.config = PruneConfig(recover_epochs=2, time_budget=10.0, stretch=False)
    assert crowded(task, None, Clock(600 - 290), recovered, 6) is None, "stretches off"


def test_a_time_budget_stops_the_run_and_keeps_the_finished_steps(digits, tmp_path, monkeypatch):
    """A clock on which each finished step takes 100 s and the final recovery is guessed at four steps (400 s),
    kept in reserve: with an 11.5-minute budget (690 s) two steps fit (a third would start at 200 s and leave
    its recovery ending at 700 s), the finished steps are on disk with their weights, and the last is recovered
    in the time kept for it."""
    loaded, data = digits
    monkeypatch.setattr(engine.RunClock, "elapsed", lambda self: 100.0 * len(self.step_seconds))
    monkeypatch.setattr(engine.RunClock, "step_done", lambda self, s: self.step_seconds.append(100.0))
    config = quick_config(max_steps=10, time_budget=11.5, recover_epochs=1)
    summary = run_pruning(loaded, data, config, tmp_path / "run")
    run = Run(tmp_path / "run")
    assert summary["state"] == "done"
    assert run.status["message"].startswith("time budget reached (11.5 min)")
    assert [r["step"] for r in run.history] == [0, 1, 2, 3]
    assert [r.get("recovered_from") for r in run.history] == [None, None, None, 2]
    assert run.rebuild_step(2)(torch.zeros(1, 3, 32, 32)).shape == (1, 10)
    tight = run_pruning(loaded, data, dataclasses.replace(config, time_budget=5.5), tmp_path / "tight")
    hist = Run(tmp_path / "tight").history
    assert [r.get("recovered_from") for r in hist] == [None, None], "one step fits, its recovery does not"
    assert tight["claim"]["step"] == 0, "an unrecovered step of a run that recovers never ships"


def test_the_time_budget_counts_from_when_the_users_wait_began(digits, tmp_path):
    """``started`` (a CLI command's process start) moves the budget's start back: a run whose command began two
    minutes ago has spent a 1-minute budget before its first step and keeps only the original; the clock reads the
    time since then, and a ``started`` in the future counts as now. Why: our ResNet-20 upload's 15-minute command
    took 900.7 s, its imports and image loading outside the run's own clock."""
    from core.cli_common import process_started

    loaded, data = digits
    assert 119.0 <= engine.RunClock(1.0, started=time.time() - 120.0).elapsed() < 125.0
    assert engine.RunClock(1.0, started=time.time() + 60.0).elapsed() < 5.0
    late = run_pruning(loaded, data, quick_config(max_steps=3, time_budget=1.0), tmp_path / "late",
                       started=time.time() - 120.0)
    assert late["state"] == "done" and [r["step"] for r in Run(tmp_path / "late").history] == [0]
    assert Run(tmp_path / "late").status["message"].startswith("time budget reached (1 min)")
    run_pruning(loaded, data, quick_config(max_steps=1, time_budget=1.0), tmp_path / "on_time", started=time.time())
    assert [r["step"] for r in Run(tmp_path / "on_time").history] == [0, 1]
    began = process_started()  # this test process's start: before now, not before this machine's boot
    assert began is not None and 0.0 < time.time() - began < 86400.0


def test_the_control_is_recorded_and_the_claim_is_the_test_drop_beside_it(digits, tmp_path):
    """Two pruning steps then the step limit: the last step is recovered once more (one epoch), and the control,
    the original given the same 2 fine-tuning mini-batches and 1 recovery epoch, is measured on the same images."""
    loaded, data = digits
    config = quick_config(max_steps=2, recover_epochs=1, control=True, finetune_steps=1)
    summary = run_pruning(loaded, data, config, tmp_path / "run")
    run = Run(tmp_path / "run")
    assert [r.get("recovered_from") for r in run.history] == [None, None, None, 2]
    control = (tmp_path / "run" / "control.json")
    assert control.exists()
    recorded = __import__("json").loads(control.read_text())
    assert recorded["received"] == {"finetune_batches": 2, "recovery_epochs": [1]}
    assert recorded["for_step"] == summary["claim"]["step"] == 3, "the control repeats the shipped step's training"
    assert 0 <= recorded["metric"] <= 1 and 0 <= recorded["test_metric"] <= 1
    assert unpack_correct(recorded["correct"], "test").mean() == pytest.approx(recorded["test_metric"])
    trained_alike = run.control()  # its weights load into the original's architecture and differ from them
    assert trained_alike is not None and trained_alike(torch.zeros(1, 3, 32, 32)).shape == (1, 10)
    assert any(not torch.equal(a, b) for a, b in zip(trained_alike.state_dict().values(),
                                                     run.original().model.state_dict().values()))
    claim = summary["claim"]
    assert claim["step"] == select_step(run.history, 100.0) and claim["max_drop"] == 100.0
    assert claim["test"] == run.record(claim["step"])["paired"]["test"]
    vs = claim["vs_control"]
    shipped = unpack_correct(run.record(claim["step"])["correct"], "test")
    assert vs["n"] == len(data.test) and vs["drop_points"] == pytest.approx(
        100 * (recorded["test_metric"] - shipped.mean()))


def test_without_test_images_no_unbiased_claim_is_made(digits, tmp_path):
    loaded, _ = digits
    data = load_dataset("sample:vgg_digits", loaded.spec.input, test_fraction=0.0)
    summary = run_pruning(loaded, data, quick_config(max_steps=1, control=False), tmp_path / "run")
    assert summary["claim"]["test"] is None and summary["claim"]["vs_control"] is None


def test_the_shipped_step_must_also_hold_on_the_test_images():
    """The smallest step within the threshold on the selection images is passed over when its test drop is
    beyond it (the winner's curse): the next larger one that holds on both is shipped."""
    def rec(step, macs, sel, test):
        return {"step": step, "macs": macs, "metric": sel, "test_metric": test}
    hist = [rec(0, 100, 0.90, 0.90), rec(1, 80, 0.90, 0.895), rec(2, 60, 0.895, 0.87), rec(3, 50, 0.893, 0.86)]
    assert select_step(hist, 1.0) == 1, "steps 2 and 3 pass on selection but lose 3 and 4 test points"
    assert select_step(hist, 5.0) == 3
    no_test = [{**r, "test_metric": None} for r in hist]
    assert select_step(no_test, 1.0) == 3, "without test images the selection figure alone decides"


def test_packed_correctness_round_trips_and_the_received_training_is_counted():
    rng = np.random.default_rng(0)
    v = rng.random(1001) < 0.8
    assert np.array_equal(unpack_correct(pack_correct({"test": v}), "test"), v)
    assert unpack_correct({"test": {"n": 5, "bits": "!!"}}, "test") is None
    hist = [{"step": 0}, {"step": 1}, {"step": 2}, {"step": 3, "recovered_from": 2, "recovery": {"epochs": 2}},
            {"step": 4}]
    assert training_received(hist, 40) == {"finetune_batches": 120, "recovery_epochs": [2]}
    assert training_received(hist, 40, upto=2) == {"finetune_batches": 80, "recovery_epochs": []}
    base = {"step": 0, "correct": pack_correct({"test": np.array([1, 1, 0, 1], bool)})}
    step = {"step": 1, "paired": {"test": {"drop_points": 25.0}},
            "correct": pack_correct({"test": np.array([1, 0, 0, 1], bool)})}
    control = {"correct": pack_correct({"test": np.array([1, 1, 1, 1], bool)})}
    claim = shipped_claim([base, step], 1, control)
    assert claim["vs_control"]["drop_points"] == 50.0 and claim["control_vs_original"]["drop_points"] == -25.0


def test_the_control_repeats_the_shipped_step_s_path_not_an_undone_stretch_nor_later_steps():
    """A run as our ResNet-20 upload's: a recovered step, a stretch undone (the model went back to step 2), the same
    stretch again with a longer recovery, kept, then a plain step the test images refuse and its recovery. The
    shipped step 6 received 2 fine-tunings and recoveries of 2 and 12 epochs; the last step 3, and 2, 12 and 2; the
    run as a whole 4, and 2, 6, 12 and 2 (what the control was given before)."""
    def rec(step, sel, test, macs, **extra):
        return {"step": step, "metric": sel, "test_metric": test, "macs": macs, **extra}
    hist = [rec(0, 0.90, 0.90, 100),
            rec(1, 0.89, 0.89, 90, awaits_recovery=True), rec(2, 0.90, 0.90, 90, recovered_from=1, recovery={"epochs": 2}),
            rec(3, 0.85, 0.86, 80, stretch=True, awaits_recovery=True),
            rec(4, 0.88, 0.89, 80, stretch=True, undone=True, recovered_from=3, recovery={"epochs": 6}),
            rec(5, 0.85, 0.86, 80, stretch=True, awaits_recovery=True),
            rec(6, 0.896, 0.896, 80, stretch=True, undone=False, recovered_from=5, recovery={"epochs": 12}),
            rec(7, 0.89, 0.88, 75, awaits_recovery=True), rec(8, 0.89, 0.885, 75, recovered_from=7, recovery={"epochs": 2})]
    assert [r["step"] for r in lineage(hist)] == [1, 2, 5, 6, 7, 8]
    assert [r["step"] for r in lineage(hist, upto=4)] == [1, 2], "the undone stretch's walk went with it"
    assert training_received(hist, 40) == {"finetune_batches": 120, "recovery_epochs": [2, 12, 2]}
    assert select_step(hist, 1.0) == 6, "the test images refuse steps 7 and 8 (2.0 and 1.5 points)"
    assert control_step(hist, 1.0) == (6, True)
    assert training_received(hist, 40, upto=6) == {"finetune_batches": 80, "recovery_epochs": [2, 12]}
    assert control_step(hist[:2], 1.0) == (1, False), "a run that ships nothing gets the control of its last step"
    assert select_step(hist[:5], -1.0) == 0 and control_step(hist[:5], -1.0) == (2, False), \
        "a run that ships nothing and ends on an undone stretch: the last step on its model's path"
    assert control_step(hist[:1], 1.0) == (0, False)
    appended = hist + [{"step": 9, "metric": 0.9, "test_metric": 0.9, "macs": 80, "recovered_from": 6,
                        "recovery": {"epochs": 3}}]  # python -m core recover --step 6, after the run
    assert [r["step"] for r in lineage(appended)] == [1, 2, 5, 6, 9]
    assert training_received(appended, 40) == {"finetune_batches": 80, "recovery_epochs": [2, 12, 3]}


def test_fast_car_measures_no_more_filters_exactly_than_the_loop_budget(digits, tmp_path):
    """vgg_digits has 224 filters; each group's shortlist (its next cluster plus a margin) would be its whole
    width, 224 exact measurements; the loop's budget is 5 % of the filters (12)."""
    loaded, data = digits
    config = quick_config(criterion="car", car="fast", max_steps=2, score_images=32, rescore_every=1)
    run_pruning(loaded, data, config, tmp_path / "run")
    run = Run(tmp_path / "run")
    budget = exact_budget(224, config.finetune_steps, config.batch_size, config.score_images)
    assert budget == 12
    for record in run.history[1:]:
        scoring = record["car_scoring"]
        assert 0 < scoring["measured"] <= budget and scoring["screened"] > 0


def test_the_default_flow_is_sized_for_real_models():
    c = PruneConfig()
    assert (c.clusters_per_step, c.step_macs, c.recover_epochs, c.control) == (8, 0.04, 2, True)
    assert (c.stretch, c.recover_mirror, c.max_recoveries, c.stretch_macs, c.stretch_allowance) == (True, "auto", 16, 0.04, None)
    with pytest.raises(Exception, match="MACs per step"):
        PruneConfig(step_macs=1.5).validate()
    with pytest.raises(Exception, match="time budget"):
        PruneConfig(time_budget=0).validate()
