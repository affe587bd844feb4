"""Layout pieces every page uses: page set-up, empty states, number formats, job progress."""
from __future__ import annotations

import math
import time

import streamlit as st

from core.clusters import PROFILES, detect_cpu_profile
from core.jobs import JobSnapshot
from core.visualize import format_macs, format_pct  # noqa: F401  (re-exported for the pages)

from .state import AppState, get_state

# key -> (page file, title, icon); the app frame (streamlit_app.py) builds st.navigation from this, in this order
PAGES = {
    "home": ("pages/0_Home.py", "Home", ":material/home:"),
    "load": ("pages/1_Load.py", "Load", ":material/upload:"),
    "analyse": ("pages/2_Analyse.py", "Analyse", ":material/insights:"),
    "prune": ("pages/3_Prune.py", "Prune", ":material/content_cut:"),
    "review": ("pages/4_Review.py", "Review", ":material/fact_check:"),
    "export": ("pages/5_Export.py", "Export", ":material/deployed_code:"),
}
STATE_BADGES = {
    "running": ":blue-badge[running]", "cancelling": ":orange-badge[cancelling]", "done": ":green-badge[done]",
    "cancelled": ":gray-badge[cancelled]", "failed": ":red-badge[failed]", "interrupted": ":orange-badge[interrupted]",
    "unknown": ":gray-badge[unknown]",
}
JOB_LABELS = {"car": "CAR analysis", "detection-car": "CAR analysis", "prune": "Pruning", "export": "Export",
              "load": "Load and validate", "recovery": "Recovery fine-tune"}
# the page that shows a job kind's result or failure in full (the sidebar only points there)
JOB_PAGES = {"car": "Analyse", "detection-car": "Analyse", "prune": "Prune", "export": "Export", "load": "Load",
             "recovery": "Review"}
RECENT_JOB_S = 600  # a job that finished within this many seconds is still listed (as finished) in the sidebar


def navigation():
    """The app's pages for ``st.navigation`` (Home is the default page, at the app's root URL)."""
    return [st.Page(path, title=title, icon=icon, url_path=None if key == "home" else key, default=key == "home")
            for key, (path, title, icon) in PAGES.items()]


def setup_page(title: str, caption: str | None = None) -> AppState:
    """A page's title and caption; returns the session's state (the frame has set up the rest)."""
    st.title(title)
    if caption:
        st.caption(caption)
    return get_state()


def resolution_box(state: AppState, max_drop: float, lead: str = "") -> None:
    """The warning that a threshold is finer than the selection images resolve, with what helps
    (``core.advice.resolution_remedies``: more selection images from this upload, a coarser threshold, the
    time it costs); nothing when they resolve it."""
    from core.advice import resolution_remedies
    from core.stats import resolution_warning

    data, base = state.data, state.baseline or {}
    warning = resolution_warning(max_drop, len(data.val), base.get("metric"))
    if not warning:
        return
    total = len(data.train) + len(data.val) + len(data.test)
    layout = ("sample" if str(state.data_source or "").startswith("sample:") else
              "presplit" if getattr(data.report, "presplit", False) else "unsplit")
    remedies = resolution_remedies(max_drop, len(data.val), base.get("metric"), total,
                                   (data.split or {}).get("val_fraction"), layout, base.get("eval_seconds"))
    st.warning(lead + warning + ("\n\n**What helps**\n" + "\n".join(f"- {r}" for r in remedies) if remedies else ""),
               icon=":material/warning:")


def job_line(s: JobSnapshot) -> str:
    """One job in a line, from a snapshot: the same numbers the page's progress bar shows. A failure is not
    repeated here: its page shows it in full (and clears it once a later job of its kind works)."""
    label = JOB_LABELS.get(s.kind, s.kind)
    if s.running:
        return f"{label} job: {int(s.progress * 100)} % · {s.message}"
    if s.state == "failed":
        return f"{label} job failed ({format_seconds(s.elapsed)}): see the {JOB_PAGES.get(s.kind, s.kind)} page"
    return f"{label} job {s.state} ({format_seconds(s.elapsed)}): {s.message}"


def sidebar_shown(snaps: list[JobSnapshot], running_ids: tuple[str, ...], now: float) -> list[JobSnapshot]:
    """The jobs the sidebar lists, from snapshots newest first: every running one (and one that was running when
    the page was drawn), and of the jobs that ended within :data:`RECENT_JOB_S`, only the newest of each kind
    while none of that kind runs. Old failures do not pile up (issue 27): a later job of the same kind replaces
    its line, whether it worked or not."""
    shown = [s for s in snaps if s.running or s.id in running_ids]
    kinds = {s.kind for s in shown}
    for s in snaps:
        if s.kind in kinds:
            continue
        kinds.add(s.kind)  # only the newest finished job of a kind
        if s.finished and now - s.finished < RECENT_JOB_S:
            shown.append(s)
    return sorted(shown, key=lambda s: -s.started)


def sidebar_jobs(registry, running_ids: tuple[str, ...]) -> None:
    """Body of the sidebar's polling fragment: running jobs and those finished lately, read from the
    registry on every tick (as the page's own progress is). A job that was running when the page was
    drawn and has ended triggers a full rerun, so the page shows its result and polling stops."""
    shown = sidebar_shown([j.snapshot() for j in registry.list()], running_ids, time.time())
    for s in shown[:4]:
        st.caption(job_line(s))
    if any(s.id in running_ids and not s.running for s in shown):
        st.rerun()


def action_button(where, label: str, action, *args, **button_kwargs) -> None:
    """A button that runs ``action(*args)`` in the script run of its click, then draws the page again.

    Not ``on_click=action, args=...``: a callback gets the arguments of the run *before* the click, so a
    widget changed just before it (the change and the click reach the app in one request when the page
    is still busy) would be ignored: a CAR job started on 50 images with the slider showing 100 (found
    by the browser test). Here ``args`` were computed in this run, from the widgets' current values.
    ``where``: ``st`` or a container (a column); ``button_kwargs`` go to ``st.button``.
    """
    if where.button(label, **button_kwargs):
        action(*args)
        st.rerun()  # every part of the page (the sidebar too) shows what the action started


def page_link(page: str, label: str | None = None) -> None:
    path, name, icon = PAGES[page]
    st.page_link(path, label=label or name, icon=icon)


def need_model(state: AppState, what: str = "this step") -> None:
    """Stop the page with a clear next step when no model and data are loaded."""
    if state.ready:
        return
    first = "a data set" if state.model is not None else "a model"
    with st.container(border=True):
        st.info(f"**Load {first} first.** {what[0].upper() + what[1:]} needs a model and a data set: "
                "upload yours or take the bundled sample on the Load page.", icon=":material/info:")
        page_link("load", "Go to Load")
    st.stop()


def format_seconds(seconds: float | None) -> str:
    if seconds is None or (isinstance(seconds, float) and (math.isnan(seconds) or math.isinf(seconds))):
        return "—"
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds} s"
    m, s = divmod(seconds, 60)
    if m < 60:
        return f"{m} min {s:02d} s"
    h, m = divmod(m, 60)
    return f"{h} h {m:02d} min"


def format_params(n: float | int | None) -> str:
    if n is None:
        return "—"
    n = float(n)
    if n >= 1e6:
        return f"{n / 1e6:.2f} M"
    if n >= 1e3:
        return f"{n / 1e3:.1f} K"
    return f"{n:.0f}"


def format_ms(ms: float | None) -> str:
    return "—" if ms is None else f"{ms:.3f} ms" if ms < 1 else f"{ms:.2f} ms"


def change(new: float | None, old: float | None, kind: str = "relative") -> str | None:
    """A delta for st.metric: relative change in %, or accuracy points."""
    if new is None or old is None:
        return None
    if kind == "points":
        return f"{(new - old) * 100:+.2f} points"
    if not old:
        return None
    return f"{(new / old - 1) * 100:+.1f} %"


def state_badge(state: str) -> str:
    return STATE_BADGES.get(state, f":gray-badge[{state}]")


def metrics_row(record: dict, base: dict | None = None, metric: str = "Accuracy") -> None:
    """The task's metric, MACs, parameters and (when measured) latency of a step, with changes against ``base``.

    Records come from ``core.runs.Run`` (which reads old runs' ``accuracy`` as ``metric``), the engine or the
    measured baseline, so the metric is always under ``metric``."""
    b = base or {}
    cols = st.columns(4 if "latency_ms" in record else 3)
    cols[0].metric(metric, format_pct(record.get("metric")),
                   change(record.get("metric"), b.get("metric"), "points") if base else None)
    cols[1].metric("MACs", format_macs(record.get("macs")), change(record.get("macs"), b.get("macs")) if base else None,
                   delta_color="inverse")
    cols[2].metric("Parameters", format_params(record.get("params")),
                   change(record.get("params"), b.get("params")) if base else None, delta_color="inverse")
    if "latency_ms" in record:
        delta, colour = latency_delta(record, b) if base else (None, "off")
        cols[3].metric("Latency (OpenVINO CPU)", format_ms(record.get("latency_ms")), delta, delta_color=colour)


def latency_delta(record: dict, base: dict) -> tuple[str | None, str]:
    """The latency change of a step against ``base`` and its colour: coloured only when the two
    interquartile ranges do not overlap. Steps are timed minutes apart under whatever else runs, so a
    change inside the spread is shown as such, not as a gain or a loss (a 2-core machine showed
    '+30 %' for a smaller model)."""
    text = change(record.get("latency_ms"), base.get("latency_ms"))
    q = [record.get("latency_q1_ms"), record.get("latency_q3_ms"), base.get("latency_q1_ms"), base.get("latency_q3_ms")]
    if text is None or None in q:
        return text, "off"
    apart = q[0] > q[3] or q[1] < q[2]
    return (text, "inverse") if apart else (f"{text} (within the spread)", "off")


def target_panel(manifest: dict) -> None:
    """A bundle's export target and its verdict on both models (the same for every task): for the NCS2 the
    MYRIAD compiler's (stages, blob size, or the refused layer and the compiler's words), where the static
    op table disagrees, the FP16 range, the cross-check on the 2021.4 runtime; the static table as the
    explanation. Bundles written before targets existed show their static NCS2 check, said as such."""
    target = manifest.get("target")
    pruned, original = manifest["models"]["pruned"], manifest["models"]["original"]
    shape = "×".join(str(d) for d in manifest["input"]["input_shape"])
    if target is None:  # an older bundle: the static check was all there was
        target = {"name": "ncs2", "label": "Intel NCS2 (Myriad X)", "ready": manifest["ncs2"]["compatible"],
                  "proven": False, "verdict": "not verified by the NCS2 compiler (static check only): this bundle was "
                  "written before exports were compiled", "fallback_ready": original["ncs2"]["compatible"],
                  "fallback_verdict": "static check only"}
    st.markdown(f"**Target: {target['label']}** · input {shape}")
    ok = target["ready"]
    if ok and target.get("proven"):
        st.success(f"**Ready**: {target['verdict']}.", icon=":material/check_circle:")
    elif ok:
        st.warning(f"**Static check passed**, {target['verdict']}.", icon=":material/help:")
    else:
        st.error(f"{target['verdict']}. The bundle still works on a CPU; on the target deploy.py falls back to the "
                 "original.", icon=":material/error:")
    st.markdown(f"**Fallback (original)**: {'ready' if target.get('fallback_ready') else 'NOT ready'}: "
                f"{target.get('fallback_verdict')}.")
    section = pruned.get("target") or {}
    details = section.get("details") or {}
    if details.get("disagreement"):
        st.info(f"Static check and compiler disagree: {details['disagreement']}.", icon=":material/compare_arrows:")
    for ranged in details.get("fp16_range_problems") or []:
        st.caption(f"FP16 range: {ranged}")
    for key in ("cross_check_2021", "cpu_run"):
        if (details.get(key) or {}).get("message"):
            st.caption(f"Cross-check: {details[key]['message']}")
    static = details.get("static") or (pruned.get("ncs2") if "target" not in pruned else None)
    if static:
        with st.expander(f"Static NCS2 check (OpenVINO 2022.3 op table): "
                         f"{'no problem' if static['compatible'] else str(len(static['problems'])) + ' problem(s)'}"):
            for p in static["problems"][:20]:
                st.markdown(f"- layer `{p['layer']}` ({p['type']}, {p['version']}): {p['reason']}")
            for w in static.get("warnings", [])[:10]:
                st.caption(f"Warning: layer `{w['layer']}` ({w['type']}): {w['reason']}")
            st.dataframe([{"operation": k, "count": v} for k, v in sorted(static["ops"].items())], hide_index=True,
                         width="stretch")


def job_progress(snap: JobSnapshot, label: str) -> None:
    """Progress bar with the current message, elapsed time and ETA of a job snapshot. A job that knows its whole
    remaining time (a pruning run: ``core.eta.RunEta``) shows that one ETA, with the running part's own progress
    and rest beside it; other jobs show the running part's ETA, or the overall fraction's."""
    pct = int(round(snap.progress * 100))
    st.progress(min(max(snap.progress, 0.0), 1.0), text=f"{label}: {pct} % · {snap.message}")
    c1, c2, c3 = st.columns(3)
    c1.markdown(f"**State** {state_badge(snap.state)}")
    c2.markdown(f"**Elapsed** {format_seconds(snap.elapsed)}")
    eta = "not known yet (measuring the rate)" if snap.eta is None else format_seconds(snap.eta)
    part = snap.part
    if getattr(snap, "eta_kind", "") == "job":
        c3.markdown(f"**ETA of the whole job** {eta}")
        if part:
            rest = "" if part.get("eta_s") is None else f", about {format_seconds(part['eta_s'])} left in it"
            st.caption(f"Now: **{part['phase']}** · {part_count(part)} · {format_seconds(part['phase_elapsed_s'])} "
                       f"in this part{rest}. The whole job's ETA adds the parts still to come at the rates measured "
                       f"in this run ({snap.eta_basis or 'so far'}).")
    elif part:  # the ETA is the running part's, at the rate measured in that part
        c3.markdown(f"**ETA of this part** {eta}")
        st.caption(f"Now: **{part['phase']}** · {part_count(part)} · {format_seconds(part['phase_elapsed_s'])} "
                   "in this part. The ETA is this part's remaining work at the rate measured in it.")
    else:
        c3.markdown(f"**ETA** {eta}")


def part_count(part: dict) -> str:
    """'37 of 120' for a part counted in units, '31 %' for one reported as a fraction."""
    if part["total"] == 1:
        return f"{part['fraction'] * 100:.0f} %"
    return f"{part['done']:.0f} of {part['total']:.0f}"


def started_at(ts: float | None) -> str:
    return "—" if not ts else time.strftime("%Y-%m-%d %H:%M", time.localtime(ts))


def damaged_runs_notice() -> None:
    """The workspace's damaged runs (``core.runs.damaged_runs``), each with the reason it cannot be used: listed,
    never fatal to the page or to the other runs (issue 28). Nothing is shown when there are none."""
    from core.runs import damaged_runs

    damaged = damaged_runs()
    if not damaged:
        return
    lines = "\n".join(f"- `{d.name}` — damaged: {d.reason}" for d in damaged[:10])
    more = f"\n- … and {len(damaged) - 10} more" if len(damaged) > 10 else ""
    st.warning(f"**{len(damaged)} damaged run(s)** cannot be opened; the others are unaffected.\n{lines}{more}",
               icon=":material/report:")


def unverified_note(run) -> None:
    """A caption when ``run``'s files carry no sha256 to check (``core.runs.Run.unverified``): runs written
    before files were hashed are shown, but marked unverified."""
    note = run.unverified()
    if note:
        st.caption(f":material/gpp_maybe: {note}")


def pick_run(state: AppState, runs: list[dict], empty_message: str, key: str, where=st) -> dict:
    """The run picker of Review and Export: the damaged runs listed with their reason, an empty state when
    there is no usable run, else a select box defaulting to the current run, and the chosen run's
    'unverified' note when it has one. Returns the chosen entry of ``core.jobs.past_runs``."""
    damaged_runs_notice()
    if not runs:
        with st.container(border=True):
            st.info(empty_message, icon=":material/info:")
            page_link("prune", "Go to Prune")
        st.stop()
    by_name = {r["name"]: r for r in runs}
    names = list(by_name)
    current = next((n for n in names if state.run_dir and str(by_name[n]["dir"]) == str(state.run_dir)), names[0])
    sel = where.selectbox("Run", names, index=names.index(current), key=key,
                          format_func=lambda n: f"{n} · {by_name[n]['state']} · {by_name[n]['steps']} step(s)")
    unverified_note(by_name[sel]["run"])
    return by_name[sel]


def job_status(registry, kind: str, key: str, label: str, was_running: bool, what: str) -> None:
    """Body of a polling fragment: progress while the job runs, a full rerun the moment it finishes
    (so the page redraws with the results), its error or cancellation afterwards."""
    job = registry.latest(kind, key)
    if job is None:
        return
    s = job.snapshot()
    if s.running:
        job_progress(s, label)
    elif was_running:
        st.rerun()
    elif s.state == "failed":
        st.error(f"The {what} failed: {s.error}", icon=":material/error:")
    elif s.state == "cancelled":
        st.info(f"The {what} was cancelled.", icon=":material/info:")


def start_cancel_buttons(running: bool, config, start, cancel) -> None:
    """Start / Cancel of a pruning job, and the error the last start left."""
    b1, b2, _ = st.columns([1, 1, 4])
    action_button(b1, "Start pruning", start, config, type="primary", key="pr_start",
                  disabled=running or config is None, icon=":material/play_arrow:", width="stretch")
    b2.button("Cancel", key="pr_cancel", disabled=not running, on_click=cancel, icon=":material/stop:",
              width="stretch")
    if st.session_state.get("prune_error"):
        st.error(st.session_state["prune_error"], icon=":material/error:")


def prune_outcome(s) -> None:
    """How a finished pruning job ended (failed / done and why it stopped / cancelled). A run that kept no
    pruning step (a recovery of the original removes nothing) says why and what to change, as Review does."""
    from core.advice import run_advice
    from core.runs import Run, removals

    undone = {r.get("recovered_from") for r in s.steps if r.get("undone")}  # an undone stretch removed nothing kept
    kept = sum(1 for r in s.steps[1:] if removals(r) and r["step"] not in undone)
    extra = sum(1 for r in s.steps[1:] if r.get("recovered_from") is not None and not r.get("undone"))
    counted = f"{kept} pruning step(s) kept" + (f" (+{extra} recovery step(s))" if extra else "") \
        + (f"; {len(undone)} stretch(es) undone" if undone else "")
    if s.state == "failed":
        st.error(f"The run failed: {s.error}", icon=":material/error:")
    elif s.state == "done" and not kept and s.run_dir is not None and (advice := run_advice(Run(s.run_dir))):
        st.warning(f"Finished after {format_seconds(s.elapsed)}. {advice.headline}", icon=":material/block:")
        st.markdown("\n".join([*advice.why, *(f"- {c}" for c in advice.changes)]))
    elif s.state == "done":
        reason = Run(s.run_dir).status.get("message", "") if s.run_dir is not None else ""
        st.success(f"Finished after {format_seconds(s.elapsed)}: {counted}"
                   + (f"; stopped because {reason}" if reason else "") + ".", icon=":material/check_circle:")
    else:
        st.info(f"Cancelled after {format_seconds(s.elapsed)}; {counted}.", icon=":material/info:")


def threshold_pick(state, run, hist: list[dict], prune_cfg: dict, sel, metric: str = "accuracy"):
    """The threshold slider of a run and the smallest step within it, remembered for Export.

    Returns (threshold in points, the picked history record)."""
    from core import visualize as V

    base = hist[0]
    drops = [(base["metric"] - r["metric"]) * 100 for r in hist]  # ``Run.history``: always under ``metric``
    top = max(5.0, float(prune_cfg.get("max_drop") or 0), max(drops) + 0.5)
    default = state.max_drop if state.max_drop is not None and str(state.run_dir) == str(run.dir) else \
        float(prune_cfg.get("max_drop") or 1.0)
    thr = st.slider(f"Acceptable {metric} drop (points below the original)", 0.0, round(top, 1),
                    min(default, round(top, 1)), step=0.1, key=f"rv_thr_{sel}")
    pick = V.pick_smallest_within(hist, thr)
    state.max_drop, state.run_dir, state.export_step = thr, str(run.dir), pick["step"]
    return thr, pick


CUSTOM_PROFILE = "custom"


@st.cache_resource
def cpu_profile():
    return detect_cpu_profile()


def hardware_profile_picker(prefix: str, running: bool) -> int:
    """The hardware profile (or a custom cluster size) of a Prune view; returns the cluster size c.

    Widget keys: ``{prefix}_profile`` and ``{prefix}_cluster``; a measured latency staircase in
    ``st.session_state["pr_staircase"]`` is the custom size's default.
    """
    detected = cpu_profile()
    names = list(PROFILES) + [CUSTOM_PROFILE]
    profile = st.selectbox("Hardware profile", names, index=0, key=f"{prefix}_profile", disabled=running,
                           format_func=lambda n: "custom cluster size" if n == CUSTOM_PROFILE else PROFILES[n].label)
    if profile == CUSTOM_PROFILE:
        measured = st.session_state.get("pr_staircase")
        cluster = int(st.number_input("Cluster size (filters)", 1, 64, measured.cluster if measured else 8,
                                      key=f"{prefix}_cluster", disabled=running))
    else:
        cluster = PROFILES[profile].cluster
        st.caption(f"Cluster size **{cluster}**. {PROFILES[profile].description}")  # not in the option: it was cut off
    st.caption(f"This machine: {detected.cpu_name or 'CPU'} → **{detected.profile}** "
               f"(cluster {detected.cluster}): {detected.reason}.")
    return cluster
