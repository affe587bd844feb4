"""Review: the trade-off of every step, a threshold that picks the smallest model within it, widths,
removed filters, per-class change, and a comparison of runs."""
from __future__ import annotations

import streamlit as st

from core import visualize as V
from core.jobs import past_runs
from core.prune import read_structure
from core.groups import removal_label
from core.runs import Run, removals
from ui.common import (change, format_macs, format_ms, format_params, format_pct, metrics_row, page_link, pick_run,
                       setup_page, started_at, state_badge, threshold_pick)
from ui.review import compare_steps, control_line, drop_text, drops_line, latency_text, no_kept_step_panel, pooled_line
from ui.state import get_registry
from ui.tasks import task_ui


def run_header() -> None:
    """The run in one line (model, data, metric, settings, start) and its state: interrupted, still running,
    or how it ended."""
    st.markdown(f"{state_badge(entry['state'])} **{run.model_label}** on `{run.data_label}` · metric **{metric}** · "
                f"criterion **{prune_cfg.get('criterion')}**, cluster **{prune_cfg.get('cluster')}**, budget "
                f"**{prune_cfg.get('max_drop')} points** · started {started_at(entry['created'])}")
    if entry["state"] == "interrupted":
        st.warning("This run was interrupted (the app stopped while it ran). Its completed steps are intact and can "
                   "be reviewed and exported.", icon=":material/warning:")
    elif entry["state"] in ("running", "cancelling"):
        st.info("This run is still going: the page shows the steps completed so far.", icon=":material/hourglass_top:")
        st.button("Refresh", key="rv_refresh", icon=":material/refresh:")
    elif entry["message"] and entry["state"] in ("done", "cancelled", "failed"):
        st.caption(f"Status: {entry['message']}")


def stop_without_steps() -> None:
    """End the page when there is no pruned step to review: a finished run that kept none says why and what
    to change; a run without a second step says so."""
    if hist and entry["state"] not in ("running", "cancelling") and not any(removals(r) for r in hist[1:]):
        no_kept_step_panel(run)  # a finished run without a pruning step: why, and what to change
        st.stop()
    if len(hist) < 2:
        st.info("No pruning step has completed in this run yet." if hist else "This run has no measured step.",
                icon=":material/info:")
        st.stop()


def pick_summary() -> None:
    """The picked step within the threshold: its figures against the original, its drops, the control, a
    recovery it came from, and the way to Export."""
    with st.container(border=True):
        if pick["step"] == 0:
            st.markdown(f"No pruned step stays within **{thr:.1f} points**: the original is the pick.")
        else:
            st.markdown(f"**Step {pick['step']}** is the smallest model within **{thr:.1f} points**: "
                        f"{format_pct(pick['metric'])} {metric} ({change(pick['metric'], base['metric'], 'points')}), "
                        f"{format_macs(pick['macs'])} MACs ({change(pick['macs'], base['macs'])}), "
                        f"{format_params(pick['params'])} parameters ({change(pick['params'], base['params'])}).")
        if pick["step"]:
            st.markdown(drops_line(pick, metric))
            control_line(run, hist, pick)
        pooled_line(hist, thr)
        if pick.get("recovered_from") is not None:
            st.caption(f"Step {pick['step']} is step {pick['recovered_from']} after a recovery fine-tune of "
                       f"{pick['recovery']['epochs']} epoch(s){' with KD' if pick['recovery'].get('kd') else ''}.")
        metrics_row(pick, base if pick["step"] else None, metric=metric)
        page_link("export", f"Go to Export with step {pick['step']} chosen")  # the Export page exports it on a click


def tradeoff_charts() -> None:
    """Every step on the metric / MACs and metric / latency curves, with the threshold and the pick."""
    tab_macs, tab_lat = st.tabs([f"{metric} vs MACs", f"{metric} vs latency"])
    with tab_macs:
        st.plotly_chart(V.fig_tradeoff({run.name: hist}, x="macs", threshold_points=thr, selected_step=pick["step"],
                                       metric=metric), key="rv_fig_macs")
    with tab_lat:
        if any(r.get("latency_ms") is not None for r in hist):
            st.plotly_chart(V.fig_tradeoff({run.name: hist}, x="latency_ms", threshold_points=thr,
                                           selected_step=pick["step"], metric=metric), key="rv_fig_latency")
            st.caption("Latency: OpenVINO CPU runtime, batch 1, median per step (steps timed minutes apart, under "
                       "whatever else ran: compare two steps below, or export, for a difference beyond the noise). "
                       f"Picked step: {latency_text(pick)}.")
        else:
            st.info("Latency was not measured in this run (switch it on in the Prune settings).")


def widths_and_classes() -> None:
    """Layer widths of the pick against the original, and the per-class change (AP per class for a detector)."""
    c1, c2 = st.columns(2)
    with c1:
        st.plotly_chart(V.fig_widths(base["widths"], pick["widths"]), key="rv_fig_widths")
    with c2:
        task_ui(run.task).per_class_view(base, pick)


def removed_filters() -> None:
    """What pruning left alone and why, one row per removed cluster up to the pick, and the removed filters
    themselves (a detector: its boxes before and after)."""
    structure = read_structure(run.dir)
    for note in structure["notes"]:
        st.caption(note)
    if structure["left_alone"]:
        with st.expander(f"{len(structure['left_alone'])} layer group(s) left alone", icon=":material/block:"):
            st.markdown("\n".join(f"- **{root}**: {why}" for root, why in structure["left_alone"].items()))
    # one row per removed cluster (a multi-cluster step has several, each with the step's figures after it)
    removed = [(r, rem) for r in hist[1:] if r["step"] <= pick["step"] for rem in removals(r)]
    car_groups = (run.car or {}).get("groups")
    if not removed:
        st.caption("Nothing removed at this threshold.")
    else:
        st.dataframe([{"step": r["step"], "layer": removal_label(rem, car_groups),
                       "filters removed": len(rem["filters"]),
                       "width": f"{rem['width_before']} → {rem['width_after']}",
                       f"{metric} after": format_pct(r["metric"]), "drop (selection, 95 % CI)": drop_text(r),
                       "test drop (95 % CI)": drop_text(r, "test"), "MACs after": format_macs(r["macs"]),
                       "latency after": format_ms(r.get("latency_ms"))} for r, rem in removed],
                     hide_index=True, width="stretch")
    task_ui(run.task).removed_filters_view(run, sel, pick, removed, car_groups)  # a gallery, or boxes before/after


def compare_runs() -> None:
    """This run's curve and pick against other runs of the same task, each picked within the same drop."""
    others = [n for n in names if n != sel and by_name[n]["steps"] >= 1 and by_name[n]["run"].task == run.task]
    if not others:
        st.caption("Start another run (e.g. another criterion or cluster size) to compare it here.")
        return
    chosen = st.multiselect("Runs to compare with this one", others, default=others[: min(2, len(others))],
                            key="rv_compare")
    if not chosen:
        return
    histories = {sel: hist}
    for n in chosen:
        histories[n] = by_name[n]["run"].history
    st.plotly_chart(V.fig_tradeoff(histories, x="macs", threshold_points=thr, baseline_metric=base["metric"],
                                   selected_step=(sel, pick["step"]), metric=metric), key="rv_fig_compare")
    rows = []
    for n, h in histories.items():
        p = V.pick_smallest_within(h, thr)
        cfg = by_name[n]["run"].config.get("prune") or {}
        rows.append({"run": n, "criterion": cfg.get("criterion"), "cluster": cfg.get("cluster"),
                     "steps": len(h) - 1, f"pick within {thr:.1f} pts": p["step"],
                     metric: format_pct(p["metric"]), "MACs": format_macs(p["macs"]),
                     "MACs kept": f"{p['macs'] / h[0]['macs'] * 100:.0f} %", "latency": format_ms(p.get("latency_ms"))})
    st.dataframe(rows, hide_index=True, width="stretch")
    st.caption("Each run's pick is the smallest of its steps within the same drop, measured against its own original.")


state = setup_page("Review", "Every step of a run on the metric / cost curve. Set how much of the metric you can give "
                   "up: the smallest model within it is picked for export.")
registry = get_registry()
runs = [r for r in past_runs(registry)]
entry = pick_run(state, runs, "**No pruning run yet.** Start one on the Prune page; every run is kept in the "
                 "workspace.", key="rv_run")
by_name = {r["name"]: r for r in runs}
names, sel = list(by_name), entry["name"]
run: Run = entry["run"]
hist = run.history
prune_cfg = run.config.get("prune") or {}
metric = run.metric_name
run_header()
stop_without_steps()
base = hist[0]
thr, pick = threshold_pick(state, run, hist, prune_cfg, sel, metric)
st.caption(f"The run decided its steps on the selection images (drop {drop_text(pick)}, biased by those decisions); "
           f"the pick must also hold on the test images, the figure to claim: {drop_text(pick, 'test')}.")
pick_summary()
tradeoff_charts()
widths_and_classes()
st.subheader("Removed filters")
removed_filters()
task_ui(run.task).recovery_section(run, hist, pick)
st.subheader("Compare two steps")
compare_steps({n: by_name[n]["run"] for n in names if by_name[n]["run"].task == run.task and by_name[n]["run"].history},
              sel, pick["step"], metric)
st.subheader("Compare runs")
compare_runs()
