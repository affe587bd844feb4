"""End-to-end in headless Chromium: the whole flow on the bundled sample, as a user clicks through it.

load → analyse (CAR job, gallery) → prune (small budget, live progress) → review (threshold slider) →
export → download the zip. Screenshots go to tests/_artifacts/ (git-ignored); the Review one is also
written to assets/screenshot_review.png for the README when that file is missing or
``PRUNESCOPE_UPDATE_SCREENSHOT=1`` (so that a test run leaves the working tree clean).

Needs Chromium: Debian's ``chromium`` package is installed with apt-get when /usr/bin/chromium is
missing (Playwright cannot download its own browser here); the test is skipped, saying why, only
when that is impossible. ``PRUNESCOPE_E2E_DEFAULTS=1`` prunes with the page's default settings
instead of the small budget and prints the timings (used to measure the default flow).
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "tests" / "_artifacts"
CHROMIUM = "/usr/bin/chromium"
USE_DEFAULTS = os.environ.get("PRUNESCOPE_E2E_DEFAULTS") == "1"
UPDATE_SCREENSHOT = os.environ.get("PRUNESCOPE_UPDATE_SCREENSHOT") == "1"

pytestmark = pytest.mark.browser


def _run(cmd: list[str], timeout: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


def ensure_chromium() -> str:
    if Path(CHROMIUM).exists():
        return CHROMIUM
    if not shutil.which("apt-get"):
        pytest.skip("Chromium is missing (/usr/bin/chromium) and apt-get is not available to install it.")
    if hasattr(os, "geteuid") and os.geteuid() != 0:
        pytest.skip("Chromium is missing (/usr/bin/chromium); installing it needs root (apt-get install chromium).")
    try:
        update = _run(["apt-get", "update"], 300)
        install = _run(["apt-get", "install", "-y", "chromium"], 900)
    except (OSError, subprocess.TimeoutExpired) as exc:
        pytest.skip(f"Could not install Chromium with apt-get: {exc}")
    if not Path(CHROMIUM).exists():
        pytest.skip("Could not install Chromium with apt-get: "
                    + (install.stderr or update.stderr or install.stdout)[-500:])
    return CHROMIUM


def ensure_playwright():
    try:
        from playwright import sync_api  # noqa: F401
    except ImportError:
        result = _run([sys.executable, "-m", "pip", "install", "playwright==1.65.2"], 600)
        if result.returncode != 0:
            pytest.skip(f"The playwright package is missing and could not be installed: {result.stderr[-300:]}")
    from playwright import sync_api

    return sync_api


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The app under ``streamlit run``, on a free local port, with its own workspace."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    port = free_port()
    workspace = tmp_path_factory.mktemp("e2e-workspace")
    env = {**os.environ, "PRUNESCOPE_WORKSPACE": str(workspace), "PYTHONUNBUFFERED": "1"}
    log = open(ARTIFACTS / "streamlit.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", "streamlit_app.py", "--server.headless", "true",
         "--server.port", str(port), "--server.address", "127.0.0.1", "--browser.gatherUsageStats", "false"],
        cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 90
        while True:
            try:
                with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as r:
                    if r.read().decode().strip() == "ok":
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"streamlit did not start: see {ARTIFACTS / 'streamlit.log'}")
            time.sleep(0.5)
        yield url, workspace
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def test_whole_flow_on_the_sample(server, tmp_path):
    executable = ensure_chromium()
    sync_api = ensure_playwright()
    expect = sync_api.expect
    url, workspace = server
    timings: dict[str, float] = {}

    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable,
                                    args=["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        context = browser.new_context(viewport={"width": 1440, "height": 1000}, accept_downloads=True)
        page = context.new_page()
        main = page.get_by_test_id("stMain")

        def shot(name: str, to_assets: bool = False) -> None:
            page.wait_for_timeout(600)  # let plotly finish drawing
            page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)
            if to_assets and (UPDATE_SCREENSHOT or not (ROOT / "assets" / f"{name}.png").exists()):
                # the README's picture: the slider, the pick and the trade-off curve
                page.set_viewport_size({"width": 1440, "height": 1560})
                page.wait_for_timeout(800)
                page.screenshot(path=str(ROOT / "assets" / f"{name}.png"), full_page=False)
                page.set_viewport_size({"width": 1440, "height": 1000})

        def nav(label: str) -> None:
            page.get_by_test_id("stSidebar").get_by_role("link", name=label, exact=True).click()
            expect(page.get_by_role("heading", name=label, exact=True).first).to_be_visible(timeout=30_000)

        def slider(label: str):
            return main.get_by_test_id("stSlider").filter(has_text=label).get_by_role("slider")

        def no_exception() -> None:
            expect(page.get_by_test_id("stException")).to_have_count(0)

        t_flow = time.time()
        # -- home: one click loads the sample
        page.goto(url)
        expect(main).to_contain_text("How it works", timeout=60_000)
        main.get_by_role("button", name="Load the sample").click()
        expect(main).to_contain_text("Loaded vgg_digits: 99.72 %", timeout=120_000)
        no_exception()
        shot("1_home")

        # -- load: the validation report and the baseline
        nav("Load")
        expect(main).to_contain_text("All files were readable images", timeout=30_000)
        expect(main.get_by_test_id("stMetric").first).to_contain_text("Accuracy")
        expect(main).to_contain_text("9.9 M")
        expect(main.locator(".js-plotly-plot").first).to_be_visible(timeout=30_000)
        shot("2_load")

        # -- analyse: CAR in the background, then the charts and the gallery
        nav("Analyse")
        t0 = time.time()
        main.get_by_role("button", name="Compute CAR").click()
        expect(main).to_contain_text("CAR of 224 filters", timeout=180_000)
        timings["analyse"] = time.time() - t0
        expect(main.locator(".js-plotly-plot").first).to_be_visible(timeout=30_000)
        page.get_by_role("tab", name="Filter gallery").click()
        expect(main).to_contain_text("top-activating patches", timeout=60_000)
        expect(main.get_by_text("Filter ", exact=False).first).to_be_visible()
        no_exception()
        shot("3_analyse_gallery")

        # -- prune: a small budget (2 steps) unless the defaults are being measured
        nav("Prune")
        expect(main.get_by_role("button", name="Start pruning")).to_be_enabled(timeout=30_000)
        if not USE_DEFAULTS:
            steps = slider("Step limit")
            steps.focus()
            for _ in range(2):
                page.keyboard.press("ArrowLeft")
            expect(main.get_by_test_id("stSlider").filter(has_text="Step limit")).to_contain_text("2")
            ft = slider("Fine-tune budget")
            ft.focus()
            for _ in range(2):
                page.keyboard.press("ArrowLeft")
        t0 = time.time()
        main.get_by_role("button", name="Start pruning").click()
        expect(main).to_contain_text("ETA", timeout=30_000)
        expect(main.get_by_test_id("stProgress")).to_be_visible()
        expect(main.get_by_role("button", name="Cancel")).to_be_enabled()
        expect(main).to_contain_text("Current step", timeout=60_000)
        expect(main.locator(".js-plotly-plot").first).to_be_visible(timeout=120_000)  # the trade-off grows
        shot("4_prune_running")
        expect(main).to_contain_text("Finished after", timeout=300_000)
        timings["prune"] = time.time() - t0
        expect(main).to_contain_text("stopped because")
        no_exception()
        shot("5_prune_done")

        # -- review: the slider picks the smallest model within the drop
        nav("Review")
        expect(main).to_contain_text("smallest model within", timeout=60_000)
        thr = slider("Acceptable accuracy drop")
        thr.focus()
        for _ in range(10):
            page.keyboard.press("ArrowRight")
        expect(main).to_contain_text("2.0 points", timeout=30_000)
        expect(main).to_contain_text("is the smallest model within 2.0 points")
        expect(main.locator(".js-plotly-plot")).to_have_count(4, timeout=30_000)
        expect(main).to_contain_text("Removed filters")
        no_exception()
        shot("screenshot_review", to_assets=True)

        # -- export: the pick by default; NCS2 report, verification; download the zip
        nav("Export")
        expect(main).to_contain_text("the Review threshold (2.0 points) picked it", timeout=30_000)
        t0 = time.time()
        main.get_by_role("button", name="Export step").click()
        expect(main).to_contain_text("NCS2 ready", timeout=240_000)
        timings["export"] = time.time() - t0
        expect(main).to_contain_text("Verified: the IR agrees with PyTorch")
        expect(main).to_contain_text("fallback/model.xml")
        with page.expect_download(timeout=60_000) as info:
            main.get_by_role("button", name="Download the bundle (.zip)").click()
        target = tmp_path / info.value.suggested_filename
        info.value.save_as(target)
        timings["flow"] = time.time() - t_flow
        no_exception()
        shot("6_export")
        browser.close()

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
