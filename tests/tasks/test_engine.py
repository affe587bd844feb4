"""One metric key in every run record, and runs written before it still open (the one loop itself is
watched in test_prune.py and test_detection_prune.py, on their runs)."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

import core.engine as engine
import core.export as export
from core.models import load_model
from core.plausibility import reorder_classes
from core.prune import run_pruning
from core.runs import Run, select_step
from core.sources import load_dataset
from tests.helpers import make_legacy_run, quick_config

pytestmark = pytest.mark.usefixtures("one_thread")

LEGACY_KEYS = ("accuracy", "map")


@pytest.fixture(scope="module")
def cls_run(tmp_path_factory):
    """A short classification run (one step, L1) written by the current code."""
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("engine") / "cls"
    loaded = load_model("sample:vgg_digits")
    data = load_dataset("sample:vgg_digits", loaded.spec.input)
    run_pruning(loaded, data, quick_config(max_steps=1, finetune_steps=2), out)
    run = Run(out)
    assert len(run.history) == 2, "the run pruned one cluster"
    return run


def test_every_record_holds_the_metric_under_one_key(cls_run):
    assert cls_run.config["metric_name"] == cls_run.metric_name == "accuracy"
    assert cls_run.config["metric_unit"] == "%" and cls_run.task == "classification"
    written = [json.loads(line) for line in (cls_run.dir / "history.jsonl").read_text().splitlines()]
    written.append(json.loads((cls_run.dir / "baseline.json").read_text()))
    for record in written:  # as on disk, not as Run normalises it
        assert 0.0 <= record["metric"] <= 1.0
        assert not set(LEGACY_KEYS) & set(record), record.keys()
    summary = engine.run_summary(cls_run.dir, "done")
    assert summary["metric_name"] == "accuracy"
    assert summary["baseline_metric"] == written[0]["metric"] and summary["final_metric"] == written[1]["metric"]


def test_the_run_records_the_class_order_the_model_was_evaluated_with(cls_run, tmp_path):
    """``config.json``'s ``class_order``: label j is ``class_order[j]``, as the records' per-class figures are
    keyed; a data set relabelled to another model output order (the plausibility fix, ``--class-order``)
    records that order, not the sorted folder names."""
    assert cls_run.config["class_order"] == cls_run.config["class_names"] == list(cls_run.history[0]["per_class"])
    loaded = load_model("sample:vgg_digits")
    data = load_dataset("sample:vgg_digits", loaded.spec.input)
    order = list(reversed(data.class_names))
    reordered = reorder_classes(data, order)
    run_pruning(loaded, reordered, quick_config(max_steps=1, finetune_steps=1), tmp_path / "reordered")
    config = json.loads((tmp_path / "reordered" / "config.json").read_text())
    assert config["class_order"] == order != sorted(order)
    assert list(Run(tmp_path / "reordered").history[0]["per_class"]) == order


@pytest.mark.parametrize("detection", [False, True])
def test_a_legacy_run_folder_reads_as_metric(cls_run, tmp_path, detection):
    """A run from before ``metric`` (a detection one: mAP under both ``accuracy`` and ``map``, the config's
    ``metric`` naming it) reads with the same figures under ``metric`` only."""
    legacy_dir = tmp_path / "legacy"
    shutil.copytree(cls_run.dir, legacy_dir)
    make_legacy_run(legacy_dir, detection=detection)
    on_disk = json.loads((legacy_dir / "history.jsonl").read_text().splitlines()[1])
    assert "metric" not in on_disk and "accuracy" in on_disk and (("map" in on_disk) == detection)
    legacy = Run(legacy_dir)
    assert legacy.task == ("detection" if detection else "classification")
    assert legacy.metric_name == ("mAP@0.5" if detection else "accuracy")
    assert [r["metric"] for r in legacy.history] == [r["metric"] for r in cls_run.history]
    assert all(not set(LEGACY_KEYS) & set(r) for r in legacy.history + [legacy.baseline])
    assert legacy.baseline["metric"] == cls_run.baseline["metric"]
    for drop in (0.0, 100.0):
        assert legacy.select_step(drop) == cls_run.select_step(drop) == select_step(cls_run.history, drop)
    summary = engine.run_summary(legacy_dir, "done")
    assert summary["final_metric"] == cls_run.history[-1]["metric"] and summary["metric_name"] == legacy.metric_name


def test_export_reads_a_legacy_runs_figures(cls_run, tmp_path, monkeypatch):
    """The manifest's figures of a run written before ``metric`` are the recorded ones (bundle not built here:
    test_export_run builds real bundles)."""
    cls = cls_run
    legacy_dir = tmp_path / "legacy"
    shutil.copytree(cls.dir, legacy_dir)
    make_legacy_run(legacy_dir)
    captured = {}

    def capture(pruned, original, spec, val, out, meta, target=None):
        captured.update(meta)
        return {}

    monkeypatch.setattr(export, "export_for_cli", capture)
    export.export_run(legacy_dir, step=1, out_path=tmp_path / "bundle")
    assert captured["step"] == 1
    assert captured["pruned"]["accuracy"] == cls.history[1]["metric"]
    assert captured["original"]["accuracy"] == cls.history[0]["metric"]
    assert captured["pruned"]["macs"] == cls.history[1]["macs"]


def test_a_run_that_keeps_no_step_records_its_closest_rejected_candidate(tmp_path):
    """Issue 27: a finished run with no kept step must say how close it came; the loop records the move the
    threshold undid with the smallest drop in the run's status (``closest_rejected``)."""
    loaded = load_model("sample:vgg_digits")
    data = load_dataset("sample:vgg_digits", loaded.spec.input)
    run_pruning(loaded, data, quick_config(max_drop=0.0, max_steps=1, finetune_steps=0, patience=1,
                                           clusters_per_step=2), tmp_path / "r")
    run = Run(tmp_path / "r")
    assert [r["step"] for r in run.history] == [0], "every candidate lost images: nothing kept"
    status = run.status
    closest = status["closest_rejected"]
    assert status["state"] == "done" and "threshold" in status["message"]
    assert closest["step"] == 1 and closest["max_drop"] == 0.0
    assert closest["drop_points"] > 0.0 and closest["macs_saved"] > 0 and closest["clusters"]
