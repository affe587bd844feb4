"""Parts of the Review page: paired drops with their confidence intervals, latency with its spread, the
recovery fine-tune job and the side-by-side comparison of two steps (of one run or of two runs).

The figures come from the run records (``core.runs.Run.history``): ``paired`` (``core.stats``), the test
images' ``test_metric``, latency spread keys (``core.measure.ModelFigures.to_dict``); the recovery is
``core.recovery.recover_run_step`` as a background job (``core.jobs.recovery_job``).
"""
from __future__ import annotations

import streamlit as st

from core.advice import run_advice
from core.claim import shipped_claim
from core.errors import PruneScopeError
from core.jobs import JobAlreadyRunning, recovery_job
from core.measure import LatencyComparison
from core.recovery import RecoveryConfig
from core.runs import Run, passed_over
from ui.common import action_button, format_macs, format_ms, format_params, format_pct, job_status, page_link
from ui.state import get_registry


def no_kept_step_panel(run: Run) -> None:
    """A run that ended without a pruning step: that it ended, why it stopped, and what to change
    (``core.advice.run_advice``)."""
    advice = run_advice(run)
    if advice is None:  # it kept a step, or runs
        return
    with st.container(border=True):
        st.warning(advice.headline, icon=":material/block:")
        for line in advice.why:
            st.markdown(line)
        if advice.changes:
            st.markdown("**What to change for the next run**\n" + "\n".join(f"- {c}" for c in advice.changes))
        page_link("prune", "Change the settings and prune again")


def drop_text(record: dict, role: str = "selection") -> str:
    """'0.84 points (95 % CI 0.21 to 1.47)' for a step's paired drop from the original on ``role``'s images;
    '—' where the record has none (the original, runs made before paired figures, no test split)."""
    p = (record.get("paired") or {}).get(role)
    if not p or not record.get("step"):
        return "—"
    return f"{p['drop_points']:.2f} points (95 % CI {p['ci_low_points']:.2f} to {p['ci_high_points']:.2f})"


def drops_line(record: dict, metric: str) -> str:
    """The picked step's selection drop (which decides) and test drop (which reports), with intervals."""
    test = record.get("test_metric")
    test_part = (f"test {metric.lower()} {format_pct(test)}, drop {drop_text(record, 'test')}" if test is not None
                 else "no test images in this run (made without a test split)")
    return f"Selection drop {drop_text(record)} · {test_part}."


def pooled_line(hist: list[dict], threshold: float) -> None:
    """Why a smaller step that reads within the threshold on its own test images is not the pick: the final
    acceptance reads the test drops as one non-decreasing curve of the compression (``core.runs.passed_over``)."""
    passed = passed_over(hist, threshold)
    if not passed:
        return
    record, fitted = passed[0]
    own = (hist[0]["test_metric"] - record["test_metric"]) * 100
    st.caption(f"Step {record['step']} ({hist[0]['macs'] / record['macs']:.2f}x fewer MACs) reads {own:.2f} test points "
               f"lost on its own, but {fitted:.2f} on the curve of this run's test reads, where less pruned steps read "
               f"worse: one lucky read on the same test images does not ship a model"
               + (f" ({len(passed) - 1} more such step(s))." if len(passed) > 1 else "."))


def control_line(run, hist: list[dict], pick: dict) -> None:
    """The picked step against the control (the original given the same fine-tuning and recoveries), when the
    run has one: fine-tuning on the user's images also adapts a model to them."""
    control = run.control_record()
    if not control:
        return
    claim = shipped_claim(hist, pick["step"], control)
    vs, gain = claim.get("vs_control"), claim.get("control_vs_original")
    if vs is None or gain is None:
        return
    st.caption(f"Against the original given the same training ({control['received']['finetune_batches']} fine-tuning "
               f"mini-batches, recoveries of {control['received']['recovery_epochs']} epochs): test drop "
               f"{vs['drop_points']:+.2f} points (95 % CI {vs['ci_low_points']:+.2f} to {vs['ci_high_points']:+.2f}); "
               f"that training alone moved the original by {0.0 - gain['drop_points']:+.2f} points on the test images. "
               + control_scope(control, pick["step"], run.control_covers(pick["step"])))


def control_scope(control: dict, picked: int, same: bool) -> str:
    """Which step's training the control repeated (``for_step``, and whether the run ships it: ``ships``; runs made
    before they were recorded: the last step), and whether the picked step received the same training (``same``)."""
    step = control.get("for_step")
    if step is None:
        return "It holds for the run's last step; an earlier pick had less training."
    which = (f"step {step}, the one the run ships" if control.get("ships", True)
             else f"step {step}, the last on the path of the run's model (the run ships none at its threshold)")
    return f"It holds for {which}" + ("." if same else f"; step {picked} had other training.")


def latency_text(record: dict) -> str:
    """'0.412 ms (IQR 0.40–0.43), 2,427 FPS', or the median alone for records without a spread."""
    ms = record.get("latency_ms")
    if ms is None:
        return "—"
    if record.get("latency_q1_ms") is None:
        return format_ms(ms)
    fps = record.get("fps")
    return (f"{format_ms(ms)} (IQR {record['latency_q1_ms']:.3g}–{record['latency_q3_ms']:.3g})"
            + (f", {fps:,.0f} FPS" if fps else ""))


def comparison_text(comparison: dict | None) -> str:
    """A manifest's ``latency_comparison`` (pruned against original, timed in alternation) as one line: the
    change as fact only when it is significant, else that it is within the machine's noise."""
    if not comparison:
        return "Pruned vs original latency: not compared (the two were not timed together)."
    keys = ("ratio", "ratio_low", "ratio_high", "p_value", "significant")
    return "Pruned vs original latency: " + LatencyComparison(None, None, **{k: comparison[k] for k in keys}).label()


# ----------------------------------------------------------------------------- recovery fine-tune


def start_recovery(run_dir: str, step: int, epochs: int, kd: bool) -> None:
    st.session_state.pop("rv_rec_error", None)
    try:
        config = RecoveryConfig(epochs=int(epochs), distill=bool(kd))
        config.validate()
        get_registry().start("recovery", recovery_job(run_dir, step, config), key=run_dir,
                             meta={"run": run_dir, "step": step, "epochs": int(epochs), "kd": bool(kd)})
    except JobAlreadyRunning:
        pass  # shown below
    except PruneScopeError as exc:
        st.session_state["rv_rec_error"] = str(exc)


def cancel_recovery(run_dir: str) -> None:
    job = get_registry().latest("recovery", run_dir)
    if job is not None:
        job.request_cancel()


def recovery_panel(run: Run, steps: list[int], default_step: int) -> None:
    """"Recover this step": N epochs over the train split (KD from the original optional) as a background
    job with progress and cancel; the result is a new step of the run."""
    registry, key = get_registry(), str(run.dir)
    job = registry.latest("recovery", key)
    running = job is not None and job.running
    c1, c2, c3, c4 = st.columns([2, 1, 1, 1], vertical_alignment="bottom")
    step = c1.selectbox("Step to recover", steps, index=steps.index(default_step), key="rv_rec_step",
                        disabled=running)
    epochs = c2.number_input("Epochs", 1, 200, 3, key="rv_rec_epochs", disabled=running)
    kd = c3.toggle("Distil from the original (KD)", value=False, key="rv_rec_kd", disabled=running)
    if running:
        c4.button("Cancel", key="rv_rec_cancel", on_click=cancel_recovery, args=(key,), icon=":material/stop:",
                  width="stretch")
    else:
        action_button(c4, "Recover this step", start_recovery, key, step, epochs, kd, key="rv_rec_start",
                      type="primary", icon=":material/healing:", width="stretch")
    st.caption("Fine-tunes the step for N epochs over the train split (cosine schedule, the pruning loop's "
               "augmentation), keeps the schedule's last finished epoch (picking the best on the selection images "
               "would be one more decision on them) and adds it to the run as a new step, measured on the selection and test images.")
    if st.session_state.get("rv_rec_error"):
        st.error(st.session_state["rv_rec_error"], icon=":material/error:")
    st.fragment(run_every=1.0 if running else None)(job_status)(registry, "recovery", key, "Recovery fine-tune",
                                                                running, "recovery fine-tune")
    if job is not None and not running and job.snapshot().state in ("done", "cancelled"):
        record = job.snapshot().result
        if record is None:
            return
        if record.get("step") is None:
            st.info("Cancelled before the first epoch finished: nothing was added.", icon=":material/info:")
        else:
            st.success(f"Step {record['step']} added: step {record['recovered_from']} after "
                       f"{record['recovery']['best_epoch']} epoch(s), selection {format_pct(record['metric'])}, "
                       f"test {format_pct(record.get('test_metric'))}.", icon=":material/check_circle:")


# ----------------------------------------------------------------------------- two steps side by side


def step_picker(label: str, runs: dict[str, Run], run_key: str, step_key: str, default_run: str,
                default_step: int, where) -> tuple[str, dict]:
    """A run and one of its steps; returns (a label for the column, the step's record)."""
    names = list(runs)
    name = where.selectbox(f"{label}: run", names, index=names.index(default_run), key=run_key)
    hist = runs[name].history
    steps = [r["step"] for r in hist]
    step = where.selectbox(f"{label}: step", steps, index=steps.index(default_step) if default_step in steps else 0,
                           key=step_key)
    record = next(r for r in hist if r["step"] == step)
    return (f"step {step}" if name == default_run else f"{name} · step {step}"), record


def figures_rows(a: dict, b: dict, la: str, lb: str, metric: str) -> list[dict]:
    """One row per figure, a column per step."""
    def row(what: str, fa, fb) -> dict:
        return {"figure": what, la: fa(a), lb: fb(b) if fb else fa(b)}

    return [
        row(f"{metric} (selection)", lambda r: format_pct(r.get("metric")), None),
        row("drop from its original (selection, 95 % CI)", drop_text, None),
        row(f"{metric} (test)", lambda r: format_pct(r.get("test_metric")), None),
        row("drop from its original (test, 95 % CI)", lambda r: drop_text(r, "test"), None),
        row("MACs", lambda r: format_macs(r.get("macs")), None),
        row("parameters", lambda r: format_params(r.get("params")), None),
        row("latency (OpenVINO CPU, median, IQR)", latency_text, None),
    ]


def compare_steps(runs: dict[str, Run], current: str, pick_step: int, metric: str) -> None:
    """Two steps side by side: figures, per-class, widths per group."""
    c1, c2 = st.columns(2)
    la, a = step_picker("A", runs, "rv_cmp_run_a", "rv_cmp_step_a", current, 0, c1)
    lb, b = step_picker("B", runs, "rv_cmp_run_b", "rv_cmp_step_b", current, pick_step, c2)
    if la == lb:
        lb = lb + " (B)"
    st.dataframe(figures_rows(a, b, la, lb, metric), hide_index=True, width="stretch", key="rv_cmp_figures")
    if a.get("per_class") and b.get("per_class"):
        classes = list(a["per_class"])
        st.dataframe([{"class": c, la: format_pct(a["per_class"].get(c)), lb: format_pct(b["per_class"].get(c))}
                      for c in classes], hide_index=True, width="stretch", key="rv_cmp_classes")
    widths_a, widths_b = a.get("widths") or {}, b.get("widths") or {}
    layers = list(dict.fromkeys([*widths_a, *widths_b]))
    st.dataframe([{"layer": n, la: widths_a.get(n), lb: widths_b.get(n)} for n in layers], hide_index=True,
                 width="stretch", key="rv_cmp_widths")
