"""Widgets of the Prune page's classification settings: CAR method, device, the resolution warning, the
per-layer plan (excluded groups, caps, a plan seeded from the sensitivity curves) and the time estimate.

Each function lays out its widgets and returns what the run's ``PruneConfig`` takes; the work is in core
(:mod:`core.plan`, :mod:`core.estimate`, :mod:`core.device`, :mod:`core.stats`).
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict

import streamlit as st
import torch

from core import criteria
from core.car import CAR_METHODS
from core.device import DEVICES, describe, resolve_device
from core.engine import FINAL_STRETCH_EPOCHS, LAST_STRETCH_EPOCHS, RETRY_STRETCH_EPOCHS, STRETCH_EPOCHS
from core.errors import PruneScopeError
from core.plan import PrunePlan, plan_from_sensitivity
from core.training import PRECISIONS, resolve_precision
from ui.common import format_seconds, resolution_box
from ui.state import AppState, model_groups, prune_estimate

CAR_METHOD_HELP = {
    "fast": "fast: a first-order screen of every filter, then exact CAR only for the lowest-screened shortlist "
            "that can decide a cluster (results labelled screened / exact).",
    "exact": "exact: every filter removed and measured on the scoring images (slow on real models).",
}
DEVICE_LABELS = {"auto": "auto (CUDA when available)", "cpu": "CPU", "cuda": "CUDA GPU"}
CAPS_KEY, CAPS_VERSION, PLAN_NOTE = "pr_plan_caps", "pr_plan_version", "pr_plan_note"


def car_method_picker(default: str, running: bool) -> str:
    """The CAR method of the run's filter scoring, with what it means in one line."""
    method = st.radio("CAR scoring", list(CAR_METHODS), index=list(CAR_METHODS).index(default), horizontal=True,
                      key="pr_car", disabled=running)
    st.caption(CAR_METHOD_HELP.get(method, method))
    return method


def time_budget_input(running: bool) -> float | None:
    """The run's time budget in minutes (None: none): the run stops before a step would pass it."""
    minutes = st.number_input("Time budget (minutes, 0 = none)", min_value=0, max_value=24 * 60, value=0, step=5,
                              key="pr_time_budget", disabled=running,
                              help="The whole run, the last step's recovery and the control included, ends within this time; it keeps the finished steps.")
    return float(minutes) if minutes else None


PRECISION_LABELS = {"auto": "auto: bf16 where the hardware computes it", "fp32": "fp32",
                    "bf16": "bf16 mixed precision"}


def precision_picker(default: str, device: str, running: bool) -> str:
    """The arithmetic of fine-tuning, recoveries and the control (``core.training``), and the line saying what it
    is on the chosen device. Returns the setting."""
    precision = st.selectbox("Training precision", list(PRECISIONS), index=list(PRECISIONS).index(default),
                             key="pr_precision", format_func=PRECISION_LABELS.get, disabled=running,
                             help="bf16 mixed precision trained 1.5-1.7x as fast on our CPU with AVX512-BF16, to the "
                                  "same accuracy; every accuracy a decision or a report reads is measured in fp32.")
    try:
        st.caption(f"Training runs in **{resolve_precision(precision, resolve_device(device))}**.")
    except PruneScopeError:  # the device picker above says what is wrong with the device
        pass
    return precision


def device_picker(default: str, running: bool) -> tuple[str, bool]:
    """The device of scoring, fine-tuning and evaluation, and the line saying what will run the job.
    Returns (device setting, whether it is usable on this machine)."""
    device = st.selectbox("Device", list(DEVICES), index=list(DEVICES).index(default), key="pr_device",
                          format_func=DEVICE_LABELS.get, disabled=running)
    try:
        st.caption(f"The job runs on: **{describe(resolve_device(device), torch.get_num_threads())}**.")
        return device, True
    except PruneScopeError as exc:
        st.error(str(exc), icon=":material/error:")
        return device, False


def resolution_note(state: AppState, max_drop: float) -> None:
    """Before Start: a warning when the threshold is finer than the selection images resolve."""
    resolution_box(state, max_drop)  # with what helps (issue 27)


def seed_plan(state: AppState, points: float, cluster: int, roots: set[str]) -> None:
    """Button callback: exclusions and caps read off the finished analysis' sensitivity curves."""
    try:
        plan = plan_from_sensitivity(state.car, float(points), int(cluster))
    except PruneScopeError as exc:
        st.session_state[PLAN_NOTE] = ("error", str(exc))
        return
    st.session_state["pr_exclude"] = sorted(plan.exclude & roots)
    st.session_state[CAPS_KEY] = {r: f for r, f in plan.max_fraction.items() if r in roots}
    st.session_state[CAPS_VERSION] = st.session_state.get(CAPS_VERSION, 0) + 1  # a fresh editor shows the seed
    st.session_state[PLAN_NOTE] = ("info", f"Seeded from the sensitivity curves: {plan.source}; "
                                           f"{len(plan.exclude)} group(s) excluded, {len(plan.max_fraction)} capped.")


def plan_editor(state: AppState, cluster: int, max_drop: float, running: bool) -> dict | None:
    """Per-layer control: groups to exclude, a cap (largest fraction of its width) per group, and a seed from
    the finished CAR analysis. Returns the plan for ``PruneConfig.plan`` (None when it limits nothing)."""
    groups = model_groups(state.key, state.model)
    by_root = {g["root"]: g for g in groups}
    st.session_state["pr_exclude"] = [r for r in st.session_state.get("pr_exclude", []) if r in by_root]
    exclude = st.multiselect("Groups never to prune", list(by_root), key="pr_exclude", disabled=running,
                             format_func=lambda r: by_root[r]["label"])
    caps = st.session_state.get(CAPS_KEY) or {}
    rows = [{"group": g["label"], "width": g["width"], "max fraction": caps.get(g["root"])} for g in groups]
    edited = st.data_editor(
        rows, key=f"pr_caps_{st.session_state.get(CAPS_VERSION, 0)}", disabled=running or ["group", "width"],
        hide_index=True, width="stretch",
        column_config={"max fraction": st.column_config.NumberColumn(
            "max fraction", min_value=0.0, max_value=1.0, step=0.05, format="%.2f",
            help="The largest fraction of its original width this group may lose (empty: no cap).")})
    c1, c2 = st.columns([1, 2], vertical_alignment="bottom")
    has_curves = state.car is not None and bool(getattr(state.car, "sensitivity", None))
    points = c1.number_input("Largest cut per layer within (points)", 0.0, 50.0, float(max_drop), step=0.1,
                             key="pr_seed_points", disabled=running or not has_curves)
    c2.button("Seed from sensitivity", key="pr_seed", disabled=running or not has_curves, on_click=seed_plan,
              args=(state, points, cluster, set(by_root)), icon=":material/auto_fix_high:",
              help=None if has_curves else "Compute CAR with per-layer sensitivity on the Analyse page first.")
    note = st.session_state.get(PLAN_NOTE)
    if note:
        (st.error if note[0] == "error" else st.caption)(note[1])
    max_fraction = {g["root"]: float(r["max fraction"]) for g, r in zip(groups, edited)
                    if _number(r.get("max fraction")) is not None}
    plan = PrunePlan(exclude=set(exclude), max_fraction=max_fraction)
    if plan.empty:
        st.caption("No per-layer limits: every group may be pruned.")
        return None
    st.caption("Plan: " + "; ".join(plan.describe(groups)))
    return {"exclude": sorted(plan.exclude), "max_fraction": plan.max_fraction}


def _number(value) -> float | None:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(v) else v


def estimate_panel(state: AppState, config, running: bool) -> None:
    """The run's expected time from rates measured on this machine, on demand, cached per model + settings. A
    finished analysis the run will reuse is left out of it (issue 27: the estimate added it again). A classifier's
    panel (``ui.classification.config_panels``)."""
    from dataclasses import replace

    from core.jobs import reusable_car

    reused = bool(getattr(config, "analyse_car", False)) and \
        reusable_car(state.car, state.model.model, state.data.val, config)[0]
    config = replace(config, analyse_car=False) if reused else config
    settings = json.dumps(asdict(config), sort_keys=True, default=str)
    if st.button("Estimate the run's time", key="pr_estimate", disabled=running, icon=":material/timer:"):
        st.session_state["pr_estimate_for"] = (state.key, settings)
    if st.session_state.get("pr_estimate_for") != (state.key, settings):
        st.caption("The estimate times this model's work units (forward pass, fine-tuning step, filter removal, "
                   "OpenVINO inference) on this machine now; press the button after choosing the settings.")
        return
    try:
        est = prune_estimate(state.key, settings, state.model, len(state.data.val), config, len(state.data.train))
    except PruneScopeError as exc:
        st.error(str(exc), icon=":material/error:")
        return
    st.markdown(f"**Estimated time:** {format_seconds(est.seconds_low)} – {format_seconds(est.seconds_high)} "
                f"({est.steps_text()}), from rates measured on this machine.")
    st.dataframe([{"part": k, "low": format_seconds(v[0]), "high": format_seconds(v[1])}
                  for k, v in est.breakdown.items()], hide_index=True, width="stretch")
    if getattr(config, "time_budget", None):
        st.caption(budget_caption(config.time_budget, est.seconds_high))
        if est.budget_buys:
            st.markdown(budget_buys_text(config.time_budget, est.budget_buys, est.steps))
    if reused:
        st.caption("The finished analysis of the Analyse page will be reused: it is not part of this estimate.")
    st.caption("The threshold can stop a run earlier than either end; other work on the machine slows it.")


def budget_caption(minutes: float, seconds_high: float) -> str:
    """Whether the time budget caps the estimate (its slow end reaches it) or the whole run fits in it."""
    if seconds_high < minutes * 60.0 - 1e-6:
        return f"The whole run fits in the time budget ({minutes:g} min) at either end of the estimate."
    return (f"Capped at the time budget ({minutes:g} min): the run stops before a step would leave too little time "
            "for the last step's recovery and the control, and keeps the finished steps.")


def budget_buys_text(minutes: float, buys: dict, expected_steps: tuple[int, int] = (1, 1)) -> str:
    """'**What 30 min buys:** 9–14 steps, leaving 64%–49% of the original MACs …' from ``Estimate.budget_buys``:
    each range from its low to its high figure (the slow end can take more, smaller steps), one figure where both
    agree, and why no step where it buys none (``expected_steps``: ``Estimate.steps``, none when no group can lose a
    cluster)."""
    steps = sorted(b["steps"] for b in buys.values())
    if steps[-1] == 0:
        why = ("no group can lose a cluster of this size" if max(expected_steps) == 0 else
               "the analysis before the first step and the time kept for the last recovery and the control use it up")
        return f"**What {minutes:g} min buys:** no pruning step: {why}."
    left = [f"{f:.0%}" for f in sorted((b["mac_fraction"] for b in buys.values()), reverse=True)]
    step_range = f"{steps[0]}–{steps[-1]} steps" if steps[0] != steps[-1] else \
        f"{steps[0]} step{'s' if steps[0] != 1 else ''}"
    left_range = f"{left[0]}–{left[-1]}" if left[0] != left[-1] else left[0]
    return (f"**What {minutes:g} min buys:** {step_range}, leaving {left_range} of the original MACs (from every step "
            "needing a long recovery to none needing one; the threshold can stop the run sooner).")


def settings_text(config) -> str:
    """The settings a prune job runs with, in one line: after a tab reload the widgets show their
    defaults again, so the running job's own settings are shown beside its progress."""
    measured = criteria.get(config.criterion, config.task).measures_removals  # its removals measured by CAR
    parts = [f"criterion {config.criterion}" + (f" ({config.car} CAR)" if measured else ""),
             f"cluster {config.cluster}", f"max drop {config.max_drop:g} points",
             f"fine-tuning {config.finetune_steps} batches", f"{config.score_images} score images",
             f"step limit {config.max_steps}", f"device {config.device}",
             f"training precision {getattr(config, 'train_precision', 'fp32')}"]
    if config.mac_target:
        parts.append(f"MAC target {config.mac_target:g}")
    if getattr(config, "clusters_per_step", 1) > 1:
        parts.append(f"up to {config.clusters_per_step} clusters per step"
                     + (f" ({config.step_macs:.0%} of the MACs)" if getattr(config, "step_macs", None) else ""))
    if getattr(config, "recover_epochs", 0):
        parts.append(f"{config.recover_epochs}-epoch recoveries when stalled (at most {config.max_recoveries}) "
                     "and of the last step (only recovered steps ship)")
        if getattr(config, "stretch", False):
            parts.append(f"stretches of {config.stretch_macs:.0%} of the MACs past the threshold, kept when a "
                         f"recovery of {STRETCH_EPOCHS}x the epochs brings them back (up to "
                         f"{RETRY_STRETCH_EPOCHS * STRETCH_EPOCHS}x for a second try, "
                         f"{LAST_STRETCH_EPOCHS * STRETCH_EPOCHS}x for the last one the budget allows, at least "
                         f"{FINAL_STRETCH_EPOCHS * STRETCH_EPOCHS}x)")
    if getattr(config, "time_budget", None):
        parts.append(f"time budget {config.time_budget:g} min")
    if config.plan:
        parts.append("a per-layer plan")
    return " · ".join(parts)
