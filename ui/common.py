"""Layout pieces every page uses: page set-up, empty states, number formats, job progress."""
from __future__ import annotations

import math
import time
from pathlib import Path

import streamlit as st

from core.clusters import PROFILES, detect_cpu_profile
from core.jobs import JobSnapshot
from core.visualize import format_macs, format_pct  # noqa: F401  (re-exported for the pages)

from .state import AppState, get_state

ASSETS = Path(__file__).resolve().parent.parent / "assets"
PAGES = {
    "home": ("streamlit_app.py", "Home", ":material/home:"),
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


def setup_page(title: str, caption: str | None = None) -> AppState:
    """Page config, shared style, title; returns the session's state."""
    st.set_page_config(page_title=f"{title} · PruneScope", page_icon=":material/content_cut:", layout="wide")
    css = ASSETS / "style.css"
    if css.exists():
        st.html(f"<style>{css.read_text()}</style>")
    state = get_state()
    sidebar(state)
    st.title(title)
    if caption:
        st.caption(caption)
    return state


def sidebar(state: AppState) -> None:
    """The flow as a menu (Streamlit's own page list is off: it would call the home page 'streamlit app'),
    and what is loaded / running."""
    from .state import get_registry

    with st.sidebar:
        st.markdown("**PruneScope**")
        for key in PAGES:
            page_link(key)
        st.divider()
        if state.task == "detection" and state.detector is not None:
            st.caption(f"Detector: {state.det_label}")
        elif state.model is not None:
            st.caption(f"Model: {state.model_label}")
        else:
            st.caption("No model loaded")
        for job in get_registry().active():
            s = job.snapshot()
            st.caption(f"{s.kind.capitalize()} job: {int(s.progress * 100)} % · {s.message}")


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


def metrics_row(record: dict, base: dict | None = None) -> None:
    """Accuracy, MACs, parameters, latency of a step (with changes against ``base``)."""
    c1, c2, c3, c4 = st.columns(4)
    b = base or {}
    c1.metric("Accuracy", format_pct(record.get("accuracy")),
              change(record.get("accuracy"), b.get("accuracy"), "points") if base else None)
    c2.metric("MACs", format_macs(record.get("macs")), change(record.get("macs"), b.get("macs")) if base else None,
              delta_color="inverse")
    c3.metric("Parameters", format_params(record.get("params")),
              change(record.get("params"), b.get("params")) if base else None, delta_color="inverse")
    c4.metric("Latency (OpenVINO CPU)", format_ms(record.get("latency_ms")),
              change(record.get("latency_ms"), b.get("latency_ms")) if base else None, delta_color="inverse")


def job_progress(snap: JobSnapshot, label: str) -> None:
    """Progress bar with the current message, elapsed time and ETA of a job snapshot."""
    pct = int(round(snap.progress * 100))
    st.progress(min(max(snap.progress, 0.0), 1.0), text=f"{label}: {pct} % · {snap.message}")
    c1, c2, c3 = st.columns(3)
    c1.markdown(f"**State** {state_badge(snap.state)}")
    c2.markdown(f"**Elapsed** {format_seconds(snap.elapsed)}")
    eta = snap.eta
    c3.markdown(f"**ETA** {'—' if eta is None else ('≤ ' if snap.kind == 'prune' else '') + format_seconds(eta)}")


def started_at(ts: float | None) -> str:
    return "—" if not ts else time.strftime("%Y-%m-%d %H:%M", time.localtime(ts))


def pick_run(state: AppState, runs: list[dict], empty_message: str, key: str, where=st) -> dict:
    """The run picker of Review and Export: an empty state when there is none, else a select box
    defaulting to the current run. Returns the chosen entry of ``core.jobs.past_runs``."""
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
    """Start / Cancel of a pruning job, and the error the last start left (both Prune views)."""
    b1, b2, _ = st.columns([1, 1, 4])
    b1.button("Start pruning", type="primary", key="pr_start", disabled=running or config is None,
              on_click=start, args=(config,), icon=":material/play_arrow:", width="stretch")
    b2.button("Cancel", key="pr_cancel", disabled=not running, on_click=cancel, icon=":material/stop:",
              width="stretch")
    if st.session_state.get("prune_error"):
        st.error(st.session_state["prune_error"], icon=":material/error:")


def prune_outcome(s) -> None:
    """How a finished pruning job ended (failed / done and why it stopped / cancelled): both Prune views."""
    from core.runs import Run

    kept = max(len(s.steps) - 1, 0)
    if s.state == "failed":
        st.error(f"The run failed: {s.error}", icon=":material/error:")
    elif s.state == "done":
        reason = Run(s.run_dir).status.get("message", "") if s.run_dir is not None else ""
        st.success(f"Finished after {format_seconds(s.elapsed)}: {kept} step(s) kept"
                   + (f"; stopped because {reason}" if reason else "") + ".", icon=":material/check_circle:")
    else:
        st.info(f"Cancelled after {format_seconds(s.elapsed)}; {kept} completed step(s) kept.",
                icon=":material/info:")


def threshold_pick(state, run, hist: list[dict], prune_cfg: dict, sel, metric: str = "accuracy"):
    """The threshold slider of a run and the smallest step within it, remembered for Export.

    Returns (threshold in points, the picked history record)."""
    from core import visualize as V

    base = hist[0]
    drops = [(base["accuracy"] - r["accuracy"]) * 100 for r in hist]
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
