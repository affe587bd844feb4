"""State that survives a reload (issue 16): a reloaded tab or a new tab is a new session; it gets the loaded
model and data back, re-attaches to a running CAR job, shows a finished CAR result, and a prune with the same
model, images and settings reuses that result and says so. The sidebar lists jobs from the registry, finished
ones as finished in every tab."""
from __future__ import annotations

from core.engine import PruneConfig
from core.runs import Run
from tests.app.apptest_tools import (assert_no_exception, goto, new_app, texts, wait_until, with_sample)
from ui.state import TOKEN_PARAM, get_registry


def sidebar_text(at) -> str:
    return "\n".join(c.value for c in at.sidebar.caption)


def test_reload_keeps_the_model_loaded():
    first = with_sample("analyse")
    token = first.query_params[TOKEN_PARAM]
    assert token, "the session's working-set token is in the URL"
    reloaded = goto(new_app().run(), "analyse")  # a new tab: no token, the newest working set
    assert "Load a model first" not in texts(reloaded)
    assert "Press **Compute CAR**" in texts(reloaded)
    assert "Model: vgg_digits" in sidebar_text(reloaded)
    # another tab loads another sample; reloading the first tab (its token in the URL) gets its own model back
    other = new_app().run()
    other.selectbox(key="home_sample").set_value("resnet_shapes").run()
    other.button(key="home_start").click().run()
    assert_no_exception(other)
    assert "Model: resnet_shapes" in sidebar_text(goto(new_app().run(), "load")), "a new tab continues the newest"
    same_tab = new_app()
    same_tab.query_params[TOKEN_PARAM] = token
    same_tab.run()
    assert "Model: vgg_digits" in sidebar_text(same_tab)


def test_car_job_reattaches_after_reload_and_its_result_stays():
    at = with_sample("analyse")
    at.slider(key="car_images").set_value(50).run()
    at.toggle(key="car_sensitivity").set_value(True).run()
    at.button(key="car_start").click().run()
    job = get_registry().latest("car")
    assert job.running
    running = goto(new_app().run(), "analyse")  # reload during the job: no Load, no second click
    assert "Load a model first" not in texts(running)
    assert "CAR analysis job:" in sidebar_text(running), "the sidebar lists the running job"
    wait_until(running, lambda a: "CAR of 224 filters" in texts(a), timeout=180)
    assert job.snapshot().state == "done"
    finished = goto(new_app().run(), "analyse")  # a new tab after it finished: the result at once
    assert "CAR of 224 filters" in texts(finished) and "on 50 images" in texts(finished)
    assert "CAR analysis job done" in sidebar_text(finished), "a finished job reads finished in every tab"
    assert finished.button(key="car_start").label == "Recompute CAR"
    # a prune with the same model, images (50) and settings reuses the analysis and says so
    goto(finished, "prune")
    # the page starts from the CLI's defaults; a run scores on at most all of the sample's 359 selection images
    scores_on = min(PruneConfig().score_images, 359)
    assert f"computed by the run (it used 50 images, the run scores on {scores_on})" in texts(finished)
    finished.slider(key="pr_max_steps").set_value(1)
    finished.slider(key="pr_finetune").set_value(5)
    finished.slider(key="pr_score_images").set_value(50)
    finished.toggle(key="pr_latency").set_value(False)
    finished.slider(key="pr_recover_epochs").set_value(0)
    finished.toggle(key="pr_control").set_value(False)
    finished.run()
    assert "the finished analysis will be reused" in texts(finished)
    finished.button(key="pr_start").click().run()
    assert_no_exception(finished)
    wait_until(finished, lambda a: "Finished after" in texts(a), timeout=240)
    assert "reused the finished analysis (same model, 50 images" in texts(finished)
    prune = get_registry().latest("prune")
    run = Run(prune.run_dir)
    assert run.car["reused_from"]
    after = goto(new_app().run(), "prune")  # a reload after the run ended: its outcome, not "app restart"
    assert "Finished after" in texts(after) and "job list was reset" not in texts(after)
