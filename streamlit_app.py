"""PruneScope's app frame (``streamlit run streamlit_app.py``): the page menu (``st.navigation`` over the
files in ``pages/``), the shared page set-up and sidebar, then the chosen page.

Every run of any page passes through here, so this is where the session's working set is kept for a
browser reload (``ui.state.remember_state``), also when the page stops early (``st.stop``) or reruns.
"""
from __future__ import annotations

import streamlit as st

from ui.common import navigation
from ui.frame import frame
from ui.state import remember_state

page = st.navigation(navigation())
frame()
try:
    page.run()
finally:
    remember_state()
