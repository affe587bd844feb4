"""What the browser tests share: Chromium and Playwright set-up, the app under ``streamlit run`` and the
page helpers a user's clicks are made of (the ``server`` fixture is in this folder's ``conftest.py``).

Needs Chromium: Debian's ``chromium`` package is installed with apt-get when /usr/bin/chromium is
missing (Playwright cannot download its own browser here); a test is skipped, saying why, only when
that is impossible. README screenshots (``assets/screenshot_*.png``) are written when
``PRUNESCOPE_UPDATE_SCREENSHOT=1`` or when the file is missing, so that a test run leaves the working
tree clean; every screenshot also goes to tests/_artifacts/ (git-ignored).
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "tests" / "_artifacts"
CHROMIUM = "/usr/bin/chromium"
UPDATE_SCREENSHOT = os.environ.get("PRUNESCOPE_UPDATE_SCREENSHOT") == "1"
LAUNCH_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
VIEWPORT = {"width": 1440, "height": 1000}
README_VIEWPORT = {"width": 1440, "height": 1560}  # a README picture: the page's first screen, taller


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


@contextmanager
def streamlit_server(workspace: Path, log_name: str = "streamlit.log"):
    """The app under ``streamlit run`` on a free local port with its own workspace; yields its URL."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    port = free_port()
    env = {**os.environ, "PRUNESCOPE_WORKSPACE": str(workspace), "PYTHONUNBUFFERED": "1"}
    log = open(ARTIFACTS / log_name, "w")
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
                raise RuntimeError(f"streamlit did not start: see {ARTIFACTS / log_name}")
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


class AppPage:
    """One browser tab on the app, with the steps a user takes: follow a sidebar link, move a slider, look
    for a traceback, take a screenshot."""

    def __init__(self, page, expect):
        self.page, self.expect = page, expect
        self.main = page.get_by_test_id("stMain")
        self.sidebar = page.get_by_test_id("stSidebar")

    def nav(self, label: str) -> None:
        """Go to page ``label`` by its sidebar link, as a user does. A click that lands while the app is still
        rerunning (a load just finished; seen on a loaded 2-core machine) can be lost, as a user's would: wait
        for the app to settle first, and click once more when the page did not change."""
        heading = self.page.get_by_role("heading", name=label, exact=True).first
        self.settled()
        self.sidebar.get_by_role("link", name=label, exact=True).click()
        try:
            self.expect(heading).to_be_visible(timeout=20_000)
        except AssertionError:
            self.settled()
            self.sidebar.get_by_role("link", name=label, exact=True).click()
            self.expect(heading).to_be_visible(timeout=30_000)

    def slider(self, label: str):
        return self.main.get_by_test_id("stSlider").filter(has_text=label).get_by_role("slider")

    def press(self, label: str, key: str, times: int = 1) -> None:
        """Move the slider ``label`` with the keyboard (``ArrowLeft``, ``Home``...), as a user can."""
        self.slider(label).focus()
        for _ in range(times):
            self.page.keyboard.press(key)

    def set_slider(self, label: str, value: int, low: int, step: int) -> None:
        """Move the slider ``label`` (range from ``low`` in ``step``) to ``value``: to its start, then
        step by step, waiting for the page to show each end (a rerun redraws the slider)."""
        box = self.main.get_by_test_id("stSlider").filter(has_text=label)
        self.press(label, "Home")
        self.expect(box.get_by_role("slider")).to_have_value(str(low))
        self.press(label, "ArrowRight", (value - low) // step)
        self.expect(box.get_by_role("slider")).to_have_value(str(value))
        self.settled()

    def settled(self) -> None:
        """Wait until the app has taken the last widget change (the slider sends its value after a short
        pause) and no script run is in progress: a click right after would carry the old value."""
        self.page.wait_for_timeout(800)
        self.expect(self.page.get_by_test_id("stStatusWidgetRunningIcon")).to_have_count(0, timeout=30_000)

    def watch_job(self, done: str, looks: dict, timeout_s: float, shot: str | None = None) -> set[str]:
        """Watch a running job until the page shows ``done``; return the names of the ``looks`` seen meanwhile.

        A job's live view (progress bar, ETA, Cancel) lasts only while it runs, and a small job on a fast
        machine finishes within seconds: checking those one after another with ``expect`` lets the job end
        between two checks (CI at b0ae800: a 2-step run done in 5 s, the ETA check then waited on a finished
        page). Sampling the page every 200 ms and recording each look the first time it shows makes the
        checks independent of the job's speed. ``looks`` maps a name to ``check(app, text) -> bool``, with
        ``text`` the main area's text at that sample; ``shot``: a screenshot at the first sample where all
        looks but those already gone have shown (the running page). Raises AssertionError when ``done`` does
        not show within ``timeout_s``, or at once when a traceback shows."""
        seen: set[str] = set()
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            text = self.main.inner_text()
            if done in text:
                return seen
            if self.page.get_by_test_id("stException").count():
                raise AssertionError(f"a traceback showed while waiting for {done!r}: {text[-2000:]}")
            seen |= {name for name, check in looks.items() if name not in seen and check(self, text)}
            if shot and seen == set(looks):
                self.page.screenshot(path=str(ARTIFACTS / f"{shot}.png"), full_page=True)
                shot = None
            self.page.wait_for_timeout(200)
        raise AssertionError(f"{done!r} did not show within {timeout_s:.0f} s; seen meanwhile: {sorted(seen)}")

    def no_exception(self) -> None:
        self.expect(self.page.get_by_test_id("stException")).to_have_count(0)

    def shot(self, name: str, readme: str | None = None) -> None:
        """A full-page screenshot in tests/_artifacts/; ``readme``: also the README picture
        ``assets/<readme>.png`` (the first screen), when updating them or when it is missing."""
        self.page.wait_for_timeout(600)  # let plotly finish drawing
        self.page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)
        target = ROOT / "assets" / f"{readme}.png"
        if readme and (UPDATE_SCREENSHOT or not target.exists()):
            self.page.set_viewport_size(README_VIEWPORT)
            self.page.wait_for_timeout(800)
            self.page.screenshot(path=str(target), full_page=False)
            self.page.set_viewport_size(VIEWPORT)


@contextmanager
def browser_page(sync_api, executable: str):
    """A headless Chromium tab (downloads accepted) wrapped in :class:`AppPage`."""
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, args=LAUNCH_ARGS)
        try:
            context = browser.new_context(viewport=VIEWPORT, accept_downloads=True)
            yield AppPage(context.new_page(), sync_api.expect)
        finally:
            browser.close()
