"""A tab reload loses nothing (issue 16), in headless Chromium on the bundled sample.

Reload during a CAR job: the page re-attaches to the running job (its progress, no "Load a model
first"), the model stays loaded and the job's result is shown when it ends. Reload during a prune
started after that analysis: the page re-attaches and the run finishes; the run reused the finished
analysis (same model, images and settings) instead of recomputing it, and says so on the page.
"""
from __future__ import annotations

import time

import pytest

from tests.e2e.browser_tools import browser_page, ensure_chromium, ensure_playwright

pytestmark = pytest.mark.browser

# the analysis' images = the run's scoring images (both sliders' lowest), so that the run can reuse it; the
# CAR job still runs for some 10-20 s on the sample, long enough for the reload to find it running
CAR_IMAGES = 50


def test_reload_during_car_and_prune_reattaches_and_the_prune_reuses_the_analysis(server):
    executable = ensure_chromium()
    sync_api = ensure_playwright()
    expect = sync_api.expect
    url, workspace = server
    t_start = time.time()
    timings: dict[str, float] = {}

    def lap(name: str) -> None:
        timings[name] = time.time() - t_start - sum(timings.values())

    with browser_page(sync_api, executable) as app:
        page, main = app.page, app.main
        page.goto(url)
        main.get_by_role("button", name="Load the sample").click()
        expect(main).to_contain_text("Loaded vgg_digits", timeout=120_000)
        lap("load")

        # -- CAR on the Prune page's number of scoring images, reload while it runs
        app.nav("Analyse")
        app.set_slider("Selection images used", CAR_IMAGES, low=50, step=10)
        main.get_by_role("button", name="Compute CAR").click()
        expect(main.get_by_test_id("stProgress")).to_be_visible(timeout=30_000)
        page.reload()
        expect(page.get_by_role("heading", name="Analyse", exact=True).first).to_be_visible(timeout=30_000)
        expect(main.get_by_test_id("stProgress")).to_be_visible(timeout=30_000)  # re-attached, still running
        expect(main.get_by_role("button", name="Cancel")).to_be_visible()
        expect(main).not_to_contain_text("Load a model first")
        expect(app.sidebar).to_contain_text("Model: vgg_digits")
        expect(main).to_contain_text("CAR of 224 filters", timeout=180_000)
        expect(main).to_contain_text(f"on {CAR_IMAGES} images")
        app.no_exception()
        lap("analyse")

        # -- prune with the same scoring images: it will reuse the analysis; reload while it runs
        app.nav("Prune")
        expect(main.get_by_role("button", name="Start pruning")).to_be_enabled(timeout=30_000)
        app.set_slider("Images for scoring", CAR_IMAGES, low=50, step=50)
        expect(main).to_contain_text("the finished analysis will be reused")
        app.set_slider("Step limit", 1, low=1, step=1)  # one step: the original's part alone outlasts the reload
        app.set_slider("Fine-tune budget", 10, low=0, step=5)
        main.get_by_text("Measure OpenVINO latency every step").click()  # off: a shorter test
        app.settled()
        main.get_by_role("button", name="Start pruning").click()
        expect(main).to_contain_text("ETA", timeout=30_000)
        page.reload()
        expect(page.get_by_role("heading", name="Prune", exact=True).first).to_be_visible(timeout=30_000)
        expect(main.get_by_test_id("stProgress")).to_be_visible(timeout=30_000)
        expect(main).to_contain_text("Current step", timeout=30_000)
        expect(main).not_to_contain_text("This tab has no model loaded")
        expect(app.sidebar).to_contain_text("Model: vgg_digits")
        expect(main).to_contain_text("Finished after", timeout=300_000)
        expect(main).to_contain_text("reused the finished analysis")
        app.no_exception()
        app.shot("reload_prune_done")
        lap("prune")

    runs = list((workspace / "runs").iterdir())
    assert len(runs) == 1
    car = (runs[0] / "car.json").read_text()
    assert '"reused_from"' in car, "the run stored the finished analysis, not a recomputed one"
    print("\nReload e2e timings (s): " + ", ".join(f"{k} {v:.1f}" for k, v in timings.items())
          + f", total {time.time() - t_start:.1f}")
