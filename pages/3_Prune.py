"""Prune: settings, Start / Cancel, and the live progress of the background pruning job (either task)."""
from __future__ import annotations

import shutil
from pathlib import Path

import streamlit as st

from core import criteria
from core import visualize as V
from core.clusters import latency_staircase
from core.tasks.detection.prune import DetectionPruneConfig
from core.errors import PruneScopeError
from core.groups import removal_label
from core.runs import removals, reviewable, run_reviewable
from core.jobs import JobAlreadyRunning, detection_prune_job, prune_job, reusable_car
from core.prune import PruneConfig
from core.workspace import new_run_dir
from ui.common import (format_macs, format_pct, hardware_profile_picker, job_progress, metric_name, metrics_row,
                       need_model, page_link, prune_outcome, setup_page, start_cancel_buttons, state_badge)
from ui.workers import recovery_toggle, work_picker
from ui.prune import (car_method_picker, device_picker, estimate_panel, plan_editor, resolution_note,
                      settings_text, time_budget_input)
from ui.state import get_registry, private_copy

# What differs per task on this page: the config class (its defaults are the one place for them), the widget key
# prefix (each task keeps its own settings) and the ranges of two sliders.
TASK_SETTINGS = {
    "classification": {"config": PruneConfig, "prefix": "pr", "images": ("Images for scoring", 50, 1000, 50),
                       "steps": 100},
    "detection": {"config": DetectionPruneConfig, "prefix": "det_pr", "images": ("Images for screening", 16, 512, 16),
                  "steps": 50},
}


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


def job_function(config, run_dir: Path):
    """The task's pruning job on a private copy of the session's model."""
    if state.task == "detection":
        return detection_prune_job(state.model, state.model_info, state.data, config, run_dir)
    return prune_job(private_copy(state.model), state.data, config, run_dir, data_source=state.data_source,
                     original_bytes=state.model_bytes, car=state.car)


def run_name() -> str:
    return state.model.config["arch"] if state.task == "detection" else state.model.spec.arch.replace("pickled:", "")


def start_prune(config) -> None:
    st.session_state.pop("prune_error", None)
    running_now = registry.active("prune")
    if running_now:  # starting twice attaches to the running job
        st.session_state["prune_job_id"] = running_now[0].id
        return
    run_dir = None
    try:
        config.validate()
        run_dir = new_run_dir(run_name())
        j = registry.start("prune", job_function(config, run_dir), run_dir=run_dir, total_steps=config.max_steps + 1,
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


def car_reuse_note(config) -> None:
    """Before Start: whether the run will reuse the finished CAR analysis of the Analyse page, and why not."""
    if state.task != "classification" or not config.analyse_car:
        return
    reuse, why = reusable_car(state.car, state.model.model, state.data.val, config)
    st.caption(f"CAR analysis of the original: the finished analysis will be reused ({why})." if reuse else
               f"CAR analysis of the original: computed by the run ({why}).")



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
    usable = True
    if state.task == "classification":
        usable = classification_settings(defaults, cluster, max_drop, extra)
    config = Config(criterion=criterion, cluster=cluster, max_drop=float(max_drop),
                    mac_target=None if mac_target is None else mac_target / 100, **budget, **extra)
    car_reuse_note(config)
    if state.task == "classification":
        with st.expander("How long will it take?", icon=":material/timer:"):
            estimate_panel(state, config, running)
    if not usable:
        config = None
    if state.task == "classification":
        with st.expander("Latency staircase: why clusters", icon=":material/stairs:"):
            staircase_panel()
    return config


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
    if state.task == "classification":
        extra["time_budget"] = time_budget_input(running)
        extra["recover_epochs"] = st.slider(
            "Recovery when stalled (epochs)", 0, 10, defaults.recover_epochs, key="pr_recover_epochs",
            disabled=running, help="When no cluster fits the threshold, this many passes of the training "
                                   "images (distilled from the original) become a step and the run goes "
                                   "on from it; 0 stops there. Also once at the MAC target.")
        extra["control"] = st.toggle(
            "Control: the original given the same training", value=defaults.control, key="pr_control",
            disabled=running, help="Fine-tuning on your images also adapts a model to them; the original "
                                   "given the same fine-tuning and recoveries shows how much of a step's "
                                   "figure is that adaptation, not pruning.")
    latency = st.toggle("Measure OpenVINO latency every step", value=defaults.latency, key=f"{p}_latency",
                        disabled=running)
    analyse = defaults.analyse_car
    if state.task == "classification":
        analyse = st.toggle("Store a CAR analysis of the original in the run", value=defaults.analyse_car,
                            key="pr_analyse", disabled=running,
                            help="Shown with the removed filters on Review. A finished analysis of the "
                                 "Analyse page with the same model, images and settings is reused; "
                                 "otherwise it is computed first.")
    return {"finetune_steps": int(finetune_steps), "score_images": int(score_images), "max_steps": int(max_steps),
            "clusters_per_step": int(clusters_per_step), "latency": latency, "analyse_car": analyse}


def classification_settings(defaults, cluster, max_drop, extra: dict) -> bool:
    """A classifier's CAR method, device, Ray workers, resolution note and per-layer plan (into ``extra``);
    returns whether the chosen device and workers can be used."""
    c1, c2 = st.columns(2, gap="large")
    with c1:
        extra["car"] = car_method_picker(defaults.car, running)
    with c2:
        extra["device"], usable = device_picker(defaults.device, running)
    work, work_ok = work_picker("pr", running)
    extra["ray_address"], extra["ray_workers"] = work.address, work.workers
    extra["ray_recovery"] = recovery_toggle("pr", running, work)
    usable = usable and work_ok
    resolution_note(state, float(max_drop))
    with st.expander("Per-layer control: exclude groups, cap their cut", icon=":material/tune:"):
        extra["plan"] = plan_editor(state, cluster, float(max_drop), running)
    return usable


def staircase_panel() -> None:
    """Measure (on demand) and show the latency staircase of one 3x3 convolution: why clusters."""
    st.markdown("Latency on vector hardware moves in steps of channel count, not smoothly: removing "
                "filters pays only when a layer drops to the next multiple of the hardware's width. "
                "Measure the staircase of one 3×3 convolution on this CPU's OpenVINO runtime:")
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
        st.caption(f"Measured step: **{sc.cluster} channels** (confidence {sc.confidence:.2f}). "
                   f"{sc.method} Choose 'custom cluster size' above to use it.")


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
task = TASK_SETTINGS[state.task]
metric = metric_name(state.task)
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
    run_task = s.meta.get("task", "classification")
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
    run_task = s.meta.get("task", "classification")
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
