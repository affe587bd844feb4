"""The app under ``streamlit run`` for the browser tests: one server per test module, each with its own
workspace, so that one module's jobs and runs never show in another's."""
from __future__ import annotations

import pytest

from tests.e2e.browser_tools import streamlit_server


@pytest.fixture(scope="module")
def server(tmp_path_factory, request):
    """(URL, workspace) of the app started for this module; its log is tests/_artifacts/<module>.log."""
    workspace = tmp_path_factory.mktemp("e2e-workspace")
    with streamlit_server(workspace, f"streamlit_{request.module.__name__.rsplit('.', 1)[-1]}.log") as url:
        yield url, workspace
