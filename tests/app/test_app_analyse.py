"""Analyse page: CAR as a background job, the charts, the filter gallery, per-class CAR."""
from __future__ import annotations


from tests.app.apptest_tools import (assert_no_exception, goto, images, new_app, progress_values, texts, wait_until, with_sample)
from ui.state import get_registry


def test_needs_a_model_first():
    at = goto(new_app().run(), "analyse")
    assert "Load a model first" in texts(at)
    assert [p.proto.label for p in at.main.get("page_link")] == ["Go to Load"]
    assert not at.get("plotly_chart")


def test_car_job_charts_gallery_and_per_class():
    at = with_sample("analyse")
    assert "Press **Compute CAR**" in texts(at)
    at.slider(key="car_images").set_value(60).run()
    at.toggle(key="car_sensitivity").set_value(True)
    at.button(key="car_start").click().run()
    assert_no_exception(at)
    assert get_registry().active("car"), "the CAR analysis runs in the background"
    # while it runs the page shows the job (and a Cancel button instead of Start)
    if get_registry().active("car"):
        assert at.button(key="car_cancel") is not None
    wait_until(at, lambda a: "CAR of 224 filters" in texts(a), timeout=120)
    assert not progress_values(at)
    charts = at.get("plotly_chart")
    assert len(charts) == 4  # per layer, heat map, sensitivity, per-class
    # gallery: weights + activation per filter, patches per filter
    assert images(at) >= 12 * 3 + 1
    assert "Filter" in texts(at) and "CAR" in texts(at)
    # another layer and order redraw the gallery
    at.selectbox(key="an_gal_order").set_value("highest CAR first").run()
    at.selectbox(key="an_gal_layer").select_index(2).run()
    assert_no_exception(at)
    at.slider(key="an_gal_limit").set_value(8).run()
    assert images(at) >= 8 * 3 + 1
    # per-class CAR for another class, another layer of the bar chart
    at.selectbox(key="an_pc_class").set_value(3).run()
    at.selectbox(key="an_layer").select_index(1).run()
    assert_no_exception(at)
    assert "'3'" in texts(at)


def test_cancel_and_reattach_after_reload():
    at = with_sample("analyse")
    at.slider(key="car_images").set_value(359).run()
    at.button(key="car_start").click().run()
    job = get_registry().latest("car")
    assert job.running
    # a reload is a new session: it finds the running job through the app-wide registry
    again = with_sample("analyse")
    assert progress_values(again), "the reloaded page shows the running job's progress"
    again.button(key="car_cancel").click().run()
    assert job.wait(30)
    assert job.snapshot().state == "cancelled"
    wait_until(again, lambda a: "The CAR analysis was cancelled." in texts(a), timeout=30)
    assert not progress_values(again) and again.button(key="car_start") is not None


def test_fast_car_is_labelled_screened_or_exact():
    """The Analyse page's fast method (issue 12): screened figures are labelled, the exact ones counted."""
    at = with_sample("analyse")
    at.slider(key="car_images").set_value(60)
    at.toggle(key="car_sensitivity").set_value(False)
    at.radio(key="car_method").set_value("fast").run()
    at.button(key="car_start").click().run()
    job = get_registry().latest("car")
    assert job.wait(120) and job.snapshot().state == "done"
    car = job.snapshot().result
    assert job.snapshot().meta["method"] == "fast" and 0 < car.n_exact < 224
    wait_until(at, lambda a: "CAR of 224 filters" in texts(a), timeout=60)
    assert f"{car.n_exact} exact (measured), {224 - car.n_exact} screened" in texts(at)
    table = next(df.value for df in at.dataframe if "figure" in df.value.columns)
    assert set(table["figure"]) <= {"exact", "screened"} and "exact" in set(table["figure"])

def test_start_uses_the_values_set_with_the_click():
    """A slider moved and Compute CAR clicked in one request (a busy page): the job takes the slider's new
    value, not the one of the run before (a button callback's arguments are that run's)."""
    at = with_sample("analyse")
    at.slider(key="car_images").set_value(60)
    at.toggle(key="car_sensitivity").set_value(False)
    at.button(key="car_start").click().run()
    assert_no_exception(at)
    job = get_registry().latest("car")
    assert job is not None and job.meta["n_images"] == 60 and job.meta["sensitivity"] is False
    job.request_cancel()
    assert job.wait(30)
