"""Helpers and fixtures of the AppTest page tests (imported by tests/test_app_*.py).

Every test starts from ``streamlit_app.py``, the app frame with ``st.navigation``, and moves with
``switch_page`` to a page file (a page file run on its own has no frame: no menu, no shared state set-up).
The job registry (with the working sets a reload restores) is process-wide (``st.cache_resource``), so
each test gets a fresh one.
"""
from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

ROOT = Path(__file__).resolve().parent.parent
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


def _navigation_app_pages_manager(monkeypatch) -> None:
    """Run the app as the server does once it has called ``st.navigation``.

    ``st.navigation`` sets ``PagesManager.uses_pages_directory = False`` for the whole process, so the
    server ignores the legacy ``pages/`` auto-menu from then on. AppTest resets the flag to None before
    every run, and the next ``PagesManager`` then finds ``pages/`` beside the entrypoint and runs the
    legacy menu instead of ``streamlit_app.py`` (a rerun would skip the frame: no sidebar, no saved
    working set). The project keeps the page files in ``pages/`` (its asked-for layout), so tests put
    the flag back where ``st.navigation`` leaves it.
    """
    from streamlit.runtime.pages_manager import PagesManager

    original = PagesManager.__init__

    def init(self, *args, **kwargs):
        original(self, *args, **kwargs)
        PagesManager.uses_pages_directory = False

    monkeypatch.setattr(PagesManager, "__init__", init)


@pytest.fixture(autouse=True)
def fresh_registry(monkeypatch):
    from ui.state import get_registry

    _navigation_app_pages_manager(monkeypatch)
    get_registry.clear()
    yield
    for job in get_registry().active():
        job.request_cancel()
        job.wait(60)
    get_registry.clear()


_TEMPLATE: list[Path] = []  # the test modules import the fixture, each its own copy: share the run itself


@pytest.fixture(scope="session")
def sample_run_template(tmp_path_factory):
    """One short pruning run of the sample (made once with core, copied into each test's workspace)."""
    if _TEMPLATE and _TEMPLATE[0].exists():
        return _TEMPLATE[0]
    from core.sources import load_dataset
    from core.models import load_model
    from core.prune import PruneConfig, run_pruning

    loaded = load_model("sample:vgg_digits")
    data = load_dataset("sample:vgg_digits", loaded.spec.input, expected_classes=loaded.spec.num_classes)
    out = tmp_path_factory.mktemp("template") / "20260101-000000-sample_vgg-abcdef"
    config = PruneConfig(criterion="car", cluster=8, max_drop=5.0, finetune_steps=3, score_images=60, max_steps=2,
                         latency=True, latency_runs=5, analyse_car=True, patience=0)
    run_pruning(loaded, data, config, out, data_source="sample:vgg_digits")
    _TEMPLATE[:] = [out]
    return out


@pytest.fixture
def sample_run(sample_run_template):
    """The sample run inside this test's workspace (as if made by the app)."""
    from core.workspace import runs_dir

    dest = runs_dir() / sample_run_template.name
    shutil.copytree(sample_run_template, dest)
    return dest
