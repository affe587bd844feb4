"""Prune page: settings, Start / Cancel, live progress, re-attaching after a reload, clear failures."""
from __future__ import annotations

from core.prune import PruneConfig
from core.runs import Run, removals
from tests.app.apptest_tools import (assert_no_exception, goto, new_app, progress_values, texts, wait_until, with_sample)
from tests.unit.test_criteria import fpgm  # noqa: F401  (the docs/extending.md example criterion, registered)
from ui.prune import budget_buys_text, budget_caption, settings_text
from ui.state import get_registry


def small_settings(at, steps: int, latency: bool = False):
    """A short run of the sample: the CAR paper's loop (one cluster per step, no recovery, no control)."""
    at.slider(key="pr_max_steps").set_value(steps)
    at.slider(key="pr_clusters_per_step").set_value(1)
    at.slider(key="pr_recover_epochs").set_value(0)
    at.toggle(key="pr_control").set_value(False)
    at.slider(key="pr_finetune").set_value(5)
    at.slider(key="pr_score_images").set_value(50)
    at.toggle(key="pr_latency").set_value(latency)
    at.toggle(key="pr_analyse").set_value(False)
    at.slider(key="pr_max_drop").set_value(5.0)
    return at.run()


def test_needs_a_model_first():
    at = goto(new_app().run(), "prune")
    assert "Load a model first" in texts(at)
    assert not at.button


def test_the_page_starts_from_the_cli_defaults():
    """One set of defaults: every setting the Prune page shows starts at the CLI's (``PruneConfig()``)."""
    at = with_sample("prune")
    cli = PruneConfig()
    sliders = {"pr_max_drop": cli.max_drop, "pr_finetune": cli.finetune_steps, "pr_score_images": cli.score_images,
               "pr_max_steps": cli.max_steps, "pr_clusters_per_step": cli.clusters_per_step,
               "pr_recover_epochs": cli.recover_epochs}
    assert {k: at.slider(key=k).value for k in sliders} == sliders
    assert at.toggle(key="pr_latency").value == cli.latency and at.toggle(key="pr_analyse").value == cli.analyse_car
    assert at.toggle(key="pr_control").value == cli.control and at.radio(key="pr_car").value == cli.car
    assert at.selectbox(key="pr_criterion").value == cli.criterion and at.number_input(key="pr_time_budget").value == 0


def test_settings_have_sample_defaults_and_staircase():
    at = with_sample("prune")
    assert at.selectbox(key="pr_criterion").value == "car"
    assert at.slider(key="pr_max_drop").value == 1.0
    assert at.selectbox(key="pr_profile").value == "ncs2"
    assert "Cluster size **8**" in texts(at)  # in the caption, not cut off
    assert len(at.selectbox(key="pr_profile").format_func("ncs2")) <= 40  # issue 16: options fit the column
    assert "This machine:" in texts(at)
    at.button(key="pr_measure").click().run()
    assert_no_exception(at)
    assert len(at.get("plotly_chart")) == 1 and "Measured step" in texts(at)
    at.selectbox(key="pr_profile").set_value("custom").run()
    assert at.number_input(key="pr_cluster").value >= 1


def test_run_shows_progress_and_finishes():
    at = small_settings(with_sample("prune"), steps=2, latency=True)
    at.button(key="pr_start").click().run()
    assert_no_exception(at)
    jobs = get_registry().active("prune")
    assert len(jobs) == 1
    job = jobs[0]
    assert at.button(key="pr_start").disabled and not at.button(key="pr_cancel").disabled
    assert progress_values(at), "a progress bar while the job runs"
    wait_until(at, lambda a: len(job.snapshot().steps) >= 1 and a.get("plotly_chart"), timeout=60)
    if job.running:
        page = texts(at)
        assert "Elapsed" in page and "ETA" in page and "Current step" in page
    wait_until(at, lambda a: "Finished after" in texts(a), timeout=180)
    assert not progress_values(at)
    assert job.snapshot().state == "done"
    assert "2 pruning step(s) kept; stopped because step limit reached" in texts(at)
    assert len(at.get("plotly_chart")) == 2  # trade-off + progress
    assert [m.label for m in at.metric][:2] == ["Accuracy", "MACs"]
    run = Run(job.run_dir)
    assert [r["step"] for r in run.history] == [0, 1, 2] and run.status["state"] == "done"
    assert all(r["latency_ms"] > 0 for r in run.history)
    assert not at.button(key="pr_start").disabled and at.button(key="pr_cancel").disabled


def test_clusters_per_step_reaches_the_run():
    at = small_settings(with_sample("prune"), steps=1)
    at.slider(key="pr_clusters_per_step").set_value(2).run()
    at.button(key="pr_start").click().run()
    assert_no_exception(at)
    job = get_registry().active("prune")[0]
    wait_until(at, lambda a: "Finished after" in texts(a), timeout=180)
    assert_no_exception(at)
    run = Run(job.run_dir)
    assert run.config["prune"]["clusters_per_step"] == 2
    # what the step removed is the engine's (test_multi_cluster.py): on this small sample two clusters at
    # once lose ~19 points and the step falls back to one
    assert 1 <= len(removals(run.history[1])) <= 2
    assert "up to 2 clusters per step" in settings_text(PruneConfig(**run.config["prune"]))


def test_cancel_from_a_reloaded_tab_keeps_completed_steps():
    at = small_settings(with_sample("prune"), steps=40)
    at.button(key="pr_start").click().run()
    job = get_registry().active("prune")[0]
    # a new session without a model (the process kept no working set) still finds and shows the running job;
    # a plain reload gets the model back (tests/test_app_reload.py)
    get_registry().working_sets.clear()
    fresh = goto(new_app().run(), "prune")
    assert "no model loaded" in texts(fresh) and progress_values(fresh)
    # the widgets show their defaults again; the job's own settings are shown beside its progress
    assert "This run's settings:" in texts(fresh) and "step limit 40" in texts(fresh)
    wait_until(fresh, lambda a: len(job.snapshot().steps) >= 2, timeout=120)
    fresh.button(key="pr_cancel").click().run()
    assert job.wait(60), "cancel takes effect within one step"
    wait_until(fresh, lambda a: "Cancelled after" in texts(a), timeout=30)
    run = Run(job.run_dir)
    assert run.status["state"] == "cancelled"
    hist = run.history
    assert 2 <= len(hist) < 41 and [r["step"] for r in hist] == list(range(len(hist)))
    assert [s["step"] for s in job.snapshot().steps] == [r["step"] for r in hist]


def test_impossible_cluster_size_fails_with_a_clear_message():
    at = small_settings(with_sample("prune"), steps=1)
    at.selectbox(key="pr_profile").set_value("custom").run()
    at.number_input(key="pr_cluster").set_value(64).run()
    at.button(key="pr_start").click().run()
    job = get_registry().latest("prune")
    assert job.wait(60)
    wait_until(at, lambda a: bool(a.error), timeout=30)
    assert "Cluster size 64 is too large" in at.error[0].value


def test_a_newly_registered_criterion_is_offered_on_the_prune_page(fpgm):
    """The example criterion of docs/extending.md, once registered, is a choice of the Prune page (and its label shown)."""
    at = with_sample("prune")
    picker = at.selectbox(key="pr_criterion")
    assert "fpgm" in picker.options or picker.format_func("fpgm") in picker.options
    picker.set_value("fpgm").run()
    assert_no_exception(at)
    assert at.selectbox(key="pr_criterion").value == "fpgm"


def test_what_a_budget_buys_reads_low_to_high_and_says_why_it_buys_no_step():
    """A break test read "14–11 steps", "down to 48%–49%" (the slow end can take more, smaller steps and overshoot a
    MAC target further), "12–12 steps" and "0–0 steps, down to 100%–100%"; and "Capped at the time budget" under an
    estimate of a tenth of it."""
    text = budget_buys_text(30, {"slow": {"steps": 14, "mac_fraction": 0.4773}, "fast": {"steps": 11, "mac_fraction": 0.4927}})
    assert "11–14 steps" in text and "leaving 49%–48% of the original MACs" in text
    assert "12 steps, leaving 50% of" in budget_buys_text(5, {e: {"steps": 12, "mac_fraction": 0.5} for e in ("slow", "fast")})
    assert "1 step," in budget_buys_text(5, {e: {"steps": 1, "mac_fraction": 0.9} for e in ("slow", "fast")})
    none = {e: {"steps": 0, "mac_fraction": 1.0} for e in ("slow", "fast")}
    assert budget_buys_text(5, none, (0, 0)).endswith("no pruning step: no group can lose a cluster of this size.")
    assert "use it up" in budget_buys_text(0.1, none, (3, 5)) and "100%" not in budget_buys_text(0.1, none, (3, 5))
    assert budget_caption(30, 109.0).startswith("The whole run fits in the time budget (30 min)")
    assert budget_caption(30, 1800.0).startswith("Capped at the time budget (30 min)")
