"""The greedy loop on a real sample: records, rebuild, threshold, cancel, bad settings."""
from __future__ import annotations

import json
import subprocess
import sys
import threading

import pytest
import torch

import core.engine as engine
from core.sources import load_dataset
from core.errors import SettingsError
from core.evaluate import evaluate_accuracy
from core.models import load_model
from core.jobs import run_progress
from core.prune import Callbacks, Progress, PruneConfig, run_pruning
from core.runs import Run, list_runs
from tests.helpers import CLASSIC_LOOP, loaded as make_loaded, quick_config, random_dataset

ROOT = __import__("pathlib").Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def vgg():
    loaded = load_model("sample:vgg_digits")
    return loaded, load_dataset("sample:vgg_digits", loaded.spec.input)


@pytest.fixture(scope="module")
def vgg_run(vgg, tmp_path_factory):
    loaded, data = vgg
    config = PruneConfig(criterion="car", cluster=8, max_drop=1.0, finetune_steps=15, score_images=150,
                         max_steps=3, latency=True, latency_runs=5, analyse_car=False, **CLASSIC_LOOP)
    out = tmp_path_factory.mktemp("runs") / "vgg"
    real = engine.score_step

    def watched(task, *args, **kwargs):
        SCORED.append(task.name)
        return real(task, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:  # watch the shared loop's scoring step
        mp.setattr(engine, "score_step", watched)
        summary = run_pruning(loaded, data, config, out, Callbacks(event=EVENTS.append, step=STEPS.append))
    return Run(out), summary


EVENTS: list[Progress] = []  # structured progress of vgg_run
STEPS: list[dict] = []
SCORED: list[str] = []  # the task of every step core.engine.score_step scored in vgg_run


def test_classification_runs_through_the_one_loop(vgg_run):
    """No second loop: every step of a classification run is scored by the loop detection uses."""
    run, summary = vgg_run
    assert SCORED[:summary["steps"]] == ["classification"] * summary["steps"] and summary["steps"] >= 1
    assert set(SCORED) == {"classification"}


def test_progress_is_structured_by_phase_and_step(vgg_run):
    run, _ = vgg_run
    assert EVENTS and EVENTS[0].phase == "original" and EVENTS[0].step == 0
    first_step = next(i for i, e in enumerate(EVENTS) if e.phase == "step")
    assert all(e.phase == "original" and e.step == 0 for e in EVENTS[:first_step])
    steps = [e.step for e in EVENTS[first_step:]]
    assert all(e.phase == "step" for e in EVENTS[first_step:]) and steps == sorted(steps)
    assert set(range(1, run.history[-1]["step"] + 1)) <= set(steps)
    assert all(0.0 <= e.fraction <= 1.0 for e in EVENTS)
    assert [r["step"] for r in STEPS] == [r["step"] for r in run.history]


def test_job_progress_places_events_by_phase_not_by_message():
    class Ctx:
        def __init__(self):
            self.reports, self.steps = [], []

        def progress(self, fraction, message=None):
            self.reports.append(round(fraction, 6))

        def step(self, record):
            self.steps.append(record)

    ctx = Ctx()
    cb = run_progress(ctx, total=4)
    cb.progress(0.5, "measuring")  # the original: unit 0
    cb.step({"step": 0})
    cb.progress(0.5, "analysing something")  # still the original, whatever the words
    cb.enter("step", 2)
    cb.progress(0.5, "analysing the original model's twin")  # step 2, even with 'the original' in the text
    assert ctx.reports == [0.125, 0.125, 0.625]
    cb.step({"step": 2})
    assert ctx.reports[-1] == 0.75 and [r["step"] for r in ctx.steps] == [0, 2]


def test_run_records_every_step(vgg_run):
    run, summary = vgg_run
    hist = run.history
    assert [r["step"] for r in hist] == list(range(len(hist)))
    assert summary["steps"] == len(hist) - 1 >= 1
    assert run.status["state"] == "done"
    for r in hist[1:]:
        assert r["macs"] < hist[0]["macs"]
        assert (hist[0]["metric"] - r["metric"]) * 100 <= 1.0 + 1e-9, "every kept step is within the threshold"
        assert r["latency_ms"] > 0 and set(r["per_class"]) == set(run.config["class_names"])
        assert r["removed"]["width_after"] % 8 == 0
    for name in ("config.json", "baseline.json", "history.jsonl", "status.json", "original.pt"):
        assert (run.dir / name).exists()


def test_rebuilt_step_reproduces_recorded_accuracy(vgg, vgg_run):
    loaded, data = vgg
    run, _ = vgg_run
    last = run.history[-1]
    model = run.rebuild_step(last["step"])
    acc = evaluate_accuracy(model, data.val, loaded.spec.input).accuracy
    assert acc == pytest.approx(last["metric"], abs=1e-9)
    assert run.rebuild_step(0).state_dict()["features.0.weight"].shape[0] == 16


def test_select_step_respects_threshold(vgg_run):
    run, _ = vgg_run
    k = run.select_step(1.0)
    assert run.record(k)["macs"] == min(r["macs"] for r in run.history)
    assert run.select_step(0.0) in [r["step"] for r in run.history if r["metric"] >= run.history[0]["metric"]]


def test_mac_target_stops_the_run(tmp_path):
    from core.architectures import SampleVGG

    data = random_dataset(4)
    summary = run_pruning(make_loaded(SampleVGG(num_classes=4), "sample_vgg", 4), data,
                          quick_config(mac_target=0.9, max_steps=20), tmp_path / "r")
    assert "MAC target" in summary["reason"]
    assert summary["final_macs"] <= 0.9 * summary["baseline_macs"]


def test_cancel_keeps_completed_steps(tmp_path):
    from core.architectures import SampleResNet

    data = random_dataset(4)
    cancel = threading.Event()
    steps = []

    def on_step(record):
        steps.append(record["step"])
        if record["step"] == 1:
            cancel.set()

    summary = run_pruning(make_loaded(SampleResNet(num_classes=4), "sample_resnet", 4), data,
                          quick_config(max_steps=10), tmp_path / "r", Callbacks(step=on_step), cancel)
    run = Run(tmp_path / "r")
    assert summary["state"] == "cancelled" and run.status["state"] == "cancelled"
    assert [r["step"] for r in run.history] == [0, 1]
    model = run.rebuild_step(1)
    assert model(torch.zeros(1, 3, 32, 32)).shape == (1, 4)


def test_interrupted_run_is_marked_and_keeps_steps(tmp_path, monkeypatch):
    monkeypatch.setenv("PRUNESCOPE_WORKSPACE", str(tmp_path))
    from core.architectures import SampleVGG
    from core.workspace import atomic_write_json, new_run_dir

    out = new_run_dir("x")
    run_pruning(make_loaded(SampleVGG(num_classes=4), "sample_vgg", 4), random_dataset(4), quick_config(max_steps=1), out)
    atomic_write_json(out / "status.json", {"state": "running", "pid": 999_999_999})
    run = [r for r in list_runs() if r.dir == out][0]
    assert run.status["state"] == "interrupted"
    assert len(run.history) == 2 and run.rebuild_step(1) is not None


@pytest.mark.parametrize("kw,msg", [
    ({"max_drop": -1}, "between 0 and 100"),
    ({"max_drop": 150}, "between 0 and 100"),
    ({"cluster": 0}, "at least 1"),
    ({"criterion": "magic"}, "Unknown criterion"),
    ({"mac_target": 1.5}, "fraction"),
])
def test_bad_settings_are_refused(kw, msg):
    with pytest.raises(SettingsError, match=msg):
        quick_config(**kw).validate()


def test_cluster_larger_than_every_layer(tmp_path):
    from core.architectures import SampleVGG

    with pytest.raises(SettingsError, match="Cluster size 64 is too large.*widest group: 64"):
        run_pruning(make_loaded(SampleVGG(num_classes=4), "sample_vgg", 4), random_dataset(4),
                    quick_config(cluster=64), tmp_path / "r")
    assert Run(tmp_path / "r").status["state"] == "failed"


def test_cli_prune_json_and_bad_setting(tmp_path):
    cmd = [sys.executable, "-m", "core", "prune", "--model", "sample:vgg_digits", "--data", "sample:vgg_digits",
           "--max-drop", "1.0", "--cluster", "8", "--criterion", "l1", "--max-steps", "1", "--finetune-steps", "5",
           "--no-latency", "--no-analysis", "--out", str(tmp_path / "cli"), "--json"]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    for key in ("baseline_metric", "final_metric", "baseline_macs", "final_macs", "steps"):
        assert key in out
    assert out["metric_name"] == "accuracy"
    assert out["final_macs"] < out["baseline_macs"]
    bad = subprocess.run(cmd[:-3] + ["--out", str(tmp_path / "cli2"), "--max-drop", "200"], cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    assert bad.returncode == 2 and "between 0 and 100" in bad.stderr and "Traceback" not in bad.stderr


def test_car_tiebreak_orders_ties_by_loss_only():
    import numpy as np

    from core.groups import ChannelGroup
    from core.tasks.classification.task import car_with_tiebreak

    g = ChannelGroup(gid=0, root="x", width=4, producers=["x"])
    n = 100
    car = np.array([0.0, 0.0, 0.01, 0.0])
    loss_up = np.array([0.5, 0.1, 0.0, 2.0])
    scores = car_with_tiebreak(car, loss_up, np.zeros(4, dtype=int), [g], n)[0]
    assert list(np.argsort(scores)) == [1, 0, 3, 2], "ties by loss; the one-image CAR difference still wins"
