"""Export: one step of a run for an export target (NCS2: IR FP16 + ONNX + a blob compiled by the MYRIAD compiler;
or OpenVINO CPU), the target's verdict, verification, bundle zip with the fallback."""
from __future__ import annotations


import streamlit as st

from core.jobs import JobAlreadyRunning, export_job, past_runs
from core.measure import per_layer_timings
from core.targets import DEFAULT_TARGET, TARGETS
from core.workspace import read_json, workspace_root
from ui.common import (action_button, format_macs, format_ms, format_params, format_pct, job_status, pick_run,
                       setup_page, state_badge, target_panel)
from ui.review import comparison_text, latency_text
from ui.state import get_registry, run_model
from ui.tasks import DEFAULT_TASK, task_ui


def step_and_target(where) -> tuple[int, float, str]:
    """The step to export (default: the Review threshold's pick, else the smallest within the run's budget),
    the drop that chose it, and the export target. ``where``: the column for the step box."""
    steps = [r["step"] for r in hist]
    max_drop = (run.config.get("prune") or {}).get("max_drop", 1.0)
    if state.export_step is not None and str(state.run_dir) == str(run.dir) and state.export_step in steps:
        max_drop = float(state.max_drop)
        default_step, why = state.export_step, f"the Review threshold ({max_drop:.1f} points) picked it"
    else:
        default_step, why = run.select_step(float(max_drop)), f"the smallest within the run's budget ({max_drop} points)"
        max_drop = float(max_drop)
    records = {r["step"]: r for r in hist}
    step = where.selectbox("Step", steps, index=steps.index(default_step), key=f"ex_step_{sel}",
                           format_func=lambda k: f"step {k} · {run.metric_name} "
                                                 f"{format_pct(records[k]['metric'])} · "
                                                 f"{format_macs(records[k]['macs'])} MACs"
                                                 + (" · threshold pick" if k == default_step else ""))
    st.caption(f"Default: step {default_step}, {why}. {state_badge(entry['state'])}")
    target = st.radio("Export target", list(TARGETS), index=list(TARGETS).index(DEFAULT_TARGET), key="ex_target",
                      horizontal=True, format_func=lambda name: TARGETS[name].label)
    return step, max_drop, target


def start_export() -> None:
    try:
        registry.start("export", export_job(run.dir, step, max_drop=max_drop, out_path=bundle_dir, target=target),
                       key=job_key, meta={"run": run.name, "step": step, "target": target})
    except JobAlreadyRunning:
        pass


def stop_until_exported() -> None:
    """End the page while the bundle is being written or was never written (then with how to start)."""
    if running or not exists:
        if not running:
            st.info(f"Press **Export** to write the bundle for {TARGETS[target].label}: ONNX + IR of the pruned step "
                    "and of the original, judged for the target (for the NCS2: compiled by the MYRIAD compiler), "
                    "verified on the selection images, with a self-test; it runs in the background.",
                    icon=":material/info:")
        st.stop()


def verdicts(manifest: dict, pruned: dict, original: dict) -> None:
    """The target's verdict beside the verification of the pruned model and of the fallback."""
    verification = manifest["verification"]
    col_ncs, col_ver = st.columns(2)
    with col_ncs:
        with st.container(border=True):
            target_panel(manifest)
    with col_ver:
        with st.container(border=True):
            # issue 27: every verification line says which model (and which arithmetic) it is about
            (st.success if verification["verified"] else st.warning)(
                f"**Pruned model (`model/`), step {manifest.get('step', step)}**: {verification['message']}",
                icon=":material/verified:" if verification["verified"] else ":material/warning:")
            for note in verification.get("notes", []):
                st.caption(f"Pruned model in FP16 arithmetic (as the NCS2 computes): {note}"
                           if note.startswith(("Verified", "Not verified")) else note)
            fb_ok = original["verification"]["verified"]
            st.markdown(f"**Fallback (original)**: {'verified' if fb_ok else 'NOT verified'} "
                        f"({original['verification']['agreement'] * 100:.1f} % agreement)."
                        + ("" if fb_ok else " Check it."))


def figures_table(manifest: dict, pruned: dict, original: dict) -> None:
    """Accuracy, MACs, parameters and latency of the pruned model and the fallback, and whether their latency
    really differs (the two timed together)."""
    st.dataframe([
        {"model": "pruned (model/)", "accuracy": format_pct(pruned.get("accuracy")),
         "MACs": format_macs(pruned.get("macs")), "parameters": format_params(pruned.get("params")),
         "latency (OpenVINO CPU, median, IQR, FPS)": latency_text(pruned.get("latency_spread") or pruned)},
        {"model": "original (fallback/)", "accuracy": format_pct(original.get("accuracy")),
         "MACs": format_macs(original.get("macs")), "parameters": format_params(original.get("params")),
         "latency (OpenVINO CPU, median, IQR, FPS)": latency_text(original.get("latency_spread") or original)},
    ], hide_index=True, width="stretch")
    st.caption(comparison_text(manifest.get("latency_comparison")))


def layer_timing() -> None:
    """On demand: the exported step's time per layer from OpenVINO's performance counters (or why it failed)."""
    if st.button("Time every layer", key="ex_layers", icon=":material/speed:"):
        with st.spinner("Timing the exported step's layers on the OpenVINO CPU runtime..."):
            try:
                model = run_model(str(run.dir), step, (run.dir / "history.jsonl").stat().st_mtime
                                  if (run.dir / "history.jsonl").exists() else 0.0)
                st.session_state["ex_layer_rows"] = (job_key, [t.to_dict() for t in per_layer_timings(model, run.spec)])
            except Exception as exc:  # OpenVINO cannot convert or count every model; say why
                st.session_state["ex_layer_rows"] = (job_key, f"{type(exc).__name__}: {exc}")
    timed_key, rows = st.session_state.get("ex_layer_rows", (None, None))
    if timed_key == job_key and isinstance(rows, str):
        st.error(f"Per-layer timing failed: {rows}", icon=":material/error:")
    elif timed_key == job_key:
        st.dataframe([{"layer": r["layer"], "operation": r["op_type"], "median (ms)": round(r["median_ms"], 4),
                       "share": f"{r['share'] * 100:.1f} %"} for r in rows], hide_index=True, width="stretch")
        st.caption("Batch 1, median per node over 20 runs; BatchNorm and ReLU are fused into the convolution.")


def zip_contents(manifest: dict, pruned: dict) -> None:
    """What the zip holds and how to run it on the target, with the download."""
    top = bundle_dir.name
    blob = "`model.blob` (NCS2 blob, compiled by the MYRIAD compiler), " if pruned.get("blob") else ""
    with st.container(border=True):
        st.markdown(f"""**What is in the zip** (`{zip_path.name}`, {zip_path.stat().st_size / 1e6:.2f} MB)

- `{top}/model/`: the pruned model, {blob}`model.xml` + `model.bin` (IR, {pruned.get("ir_precision", "FP16")}) and `model.onnx`
- `{top}/fallback/`: **the original model, the fail-safe**: {blob}`fallback/model.xml` + `model.bin` + `model.onnx`
- `{top}/deploy.py`: loads `model/` on the device and switches to `fallback/` by itself when a file is missing or
  altered (sha256 in the manifest), fails to compile, or fails the self-test (`selftest.npz`)
- `{top}/manifest.json`, `README.txt`: hashes, figures, input format, class names, target verdicts, verification

{(manifest.get("target") or {}).get("deploy") or "On the target: python deploy.py --device MYRIAD --image picture.png (OpenVINO 2022.3 LTS)."}""")
        st.download_button("Download the bundle (.zip)", data=zip_path.read_bytes(), file_name=zip_path.name,
                           mime="application/zip", type="primary", key="ex_download", icon=":material/download:")
        st.caption(f"Also on disk: `{bundle_dir}`")


state = setup_page("Export", "For the Intel NCS2: OpenVINO IR (FP16, static 1×C×H×W) + ONNX (opset 13) + a blob "
                   "compiled by Intel's MYRIAD compiler (OpenVINO 2021.4.2), verified on real images, with the "
                   "original as fail-safe. Or for an OpenVINO CPU host (FP32 IR).")
registry = get_registry()
runs = [r for r in past_runs(registry) if r["steps"] >= 0 and r["run"].history]
c1, c2 = st.columns(2)
entry = pick_run(state, runs, "**Nothing to export yet.** Prune a model first, then pick a step on the Review page.",
                 key="ex_run", where=c1)
sel, run = entry["name"], entry["run"]
hist = run.history
step, max_drop, target = step_and_target(c2)
bundle_dir = workspace_root() / "exports" / (f"{run.name}-step{step:04d}"
                                             + ("" if target == DEFAULT_TARGET else f"-{target}"))
zip_path = bundle_dir.parent / f"{bundle_dir.name}.zip"
job_key = f"{run.name}:{step}" + ("" if target == DEFAULT_TARGET else f":{target}")
job = registry.latest("export", job_key)
running = job is not None and job.running
exists = (bundle_dir / "manifest.json").exists() and zip_path.exists()
action_button(st, "Export again" if exists else f"Export step {step}", start_export,
              type="secondary" if exists else "primary", key="ex_start", disabled=running,
              icon=":material/deployed_code:")


@st.fragment(run_every=1.0 if running else None)
def export_status() -> None:
    job_status(registry, "export", job_key, "Export", running, what="export")


export_status()
stop_until_exported()
manifest = read_json(bundle_dir / "manifest.json")
if task_ui(manifest.get("task") or DEFAULT_TASK).bundle_view(manifest, bundle_dir, zip_path):  # the task's own view
    st.stop()
pruned, original = manifest["models"]["pruned"], manifest["models"]["original"]
st.subheader(f"Bundle of step {manifest.get('step', step)}")
verdicts(manifest, pruned, original)
figures_table(manifest, pruned, original)
with st.expander("Per-layer timing (OpenVINO performance counters)", icon=":material/timer:"):
    layer_timing()
zip_contents(manifest, pruned)
