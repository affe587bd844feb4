"""Multi-cluster steps (``PruneConfig.clusters_per_step``): a step removes the k best-ranked clusters of k
distinct groups with one fine-tuning; when they break the threshold together it takes one, and later steps
try half as many. Readers of ``removed`` (a dict for one cluster, a list for several) see both forms."""
from __future__ import annotations

import dataclasses

import pytest
import torch

import core.engine as engine
from core.cli_common import removal_text
from core.evaluate import count_macs_params
from core.models import load_model
from core.prune import PruneConfig, run_pruning
from core.runs import Run, removals
from core.sources import load_dataset
from tests.helpers import quick_config

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def digits():
    torch.set_num_threads(1)
    loaded = load_model("sample:vgg_digits")
    return loaded, load_dataset("sample:vgg_digits", loaded.spec.input)


def test_a_step_removes_several_clusters_of_distinct_groups(digits, tmp_path):
    loaded, data = digits
    messages: list[str] = []
    run_pruning(loaded, data, quick_config(max_steps=1, clusters_per_step=3), tmp_path / "multi",
                callbacks=engine.Callbacks(progress=lambda f, m: messages.append(m)))
    one = Run(tmp_path / "multi")
    step = one.history[1]
    rems = removals(step)
    assert isinstance(step["removed"], list) and len(rems) == 3
    assert len({r["group"] for r in rems}) == 3, "each cluster is of its own group"
    before, after = one.history[0]["widths"], step["widths"]
    for rem in rems:
        assert rem["width_after"] == rem["width_before"] - len(rem["filters"])
        for layer in rem["producers"]:
            assert after[layer] == before[layer] - len(rem["filters"]), layer
        assert sorted(rem["filters_original"]) == rem["filters_original"] and len(rem["filters_original"]) == len(
            rem["filters"])
    assert sum(before.values()) - sum(after.values()) >= sum(len(r["filters"]) for r in rems)
    model = one.rebuild_step(1).eval()
    assert count_macs_params(model, one.spec.input)[0] == step["macs"] < one.history[0]["macs"]
    assert model(torch.zeros(2, *one.spec.input.shape(1)[1:])).shape == (2, one.spec.num_classes)
    assert removal_text(step).count(" from ") == 3
    assert sum(m.startswith("step 1: fine-tuning (1/1)") for m in messages) == 1, "one fine-tuning for the three"


def test_clusters_that_break_the_threshold_together_fall_back_to_one_then_to_half(digits, tmp_path, monkeypatch):
    """A fake decision metric that loses 0.4 points per cluster removed so far (threshold 1.0): four clusters
    together (1.6) are undone and one is kept (0.4); step 2 then tries two (0.4 + 0.8 = 1.2), undone, one kept
    (0.8); step 3's single cluster (1.2) breaks the threshold and the run stops."""
    loaded, data = digits
    real, real_measure_original = engine.finetune_and_decide, engine.measure_original
    base: dict = {}

    def conv_filters(model) -> int:
        return sum(m.out_channels for m in model.modules() if isinstance(m, torch.nn.Conv2d))

    def measure_original(graph, task, writer, cb, cancel):
        record = real_measure_original(graph, task, writer, cb, cancel)
        base.update(filters=conv_filters(graph.model), metric=record["metric"])
        return record

    def fake(task, model, rng, cancel, cb, step):
        clusters_gone = round((base["filters"] - conv_filters(model)) / 8)  # vgg_digits: one conv per group
        return dataclasses.replace(real(task, model, rng, cancel, cb, step),
                                   accuracy=base["metric"] - 0.004 * clusters_gone)

    messages: list[str] = []
    monkeypatch.setattr(engine, "finetune_and_decide", fake)
    monkeypatch.setattr(engine, "measure_original", measure_original)
    # the fake metric is what decides (not the task's paired drop on its own decision images), and the test
    # images do not refuse a step here
    monkeypatch.setattr(engine, "decision_drop", lambda task, decision, base: (base - decision.metric) * 100)
    monkeypatch.setattr(engine, "test_refusal", lambda base, record, max_drop: None)
    config = quick_config(max_steps=5, clusters_per_step=4, max_drop=1.0, patience=0)
    run_pruning(loaded, data, config, tmp_path / "fallback", callbacks=engine.Callbacks(
        progress=lambda f, m: messages.append(m)))
    run = Run(tmp_path / "fallback")
    assert [len(removals(r)) for r in run.history[1:]] == [1, 1], "each step kept one cluster"
    assert all(isinstance(r["removed"], dict) for r in run.history[1:]), "a one-cluster step keeps the dict form"
    undone = [m for m in messages if "would drop" in m]
    assert any(m.startswith("step 1: 4 clusters (") for m in undone), undone
    assert any(m.startswith("step 2: 2 clusters (") for m in undone), undone
    assert not any(m.startswith("step 3: ") and "clusters (" in m for m in undone), "step 3 tries one at a time"
    assert run.status["message"].startswith("the next clusters would exceed")


def test_step_moves_and_the_setting():
    cands = ["a", "b", "c"]
    assert engine.step_moves(cands, 1) == [["a"], ["b"], ["c"]]
    assert engine.step_moves(cands, 2) == [["a", "b"], ["a"], ["b"], ["c"]]
    assert engine.step_moves(cands, 8) == [["a", "b", "c"], ["a"], ["b"], ["c"]]
    assert engine.step_moves(["a"], 4) == [["a"]], "one candidate: nothing to batch"
    sized = [engine.Cluster(None, [0], macs) for macs in (5.0, 4.0, 3.0)]
    assert engine.step_moves(sized, 3, macs_to_go=8.0)[0] == sized[:2], "stops at the cluster that reaches the target"
    assert engine.step_moves(sized, 3, macs_to_go=4.0)[0] == [sized[0]], "one reaches it: no group move"
    assert engine.step_moves(sized, 3, macs_to_go=100.0)[0] == sized
    for bad in (0, -1, 1.5):
        with pytest.raises(Exception, match="Clusters per step"):
            PruneConfig(clusters_per_step=bad).validate()


def test_removals_reads_every_form_of_the_record():
    one = {"group": "a", "filters": [1]}
    assert removals({"removed": None}) == [] and removals({}) == []
    assert removals({"removed": one}) == [one]
    assert removals({"removed": [one, one]}) == [one, one]
    assert removal_text({"removed": [{"group": "a", "filters": [1, 2]}, {"group": "b", "filters": [3]}]}) == \
        "  removed 2 from a, 1 from b"
