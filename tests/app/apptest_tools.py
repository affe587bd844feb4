"""Helpers of the AppTest page tests (imported by tests/app/test_app_*.py; their fixtures are in conftest.py).

Every test starts from ``streamlit_app.py``, the app frame with ``st.navigation``, and moves with
``switch_page`` to a page file (a page file run on its own has no frame: no menu, no shared state set-up).
The job registry (with the working sets a reload restores) is process-wide (``st.cache_resource``), so
each test gets a fresh one.
"""
from __future__ import annotations

import time
from pathlib import Path

from streamlit.testing.v1 import AppTest

ROOT = Path(__file__).resolve().parents[2]
APP = str(ROOT / "streamlit_app.py")
PAGES = {"home": "pages/0_Home.py", "load": "pages/1_Load.py", "analyse": "pages/2_Analyse.py",
         "prune": "pages/3_Prune.py", "review": "pages/4_Review.py", "export": "pages/5_Export.py"}


def new_app() -> AppTest:
    return AppTest.from_file(APP, default_timeout=90)


def goto(at: AppTest, page: str) -> AppTest:
    at.switch_page(PAGES[page]).run()
    assert_no_exception(at)
    return at


def assert_no_exception(at: AppTest) -> None:
    assert not at.exception, "\n".join(e.message + "\n" + "\n".join(e.stack_trace) for e in at.exception)


def with_sample(page: str = "home") -> AppTest:
    """An app session with the bundled sample loaded (through the home page's one-click start)."""
    at = new_app().run()
    at.button(key="home_start").click().run()
    assert_no_exception(at)
    assert at.success and "Loaded" in at.success[0].value
    return goto(at, page) if page != "home" else at


def click_load(at: AppTest) -> AppTest:
    """Press "Load and validate" and let its background job end: the next run takes its result in (the
    app frame adopts it) or shows its error, as a browser tab's polling does."""
    from ui.state import get_registry

    before = get_registry().latest("load")
    at.button(key="load_upload").click().run()
    job = get_registry().latest("load")
    if job is not None and job is not before:
        assert job.wait(300), "the load job ends"
        at.run()
    return at


def texts(at: AppTest) -> str:
    """All visible text of the page in one string (markdown, alerts, captions, titles)."""
    parts = []
    for kind in ("markdown", "caption", "success", "info", "warning", "error", "title", "subheader", "header"):
        parts += [str(e.value) for e in getattr(at, kind)]
    return "\n".join(parts)


def progress_values(at: AppTest) -> list[int]:
    return [p.proto.value for p in at.get("progress")]


def wait_until(at: AppTest, predicate, timeout: float = 120.0, interval: float = 1.0) -> AppTest:
    """Rerun the app (``run_every`` does not fire under AppTest) until ``predicate(at)`` holds."""
    end = time.time() + timeout
    while True:
        at.run()
        assert_no_exception(at)
        if predicate(at):
            return at
        if time.time() > end:
            raise AssertionError(f"timed out after {timeout} s; page text:\n{texts(at)[-2000:]}")
        time.sleep(interval)


def images(at: AppTest) -> int:
    return sum(len(e.proto.imgs) for e in at.get("image"))
