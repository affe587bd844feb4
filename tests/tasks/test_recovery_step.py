"""The recovery fine-tune as a run step (issue 14): a real sample run gets a new step with selection and
test figures that rebuilds like any step; old runs without a test split still recover; the CLI refuses
bad input in one line."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from core.claim import shipped_claim, unpack_correct
from core.cli_recover import recovery_note, recovery_summary
from core.errors import PruneScopeError
from core.eta import PhaseProgress
from core.evaluate import count_macs_params, evaluate_accuracy
from core.models import load_model
from core.prune import PruneConfig, run_pruning
from core.recovery import RecoveryConfig, recover_run_step, recovery_device
from core.runs import Run
from core.sources import load_dataset, load_run_dataset
from core.workspace import atomic_write_json, read_json
from tests.helpers import CLASSIC_LOOP

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    """vgg_digits pruned by two L1 steps, on the digits sample with half its selection images as test images."""
    torch.set_num_threads(1)
    loaded = load_model("sample:vgg_digits")
    data = load_dataset("sample:vgg_digits", loaded.spec.input, test_fraction=0.5)
    out = tmp_path_factory.mktemp("run") / "digits"
    config = PruneConfig(criterion="l1", cluster=8, max_drop=100.0, finetune_steps=2, max_steps=2, latency=False,
                         analyse_car=False, score_images=64, patience=0, **CLASSIC_LOOP)
    run_pruning(loaded, data, config, out, data_source="sample:vgg_digits",
                data_options={"val_fraction": 0.2, "seed": 0, "test_fraction": 0.5, "split": data.split_record()})
    run = Run(out)
    assert len(run.history) == 3, "two pruning steps were taken"
    return run, data


def test_recovered_step_has_both_figures_and_rebuilds(digits_run):
    run, data = digits_run
    seen: list[PhaseProgress] = []
    record = recover_run_step(run.dir, 2, RecoveryConfig(epochs=2, batch_size=64, lr=0.02), progress=seen.append)
    spec = run.spec.input
    if record["step"] is None:
        pytest.fail("two epochs must beat a model fine-tuned for two mini-batches after two cuts")
    assert record["step"] == 3 and record["recovered_from"] == 2
    assert run.history[-1] == json.loads(json.dumps(record)), "the record is the run's last history line"
    rec = record["recovery"]
    assert rec["epochs"] == 2 and rec["kd"] is False and rec["best_epoch"] in (1, 2) and rec["seconds"] > 0
    assert rec["device"] == ("cuda" if torch.cuda.is_available() else "cpu"), "where the run pruned (auto)"
    model = run.rebuild_step(3)
    source = run.rebuild_step(2)
    assert count_macs_params(model, spec) == count_macs_params(source, spec) == (record["macs"], record["params"])
    assert record["macs"] < run.history[0]["macs"], "the recovered step is the pruned structure"
    assert evaluate_accuracy(model, data.val, spec).accuracy == pytest.approx(record["metric"])
    assert evaluate_accuracy(model, data.test, spec).accuracy == pytest.approx(record["test_metric"])
    assert record["metric"] >= run.history[2]["metric"], "the best epoch never loses selection accuracy"
    assert set(record["paired"]) == {"selection", "test"}
    assert record["paired"]["test"]["n"] == len(data.test) and record["paired"]["selection"]["n"] == len(data.val)
    assert {p.phase for p in seen} == {"recovery", "measuring"} and seen[-1].fraction == 1.0
    assert run.status["state"] == "done", "the run's status is restored"
    for role, images in (("selection", data.val), ("test", data.test)):
        assert (unpack_correct(record["correct"], role) == evaluate_accuracy(model, images, spec).correct.numpy()).all()
    control = {"correct": run.history[0]["correct"]}  # a control that kept the original's answers
    claim = shipped_claim(run.history, 3, control)
    assert claim["vs_control"] == claim["test"], "the appended step is read against a control like a loop step"
    assert model(torch.zeros(2, *spec.shape(1)[1:])).shape == (2, 10)


def test_a_recovery_trains_where_its_run_pruned(digits_run, tmp_path):
    """A run pruned on the GPU recovers on the GPU (``prune --device cuda --recover-epochs N`` trained on the
    CPU before); a run pruned on a GPU machine still recovers on a machine without one; a device given wins."""
    run, _ = digits_run
    copy = tmp_path / "copy"
    shutil.copytree(run.dir, copy)
    config = read_json(copy / "config.json")
    for recorded, expected in (("cpu", "cpu"), ("cuda", "cuda" if torch.cuda.is_available() else "cpu"),
                               ("auto", "cuda" if torch.cuda.is_available() else "cpu")):
        atomic_write_json(copy / "config.json", {**config, "prune": {**config["prune"], "device": recorded}})
        assert recovery_device(Run(copy)).type == expected, recorded
    assert recovery_device(Run(copy), "cpu").type == "cpu"
    assert recovery_device(Run(copy), torch.device("cpu", 0)) == torch.device("cpu", 0), "a torch device as given"


def test_old_run_without_a_test_split_recovers_with_selection_figures_only(digits_run, tmp_path):
    run, _ = digits_run
    old = tmp_path / "old"
    shutil.copytree(run.dir, old)
    config = read_json(old / "config.json")
    config["data_options"] = {"val_fraction": 0.2, "seed": 0}  # as runs were written before issue 14
    atomic_write_json(old / "config.json", config)
    data = load_run_dataset(config, run.spec.input)
    assert len(data.val) == 359 and len(data.test) == 0
    record = recover_run_step(old, 1, RecoveryConfig(epochs=1, batch_size=64))
    assert record["test_metric"] is None and set(record["paired"]) <= {"selection"}


def test_a_cancelled_recovery_adds_no_copy_of_its_source(digits_run, tmp_path):
    run, data = digits_run
    copy = tmp_path / "copy"
    shutil.copytree(run.dir, copy)
    before = Run(copy).steps()
    cancel = threading.Event()
    cancel.set()
    record = recover_run_step(copy, 1, RecoveryConfig(epochs=1), data=data, cancel=cancel)
    assert record["step"] is None and record["recovery"]["cancelled"] and Run(copy).steps() == before
    summary = recovery_summary(record)  # what the CLI prints: not kept, said in words, not just a null
    assert summary["kept"] is False and summary["step"] is None
    assert "cancelled before the first epoch finished" in recovery_note(record)


def test_the_note_says_when_the_recovered_step_reads_below_its_source():
    record = {"step": 4, "recovered_from": 3, "metric": 0.80, "test_metric": 0.79, "macs": 1.0,
              "recovery": {"start_selection": 0.81, "kd": False, "best_epoch": 1, "epochs": 1, "cancelled": False,
                           "seconds": 1.0, "device": "cpu"}}
    assert "below step 3's 81.00 %" in recovery_note(record)
    assert recovery_note({**record, "metric": 0.82}) is None
    assert recovery_summary(record)["kept"] is True and recovery_summary(record)["device"] == "cpu"


def test_refusals_are_one_clear_error(digits_run, tmp_path):
    run, data = digits_run
    busy = tmp_path / "busy"
    shutil.copytree(run.dir, busy)
    atomic_write_json(busy / "status.json", {"state": "running", "message": "pruning", "pid": os.getppid()})
    with pytest.raises(PruneScopeError, match="still running"):
        recover_run_step(busy, 1, RecoveryConfig(epochs=1), data=data)
    with pytest.raises(PruneScopeError, match="no step 9"):
        recover_run_step(run.dir, 9, RecoveryConfig(epochs=1), data=data)
    with pytest.raises(PruneScopeError, match="not a PruneScope run"):
        recover_run_step(tmp_path, 1, RecoveryConfig(epochs=1), data=data)


def _cli(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "core", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_recover_cli_bad_input_is_one_line_and_exit_2(tmp_path):
    res = _cli("recover", str(tmp_path / "nope"), "--epochs", "1")
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1 and "not a PruneScope run" in res.stderr
    res = _cli("recover", str(tmp_path), "--epochs", "0")
    assert res.returncode == 2 and "at least 1 epoch" in res.stderr and len(res.stderr.strip().splitlines()) == 1


def test_recover_cli_appends_the_threshold_step(digits_run, tmp_path):
    run, _ = digits_run
    copy = tmp_path / "cli"
    shutil.copytree(run.dir, copy)
    res = _cli("recover", str(copy), "--step", "1", "--epochs", "1", "--json")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["recovered_from"] == 1 and 0 <= out["test_metric"] <= 1
    assert out["step"] in (Run(copy).steps()[-1], None) and out["kept"] == (out["step"] is not None)


def test_prune_with_recover_epochs_records_the_split_and_appends_the_recovery(tmp_path):
    """A run that ends at its step limit recovers its last step once more: the recovery is a step of the run."""
    out = tmp_path / "run"
    res = _cli("prune", "--model", "sample:vgg_digits", "--data", "sample:vgg_digits", "--test-fraction", "0.5",
               "--criterion", "l1", "--max-steps", "1", "--finetune-steps", "2", "--max-drop", "100",
               "--score-images", "64", "--no-latency", "--no-analysis", "--recover-epochs", "1", "--no-control",
               "--out", str(out), "--json", timeout=900)
    assert res.returncode == 0, res.stderr
    summary = json.loads(res.stdout)
    run = Run(out)
    options = run.config["data_options"]
    assert options["test_fraction"] == 0.5 and options["split"]["counts"]["test"] == len(load_run_dataset(
        run.config, run.spec.input).test) > 0
    last = run.history[-1]
    assert last["recovered_from"] == 1 and last["recovery"]["epochs"] == 1 and last["test_metric"] is not None
    assert summary["steps"] == last["step"] == 2 and run.rebuild_step(2) is not None
    assert run.status["state"] == "done"
