"""The app frame's part of every page (``streamlit_app.py`` calls :func:`frame` before the page): page config,
style, the session's state and the sidebar (what is loaded, the jobs of this app process, the glossary)."""
from __future__ import annotations

from pathlib import Path

import streamlit as st

from core import glossary
from ui.common import sidebar_jobs
from ui.state import AppState, adopt_finished_load, get_registry, get_state
from ui.tasks import task_ui

ASSETS = Path(__file__).resolve().parent.parent / "assets"


def frame() -> AppState:
    """What every page shares, drawn by the app frame before the page runs: page config, style, the
    session's state (restored after a reload, see :mod:`ui.state`) and the sidebar."""
    st.set_page_config(page_title="PruneScope", page_icon=":material/content_cut:", layout="wide")
    css = ASSETS / "style.css"
    if css.exists():
        st.html(f"<style>{css.read_text()}</style>")
    state = get_state()
    adopt_finished_load(state)
    sidebar(state)
    return state


def sidebar(state: AppState) -> None:
    """Below the page menu (``st.navigation``): what is loaded, and the jobs of this app process."""
    registry = get_registry()
    with st.sidebar:
        if state.model is not None:
            st.caption(f"{task_ui(state.task).MODEL_WORD}: {state.model_label}")
        else:
            st.caption("No model loaded")
        running = tuple(j.id for j in registry.active())
        st.fragment(run_every=1.0 if running else None)(sidebar_jobs)(registry, running)
        with st.expander("Glossary: the words used here", icon=":material/menu_book:"):
            st.markdown(glossary.markdown())  # one definition per word, for every page (core.glossary)
