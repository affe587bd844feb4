"""``--profile`` sets the cluster size for both tasks; with ``--cluster`` it must agree; unknown names exit 2."""
from __future__ import annotations

import pytest

from core.cli import build_parser, main
from core.cli_common import config_from_args
from core.clusters import PROFILES
from core.tasks.detection.prune import DetectionPruneConfig
from core.errors import SettingsError
from core.prune import PruneConfig

BASE = ["prune", "--model", "sample:vgg_digits", "--data", "sample:vgg_digits", "--out", "unused"]


@pytest.mark.parametrize("task,config_class", [("classification", PruneConfig), ("detection", DetectionPruneConfig)])
@pytest.mark.parametrize("profile", ["ncs2", "cpu-avx512", "none"])
def test_profile_sets_the_cluster_size_for_both_tasks(task, config_class, profile):
    args = build_parser().parse_args(BASE + ["--task", task, "--profile", profile])
    assert config_from_args(args, config_class).cluster == PROFILES[profile].cluster


def test_without_profile_or_cluster_the_default_stays():
    assert config_from_args(build_parser().parse_args(BASE), PruneConfig).cluster == PruneConfig().cluster == 8


def test_profile_and_a_contradicting_cluster_are_refused():
    args = build_parser().parse_args(BASE + ["--profile", "ncs2", "--cluster", "4"])
    with pytest.raises(SettingsError, match="contradicts --profile ncs2"):
        config_from_args(args, PruneConfig)
    agreeing = build_parser().parse_args(BASE + ["--profile", "ncs2", "--cluster", "8"])
    assert config_from_args(agreeing, PruneConfig).cluster == 8


def test_unknown_profile_is_one_line_and_exit_code_2(capsys, tmp_path):
    code = main(BASE[:-1] + [str(tmp_path / "run"), "--task", "detection", "--profile", "tpu9000"])
    err = capsys.readouterr().err
    assert code == 2 and "Unknown hardware profile 'tpu9000'" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_defaults_live_in_the_config_classes_and_the_cli_help_reads_them():
    prune = build_parser()._subparsers._group_actions[0].choices["prune"]
    helps = {a.dest: a.help for a in prune._actions}
    assert f"default {PruneConfig().finetune_steps}" in helps["finetune_steps"]
    assert f"(detection: {DetectionPruneConfig().finetune_steps})" in helps["finetune_steps"]
    assert f"default {PruneConfig().max_steps}" in helps["max_steps"]
    args = build_parser().parse_args(BASE)
    assert config_from_args(args, PruneConfig) == PruneConfig()
    det = build_parser().parse_args(BASE + ["--task", "detection"])
    assert config_from_args(det, DetectionPruneConfig) == DetectionPruneConfig()
    app = PruneConfig.app_defaults()
    assert app == PruneConfig() == config_from_args(args, PruneConfig)  # one set of defaults: the app's are the CLI's
    det_app = DetectionPruneConfig.app_defaults()
    assert det_app.max_steps == 3 and det_app.latency is False and det_app.finetune_steps == 20
    app.validate()
    det_app.validate()
