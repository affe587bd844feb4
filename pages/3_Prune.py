"""Prune: settings, Start / Cancel, and the live progress of the background pruning job (either task)."""
from __future__ import annotations

import shutil
from pathlib import Path

import streamlit as st

from core import criteria
from core import visualize as V
from core.errors import PruneScopeError
from core.groups import removal_label
from core.runs import removals, reviewable, run_reviewable
from core.jobs import JobAlreadyRunning
from core.workspace import new_run_dir
from ui.common import (format_macs, format_pct, hardware_profile_picker, job_progress, metrics_row, need_model,
                       page_link, prune_outcome, setup_page, start_cancel_buttons, state_badge)
from ui.prune import settings_text
from ui.state import get_registry
from ui.tasks import DEFAULT_TASK, metric_name, task_ui


def attach_prune_job():
    """The pruning job this tab shows: the running one (re-attached after a reload; there is at most one at a
    time), else the job of this session's last run; None when there is neither."""
    active = registry.active("prune")
    if active:  # re-attach (e.g. after a reload): there is at most one pruning job at a time
        st.session_state["prune_job_id"] = active[0].id
    elif "prune_job_id" not in st.session_state and state.run_dir:  # a reload after the run ended: its job
        ended = registry.for_run(state.run_dir)
        if ended is not None:
            st.session_state["prune_job_id"] = ended.id
    return registry.get(st.session_state.get("prune_job_id"))


def start_prune(config) -> None:
    st.session_state.pop("prune_error", None)
    running_now = registry.active("prune")
    if running_now:  # starting twice attaches to the running job
        st.session_state["prune_job_id"] = running_now[0].id
        return
    run_dir = None
    try:
        config.validate()
        run_dir = new_run_dir(plugin.run_name(state))
        j = registry.start("prune", plugin.prune_job(state, config, run_dir), run_dir=run_dir,
                           total_steps=config.max_steps + 1,
                           meta={"max_drop": config.max_drop, "max_steps": config.max_steps, "model": state.model_label,
                                 "task": state.task, "settings": settings_text(config)})
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
def prune_settings() -> None:
    """The settings box with Start / Cancel; without a model in this tab, a pointer to Load instead."""
    settings = st.container(border=True)
    with settings:
        if not state.ready:
            st.info("This tab has no model loaded; the pruning job is shown below. "
                    "Load a model to start another run.")
            page_link("load", "Go to Load")
            config = None
        else:
            config = settings_form()
        start_cancel_buttons(running, config, start_prune, cancel_prune)


def settings_form():
    """The task's settings as a config (None when the chosen device or workers cannot be used)."""
    Config, p = task["config"], task["prefix"]
    defaults = Config.app_defaults()  # one place: the task's config class
    b = state.baseline or {}
    st.markdown(f"**{state.model_label}** · baseline {metric} {format_pct(b.get('metric'))}, "
                f"{format_macs(b.get('macs'))} MACs")
    c1, c2, c3 = st.columns(3, gap="large")
    extra = {}
    with c1:
        criterion, max_drop, mac_target = threshold_settings(Config, defaults, p)
    with c2:
        cluster = hardware_profile_picker(p, running)
    with c3:
        budget = budget_settings(defaults, p, extra)
    usable = plugin.extra_settings(state, defaults, cluster, max_drop, extra, running)
    config = Config(criterion=criterion, cluster=cluster, max_drop=float(max_drop),
                    mac_target=None if mac_target is None else mac_target / 100, **budget, **extra)
    plugin.config_panels(state, config, running)  # e.g. the reuse of the analysis, the time estimate
    return config if usable else None


def threshold_settings(Config, defaults, p: str) -> tuple:
    """Criterion, acceptable drop and the optional MAC target: what is ranked and where the run stops."""
    choices = criteria.names(Config.task)
    criterion = st.selectbox("Criterion", choices, index=choices.index(defaults.criterion),
                             format_func=criteria.label, key=f"{p}_criterion", disabled=running,
                             help=f"How filters are ranked. CAR measures each candidate cluster's real "
                                  f"{metric} loss; the others are cheaper proxies, for comparison.")
    max_drop = st.slider(f"Acceptable {metric} drop (points)", 0.0, 10.0, defaults.max_drop, step=0.1,
                         key=f"{p}_max_drop", disabled=running,
                         help="A step that would lose more than this (against the original) is undone; "
                              "the run stops when no cluster fits.")
    mac_on = st.toggle("Stop at a MAC target", value=False, key=f"{p}_mac_on", disabled=running)
    mac_target = st.slider("MAC target (% of the original)", 10, 95, 50, step=5, key=f"{p}_mac_target",
                           disabled=running or not mac_on) if mac_on else None
    return criterion, max_drop, mac_target


def budget_settings(defaults, p: str, extra: dict) -> dict:
    """What each step may spend (fine-tuning, images, steps, clusters, latency, recovery, control, CAR analysis):
    the config's budget fields; the classification-only ones go into ``extra``."""
    finetune_steps = st.slider("Fine-tune budget (mini-batches per step)", 0, 200, defaults.finetune_steps,
                               step=5, key=f"{p}_finetune", disabled=running)
    label, low, high, step = task["images"]
    score_images = st.slider(label, low, high, defaults.score_images, step=step, key=f"{p}_score_images",
                             disabled=running)
    max_steps = st.slider("Step limit", 1, max(task["steps"], defaults.max_steps), defaults.max_steps,
                          key=f"{p}_max_steps", disabled=running)
    clusters_per_step = st.slider("Clusters per step", 1, 8, defaults.clusters_per_step,
                                  key=f"{p}_clusters_per_step", disabled=running,
                                  help="The best-ranked clusters removed together, with one fine-tuning and "
                                       "one measurement: fewer, faster steps on deep networks. When they "
                                       "break the threshold together, the step takes one and later steps "
                                       "try half as many.")
    plugin.budget_extras(defaults, extra, running)
    latency = st.toggle("Measure OpenVINO latency every step", value=defaults.latency, key=f"{p}_latency",
                        disabled=running)
    analyse = plugin.analyse_car_setting(defaults, running)
    return {"finetune_steps": int(finetune_steps), "score_images": int(score_images), "max_steps": int(max_steps),
            "clusters_per_step": int(clusters_per_step), "latency": latency, "analyse_car": analyse}


# ----------------------------------------------------------------------------- live progress
def step_text(r: dict | None, metric_label: str) -> str:
    if not r:
        return "measuring the original model"
    if r["step"] == 0:
        return "step 0 (the original) measured"
    removed = ", ".join(f"{len(rem.get('filters', []))} filters from `{removal_label(rem)}` "
                        f"({rem.get('width_before')} → {rem.get('width_after')})" for rem in removals(r))
    return (f"step {r['step']}: removed {removed or 'nothing'}, {metric_label} "
            f"{format_pct(r.get('metric'))}, "
            f"MACs {format_macs(r['macs'])}")


def no_job_note() -> None:
    """Without a job in the registry: this session's last run (the job list was reset), else how to start."""
    if state.run_dir and Path(state.run_dir).exists():
        st.caption(f"Last run of this session: `{Path(state.run_dir).name}`. The job list was reset (app restart).")
        if run_reviewable(state.run_dir):
            page_link("review", "Review it")
    else:
        st.info("Choose the settings and press **Start pruning**. Each step screens every cluster, measures the exact "
                f"{metric} of the best few, removes one, fine-tunes and measures again.", icon=":material/info:")


state = setup_page("Prune", "Greedy cluster pruning: each step removes the cheapest cluster of filters (metric lost "
                   "per MAC saved), fine-tunes briefly and measures. Runs in the background; cancel at any time.")
registry = get_registry()
job = attach_prune_job()
running = job is not None and job.running
if job is None and not state.ready:
    need_model(state, "pruning")
plugin = task_ui(state.task)
task = plugin.PRUNE_SETTINGS
metric = plugin.METRIC
prune_settings()


def job_snapshot():
    """The page's prune job as it stands now, or None when the registry no longer has it."""
    j = registry.get(job.id) if job is not None else None
    return j.snapshot() if j is not None else None


@st.fragment(run_every=1.0 if running else None)
def live() -> None:
    s = job_snapshot()
    if s is None:
        return
    if not s.running and running:
        st.rerun()  # finished since the page was drawn: full redraw with the result
    st.subheader("Progress" if s.running else "Last run")
    name = s.run_dir.name if s.run_dir else s.id
    st.markdown(f"Run `{name}` · {state_badge(s.state)}")
    run_task = s.meta.get("task", DEFAULT_TASK)
    if s.running:
        job_progress(s, "Pruning")
        max_steps = s.meta.get("max_steps")
        on_original = (s.part or {}).get("phase", "").startswith("original") or "the original" in s.message
        current = 0 if (not s.steps or on_original) else len(s.steps)
        st.markdown(f"**Current step** {current} of at most {max_steps}"
                    + (" (0 = measuring and analysing the original)" if current == 0 else "")
                    + f" · last finished: {step_text(s.last_step, metric_name(run_task))}")
        st.caption("The bar counts steps up to the limit; the run stops earlier when no cluster fits the budget.")
        if s.meta.get("settings"):
            st.caption(f"This run's settings: {s.meta['settings']}.")
    for line in s.log:  # what the job decided, e.g. that it reused a finished CAR analysis
        st.caption(line)
    if not s.running:
        prune_outcome(s)
        if reviewable(s.steps):  # issue 16: a run cancelled before its first step has nothing to review
            page_link("review", "Review the run")


# The figures change once a step (tens of seconds apart), the progress every second: drawn by their own
# fragment every few seconds, they stop taking CPU from the job on a small machine (the two Plotly figures
# took 69 ms a redraw on the server for the cifar10 sample's run, 7 % of a core at one redraw a second,
# before the browser's own re-render of both).
CHART_REFRESH_S = 5.0


@st.fragment(run_every=CHART_REFRESH_S if running else None)
def live_charts() -> None:
    s = job_snapshot()
    if s is None or not s.steps:
        return
    name = s.run_dir.name if s.run_dir else s.id
    run_task = s.meta.get("task", DEFAULT_TASK)
    metrics_row(s.steps[-1], s.steps[0] if len(s.steps) > 1 else None, metric=metric_name(run_task))
    c1, c2 = st.columns(2)
    with c1:
        st.plotly_chart(V.fig_tradeoff({name: s.steps}, x="macs", threshold_points=s.meta.get("max_drop"),
                                       metric=metric_name(run_task)), key="pr_fig_tradeoff")
    with c2:
        st.plotly_chart(V.fig_progress(s.steps, metric=metric_name(run_task)), key="pr_fig_progress")


if job is not None:
    live()
    live_charts()
else:
    no_job_note()
