"""End-to-end in headless Chromium: the whole flow on the bundled sample, as a user clicks through it.

load → analyse (CAR job, gallery) → prune (small budget, live progress) → review (threshold slider) →
export → download the zip. Screenshots go to tests/_artifacts/ (git-ignored); the README's are taken by
the cifar10 walk (``test_browser_cifar10.py``). ``PRUNESCOPE_E2E_DEFAULTS=1`` prunes with
the page's default settings instead of the small budget and prints the timings (used to measure the
default flow).
"""
from __future__ import annotations

import os
import re
import time
import zipfile

import pytest

from tests.e2e.browser_tools import browser_page, ensure_chromium, ensure_playwright

USE_DEFAULTS = os.environ.get("PRUNESCOPE_E2E_DEFAULTS") == "1"

pytestmark = pytest.mark.browser


def test_whole_flow_on_the_sample(server, tmp_path):
    executable = ensure_chromium()
    sync_api = ensure_playwright()
    expect = sync_api.expect
    url, workspace = server
    timings: dict[str, float] = {}

    with browser_page(sync_api, executable) as app:
        page, main = app.page, app.main
        t_flow = time.time()
        # -- home: one click loads the sample
        page.goto(url)
        expect(main).to_contain_text("How it works", timeout=60_000)
        main.get_by_role("button", name="Load the sample").click()
        expect(main).to_contain_text("Loaded vgg_digits: 99.72 %", timeout=120_000)
        app.no_exception()
        app.shot("1_home")

        # -- load: the validation report and the baseline
        app.nav("Load")
        expect(main).to_contain_text("All files were readable images", timeout=30_000)
        expect(main.get_by_test_id("stMetric").first).to_contain_text("Accuracy", timeout=30_000)
        expect(main).to_contain_text("9.9 M")
        expect(main.locator(".js-plotly-plot").first).to_be_visible(timeout=30_000)
        app.shot("2_load")

        # -- analyse: CAR in the background, then the charts and the gallery
        app.nav("Analyse")
        t0 = time.time()
        main.get_by_role("button", name="Compute CAR").click()
        expect(main).to_contain_text("CAR of 224 filters", timeout=180_000)
        timings["analyse"] = time.time() - t0
        expect(main.locator(".js-plotly-plot").first).to_be_visible(timeout=30_000)
        app.shot("3_analyse")  # the README's screenshots come from test_browser_cifar10.py
        page.get_by_role("tab", name="Filter gallery").click()
        expect(main).to_contain_text("top-activating patches", timeout=60_000)
        expect(main.get_by_text("Filter ", exact=False).first).to_be_visible()
        app.no_exception()
        app.shot("3_analyse_gallery")

        # -- prune: a small budget (2 steps) unless the defaults are being measured
        app.nav("Prune")
        expect(main.get_by_role("button", name="Start pruning")).to_be_enabled(timeout=30_000)
        # the pages' defaults agree: the analysis just made is the run's, it is not computed again
        expect(main).to_contain_text("the finished analysis will be reused")
        if not USE_DEFAULTS:
            # the page starts from the CLI's defaults (up to 200 steps, recoveries): two steps, no recovery
            app.set_slider("Step limit", 2, 1, 1)
            app.set_slider("Recovery when stalled (epochs)", 0, 0, 1)
            app.press("Fine-tune budget", "ArrowLeft", 2)
        t0 = time.time()
        main.get_by_role("button", name="Start pruning").click()
        # the live view lasts only while the job runs (a 2-step run can finish in 5 s): sample it until done
        live = app.watch_job("Finished after", {
            "progress bar": lambda a, text: a.main.get_by_test_id("stProgress").count() > 0,
            "Cancel enabled": lambda a, text: a.main.get_by_role("button", name="Cancel").is_enabled(timeout=5_000),
            "current step": lambda a, text: "Current step" in text,
            "ETA with a figure": lambda a, text: re.search(r"ETA( of this part| of the whole job)? \d", text),
        }, timeout_s=300, shot="4_prune_running")
        assert live == {"progress bar", "Cancel enabled", "current step", "ETA with a figure"}, live
        expect(main.locator(".js-plotly-plot").first).to_be_visible(timeout=120_000)  # the trade-off chart
        timings["prune"] = time.time() - t0
        expect(main).to_contain_text("stopped because")
        expect(main).to_contain_text("reused the finished analysis")
        app.no_exception()
        app.shot("5_prune_done")

        # -- review: the slider picks the smallest model within the drop
        app.nav("Review")
        expect(main).to_contain_text("smallest model within", timeout=60_000)
        app.press("Acceptable accuracy drop", "ArrowRight", 10)
        expect(main).to_contain_text("2.0 points", timeout=30_000)
        expect(main).to_contain_text("is the smallest model within 2.0 points")
        expect(main.locator(".js-plotly-plot")).to_have_count(4, timeout=30_000)
        expect(main).to_contain_text("Removed filters")
        app.no_exception()
        app.shot("screenshot_review")

        # -- export: the pick by default; NCS2 report, verification; download the zip
        app.nav("Export")
        expect(main).to_contain_text("the Review threshold (2.0 points) picked it", timeout=30_000)
        t0 = time.time()
        main.get_by_role("button", name="Export step").click()
        expect(main).to_contain_text("Ready: compiled for NCS2 (Myriad X) by the", timeout=240_000)  # Intel's MYRIAD compiler said so
        timings["export"] = time.time() - t0
        expect(main).to_contain_text("Verified: the IR agrees with PyTorch")
        expect(main).to_contain_text("fallback/model.xml")
        with page.expect_download(timeout=60_000) as info:
            main.get_by_role("button", name="Download the bundle (.zip)").click()
        target = tmp_path / info.value.suggested_filename
        info.value.save_as(target)
        timings["flow"] = time.time() - t_flow
        app.no_exception()
        app.shot("6_export")

    assert target.suffix == ".zip" and zipfile.is_zipfile(target)
    names = zipfile.ZipFile(target).namelist()
    top = names[0].split("/")[0]
    assert any(n.startswith(f"{top}/model/") for n in names) and any(n.startswith(f"{top}/fallback/") for n in names)
    for f in ("model/model.xml", "model/model.bin", "fallback/model.xml", "fallback/model.bin", "deploy.py", "manifest.json"):
        assert f"{top}/{f}" in names
    runs = list((workspace / "runs").iterdir())
    assert len(runs) == 1 and (runs[0] / "history.jsonl").exists()
    print("\nE2E timings (s): " + ", ".join(f"{k} {v:.1f}" for k, v in timings.items())
          + (" [default prune settings]" if USE_DEFAULTS else " [small budget]"))
