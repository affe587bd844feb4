"""A pruning run's image roles and per-layer plan, end to end through the one loop.

- Selection and test images differ, and every record carries both figures with paired drops.
- The test images never affect a decision: replacing them with noise changes no removed filter and no
  selection figure, only the test figure (issue 14).
- A plan that excludes one group and caps another at 25 % is obeyed at every step (issue 16).
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

from core.data import ImageSet
from core.groups import PruningGraph
from core.models import load_model
from core.prune import PruneConfig, run_pruning
from core.runs import Run, removals
from core.sources import load_dataset
from tests.helpers import CLASSIC_LOOP


@pytest.fixture(scope="module")
def sample():
    torch.set_num_threads(1)
    loaded = load_model("sample:vgg_digits")
    data = load_dataset("sample:vgg_digits", loaded.spec.input)
    return loaded, data


def _with_test(data, images: torch.Tensor, labels: torch.Tensor):
    return dataclasses.replace(data, test=ImageSet(images, labels, data.class_names))


def _config(**kw) -> PruneConfig:
    base = dict(criterion="car", car="fast", cluster=8, max_drop=100.0, finetune_steps=2, batch_size=16,
                score_images=40, max_steps=2, latency=False, analyse_car=False, patience=0, seed=0,
                **CLASSIC_LOOP)
    base.update(kw)
    return PruneConfig(**base)


def _decisions(run: Run) -> list[tuple]:
    return [(r["step"], tuple((x["group"], tuple(x["filters"])) for x in removals(r)), round(r["metric"], 9))
            for r in run.history]


def test_records_carry_selection_and_test_figures_and_test_images_decide_nothing(sample, tmp_path):
    loaded, data = sample
    real = data.train.subset(60, seed=5)  # other images than the selection ones
    with_real = _with_test(data, real.images, real.labels)
    g = torch.Generator().manual_seed(0)
    noise = torch.randint(0, 256, real.images.shape, generator=g, dtype=torch.uint8)
    with_noise = _with_test(data, noise, torch.randint(0, len(data.class_names), (len(noise),), generator=g))

    run_pruning(loaded, with_real, _config(), tmp_path / "real")
    run_pruning(loaded, with_noise, _config(), tmp_path / "noise")
    run_real, run_noise = Run(tmp_path / "real"), Run(tmp_path / "noise")

    hist = run_real.history
    assert len(hist) == 3
    for r in hist:
        assert 0 <= r["metric"] <= 1 and 0 <= r["test_metric"] <= 1
        assert set(r["paired"]) == {"selection", "test"}
        assert r["paired"]["test"]["n"] == len(real) and r["paired"]["selection"]["n"] == len(data.val)
    assert hist[0]["paired"]["selection"]["drop_points"] == 0
    assert hist[1]["car_scoring"]["method"] == "fast"
    assert _decisions(run_real) == _decisions(run_noise), "the test images changed a decision"
    assert [r["test_metric"] for r in run_real.history] != [r["test_metric"] for r in run_noise.history]


def test_a_plan_excludes_one_group_and_caps_another(sample, tmp_path):
    loaded, data = sample
    groups = PruningGraph(loaded.model, loaded.spec.input.shape(1)).groups()
    original = {g.root: g.width for g in groups}
    run_pruning(loaded, data, _config(criterion="l1", max_steps=1), tmp_path / "free")
    free = Run(tmp_path / "free")
    first = removals(free.history[1])[0]["group"]  # what the loop cuts first without a plan
    capped = next(g.root for g in groups if g.root != first and g.width >= 32)
    plan = {"exclude": [first], "max_fraction": {capped: 0.25}}

    run_pruning(loaded, data, _config(criterion="l1", max_steps=6, plan=plan), tmp_path / "planned")
    planned = Run(tmp_path / "planned")
    hist = planned.history
    assert len(hist) > 2, "the planned run still prunes other groups"
    for r in hist:
        widths = r["widths"]
        assert widths[first] == original[first], f"step {r['step']} touched the excluded group"
        assert widths[capped] >= 0.75 * original[capped], f"step {r['step']} took {capped} below 75 %"
    assert planned.config["prune"]["plan"] == plan


def test_a_plan_naming_an_unknown_layer_is_refused(sample, tmp_path):
    from core.errors import SettingsError

    loaded, data = sample
    with pytest.raises(SettingsError, match="not a prunable group"):
        run_pruning(loaded, data, _config(plan={"exclude": ["no_such_layer"]}), tmp_path / "bad")


def test_an_undone_candidate_costs_no_test_measurement(sample, tmp_path, monkeypatch):
    """Accept or undo reads the selection images only; the test split, MACs and latency are measured for
    a kept step alone (a real CIFAR-10 run undoes about every second candidate)."""
    import core.tasks.classification.task as cls

    loaded, data = sample
    held = data.train.subset(60, seed=5)
    with_test = _with_test(data, held.images, held.labels)
    calls = {"test": 0, "selection": 0}
    real_evaluate = cls.evaluate_accuracy

    def counting(model, images, spec, *a, **kw):
        if images is with_test.test:
            calls["test"] += 1
        elif images is with_test.val:
            calls["selection"] += 1
        return real_evaluate(model, images, spec, *a, **kw)

    monkeypatch.setattr(cls, "evaluate_accuracy", counting)
    # a zero threshold undoes every candidate that loses an image: patience 2 -> up to three tried
    config = _config(max_drop=0.0, patience=2, max_steps=1, finetune_steps=0)
    run_pruning(loaded, with_test, config, tmp_path / "r")
    run = Run(tmp_path / "r")
    kept = len(run.history)
    assert calls["test"] == kept, f"{calls['test']} test measurements for {kept} records"
    assert calls["selection"] > calls["test"], "no candidate was undone: the test proves nothing"
