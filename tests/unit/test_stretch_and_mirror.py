"""Stretches (``core.engine.stretch_step``) and the mirror check of recoveries (issue 23): which records may
ship, where the settings come from, and that the mirror check reads the model it was given."""
from __future__ import annotations

import time

import pytest
import torch

from core.cli import build_parser
from core.cli_common import config_from_args
from core.errors import SettingsError
from core.models import load_model
from core.prune import PruneConfig
from core.runs import select_step, shippable
from core.sources import load_dataset
from core.tasks.classification.task import ClassificationTask, mirror_check


def _record(step, metric, macs, **kw):
    return {"step": step, "metric": metric, "test_metric": metric, "macs": macs, **kw}


def test_neither_half_of_an_undone_stretch_nor_the_removal_half_of_a_kept_one_ships():
    history = [_record(0, 0.90, 100), _record(1, 0.899, 95),
               _record(2, 0.896, 85, stretch=True),  # the removal half: never shipped, even within the threshold
               _record(3, 0.897, 85, stretch=True, recovered_from=2, undone=True),  # undone: never shipped
               _record(4, 0.899, 95, recovered_from=1)]
    assert select_step(history, 1.0) == 1
    assert not shippable(history[2]) and not shippable(history[3]) and shippable(history[4])
    history[3]["undone"] = False  # a kept stretch: its recovered half ships
    assert select_step(history, 1.0) == 3


def test_a_pruning_step_awaiting_its_recovery_never_ships_and_runs_before_the_key_are_read_as_they_were():
    """Only recovered steps of a run that recovers ship (``awaits_recovery``), however well the pruning step reads;
    a run written before the key (or with recoveries off) ships its pruning steps as before."""
    history = [_record(0, 0.90, 100), _record(1, 0.899, 90, awaits_recovery=True),
               _record(2, 0.899, 90, recovered_from=1), _record(3, 0.90, 80, awaits_recovery=True)]
    assert select_step(history, 1.0) == 2, "step 3 reads 0.0 points lost on both splits and still waits"
    assert not shippable(history[1]) and shippable(history[2]) and not shippable(history[3])
    older = [{k: v for k, v in r.items() if k != "awaits_recovery"} for r in history]
    assert select_step(older, 1.0) == 3


def test_the_cli_flags_set_the_stretch_and_the_mirror():
    base = ["prune", "--model", "m.pt", "--data", "d", "--out", "o"]
    args = build_parser().parse_args(base + ["--no-stretch", "--recover-mirror", "off"])
    config = config_from_args(args, PruneConfig)
    assert config.stretch is False and config.recover_mirror == "off"
    config = config_from_args(build_parser().parse_args(base), PruneConfig)
    assert config.stretch is True and config.recover_mirror == "auto" == PruneConfig().recover_mirror
    assert config_from_args(build_parser().parse_args(base + ["--stretch"]), PruneConfig).stretch is True
    sized = config_from_args(build_parser().parse_args(base + ["--stretch-macs", "0.2", "--stretch-allowance", "2"]),
                             PruneConfig)
    assert (sized.stretch_macs, sized.stretch_allowance) == (0.2, 2.0)
    assert (config.stretch_macs, config.stretch_allowance) == (PruneConfig().stretch_macs, PruneConfig().stretch_allowance)
    for bad in (["--stretch-macs", "1.5"], ["--stretch-macs", "0"], ["--stretch-allowance", "0.5"]):
        with pytest.raises(SettingsError, match="stretch"):
            config_from_args(build_parser().parse_args(base + bad), PruneConfig)
    with pytest.raises(SettingsError, match="Mirrored images"):
        PruneConfig(recover_mirror="sometimes").validate()


@pytest.mark.parametrize("sample, mirrors", [("vgg_digits", False), ("cifar10", True)])
def test_the_mirror_check_reads_the_model(sample, mirrors, one_thread):
    """Digits mirrored are other digits: the digit model loses far more than the allowance on them, so its
    recoveries never mirror; the CIFAR-10 ResNet-20 (trained with mirrors) scores mirrored images as well."""
    loaded = load_model(f"sample:{sample}")
    data = load_dataset(f"sample:{sample}", loaded.spec.input)
    task = ClassificationTask(loaded.spec.input, data, PruneConfig(latency=False, recover_mirror="auto"))
    figures = task.measure(loaded.model)
    check = figures["mirror_check"]
    assert check["hflip"] is mirrors and task.recovery_config().hflip is mirrors
    assert (check["drop_points"] > check["allowance_points"]) is not mirrors
    flipped = mirror_check(loaded.model, data.val, loaded.spec.input, torch.ones(len(data.val), dtype=torch.bool).numpy())
    assert flipped["mirrored_accuracy"] == pytest.approx(check["mirrored_accuracy"]), "the same mirrored images"
    task.config.recover_mirror = "on" if not mirrors else "off"
    assert task.recovery_config().hflip is not mirrors, "the setting overrides the check"


def test_the_control_is_estimated_from_the_training_the_run_gave_at_its_measured_rates():
    """Two pruning steps of 40 mini-batches and two 2-epoch recoveries of 30 s (15 s an epoch, 1,000 images at 64 a
    batch: 16 batches, ~0.94 s a batch): the control repeats 4 epochs and 80 batches, about 135 s; a 2-minute budget
    with a minute gone has no room for it."""
    from types import SimpleNamespace

    import core.engine as engine

    history = [{"step": 0}, {"step": 1}, {"step": 2, "recovered_from": 1, "seconds": 30.0, "recovery": {"epochs": 2}},
               {"step": 3}, {"step": 4, "recovered_from": 3, "seconds": 30.0, "recovery": {"epochs": 2}}]
    task = SimpleNamespace(config=PruneConfig(), data=SimpleNamespace(train=list(range(1000))))
    clock = engine.RunClock(2.0)
    needs = engine.control_estimate(history, task, clock)
    assert needs == pytest.approx(4 * 15.0 + 80 * 15.0 / 16)
    clock.start -= 60.0
    assert clock.would_pass_budget(needs) and not engine.RunClock(None).would_pass_budget(needs)
    assert engine.control_estimate(history[:2], task, clock) == clock.recovery_estimate(), "no recovery measured yet"


def test_a_budgeted_run_keeps_time_for_the_last_recovery_and_the_control(tmp_path, monkeypatch):
    """The reserve the loop keeps before each step: none without a budget; with one, the last step's recovery, and
    with the control that recovery again (the control repeats it) plus the control's training so far."""
    from types import SimpleNamespace

    import core.engine as engine

    task = SimpleNamespace(config=PruneConfig(control=True, recover_epochs=2), data=SimpleNamespace(train=list(range(1000))),
                           recover=object(), control=object())
    writer = SimpleNamespace(dir=tmp_path)
    monkeypatch.setattr(engine, "Run", lambda folder: SimpleNamespace(history=[{"step": 0}]))  # no step yet
    assert engine.time_to_finish(task, writer, engine.RunClock(None)) == 0.0
    clock = engine.RunClock(30.0)
    clock.step_done(50.0)
    assert clock.recovery_estimate() == 200.0
    assert engine.time_to_finish(task, writer, clock) == pytest.approx(3 * 200.0)
    task.config.control = False
    assert engine.time_to_finish(task, writer, clock) == pytest.approx(200.0)


def test_a_stretch_starts_only_with_room_for_its_recovery_twice_when_the_control_repeats_it(tmp_path, monkeypatch):
    """The control repeats a kept stretch's recovery (core.claim.training_received), and a stretch is not known to be
    kept before its recovery, so a stretch needs its own recovery and the control's repeat of it beside the step and
    the reserve; a ResNet-20 upload whose stretch did not count the repeat ended with no time left for its control.
    The recovery counted is the one a last stretch gets at least (``least_final_epochs``: twice a stretch's usual
    3x, 12 epochs here), since any stretch may be the last. The reserve is the control alone: a stretch ends
    recovered, so no final recovery is due after it (counting one held back about a minute on the ResNet-20
    upload)."""
    from types import SimpleNamespace

    import core.engine as engine

    task = SimpleNamespace(config=PruneConfig(control=True, recover_epochs=2), data=SimpleNamespace(train=list(range(1000))),
                           recover=object(), control=object())
    writer = SimpleNamespace(dir=tmp_path)
    monkeypatch.setattr(engine, "Run", lambda folder: SimpleNamespace(history=[{"step": 0}]))
    clock = engine.RunClock(1000 / 60)  # a 1000-s budget
    clock.step_done(10.0)
    clock.recovery_done(20.0, 2)  # 10 s an epoch: a plain recovery 20 s, a stretch's 60 s, a last stretch's 120 s
    assert engine.least_final_epochs(task.config) == 12 and engine.least_final_epochs(task.config, 18) == 18
    clock.start = time.perf_counter()
    # a stretch ends recovered: no final recovery is due after it, only the control (20 s, no recorded recovery)
    reserve = engine.reserve_after_recovery(task, writer, clock)
    assert reserve == pytest.approx(20.0) and engine.time_to_finish(task, writer, clock) == pytest.approx(60.0)
    with_control = 10.0 + reserve + 2 * 120.0
    clock.start -= 1000 - with_control - 1.0  # 1 s to spare
    assert engine.stretch_fits(task, writer, clock)
    clock.start -= 2.0
    assert not engine.stretch_fits(task, writer, clock)
    task.config.control = False  # no repeat: the stretch's recovery once, and no reserve
    assert engine.reserve_after_recovery(task, writer, clock) == 0.0
    assert engine.stretch_fits(task, writer, clock)
    clock.start -= (with_control - 1.0) - (10.0 + 120.0) - 0.5  # 130.5 s left: the stretch alone (130 s) fits
    assert engine.stretch_fits(task, writer, clock)
    clock.start -= 1.0
    assert not engine.stretch_fits(task, writer, clock)


def test_a_plain_recovery_in_the_loop_keeps_time_for_the_control(tmp_path, monkeypatch):
    """A recovery the loop makes (a stall, a refused step) needs its own time, the control's repeat of it and the
    control (``time_to_finish``), not only its own: a ResNet-56 upload recovered its last model 18 minutes into a
    30-minute budget and then had no time for its 12-minute control."""
    from types import SimpleNamespace

    import core.engine as engine

    task = SimpleNamespace(config=PruneConfig(control=True, recover_epochs=2, max_recoveries=5, time_budget=20.0),
                           data=SimpleNamespace(train=list(range(1000))), recover=object(), control=object())
    writer = SimpleNamespace(dir=tmp_path)
    monkeypatch.setattr(engine, "Run", lambda folder: SimpleNamespace(history=[{"step": 0}]))
    clock = engine.RunClock(task.config.time_budget)  # 1,200 s
    clock.step_done(10.0)
    clock.recovery_done(20.0, 2)
    clock.start = time.perf_counter() - (1200 - 3 * 20.0 - 1.0)  # room for 20 + 20 + the control's 20, 1 s to spare
    assert engine.recovery_blocked(task, writer, 0, clock) is None
    clock.start -= 2.0  # the recovery alone (20 s) still fits, the control after it does not
    assert not clock.would_pass_budget(20.0)
    assert engine.recovery_blocked(task, writer, 0, clock) == \
        "; no time left in the 20-minute budget for a recovery and the control"
    task.config.control = False
    assert engine.recovery_blocked(task, writer, 0, clock) is None, "without the control the recovery alone counts"
    assert engine.recovery_blocked(task, writer, 5, clock) == "; all 5 recoveries spent"


def test_a_recovery_is_estimated_per_epoch_so_a_stretch_is_not_the_next_plain_recovery():
    """A stretch recovers 3x the epochs of a plain one: after a 6-epoch stretch of 60 s the last step's 2-epoch
    recovery is reserved at 20 s, not 60 (the budget would otherwise stop the loop early); unknown epochs keep
    the last recovery's own seconds."""
    import core.engine as engine

    clock = engine.RunClock(30.0)
    clock.step_done(10.0)
    assert clock.recovery_estimate(2) == clock.recovery_estimate() == 40.0, "a guess of four steps before any"
    clock.recovery_done(60.0, 6)
    assert clock.recovery_estimate(2) == pytest.approx(20.0) and clock.recovery_estimate(6) == pytest.approx(60.0)
    assert clock.recovery_estimate() == 60.0
    clock.recovery_done(25.0)
    assert clock.recovery_estimate(2) == 25.0, "epochs not known: the last recovery's seconds"


def test_the_control_s_repeat_of_a_recovery_epoch_is_counted_at_the_rate_its_check_at_the_end_reads(tmp_path,
                                                                                                    monkeypatch):
    """The room for a stretch's epochs counts the control's repeat of each at the rate ``control_estimate`` will
    read at the end, not at the last recovery's (on a ResNet-20 upload they differed by 0.24 s an epoch, 18 s over
    76 epochs, and the run ended without its control); that rate is the largest recovered model's, the nearest to
    the original the control trains, or all recoveries pooled where that is more (the control on the 41-M-MAC
    original ran at 4.72 s an epoch where the recoveries pooled ran at 4.41, and the command ended 7 s late)."""
    from types import SimpleNamespace

    import core.engine as engine

    task = SimpleNamespace(config=PruneConfig(control=True, recover_epochs=2, batch_size=100),
                           data=SimpleNamespace(train=list(range(1000))), recover=object(), control=object())
    history = [{"step": 0, "macs": 100}, {"step": 1, "seconds": 5.0, "macs": 90},
               {"step": 2, "recovered_from": 1, "seconds": 10.0, "recovery": {"epochs": 2}, "macs": 90},  # 5 s/epoch
               {"step": 3, "seconds": 5.0, "macs": 60},
               {"step": 4, "recovered_from": 3, "seconds": 40.0, "recovery": {"epochs": 10}, "macs": 60}]  # 4 s/epoch
    monkeypatch.setattr(engine, "Run", lambda folder: SimpleNamespace(history=history))
    clock = engine.RunClock(30.0)
    clock.recovery_done(10.0, 2)
    clock.recovery_done(40.0, 10)
    assert engine.control_epoch_seconds(history, clock) == pytest.approx(5.0), "the 90-MAC model's, not 4 or 4.17"
    writer = SimpleNamespace(dir=tmp_path)
    assert engine.recovery_epoch_seconds(task, writer, clock) == pytest.approx(4.0 + 5.0)
    received = engine.training_received(history, task.config.finetune_steps)
    assert received["recovery_epochs"] == [2, 10]
    assert engine.control_estimate(history, task, clock) == pytest.approx(
        12 * 5.0 + received["finetune_batches"] * 5.0 / 10)
    history[2]["seconds"] = 6.0  # the largest model's recovery ran at 3 s an epoch: the pooled 46/12 is more
    assert engine.control_epoch_seconds(history, clock) == pytest.approx(46.0 / 12)
    task.config.control = False
    assert engine.recovery_epoch_seconds(task, writer, clock) == pytest.approx(4.0)
    assert engine.control_epoch_seconds([{"step": 0}], clock) == pytest.approx(4.0), "no recovery: the clock's"


def test_the_control_s_epochs_are_read_off_a_line_through_the_recoveries_training_times(tmp_path):
    """Where the recoveries' epochs carry their training times (``core.recovery.recover``), the control's epoch is
    read off a line through each recovery's time against its MACs at the original's, kept between the largest
    recovered model's time and that time scaled by the MAC ratio; each repeated recovery adds the largest model's
    measuring, and each fine-tuning mini-batch the original's measured rate. On a ResNet-56 upload the old rate
    (the largest model's seconds over its epochs, measuring included; mini-batches at a distilled epoch's rate)
    estimated the control at 699 s where it took 657; this one at 670."""
    from types import SimpleNamespace

    import core.engine as engine

    def recovery(step, macs, seconds, epoch_s, epochs):
        return {"step": step, "recovered_from": step - 1, "macs": macs, "seconds": seconds,
                "recovery": {"epochs": epochs, "per_epoch": [{"epoch": e + 1, "seconds": epoch_s} for e in range(epochs)]}}

    history = [{"step": 0, "macs": 100}, {"step": 1, "macs": 80}, recovery(2, 80, 6 * 9.0 + 3.0, 9.0, 6),
               {"step": 3, "macs": 60}, recovery(4, 60, 6 * 8.0 + 2.0, 8.0, 6)]
    clock = engine.RunClock(30.0)
    # 8 s at 60, 9 s at 80: 10 s at 100 (between 9 and 9 x 100/80 = 11.25)
    assert engine.control_epoch_seconds(history, clock) == pytest.approx(10.0)
    assert engine.recovery_overhead_seconds(history) == pytest.approx(3.0), "the largest model's measuring"
    task = SimpleNamespace(config=PruneConfig(), data=SimpleNamespace(train=list(range(1000))),
                           finetune_batch_seconds=0.5)
    received = engine.training_received(history, task.config.finetune_steps)
    assert received["recovery_epochs"] == [6, 6]
    assert engine.control_estimate(history, task, clock) == pytest.approx(
        12 * 10.0 + 2 * 3.0 + received["finetune_batches"] * 0.5)
    history[4]["recovery"]["per_epoch"] = [{"epoch": e, "seconds": 12.0} for e in range(1, 7)]
    assert engine.control_epoch_seconds(history, clock) == pytest.approx(9.0), \
        "a line falling towards the original reads no less than the largest model's time"
    history[4] = recovery(4, 20, 6 * 2.0, 2.0, 6)  # 2 s at 20, 9 s at 80: 11.33 s at 100, past the scaled 11.25
    assert engine.control_epoch_seconds(history, clock) == pytest.approx(9.0 * 100 / 80)
    history[4] = recovery(4, 75, 6 * 8.5, 8.5, 6)  # 80 and 75: a span of less than a tenth, scaled alone
    assert engine.control_epoch_seconds(history, clock) == pytest.approx(9.0 * 100 / 80)


def test_before_any_recovery_an_epoch_is_guessed_from_the_original_s_timed_mini_batch(tmp_path, monkeypatch):
    """Before any recovery was timed, a recovery epoch is its mini-batches at the original's fine-tuning rate (the
    fine-tuning check's timing) times the teacher's cost, not four steps' time (a guess for a whole recovery: 64 s
    an epoch on a ResNet-56 upload whose epochs took 11-12 s, which made a 12-epoch stretch at the first stall fit
    a 30-minute budget or not by a second of step time). Without a timing the old guess stands."""
    from types import SimpleNamespace

    import core.engine as engine

    task = SimpleNamespace(config=PruneConfig(control=True, recover_epochs=2, batch_size=100),
                           data=SimpleNamespace(train=list(range(1000))), recover=object(), control=object(),
                           finetune_batch_seconds=0.2)
    history = [{"step": 0, "macs": 100}, {"step": 1, "macs": 90}]
    monkeypatch.setattr(engine, "Run", lambda folder: SimpleNamespace(history=history))
    clock = engine.RunClock(30.0)
    clock.step_done(16.0)
    writer = SimpleNamespace(dir=tmp_path)
    epoch = 10 * 0.2 * engine.DISTILLED_BATCH_COST  # 10 mini-batches of 100
    assert engine.unmeasured_epoch_seconds(task) == pytest.approx(epoch)
    assert engine.recovery_epoch_seconds(task, writer, clock) == pytest.approx(2 * epoch), "the epoch and the control's"
    received = engine.training_received(history, task.config.finetune_steps)
    assert engine.control_estimate(history, task, clock) == pytest.approx(received["finetune_batches"] * 0.2)
    task.config.recover_kd = False
    assert engine.unmeasured_epoch_seconds(task) == pytest.approx(10 * 0.2)
    task.finetune_batch_seconds = None  # no timing: four steps, as before
    assert engine.recovery_epoch_seconds(task, writer, clock) == pytest.approx(2 * 4 * 16.0)
    assert engine.control_estimate(history, task, clock) == pytest.approx(4 * 16.0)
    clock.recovery_done(20.0, 2)  # once a recovery is timed, its rate
    task.finetune_batch_seconds, task.config.recover_kd = 0.2, True
    assert engine.recovery_epoch_seconds(task, writer, clock) == pytest.approx(10.0 + epoch), \
        "the run's own epoch at the timed recovery's rate; the control's at the guess until the history holds one"


def test_the_slowest_step_counts_a_stall_that_tried_every_candidate():
    """A stall tries every candidate where a kept step stops at the first that fits; the room for a stretch after a
    plain step counts the slowest of either (a ResNet-56 upload's stall after its 2.37x stretch took longer than its
    slowest kept step, and the stretch the loop had kept room for no longer fitted)."""
    import core.engine as engine

    clock = engine.RunClock(30.0)
    assert clock.slowest_step() == 0.0
    clock.step_done(23.0)
    clock.stall_done(31.0)
    assert clock.slowest_step() == 31.0 and clock.step_estimate() == 23.0, "a stall is no step's mean"
