"""Home: what the tool does, the current model / data / run at a glance, a one-click start."""
from __future__ import annotations

from pathlib import Path

import streamlit as st

from core.jobs import past_runs
from core.runs import run_reviewable
from core.models import sample_entry, sample_names
from ui.common import (action_button, damaged_runs_notice, format_macs, format_params, format_pct, format_seconds,
                       page_link, setup_page, started_at, state_badge)
from ui.state import DEFAULT_SAMPLE, get_registry, load_sample
from ui.tasks import metric_name, task_ui


def how_it_works() -> None:
    """The five pages in order, what each does, and that everything stays on this machine."""
    st.markdown(
        """
**How it works**

1. **Load** a trained PyTorch classifier and an image data set (or the bundled sample). The tool checks both and
   measures accuracy, MACs, parameters and OpenVINO CPU latency.
2. **Analyse** every filter with **CAR** (Classification Accuracy Reduction): the selection accuracy lost when that
   one filter is removed: exact (removed and measured) or screened (a first-order estimate, exact where it
   decides: the fast default of a prune); per-layer sensitivity and a filter gallery show what each filter does.
3. **Prune** greedily in **clusters sized to the hardware** (8 channels on the NCS2), with short fine-tuning
   between steps, in the background: live progress, ETA, cancel at any time.
4. **Review** the accuracy / cost trade-off of every step and pick the smallest model within your accuracy budget.
5. **Export** OpenVINO IR (FP16) + ONNX, checked for the NCS2 and verified on real images, bundled with the
   original model as fallback.
"""
    )
    st.caption("Everything stays on this machine: runs are kept in the workspace folder and survive an app restart.")


def sample_start() -> None:
    """One click to a loaded sample: choose it, see its figures, load it, and go on to Analyse or Prune."""
    with st.container(border=True):
        st.subheader("Start with the sample")
        names = sample_names()
        sample = st.selectbox("Bundled sample", names, index=names.index(DEFAULT_SAMPLE) if DEFAULT_SAMPLE in names else 0,
                              format_func=lambda n: f"{n} ({sample_entry(n)['dataset']})", key="home_sample")
        entry = sample_entry(sample)
        st.caption(f"{entry['architecture']}, {format_pct(entry['accuracy'])} accuracy, "
                   f"{format_macs(entry['macs'])} MACs. {entry['dataset_description']}")
        action_button(st, "Load the sample", load_sample, sample, type="primary", icon=":material/play_arrow:",
                      key="home_start", width="stretch")
        if st.session_state.get("sample_error"):
            st.error(st.session_state["sample_error"])
        if state.ready and state.sample == sample:
            st.success(f"Loaded **{sample}**: {format_pct(state.baseline['metric'])} on "
                       f"{len(state.data.val)} selection images. Next: analyse its filters or prune it.")
            c1, c2 = st.columns(2)
            with c1:
                page_link("analyse", "Analyse")
            with c2:
                page_link("prune", "Prune")


def model_card() -> None:
    """The loaded model with its baseline figures, or a link to Load."""
    with st.container(border=True):
        st.markdown("**Model**")
        if state.model is None:
            st.markdown("No model loaded.")
            page_link("load", "Load a model")
        else:
            b = state.baseline or {}
            st.markdown(f"{state.model_label}  \n{task_ui(state.task).model_shape(state)}")
            if b:
                st.markdown(f"{metric_name(state.task)} **{format_pct(b['metric'])}** · "
                            f"MACs **{format_macs(b['macs'])}** · params **{format_params(b['params'])}**")


def data_card() -> None:
    """The loaded data set with its split, or a link to Load."""
    with st.container(border=True):
        st.markdown("**Data**")
        if state.data is None:
            st.markdown("No data set loaded.")
            page_link("load", "Load a data set")
        else:
            test = getattr(state.data, "test", None)  # a detection set has train and validation images only
            st.markdown(f"{state.data_label}  \n{len(state.data.train)} train / {len(state.data.val)} selection"
                        + (f" / {len(test)} test" if test is not None else "")
                        + f" images, {len(state.data.class_names)} classes")


def run_card() -> None:
    """The pruning run: the one in progress, this session's last one, or a link to Prune."""
    with st.container(border=True):
        st.markdown("**Pruning run**")
        active = registry.active("prune")
        if active:
            snap = active[0].snapshot()
            st.markdown(f"{state_badge(snap.state)} {snap.run_dir.name if snap.run_dir else ''}  \n"
                        f"{int(snap.progress * 100)} % · {snap.message} · {format_seconds(snap.elapsed)} elapsed")
            page_link("prune", "Watch it")
        elif state.run_dir:
            st.markdown(f"Current run: `{Path(state.run_dir).name}`")
            if run_reviewable(state.run_dir):
                page_link("review", "Review it")
        else:
            st.markdown("No run in this session yet.")
            page_link("prune", "Prune")


def workspace_runs(runs: list[dict]) -> None:
    """The workspace's runs (the newest 20), damaged ones with their reason, interrupted ones flagged."""
    damaged_runs_notice()  # a damaged run is listed with its reason, never fatal to the page (issue 28)
    if not runs:
        st.caption("No runs yet. Runs you start on the Prune page are listed here, also after an app restart.")
        return
    rows = [{"run": r["name"], "state": r["state"], "steps": r["steps"], "model": r["run"].model_label,
             "criterion": r["criterion"], "data": r["run"].data_label, "created": started_at(r["created"])}
            for r in runs[:20]]
    st.dataframe(rows, hide_index=True, width="stretch")
    interrupted = [r for r in runs if r["state"] == "interrupted"]
    if interrupted:
        st.warning(f"{len(interrupted)} run(s) were interrupted (the app stopped while they ran); their completed "
                   "steps are kept and can be reviewed and exported.", icon=":material/warning:")
    page_link("review", "Review runs")


state = setup_page("PruneScope", "Structured compression of CNNs for edge hardware: find the filters that matter, "
                   "remove the rest in hardware-sized clusters, and export for the Intel NCS2 with the original as fail-safe.")
registry = get_registry()
intro, start = st.columns([3, 2], gap="large")
with intro:
    how_it_works()
with start:
    sample_start()
st.divider()
st.subheader("At a glance")
col_model, col_data, col_run = st.columns(3, gap="medium")
with col_model:
    model_card()
with col_data:
    data_card()
with col_run:
    run_card()
runs = past_runs(registry)
st.subheader("Runs in the workspace")
workspace_runs(runs)
