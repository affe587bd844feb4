"""Review page: trade-off curves with the threshold, the slider's pick, widths, removed filters, comparison."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

from core.advice import coarser_threshold
from core.runs import Run
from core.visualize import format_pct
from tests.app.apptest_tools import (assert_no_exception, goto, images, new_app, texts)
from tests.helpers import make_legacy_run


def test_empty_state_points_to_prune():
    at = goto(new_app().run(), "review")
    assert "No pruning run yet" in texts(at)
    assert [p.proto.label for p in at.main.get("page_link")] == ["Go to Prune"]


def test_tradeoff_threshold_and_removed_filters(sample_run):
    run = Run(sample_run)
    hist = run.history
    at = goto(new_app().run(), "review")
    assert at.selectbox(key="rv_run").value == sample_run.name
    charts = at.get("plotly_chart")
    assert len(charts) == 4  # accuracy vs MACs, vs latency, widths, per-class change
    slider = at.slider(key=f"rv_thr_{sample_run.name}")
    assert slider.value == 5.0  # the run's own budget
    page = texts(at)
    last = hist[-1]
    assert f"**Step {last['step']}** is the smallest model within **5.0 points**" in page
    # the removed filters of every step up to the pick, and their gallery
    assert len(at.dataframe[0].value) == last["step"]
    assert images(at) >= 8 * 2
    assert "CAR" in page
    # the strictest threshold picks what Run.select_step picks (the CLI and export agree)
    at.slider(key=f"rv_thr_{sample_run.name}").set_value(0.0).run()
    assert_no_exception(at)
    picked = at.session_state["prunescope"].export_step
    assert picked == run.select_step(0.0)
    page = texts(at)
    assert ("No pruned step stays within **0.0 points**" in page) if picked == 0 else \
        (f"**Step {picked}** is the smallest model within **0.0 points**" in page)


def test_comparison_and_interrupted_run(sample_run):
    other = sample_run.with_name(sample_run.name.replace("abcdef", "fedcba"))
    shutil.copytree(sample_run, other)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    status = json.loads((other / "status.json").read_text())
    (other / "status.json").write_text(json.dumps({**status, "state": "running", "pid": dead.pid}))
    at = goto(new_app().run(), "review")
    at.selectbox(key="rv_run").set_value(other.name).run()
    assert_no_exception(at)
    assert "This run was interrupted" in texts(at)
    assert at.multiselect(key="rv_compare").value == [sample_run.name]
    assert len(at.get("plotly_chart")) == 5
    table = at.dataframe[-1].value
    assert list(table["run"]) == [other.name, sample_run.name]


def test_a_legacy_run_opens_in_review_and_export(sample_run):
    """A run written before records had one ``metric`` key (accuracy stored as ``accuracy``) still reviews,
    and Export offers its steps with their recorded accuracy."""
    hist = Run(sample_run).history
    make_legacy_run(sample_run)
    at = goto(new_app().run(), "review")
    assert_no_exception(at)
    assert len(at.get("plotly_chart")) == 4
    last = hist[-1]
    page = texts(at)
    assert f"**Step {last['step']}** is the smallest model within **5.0 points**" in page
    assert f"{format_pct(last['metric'])} accuracy" in page
    removals = at.dataframe[0].value  # the removals table and the two-step comparison read the same records
    assert list(removals["accuracy after"]) == [format_pct(r["metric"]) for r in hist[1:]]
    figures = next(df.value for df in at.dataframe if "figure" in df.value.columns)
    selection = figures[figures["figure"] == "accuracy (selection)"].iloc[0]
    assert list(selection.drop("figure")) == [format_pct(hist[0]["metric"]), format_pct(last["metric"])]
    goto(at, "export")
    assert_no_exception(at)
    box = at.selectbox(key=f"ex_step_{sample_run.name}")
    assert box.value == last["step"]
    assert any(f"accuracy {format_pct(last['metric'])}" in o for o in box.options)


def test_a_multi_cluster_run_lists_each_removed_cluster():
    """A step that removed two clusters (``clusters_per_step``) shows a row and a gallery entry per cluster."""
    from core.models import load_model
    from core.prune import run_pruning
    from core.sources import load_dataset
    from core.workspace import runs_dir
    from tests.helpers import quick_config

    loaded = load_model("sample:vgg_digits")
    data = load_dataset("sample:vgg_digits", loaded.spec.input)
    out = runs_dir() / "20260102-000000-sample_vgg-multi01"
    run_pruning(loaded, data, quick_config(max_steps=1, clusters_per_step=2), out, data_source="sample:vgg_digits")
    at = goto(new_app().run(), "review")
    at.selectbox(key="rv_run").set_value(out.name).run()
    assert_no_exception(at)
    table = at.dataframe[0].value
    assert len(table) == 2 and list(table["step"]) == [1, 1]
    assert len(set(table["layer"])) == 2, "two groups"
    gallery = at.selectbox(key=f"rv_gal_removal_{out.name}")
    assert len(gallery.options) == 2
    gallery.set_value(1).run()
    assert_no_exception(at)


def test_a_finished_run_without_a_kept_step_says_why_and_what_to_change():
    """Issue 27: a finished run that kept no pruning step is not "not completed yet": Review says that it
    finished, why it stopped (the closest candidate's drop against the allowance), and what to change. The run
    is made by the real loop with a threshold no candidate meets."""
    from core.models import load_model
    from core.prune import run_pruning
    from core.sources import load_dataset
    from core.workspace import runs_dir
    from tests.helpers import quick_config

    loaded = load_model("sample:vgg_digits")
    data = load_dataset("sample:vgg_digits", loaded.spec.input)
    out = runs_dir() / "20260101-000000-sample_vgg-nokept"
    run_pruning(loaded, data, quick_config(max_drop=0.0, max_steps=1, finetune_steps=0, patience=1), out,
                data_source="sample:vgg_digits")
    run = Run(out)
    assert [r["step"] for r in run.history] == [0] and run.status["state"] == "done"
    closest = run.status["closest_rejected"]
    at = goto(new_app().run(), "review")
    page = texts(at)
    assert "No pruning step has completed" not in page
    assert "The run finished without keeping a pruning step: it stopped because the next clusters would exceed" in page
    assert (f"The closest candidate, {closest['clusters']} at step 1, lost {closest['drop_points']:.2f} points on the "
            "selection images; the acceptable drop is 0 points.") in page
    assert f"A coarser threshold: {coarser_threshold(closest['drop_points']):.1f} points would have kept that " \
           "candidate" in page
    assert f"More selection images: with {len(data.val)} one image is {100 / len(data.val):.2f} points" in page
    assert "Recovery epochs: with recovery when stalled" in page
    assert [p.proto.label for p in at.main.get("page_link")] == ["Change the settings and prune again"]


def test_a_step_passed_over_by_the_curve_of_test_reads_is_explained(sample_run):
    """Step 1 reads 8 test points lost, step 2 (fewer MACs) 3: within the run's 5-point budget on its own read, but
    the final acceptance reads the test drops as one non-decreasing curve (5.5 for both), so Review says why the
    smaller step is not the pick."""
    path = sample_run / "history.jsonl"  # the sample run has no test split: give it test reads
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    for record, drop in zip(records, (0.0, 8.0, 3.0)):
        record["test_metric"] = 0.90 - drop / 100
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert Run(sample_run).select_step(5.0) == 0
    at = goto(new_app().run(), "review")
    assert_no_exception(at)
    page = texts(at)
    assert "Step 2 (" in page and "reads 3.00 test points lost on its own, but 5.50 on the curve" in page
