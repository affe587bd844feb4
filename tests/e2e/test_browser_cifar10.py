"""The app on a real model, as a newcomer meets it (issue 27), in headless Chromium.

The bundled ``cifar10`` sample (a real CIFAR-10 ResNet-20 with option-A shortcuts, 2,000 real CIFAR-10 images)
walked with every page's defaults: Home → a data zip without images and a user-style zip of real CIFAR-10
JPEGs on Load (the failure stays on its page and leaves the sidebar when a later load works) → the sample again
→ Analyse (defaults) → Prune (defaults): the run reuses the analysis, one whole-job ETA shows while it runs,
at least one step is kept → Review → Export → the downloaded bundle. Its screenshots are the README's
(``assets/screenshot_*.png``) when ``PRUNESCOPE_UPDATE_SCREENSHOT=1``.

The real JPEGs come from ``../shared/data/cifar10_train_jpeg.zip``; without it the upload part is skipped, the
walk itself needs only the repository.
"""
from __future__ import annotations

import json
import re
import time
import zipfile

import pytest

from tests.e2e.browser_tools import browser_page, ensure_chromium, ensure_playwright
from tests.helpers import SHARED_CIFAR_JPEGS, cifar_jpeg_entries, zip_bytes

pytestmark = pytest.mark.browser


def _upload_data(app, path) -> None:
    main = app.main
    main.get_by_role("tab", name="Upload your own").click()
    uploader = main.get_by_test_id("stFileUploader").filter(has_text="Zip of class folders")
    uploader.locator("input[type=file]").set_input_files(str(path))
    app.page.wait_for_timeout(1500)
    main.get_by_role("button", name="Load and validate").click()


@pytest.mark.timeout(3000)  # 8 min alone at 2 threads; 18-30+ min in the suite (1 thread, shared cores)
def test_cifar10_sample_walk_with_the_defaults(server, tmp_path):
    executable = ensure_chromium()
    sync_api = ensure_playwright()
    expect = sync_api.expect
    url, workspace = server
    timings: dict[str, float] = {}
    t_flow = time.time()

    with browser_page(sync_api, executable) as app:
        page, main, sidebar = app.page, app.main, app.sidebar
        # -- home: the cifar10 sample in one click
        page.goto(url)
        expect(main).to_contain_text("How it works", timeout=60_000)

        def load_sample() -> None:
            sidebar.get_by_role("link", name="Home", exact=True).click()  # the Home page's title is the app's
            expect(main).to_contain_text("How it works", timeout=30_000)
            main.get_by_test_id("stSelectbox").filter(has_text="Bundled sample").click()
            page.get_by_role("option", name=re.compile(r"^cifar10 ")).click()
            app.settled()
            main.get_by_role("button", name="Load the sample").click()
            expect(main).to_contain_text("Loaded cifar10", timeout=180_000)

        load_sample()
        expect(main).to_contain_text("400 selection images")
        app.no_exception()

        # -- load: a zip without images says so, on its page; a later load that works clears it from the sidebar
        if SHARED_CIFAR_JPEGS.is_file():
            junk = tmp_path / "holiday_photos.zip"
            junk.write_bytes(zip_bytes({"photos/cats/readme.txt": b"x", "photos/dogs/list.csv": b"a,b"}))
            app.nav("Load")
            _upload_data(app, junk)
            expect(main).to_contain_text("No images found in holiday_photos.zip", timeout=120_000)
            expect(main).to_contain_text("cats/readme.txt (not an image: .txt)")
            expect(sidebar).to_contain_text("see the Load page", timeout=30_000)
            real = tmp_path / "my_cifar10.zip"
            real.write_bytes(zip_bytes(cifar_jpeg_entries(20)))  # 20 real JPEGs of each of the 10 classes
            _upload_data(app, real)
            expect(main).to_contain_text("All files were readable images", timeout=180_000)
            expect(main).to_contain_text("10 classes")
            expect(sidebar).not_to_contain_text("failed", timeout=30_000)
            app.no_exception()
            load_sample()  # the walk goes on with the sample's own images

        # -- analyse with the page's defaults
        app.nav("Analyse")
        t0 = time.time()
        main.get_by_role("button", name="Compute CAR").click()
        expect(main).to_contain_text(re.compile(r"CAR of \d+ filters"), timeout=1_200_000)
        timings["analyse"] = time.time() - t0
        expect(main.locator(".js-plotly-plot").first).to_be_visible(timeout=60_000)
        app.no_exception()
        app.shot("c10_analyse", readme="screenshot_analyse")

        # -- prune with the page's defaults: the analysis is reused, one ETA for the whole job
        app.nav("Prune")
        expect(main.get_by_role("button", name="Start pruning")).to_be_enabled(timeout=60_000)
        expect(main).to_contain_text("the finished analysis will be reused")
        expect(main).not_to_contain_text("computed by the run")
        t0 = time.time()
        main.get_by_role("button", name="Start pruning").click()
        expect(main.get_by_test_id("stProgress")).to_be_visible(timeout=60_000)
        expect(main).to_contain_text(re.compile(r"ETA of the whole job \d"), timeout=300_000)
        expect(main).not_to_contain_text("ETA of this part")  # one ETA, the part's progress beside it
        expect(main).to_contain_text("in this part")
        main.get_by_role("heading", name="Progress").scroll_into_view_if_needed()
        app.shot("c10_prune_running", readme="screenshot_prune")
        expect(main).to_contain_text("Finished after", timeout=3_600_000)
        timings["prune"] = time.time() - t0
        expect(main).to_contain_text("reused the finished analysis")
        expect(sidebar).not_to_contain_text("failed")  # no stacked stale failure
        app.no_exception()
        app.shot("c10_prune_done")
        outcome = main.inner_text()
        kept = re.search(r"(\d+) pruning step\(s\) kept", outcome)
        assert kept and int(kept.group(1)) >= 1, \
            "at least one kept step with the defaults: " + outcome[outcome.find("Finished after"):][:600]

        # -- review
        app.nav("Review")
        expect(main).to_contain_text("smallest model within", timeout=60_000)
        expect(main).not_to_contain_text("No pruning step has completed")
        expect(main.locator(".js-plotly-plot").first).to_be_visible(timeout=60_000)
        app.no_exception()
        app.shot("c10_review", readme="screenshot_review")

        # -- export the pick and download the bundle
        app.nav("Export")
        t0 = time.time()
        main.get_by_role("button", name="Export step").click()
        expect(main).to_contain_text("Pruned model (", timeout=900_000)
        timings["export"] = time.time() - t0
        expect(main).to_contain_text("Fallback (original)")
        with page.expect_download(timeout=120_000) as info:
            main.get_by_role("button", name="Download the bundle (.zip)").click()
        target = tmp_path / info.value.suggested_filename
        info.value.save_as(target)
        app.no_exception()
        app.shot("c10_export", readme="screenshot_export")
    timings["flow"] = time.time() - t_flow

    assert zipfile.is_zipfile(target)
    names = zipfile.ZipFile(target).namelist()
    top = names[0].split("/")[0]
    assert f"{top}/model/model.xml" in names and f"{top}/fallback/model.xml" in names
    runs = list((workspace / "runs").iterdir())
    assert len(runs) == 1
    car = json.loads((runs[0] / "car.json").read_text())
    assert car.get("reused_from"), "the run stored the finished analysis (car.json says so), not a recomputed one"
    print("\ncifar10 e2e timings (s): " + ", ".join(f"{k} {v:.1f}" for k, v in timings.items()))
