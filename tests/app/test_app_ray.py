"""Analyse and Prune pages: the "where the heavy work runs" choice (``ui.workers``, ``core.distributed``)."""
from __future__ import annotations

from tests.app.apptest_tools import assert_no_exception, texts, wait_until, with_sample


def test_analyse_on_a_local_ray_cluster_lists_workers_and_says_where_it_scored(ray_cluster):
    at = with_sample("analyse")
    at.radio(key="car_where").set_value("local Ray cluster").run()
    at.number_input(key="car_ray_workers").set_value(1).run()
    at.button(key="car_ray_check").click().run()
    assert_no_exception(at)
    assert "1 Ray worker(s)" in texts(at) and "cpu, 1 thread(s)" in texts(at)
    rows = at.dataframe[0].value
    assert list(rows["worker"]) == [0] and list(rows["device"]) == ["cpu, 1 thread(s)"]
    at.slider(key="car_images").set_value(60).run()
    at.toggle(key="car_sensitivity").set_value(False).run()
    at.button(key="car_start").click().run()
    wait_until(at, lambda a: "CAR of 224 filters" in texts(a), timeout=120)
    assert "Scored on 1 Ray worker(s) (cpu, 1 thread(s)); ablations by place: worker 0: 224." in texts(at)


def test_prune_page_offers_the_choice(ray_cluster):
    at = with_sample("prune")
    assert not [t for t in at.toggle if t.key == "pr_ray_recovery"], "no Ray recovery while CAR runs here"
    at.radio(key="pr_where").set_value("Ray cluster by address").run()
    assert_no_exception(at)
    assert at.toggle(key="pr_ray_recovery").value is False
    at.text_input(key="pr_ray_address").set_value("ray:// bad").run()
    assert "A Ray address is" in texts(at)
