"""Prune page (issues 12, 14, 16): CAR method, device line, resolution warning, per-layer plan, time estimate."""
from __future__ import annotations

from core.runs import Run
from tests.app.apptest_tools import (assert_no_exception, texts, wait_until, with_sample)
from ui.state import get_registry

EXCLUDED, CAPPED = "features.17", "features.14"  # sample VGG groups: 64 filters each


def test_settings_show_car_method_device_and_resolution_warning():
    at = with_sample("prune")
    assert at.radio(key="pr_car").value == "fast" and "exact" in at.radio(key="pr_car").options
    assert "screen" in texts(at), "the CAR method is explained in one line"
    assert at.selectbox(key="pr_device").value == "auto"
    assert "The job runs on: **CPU" in texts(at)
    at.slider(key="pr_max_drop").set_value(0.1).run()  # finer than 359 selection images resolve
    assert any("selection images would resolve it" in w.value for w in at.warning)
    # issue 27: with what helps: more selection images (a sample's split is fixed), a coarser threshold, the time
    remedy = next(w.value for w in at.warning if "What helps" in w.value)
    assert "a bundled sample's split is fixed" in remedy and "A coarser threshold:" in remedy
    assert "The time it costs:" in remedy and "on this machine" in remedy, "timed with the baseline's evaluation"
    at.slider(key="pr_max_drop").set_value(10.0).run()
    assert not any("resolve" in w.value for w in at.warning)


def test_excluded_group_and_cap_reach_the_run_and_hold():
    at = with_sample("prune")
    at.selectbox(key="pr_criterion").set_value("l1")
    at.slider(key="pr_max_steps").set_value(6)
    at.slider(key="pr_finetune").set_value(10)
    at.slider(key="pr_score_images").set_value(50)
    at.slider(key="pr_max_drop").set_value(10.0)
    at.toggle(key="pr_latency").set_value(False)
    at.toggle(key="pr_analyse").set_value(False)
    at.session_state["pr_plan_caps"] = {CAPPED: 0.25}  # what the cap editor starts from (as a seed sets it)
    at.run()
    at.multiselect(key="pr_exclude").set_value([EXCLUDED]).run()
    assert_no_exception(at)
    page = texts(at)
    assert f"{EXCLUDED}: excluded" in page and f"{CAPPED}: at most 25 %" in page
    at.button(key="pr_start").click().run()
    job = get_registry().latest("prune")
    assert job.wait(300)
    wait_until(at, lambda a: "Finished after" in texts(a), timeout=60)
    run = Run(job.run_dir)
    plan = run.config["prune"]["plan"]
    assert plan["exclude"] == [EXCLUDED] and plan["max_fraction"] == {CAPPED: 0.25}
    assert run.config["prune"]["criterion"] == "l1" and len(run.history) >= 3, run.status
    for r in run.history:
        assert r["widths"][EXCLUDED] == 64, "the excluded group is never touched"
        assert r["widths"][CAPPED] >= 48, "the capped group keeps at least 75 % of its width"
    assert any(r["widths"] != run.history[0]["widths"] for r in run.history[1:]), "the run did prune"


def test_estimate_before_start_is_measured_on_demand():
    at = with_sample("prune")
    assert "Estimated time" not in texts(at)
    at.button(key="pr_estimate").click().run()
    assert_no_exception(at)
    assert "Estimated time:" in texts(at) and "from rates measured on this machine" in texts(at)
    assert any("CAR analysis" in str(df.value) for df in at.dataframe)


def test_the_estimate_leaves_out_an_analysis_the_run_will_reuse():
    """Issue 27: with a finished analysis the run reuses, the estimate added the whole analysis again."""
    import copy

    from core.car import compute_car
    from core.prune import PruneConfig

    at = with_sample("prune")
    state = at.session_state["prunescope"]
    config = PruneConfig.app_defaults()
    state.car = compute_car(copy.deepcopy(state.model.model), state.model.spec.input, state.data.val,
                            n_images=config.score_images, method=config.car)
    at.session_state["prunescope"] = state
    at.run()
    assert_no_exception(at)
    assert "the finished analysis will be reused" in texts(at)
    at.button(key="pr_estimate").click().run()
    assert_no_exception(at)
    assert "it is not part of this estimate" in texts(at)
    assert not any("CAR analysis" in str(df.value) for df in at.dataframe)
