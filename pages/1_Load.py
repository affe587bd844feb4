"""Load: a model and its data set (the task's own upload form: for a classifier, weights + architecture, weights +
the user's own Python file, or a trusted pickle, and an ImageFolder data set), or the bundled sample."""
from __future__ import annotations

import streamlit as st

from ui.common import metrics_row, page_link, setup_page
from ui.tasks import task_labels, task_ui

state = setup_page("Load", "A trained model and its data set: upload your own or take the bundled sample.")
TASKS = task_labels()  # label -> AppState.task
task = TASKS[st.radio("Task", list(TASKS), index=list(TASKS.values()).index(state.task), horizontal=True,
                      key="load_task",
                      help="Classification: a classifier and an ImageFolder data set. Detection: an SSD detector "
                           "and a Pascal VOC data set; pruning is then scored by mAP@0.5.")]
plugin = task_ui(task)

tab_sample, tab_upload = st.tabs(["Bundled sample", "Upload your own"])
with tab_sample:
    plugin.sample_tab(state)
with tab_upload:
    plugin.upload_form(state)

# ----------------------------------------------------------------------------- what is loaded
st.divider()
if state.model is None or state.task != task:
    st.info("Nothing loaded yet: take the sample or upload a model and a data set above.", icon=":material/info:")
    st.stop()

st.subheader("Current model")
st.markdown(f"**{state.model_label}** · {plugin.model_shape(state)}" + plugin.input_details(state))
for note in getattr(state.model, "notes", []):
    st.caption(f"Note: {note}")
if state.data is None:
    st.stop()

st.subheader("Baseline")
metrics_row(state.baseline, metric=plugin.METRIC)
plugin.loaded_details(state)

st.markdown("**Next**")
c1, c2, _ = st.columns([1, 1, 3])
with c1:
    page_link("analyse", "Analyse the filters")
with c2:
    page_link("prune", "Prune")
