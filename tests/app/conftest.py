"""Fixtures of the AppTest page tests: a fresh job registry for every test (the app frame run as the
server runs it) and one short pruning run of the sample, made once and copied into each test's workspace."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from tests.helpers import CLASSIC_LOOP


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


_TEMPLATE: list[Path] = []  # made once per test process, copied per test


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
                         latency=True, latency_runs=5, analyse_car=True, patience=0, **CLASSIC_LOOP)
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
