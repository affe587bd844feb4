"""Review with a held-out test split (issue 14, 16): test figure and CI beside every drop, the recovery job
appends a step, two steps side by side."""
from __future__ import annotations

import json
import shutil

import pytest

from core.runs import Run
from tests.app.apptest_tools import (assert_no_exception, goto, new_app, texts, wait_until)
from ui.state import get_registry
from tests.helpers import CLASSIC_LOOP

_TEMPLATE = []


@pytest.fixture
def split_run(tmp_path_factory):
    """A short l1 run of the sample with a test split (made once with core, copied into the workspace)."""
    from core.jobs import split_options_of
    from core.models import load_model
    from core.prune import PruneConfig, run_pruning
    from core.sources import load_dataset
    from core.workspace import runs_dir

    if not _TEMPLATE:
        loaded = load_model("sample:vgg_digits")
        data = load_dataset("sample:vgg_digits", loaded.spec.input, expected_classes=loaded.spec.num_classes,
                            test_fraction=0.2)
        out = tmp_path_factory.mktemp("split") / "20260102-000000-split_vgg-abcdef"
        config = PruneConfig(criterion="l1", cluster=8, max_drop=10.0, finetune_steps=10, score_images=60,
                             max_steps=2, latency=False, analyse_car=False, patience=0, **CLASSIC_LOOP)
        run_pruning(loaded, data, config, out, data_source="sample:vgg_digits", data_options=split_options_of(data))
        _TEMPLATE.append(out)
    dest = runs_dir() / _TEMPLATE[0].name
    shutil.copytree(_TEMPLATE[0], dest)
    return dest


def test_review_shows_test_figure_and_confidence_intervals(split_run):
    hist = Run(split_run).history
    assert all(r["test_metric"] is not None for r in hist)
    at = goto(new_app().run(), "review")
    page = texts(at)
    assert "test accuracy" in page and "95 % CI" in page
    pick = hist[-1]
    sel = pick["paired"]["selection"]
    assert f"{sel['drop_points']:.2f} points (95 % CI {sel['ci_low_points']:.2f} to {sel['ci_high_points']:.2f})" in page
    tst = pick["paired"]["test"]
    assert f"{tst['drop_points']:.2f} points (95 % CI" in page
    table = at.dataframe[0].value
    assert "test drop (95 % CI)" in table.columns and "drop (selection, 95 % CI)" in table.columns
    names = [t.get("name", "") for t in json.loads(at.get("plotly_chart")[0].proto.spec)["data"]]
    assert any(n.endswith("· test") for n in names), "the curve has a test trace beside the selection one"


def test_the_pick_is_read_against_the_control_of_the_step_the_run_ships(split_run):
    """A control that repeated the shipped step's training says so beside the pick; its test drop is read against
    the control's own per-image correctness (here the original's, so the figure is the step's own test drop). A
    control whose training differs from the pick's says so; one of a run that ships nothing does not claim to be."""
    from core.claim import training_received

    run = Run(split_run)
    hist = run.history
    shipped = run.select_step(10.0)
    assert shipped > 0
    received = training_received(hist, run.config["prune"]["finetune_steps"], upto=shipped)
    control = {"metric": hist[0]["metric"], "test_metric": hist[0]["test_metric"], "correct": hist[0]["correct"],
               "received": received, "for_step": shipped, "ships": True}
    (split_run / "control.json").write_text(json.dumps(control))
    at = goto(new_app().run(), "review")
    page = texts(at)
    drop = hist[shipped]["paired"]["test"]["drop_points"]
    assert f"Against the original given the same training ({received['finetune_batches']} fine-tuning mini-batches" in page
    assert f"test drop {drop:+.2f} points" in page and f"It holds for step {shipped}, the one the run ships." in page
    assert "moved the original by +0.00 points" in page, "a control that changed nothing reads +0.00, not -0.00"
    other = {**control, "received": {"finetune_batches": received["finetune_batches"] + 10, "recovery_epochs": [2]},
             "ships": False}
    (split_run / "control.json").write_text(json.dumps(other))
    page = texts(goto(new_app().run(), "review"))
    assert (f"It holds for step {shipped}, the last on the path of the run's model (the run ships none at its "
            f"threshold); step {shipped} had other training.") in page


def test_compare_two_steps_side_by_side(split_run):
    at = goto(new_app().run(), "review")
    at.selectbox(key="rv_cmp_step_a").set_value(0).run()
    at.selectbox(key="rv_cmp_step_b").set_value(2).run()
    assert_no_exception(at)
    figures = next(df.value for df in at.dataframe if "figure" in df.value.columns)
    assert list(figures.columns) == ["figure", "step 0", "step 2"]
    hist = Run(split_run).history
    row = figures[figures["figure"] == "MACs"].iloc[0]
    from core.visualize import format_macs
    assert row["step 0"] == format_macs(hist[0]["macs"]) and row["step 2"] == format_macs(hist[2]["macs"])
    widths = next(df.value for df in at.dataframe if "layer" in df.value.columns and "step 2" in df.value.columns)
    assert len(widths) == len(hist[0]["widths"])
    assert any(df.value.columns[0] == "class" for df in at.dataframe)


def test_recovery_job_appends_a_step(split_run):
    at = goto(new_app().run(), "review")
    before = Run(split_run).history
    at.selectbox(key="rv_rec_step").set_value(before[-1]["step"])
    at.number_input(key="rv_rec_epochs").set_value(1)
    at.button(key="rv_rec_start").click().run()
    assert_no_exception(at)
    job = get_registry().latest("recovery")
    assert job is not None and job.wait(300)
    assert job.snapshot().state == "done", job.snapshot().error
    at.run()
    assert_no_exception(at)
    after = Run(split_run).history
    record = job.snapshot().result
    if record["step"] is None:
        assert len(after) == len(before) and "nothing was added" in texts(at)
    else:
        assert len(after) == len(before) + 1 and after[-1]["recovered_from"] == before[-1]["step"]
        assert after[-1]["test_metric"] is not None
        assert f"Step {record['step']} added" in texts(at)
        assert str(record["step"]) in at.selectbox(key="rv_cmp_step_b").options
