"""Stretches (``core.engine.stretch_step``) and the mirror check of recoveries (issue 23): which records may
ship, where the settings come from, and that the mirror check reads the model it was given."""
from __future__ import annotations

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
    args = build_parser().parse_args(base + ["--stretch", "--recover-mirror", "auto"])
    config = config_from_args(args, PruneConfig)
    assert config.stretch is True and config.recover_mirror == "auto"
    config = config_from_args(build_parser().parse_args(base), PruneConfig)
    assert config.stretch is False and config.recover_mirror == "off" == PruneConfig().recover_mirror
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
