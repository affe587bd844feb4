"""Detection pruning: clusters really leave, the head's outputs stay, steps rebuild, emulation is exact."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import core.engine as engine
from core.tasks.detection.evaluate import evaluate_map
from core.ablation import AblationEngine
from core.tasks.detection.prune import (DetectionPruneConfig, DetectionScorer, detection_spec, output_layer_names,
                                  run_detection_pruning)
from core.tasks.detection.sample import load_sample_detection
from core.tasks.detection.sample_model import load_sample_detector
from core.errors import SettingsError
from core.groups import PruningGraph
from core.runs import Run

CLUSTER = 8


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def detector():
    model, entry = load_sample_detector("ssd_counting")
    data = load_sample_detection("counting")
    data.val = data.val.subset(np.arange(64))  # small validation split: fast, still a real mAP
    return model, entry, data


@pytest.fixture(scope="module")
def short_run(detector, tmp_path_factory):
    torch.set_num_threads(1)
    model, entry, data = detector
    out = tmp_path_factory.mktemp("det") / "run"
    steps = []
    config = DetectionPruneConfig(cluster=CLUSTER, max_steps=1, finetune_steps=3, score_images=32, filter_images=10,
                                  exact_candidates=2, latency=False, max_drop=5.0)
    with pytest.MonkeyPatch.context() as mp:  # watch the shared loop's scoring step
        mp.setattr(engine, "score_step", watch(engine.score_step, SCORED))
        summary = run_detection_pruning(model, entry, data, config, out, progress_steps(steps))
    return out, summary, steps


SCORED: list[str] = []  # the task of every step core.engine.score_step scored in short_run


def watch(real, seen: list[str]):
    def watched(task, *args, **kwargs):
        seen.append(task.name)
        return real(task, *args, **kwargs)
    return watched


def progress_steps(steps):
    from core.engine import Callbacks

    return Callbacks(None, steps.append)


def test_short_run_removes_whole_clusters_and_keeps_the_head_outputs(detector, short_run):
    model, _, _ = detector
    out, summary, steps = short_run
    run = Run(out)
    assert summary["state"] == "done" and summary["steps"] >= 1
    assert run.task == "detection" and run.config["metric_name"] == run.metric_name == "mAP@0.5"
    assert run.config["detector_config"] == model.config
    hist = run.history
    assert [r["step"] for r in steps] == [r["step"] for r in hist]
    base_widths = hist[0]["widths"]
    heads = output_layer_names(model)
    for r in hist[1:]:
        assert {"step", "metric", "macs", "params", "latency_ms", "widths", "removed", "seconds"} <= set(r)
        removed = r["removed"]
        assert len(removed["filters"]) % CLUSTER == 0 or removed["width_after"] % CLUSTER == 0
        assert removed["width_after"] % CLUSTER == 0 and removed["width_after"] < removed["width_before"]
        for name in heads:
            assert r["widths"][name] == base_widths[name]
    assert hist[-1]["macs"] < hist[0]["macs"]
    last = run.rebuild_step(hist[-1]["step"])
    with torch.no_grad():
        assert last(torch.zeros(1, 3, 128, 128)).shape == model(torch.zeros(1, 3, 128, 128)).shape


def test_detection_runs_through_the_one_loop(short_run):
    """No second loop: every step of a detection run is scored by the loop classification uses."""
    out, summary, _ = short_run
    assert SCORED == ["detection"] * summary["steps"] and summary["steps"] >= 1


def test_detection_records_hold_the_map_as_metric_only(short_run):
    out, _, _ = short_run
    written = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    written.append(json.loads((out / "baseline.json").read_text()))
    for record in written:  # as on disk: no record stores the mAP under 'accuracy' (or twice)
        assert 0.0 < record["metric"] <= 1.0 and "accuracy" not in record and "map" not in record
    assert json.loads((out / "config.json").read_text())["metric_name"] == "mAP@0.5"


def test_a_rebuilt_step_gives_the_recorded_map(detector, short_run):
    _, entry, data = detector
    out, _, _ = short_run
    run = Run(out)
    record = run.history[-1]
    rebuilt = run.rebuild_step(record["step"])
    assert evaluate_map(rebuilt, data.val, entry["mean"], entry["std"]).map == pytest.approx(record["metric"], abs=1e-6)
    assert run.original().model.config == rebuilt.config


def test_emulated_cluster_removal_gives_the_real_removals_map(detector):
    model, entry, data = detector
    model = __import__("copy").deepcopy(model)
    spec_model = model
    from core.tasks.detection.prune import detection_spec

    spec = detection_spec(spec_model, entry).input
    graph = PruningGraph(model, spec.shape(1), output_layers=output_layer_names(model))
    group = next(g for g in graph.groups() if g.root == "backbone.stages.0.4.conv.2")  # feeds a head and the backbone
    filters = list(range(0, group.width, 4))[:CLUSTER]
    scorer = DetectionScorer(model, spec, data.val.subset(np.arange(16)), data.val)
    emulated = scorer.maps([group.ablation(filters)])[0]
    graph.prune(group.root, filters)
    real = evaluate_map(graph.model, data.val, entry["mean"], entry["std"]).map
    assert emulated == pytest.approx(real, abs=2e-3)
    assert emulated < scorer.base_map  # the removal does cost something: the check is not vacuous


def test_detection_settings_are_checked():
    with pytest.raises(SettingsError, match="optimizer"):
        DetectionPruneConfig(optimizer="lion").validate()
    with pytest.raises(SettingsError, match="taylor"):
        DetectionPruneConfig(criterion="taylor").validate()


def test_scorer_falls_back_to_the_naive_path_with_the_same_numbers(detector, monkeypatch):
    """Detection goes through the engine's public ``run``: when the split (fast) path fails midway,
    what it accumulated is cleared and the naive path gives the same loss increases and mAPs."""
    model, entry, data = detector
    torch.set_num_threads(1)
    spec_input = detection_spec_input(model, entry)
    screen, exact = data.val.subset(np.arange(8)), data.val.subset(np.arange(12))
    scorer = DetectionScorer(model, spec_input, screen, exact)
    group = next(g for g in PruningGraph(model, spec_input.shape(1), output_layers=output_layer_names(model)).groups()
                 if not g.left_alone)
    ablations = [group.ablation([0]), group.ablation([1, 2])]
    fast_loss, fast_maps = scorer.loss_increase(ablations), scorer.maps(ablations)
    real_fast = AblationEngine._evaluate_fast

    def broken(self, ablations, account, progress, cancel):  # accounts one chunk, then fails like MaxViT does
        real_fast(self, ablations[:1], account, progress, cancel)
        raise RuntimeError("shape baked into the traced graph")

    monkeypatch.setattr(AblationEngine, "_evaluate_fast", broken)
    slow = DetectionScorer(model, spec_input, screen, exact)
    np.testing.assert_allclose(slow.loss_increase(ablations), fast_loss, rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(slow.maps(ablations), fast_maps, atol=1e-6)
    assert not slow.screen_engine.fast and not slow.exact_engine.fast


def detection_spec_input(model, entry):
    return detection_spec(model, entry).input
