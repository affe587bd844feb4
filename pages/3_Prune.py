"""Prune: settings, Start / Cancel, and the live progress of the background pruning job."""
from __future__ import annotations

import shutil
from pathlib import Path

import streamlit as st

from core import visualize as V
from core.clusters import latency_staircase
from core.errors import PruneScopeError
from core.groups import removal_label
from core.jobs import JobAlreadyRunning, prune_job
from core import criteria
from core.prune import PruneConfig
from core.runs import reviewable, run_reviewable
from core.workspace import new_run_dir
from ui.common import (format_macs, format_pct, hardware_profile_picker, job_progress, metrics_row, need_model,
                       page_link, prune_outcome, setup_page, start_cancel_buttons, state_badge)
from ui.detection import detection_prune_page
from ui.state import get_registry, private_copy

DEFAULTS = PruneConfig.app_defaults()  # one place: core.prune.PruneConfig (APP_DEFAULTS over the class defaults)

state = setup_page("Prune", "Greedy cluster pruning: each step removes the cheapest cluster of filters (accuracy lost "
                   "per MAC saved), fine-tunes briefly and measures. Runs in the background; cancel at any time.")
if state.task == "detection":
    detection_prune_page(state)
    st.stop()
registry = get_registry()
active = registry.active("prune")
if active:  # re-attach (e.g. after a reload): there is at most one pruning job at a time
    st.session_state["prune_job_id"] = active[0].id
job = registry.get(st.session_state.get("prune_job_id"))
running = job is not None and job.running
if job is None and not state.ready:
    need_model(state, "pruning")


def start_prune(config: PruneConfig) -> None:
    st.session_state.pop("prune_error", None)
    running_now = registry.active("prune")
    if running_now:  # starting twice attaches to the running job
        st.session_state["prune_job_id"] = running_now[0].id
        return
    run_dir = None
    try:
        config.validate()
        run_dir = new_run_dir(state.model.spec.arch.replace("pickled:", ""))
        j = registry.start("prune", prune_job(private_copy(state.model), state.data, config, run_dir,
                                              data_source=state.data_source,
                                              original_bytes=state.model_bytes, car=state.car),
                           run_dir=run_dir, total_steps=config.max_steps + 1,
                           meta={"max_drop": config.max_drop, "max_steps": config.max_steps, "model": state.model_label})
    except JobAlreadyRunning as exc:  # another tab won the race: attach to its job
        shutil.rmtree(run_dir, ignore_errors=True)
        j = exc.job
    except PruneScopeError as exc:
        st.session_state["prune_error"] = str(exc)
        return
    st.session_state["prune_job_id"] = j.id
    state.run_dir = str(j.run_dir)
    state.export_step = None


def cancel_prune() -> None:
    for j in registry.active("prune"):
        j.request_cancel()


# ----------------------------------------------------------------------------- settings
settings = st.container(border=True)
with settings:
    if not state.ready:
        st.info("This tab has no model loaded (the page was reloaded); the pruning job is shown below. "
                "Load a model to start another run.")
        page_link("load", "Go to Load")
        config = None
    else:
        b = state.baseline or {}
        st.markdown(f"**{state.model_label}** · baseline {format_pct(b.get('accuracy'))}, "
                    f"{format_macs(b.get('macs'))} MACs")
        c1, c2, c3 = st.columns(3, gap="large")
        with c1:
            choices = criteria.names(PruneConfig.task)
            criterion = st.selectbox("Criterion", choices, index=choices.index(DEFAULTS.criterion),
                                     format_func=criteria.label, key="pr_criterion", disabled=running,
                                     help="How filters are ranked. CAR measures each candidate cluster's real "
                                          "accuracy loss; the others are cheaper proxies, for comparison.")
            max_drop = st.slider("Acceptable accuracy drop (points)", 0.0, 10.0, DEFAULTS.max_drop, step=0.1,
                                 key="pr_max_drop", disabled=running,
                                 help="A step that would lose more than this (against the original) is undone; "
                                      "the run stops when no cluster fits.")
            mac_on = st.toggle("Stop at a MAC target", value=False, key="pr_mac_on", disabled=running)
            mac_target = st.slider("MAC target (% of the original)", 10, 95, 50, step=5, key="pr_mac_target",
                                   disabled=running or not mac_on) if mac_on else None
        with c2:
            cluster = hardware_profile_picker("pr", running)
        with c3:
            finetune_steps = st.slider("Fine-tune budget (mini-batches per step)", 0, 200, DEFAULTS.finetune_steps,
                                       step=5, key="pr_finetune", disabled=running)
            score_images = st.slider("Images for scoring", 50, 1000, DEFAULTS.score_images, step=50,
                                     key="pr_score_images", disabled=running)
            max_steps = st.slider("Step limit", 1, 100, DEFAULTS.max_steps, key="pr_max_steps", disabled=running)
            latency = st.toggle("Measure OpenVINO latency every step", value=DEFAULTS.latency, key="pr_latency",
                                disabled=running)
            analyse = st.toggle("Store a CAR analysis of the original in the run", value=DEFAULTS.analyse_car,
                                key="pr_analyse", disabled=running,
                                help="Shown with the removed filters on Review. The Analyse page's result is "
                                     "reused when there is one; otherwise it is computed first.")
        config = PruneConfig(criterion=criterion, cluster=cluster, max_drop=float(max_drop),
                             mac_target=None if mac_target is None else mac_target / 100,
                             finetune_steps=int(finetune_steps), score_images=int(score_images),
                             max_steps=int(max_steps), latency=latency, analyse_car=analyse)
        with st.expander("Latency staircase: why clusters", icon=":material/stairs:"):
            st.markdown("Latency on vector hardware moves in steps of channel count, not smoothly: removing filters "
                        "pays only when a layer drops to the next multiple of the hardware's width. Measure the "
                        "staircase of one 3×3 convolution on this CPU's OpenVINO runtime:")
            if st.button("Measure the staircase", key="pr_measure", disabled=running, icon=":material/speed:"):
                with st.spinner("Timing one convolution at 8..128 output channels..."):
                    try:
                        st.session_state["pr_staircase"] = latency_staircase(runs=20)
                    except PruneScopeError as exc:
                        st.error(str(exc))
            sc = st.session_state.get("pr_staircase")
            if sc is not None:
                st.plotly_chart(V.fig_staircase(sc.channels, sc.latency_ms, sc.cluster, sc.latency_p25_ms,
                                                sc.latency_p75_ms), key="pr_fig_staircase")
                st.caption(f"Measured step: **{sc.cluster} channels** (confidence {sc.confidence:.2f}). {sc.method} "
                           "Choose 'custom cluster size' above to use it.")

    start_cancel_buttons(running, config, start_prune, cancel_prune)


# ----------------------------------------------------------------------------- live progress
def step_text(r: dict | None) -> str:
    if not r:
        return "measuring the original model"
    if r["step"] == 0:
        return "step 0 (the original) measured"
    rem = r.get("removed") or {}
    return (f"step {r['step']}: removed {len(rem.get('filters', []))} filters from `{removal_label(rem)}` "
            f"({rem.get('width_before')} → {rem.get('width_after')}), accuracy {format_pct(r['accuracy'])}, "
            f"MACs {format_macs(r['macs'])}")


@st.fragment(run_every=1.0 if running else None)
def live() -> None:
    j = registry.get(job.id) if job is not None else None
    if j is None:
        return
    s = j.snapshot()
    if not s.running and running:
        st.rerun()  # finished since the page was drawn: full redraw with the result
    st.subheader("Progress" if s.running else "Last run")
    name = s.run_dir.name if s.run_dir else s.id
    st.markdown(f"Run `{name}` · {state_badge(s.state)}")
    if s.running:
        job_progress(s, "Pruning")
        max_steps = s.meta.get("max_steps")
        current = 0 if (not s.steps or "the original" in s.message) else len(s.steps)
        st.markdown(f"**Current step** {current} of at most {max_steps}"
                    + (" (0 = measuring and analysing the original)" if current == 0 else "")
                    + f" · last finished: {step_text(s.last_step)}")
        st.caption("The ETA assumes every step up to the limit is taken; the run stops earlier when no cluster fits "
                   "the accuracy budget.")
    if not s.running:
        prune_outcome(s)
        if reviewable(s.steps):  # issue 16: a run cancelled before its first step has nothing to review
            page_link("review", "Review the run")
    if s.steps:
        metrics_row(s.steps[-1], s.steps[0] if len(s.steps) > 1 else None)
        c1, c2 = st.columns(2)
        with c1:
            st.plotly_chart(V.fig_tradeoff({name: s.steps}, x="macs", threshold_points=s.meta.get("max_drop")),
                            key="pr_fig_tradeoff")
        with c2:
            st.plotly_chart(V.fig_progress(s.steps), key="pr_fig_progress")


if job is not None:
    live()
elif state.run_dir and Path(state.run_dir).exists():
    st.caption(f"Last run of this session: `{Path(state.run_dir).name}`. The job list was reset (app restart).")
    if run_reviewable(state.run_dir):
        page_link("review", "Review it")
else:
    st.info("Choose the settings and press **Start pruning**. The defaults finish the bundled sample in about "
            "three minutes on a laptop.", icon=":material/info:")
