"""The classification task's UI (one plug-in of :mod:`ui.tasks`): a classifier and its ImageFolder data set.
Its load form and data report, its CAR analysis (``ui.analyse``), its Prune settings beyond the shared ones
(CAR method, device, workers, plan, recovery, control, time budget, estimate, latency staircase), its per-class
change, removed-filter gallery and recovery fine-tune on Review. The pages own the flow and everything the tasks
share (state, jobs, progress, threshold, charts)."""
from __future__ import annotations

from pathlib import Path

import streamlit as st

from core.tasks.classification.task import NAME as TASK_NAME
from core.tasks.registry import task_plugin
from core import visualize as V
from core.clusters import latency_staircase
from core.custom_code import keep_uploaded_code, model_candidates, probe_shapes, whole_models
from core.errors import PruneScopeError
from core.glossary import sentence
from core.groups import group_display_name, removal_group, removal_label
from core.jobs import JobAlreadyRunning, phased_job, prune_job as classification_prune_job, reusable_car
from core.models import InputSpec, list_architectures, load_model, sample_entry, sample_names
from core.plausibility import apply_fix, check_plausibility, describe_fix
from core.prune import PruneConfig
from core.runs import remember_trusted_model
from core.workspace import folder_upload_name, remember_upload_name
from ui.analyse import car_analysis
from ui.charts import fig_class_counts, fig_confusion, fig_per_class_accuracy
from ui.common import action_button, format_pct, job_progress, resolution_box
from ui.prune import (car_method_picker, device_picker, estimate_panel, plan_editor, precision_picker, resolution_note,
                      time_budget_input)
from ui.review import recovery_panel
from ui.state import (DEFAULT_SAMPLE, LOAD_BASELINE, LOAD_CHECK, LOAD_DATA, LOAD_MODEL, AppState, baseline,
                      data_for_run, digest, files_to_zip, get_registry, get_state, load_sample, load_uploaded_data,
                      model_lock, private_copy, run_model, session_token)
from core.tasks.classification.task import measure_baseline
from ui.workers import recovery_toggle, work_picker

NAME = TASK_NAME  # AppState.task and a run's recorded task (the core task's own name)
LABEL = task_plugin(NAME).label  # the Load page's task choice, as the core registry names it
METRIC = "Accuracy"  # the metric as the pages show it
MODEL_WORD = "Model"  # what the sidebar calls the loaded model
# The Prune page's settings of this task: the config class (its defaults are the one place for them), the widget
# key prefix (each task keeps its own settings) and the ranges of two sliders.
PRUNE_SETTINGS = {"config": PruneConfig, "prefix": "pr", "images": ("Images for scoring", 50, 1000, 50),
                  "steps": 100}


# ----------------------------------------------------------------------------- Load

MODEL_KINDS = ("Weights (state dict) + architecture", "Whole pickled model (trusted files only)",
               "Custom architecture (Python file) + weights")
DATA_KINDS = ("Zip archive", "Folder")
SELECTION_SHARE_LABEL = "Selection images (% of a data set without train/ and val/)"


def parse_floats(text: str, n: int, what: str) -> tuple[float, ...]:
    try:
        vals = tuple(float(v) for v in text.replace(";", ",").split(",") if v.strip())
    except ValueError:
        raise PruneScopeError(f"The {what} must be {n} numbers separated by commas, e.g. 0.485, 0.456, 0.406.") from None
    if len(vals) not in (1, n):  # one value: a grey-scale model (the first layer's channels decide)
        raise PruneScopeError(f"The {what} must have {n} values (one per input channel) or 1 for a grey-scale "
                              f"model; got {len(vals)}.")
    return vals


def read_model(kind: str, model_bytes: bytes, trusted: bool, arch: str | None, spec: InputSpec, code: dict):
    """The uploaded model as the chosen kind says; a custom architecture's file is kept in the workspace first,
    because the model spec (and every run made from it) points at a real file."""
    if kind == MODEL_KINDS[2]:
        if code["bytes"] is None:
            raise PruneScopeError("Choose the Python file (.py) that defines the model.")
        code_path = keep_uploaded_code(code["bytes"], code["filename"])
        return load_model(model_bytes, trusted=trusted, input_spec=spec, code_path=code_path, code_name=code["name"],
                          code_args=code["args"], code_source=code["bytes"])  # the bytes uploaded run, not a re-read
    return load_model(model_bytes, arch=arch if kind == MODEL_KINDS[0] else None, trusted=trusted, input_spec=spec)


def model_phase(kind: str, model_bytes: bytes, trusted: bool, arch: str | None, spec: InputSpec, code: dict,
                file_name: str = ""):
    """Phase 1 of the load job: the uploaded model, with the key and label the working set keeps."""
    def phase(results: dict):
        try:
            loaded = read_model(kind, model_bytes, trusted, arch, spec, code)
        except PruneScopeError as exc:
            raise PruneScopeError(f"**The model could not be loaded.** {exc}") from None
        loaded.spec.upload_name = file_name  # issue 16: runs name the user's file, not the stored copy
        if trusted:  # issue 15: runs holding this pickle or code may run it now
            remember_trusted_model(loaded, model_bytes)
        key = (f"upload:{digest(model_bytes)}:{loaded.spec.arch}:{loaded.spec.code_file}:{loaded.spec.code_args}:"
               f"{spec.height}x{spec.width}:{spec.mean}:{spec.std}")
        return (loaded, key, f"uploaded {loaded.spec.arch} ({len(model_bytes) / 1e6:.1f} MB)",
                model_bytes if loaded.spec.pickled else None)

    return phase


def data_phase(data_kind: str, files, current, file_name: str = "", val_fraction: float = 0.2):
    """Phase 2: the uploaded data set, kept in the workspace and checked against the model (phase 1's, or the
    session's ``current`` one when only data was uploaded)."""
    def phase(results: dict):
        loaded = results[LOAD_MODEL][0] if LOAD_MODEL in results else current
        try:
            if data_kind == DATA_KINDS[0]:
                raw = files
                label = f"uploaded zip ({len(raw) / 1e6:.1f} MB)"
            else:
                raw = files_to_zip(files)
                label = f"uploaded folder ({len(files)} files)"
            name = file_name if data_kind == DATA_KINDS[0] else folder_upload_name([name for name, _ in files])
            # issue 15: a refused upload leaves nothing behind; issue 27: a refusal names the user's file
            data, path = load_uploaded_data(raw, loaded, name, val_fraction)
            remember_upload_name(path, name)
        except PruneScopeError as exc:
            raise PruneScopeError(f"**The data set could not be used.** {exc}") from None
        loaded.spec.input = data.input  # the size the data gave a model that does not fix it
        if loaded.spec.class_names is None:
            loaded.spec.class_names = list(data.class_names)
        return data, label, path

    return phase


def start_load(state: AppState, kind: str, model_file, trusted: bool, arch: str | None, spec: InputSpec,
               data_kind: str, data_files, code: dict, val_fraction: float = 0.2) -> None:
    """Start "Load and validate" as a background job (read the model, read the data, measure, check);
    the frame takes its result into the session when it ends (``ui.state.adopt_finished_load``).
    What is missing is said at once; every error of the job ends as one clear message."""
    if model_file is None:
        if state.model is None or state.task != NAME:
            st.error("Choose a model file (.pt / .pth) first.")
            return
        if not data_files:
            st.error("Choose a model file and a data set to upload (or a data set for the current model).")
            return
    current = state.model
    phases = []
    if model_file is not None:  # the uploads' bytes are read here: the job never touches a widget
        code = {"bytes": code["file"].getvalue() if code["file"] is not None else None,
                "filename": code["file"].name if code["file"] is not None else "", "name": code["name"],
                "args": code["args"]}
        phases.append((LOAD_MODEL, model_phase(kind, model_file.getvalue(), trusted, arch, spec, code, model_file.name)))
    if data_files:
        files = data_files.getvalue() if data_kind == DATA_KINDS[0] else [(f.name, f.getvalue()) for f in data_files]
        phases += [(LOAD_DATA, data_phase(data_kind, files, current,
                                          data_files.name if data_kind == DATA_KINDS[0] else "", val_fraction)),
                   (LOAD_BASELINE, lambda r: measure_baseline(model_of_results(r, current), r[LOAD_DATA][0])),
                   (LOAD_CHECK, lambda r: check_plausibility(model_of_results(r, current).model, r[LOAD_DATA][0],
                                                             model_of_results(r, current).spec.input,
                                                             r[LOAD_BASELINE]["metric"]))]
    try:
        get_registry().start("load", phased_job(phases), key=session_token(), meta={"with_data": bool(data_files)})
    except JobAlreadyRunning:
        st.warning("A load is already running in this tab: wait for it or cancel it.")


def model_of_results(results: dict, current):
    return results[LOAD_MODEL][0] if LOAD_MODEL in results else current


def cancel_load() -> None:
    job = get_registry().latest("load", session_token())
    if job is not None:
        job.request_cancel()


def apply_plausibility_fix(fix) -> None:
    """The one-click fix of a near-chance baseline: the normalisation (and class order) found, re-measured."""
    state = get_state()
    loaded = state.model
    loaded.spec.input, data = apply_fix(fix, loaded.spec.input, state.data)
    loaded.spec.class_names = list(data.class_names)
    state.model_key += f":fix:{fix.label}:{fix.class_order}"  # a new baseline, not the cached one
    state.set_data(data, state.data_label, state.data_source)
    state.baseline = baseline(state.key, loaded, data)
    st.session_state["load_plausibility"] = (state.key, check_plausibility(loaded.model, data, loaded.spec.input,
                                                                           state.baseline["accuracy"]))


def custom_code_inputs() -> dict:
    """The Python file, what in it builds the model, and its arguments. The names on offer are read from the
    file without running it, so the user can pick before deciding to trust the file."""
    code = {"file": st.file_uploader("Model code (.py)", type=["py"], key="load_code_file",
                                     help="One self-contained Python file defining the model, e.g. a published "
                                          "resnet.py. It runs only when you trust it (below).")}
    names = []
    if code["file"] is not None:
        try:
            names = model_candidates(code["file"].getvalue(), code["file"].name)
            if st.session_state.get("load_trusted"):  # issue 16: trusted, so keep what builds a whole model
                shapes = probe_shapes(st.session_state.get("load_h_None", 0), st.session_state.get("load_w_None", 0))
                names = whole_models(keep_uploaded_code(code["file"].getvalue(), code["file"].name), names, shapes,
                                     trusted=True)
        except PruneScopeError as exc:
            st.error(str(exc), icon=":material/error:")
    if names:
        code["name"] = st.selectbox("Class or factory function", names, key="load_code_name",
                                    help="What builds the model: its class, or a function such as resnet56().")
    else:
        code["name"] = st.text_input("Class or factory function", key="load_code_name_text")
    code["args"] = st.text_input("Arguments (JSON)", "", key="load_code_args", placeholder='{"num_classes": 10}',
                                 help="Keyword arguments as a JSON object, or positional ones as a list. The number "
                                      "of classes is read from the built model's output layer.")
    return code


def sample_tab(state: AppState) -> None:
    """The bundled samples: one to choose, what it is, one click to load it."""
    names = sample_names()
    name = st.selectbox("Sample", names, index=names.index(DEFAULT_SAMPLE) if DEFAULT_SAMPLE in names else 0,
                        key="load_sample_name")
    entry = sample_entry(name)
    st.markdown(f"**{entry['architecture']}** trained on **{entry['dataset']}**: {entry['dataset_description']}  \n"
                f"Reported accuracy {format_pct(entry['accuracy'])} on its {entry['num_val_images']} selection images.")
    action_button(st, "Load the sample", load_sample, name, type="primary", key="load_sample",
                  icon=":material/play_arrow:")
    if st.session_state.get("sample_error"):
        st.error(st.session_state["sample_error"])


def upload_form(state: AppState) -> None:
    """A model (weights + architecture, a Python file, or a trusted pickle) and an ImageFolder data set."""
    left, right = st.columns(2, gap="large")
    with left:
        st.subheader("Model")
        kind = st.radio("What the file holds", MODEL_KINDS, key="load_model_kind",
                        help="A state dict (torch.save(model.state_dict())) is read without running any code. "
                             "A whole pickled model, or a Python file defining the architecture, runs code when "
                             "loaded: only for files you made or have read.")
        archs = list_architectures()
        arch = None
        code = {"file": None, "name": None, "args": None}
        if kind == MODEL_KINDS[0]:
            arch = st.selectbox("Architecture", archs, index=archs.index("resnet18") if "resnet18" in archs else 0,
                                key="load_arch", help="The sample architectures or any torchvision classifier; the "
                                                      "number of classes is read from the weights.")
        elif kind == MODEL_KINDS[2]:
            code = custom_code_inputs()
        default_side = 32 if (arch or "").startswith("sample_") else 224 if arch else 0  # 0: from the data
        c1, c2 = st.columns(2)
        size_help = "0 = from the data set's images (a Python file or a pickle does not fix the model's input size)"
        height = c1.number_input("Input height (px)", 0, 1024, default_side, key=f"load_h_{arch}", help=size_help)
        width = c2.number_input("Input width (px)", 0, 1024, default_side, key=f"load_w_{arch}", help=size_help)
        mean_text = st.text_input("Normalisation mean (R, G, B or one grey value)", "0.485, 0.456, 0.406", key="load_mean")
        std_text = st.text_input("Normalisation std (R, G, B or one grey value)", "0.229, 0.224, 0.225", key="load_std")
        model_file = st.file_uploader("Model file (.pt / .pth)", type=["pt", "pth", "bin", "ckpt", "tar", "th"],
                                      key="load_model_file")
        trusted = st.toggle("I trust this file (a pickled model or a Python model file runs code when loaded)",
                            value=False, key="load_trusted",
                            help="Leave off for files from others: without it only plain weights are read, and a "
                                 "pickle or a Python file is refused.")
    with right:
        st.subheader("Data set")
        st.markdown("An **ImageFolder**: one folder per class (optionally inside `train/` and `val/`). "
                    "Non-image and unreadable files are skipped and listed.")
        data_kind = st.radio("Upload as", DATA_KINDS, horizontal=True, key="load_data_kind")
        if data_kind == DATA_KINDS[0]:
            data_files = st.file_uploader("Zip of class folders", type=["zip"], key="load_data_zip")
        else:
            data_files = st.file_uploader("Folder of class folders", accept_multiple_files="directory",
                                          key="load_data_dir")
        val_pct = st.number_input(SELECTION_SHARE_LABEL, 5, 50, 20, step=5, key="load_val_pct",
                                  help="The share of a data set without train/ and val/ folders that becomes "
                                       "selection images (they score filters and decide every step). More "
                                       "selection images resolve a finer acceptable drop; each decision then "
                                       "takes longer. A further 20 % of all images become test images.")
    job = get_registry().latest("load", session_token())
    running = job is not None and job.running
    b1, b2, _ = st.columns([1, 1, 3])
    if b1.button("Load and validate", type="primary", key="load_upload", icon=":material/task_alt:",
                 disabled=running):
        try:
            spec = InputSpec(height=int(height), width=int(width), mean=parse_floats(mean_text, 3, "mean"),
                             std=parse_floats(std_text, 3, "std"))
        except PruneScopeError as exc:
            st.error(str(exc))
        else:
            start_load(state, kind, model_file, trusted, arch, spec, data_kind, data_files, code,
                       val_pct / 100.0)
            running = True
    b2.button("Cancel", key="load_cancel", disabled=not running, on_click=cancel_load, icon=":material/stop:")
    load_status(state, running)


def load_status(state: AppState, running: bool) -> None:
    """Phase, elapsed time while the load job runs (polled); its error, cancellation or a missing data set after."""
    @st.fragment(run_every=1.0 if running else None)
    def status() -> None:
        job = get_registry().latest("load", session_token())
        if job is None:
            return
        s = job.snapshot()
        if s.running:
            job_progress(s, "Loading and validating")
        elif running:
            st.rerun()  # finished since the page was drawn: the frame takes its result in
        elif s.state == "failed":
            st.error(s.error, icon=":material/error:")
        elif s.state == "cancelled":
            st.info("Loading was cancelled; nothing was changed.", icon=":material/info:")
        elif not s.meta.get("with_data") and state.data is None:
            st.warning("Model loaded. Now add a data set (a zip of class folders, or a folder) and press "
                       "**Load and validate** again to check and measure it.")

    status()


def role_counts(data) -> str:
    """'1,438 train · 287 selection · 72 test images'."""
    return (f"**{len(data.train):,}** train · **{len(data.val):,}** selection · **{len(data.test):,}** test images")


def split_description(split: dict, counts: tuple[int, int, int] | None = None) -> str:
    """How the roles were drawn, from ``DataSet.split``, in the glossary's words (``core.glossary``): a held-out
    ``val/`` folder is split into selection and test images (not "selection 20 %"), an unsplit set by shares of
    all its images. ``counts``: (train, selection, test) images."""
    if not split:
        return "Split: not recorded."
    test_from, layout = split.get("test_from", "none"), split.get("layout", "layout unknown")
    share = split.get("test_fraction") or 0
    n = f" ({counts[1]:,} selection, {counts[2]:,} test)" if counts else ""
    if test_from.endswith("/ folder") and test_from.startswith("test/"):
        roles = "train/ → train images, val/ → selection images, test/ → test images"
    elif test_from.endswith("/ folder"):
        folder = test_from[:-len(" folder")]
        roles = (f"train/ → train images; {folder} split into selection images ({(1 - share) * 100:.0f} %) and "
                 f"test images ({share * 100:.0f} %){n}")
    elif "/" in layout:
        roles = "train/ → train images; val/ → selection images; no test images"
    else:
        test = ("no test images" if test_from == "none" else
                f"test images {share * 100:.0f} % ({test_from})" if share else f"test images from {test_from}")
        roles = f"selection images {split.get('val_fraction', 0) * 100:.0f} % of all images, {test}, the rest train"
    return f"Split ({layout}): {roles}; stratified, seed {split.get('seed', 0)}."


def loaded_details(state: AppState) -> None:
    """Below the shared baseline metrics: baseline note, plausibility, data set check and charts."""
    b, spec = state.baseline, state.model.spec
    st.caption(f"Accuracy on {b['n']} selection images; MACs and parameters of one {spec.input.height}×"
               f"{spec.input.width} image; latency: {b['latency_note']}.")
    plaus_key, plaus = st.session_state.get("load_plausibility", (None, None))
    if plaus is not None and plaus_key == state.key and plaus.suspect:  # issue 13: a baseline near or below chance
        st.warning(plaus.message(), icon=":material/warning:")
        if plaus.fix is not None:
            st.button(f"Apply: {describe_fix(plaus.fix)}", key="load_apply_fix", icon=":material/auto_fix_high:",
                      on_click=apply_plausibility_fix, args=(plaus.fix,))

    st.subheader("Data set check")
    report = state.data.report
    st.markdown(f"**{state.data_label}** · {report.num_classes} classes · " + role_counts(state.data))
    st.caption(split_description(state.data.split, (len(state.data.train), len(state.data.val), len(state.data.test)))
               + " " + " ".join(sentence(t) for t in ("train images", "selection images", "test images")))
    resolution_box(state, PruneConfig.max_drop, f"At the default threshold ({PruneConfig.max_drop:g} points): ")
    problems = 0
    if report.skipped_non_images:
        problems += 1
        st.warning(f"{len(report.skipped_non_images)} file(s) skipped: not images or outside a class folder.",
                   icon=":material/warning:")
        with st.expander("Skipped files"):
            st.code("\n".join(report.skipped_non_images[:500]), language=None)
    if report.corrupt_images:
        problems += 1
        st.error(f"{len(report.corrupt_images)} image(s) could not be decoded (damaged or not what the extension says) "
                 "and were left out.", icon=":material/broken_image:")
        with st.expander("Unreadable images"):
            st.code("\n".join(report.corrupt_images[:500]), language=None)
    if report.converted:
        st.info("Converted to the model's colour mode: "
                + ", ".join(f"{n} {mode} image(s)" for mode, n in report.converted.items()), icon=":material/palette:")
    for note in getattr(report, "notes", []):  # inferred input size, 16-bit scaling: what was done, said plainly
        st.info(note, icon=":material/info:")
    for w in report.warnings:
        problems += 1
        st.warning(w, icon=":material/warning:")
    if spec.class_names and list(spec.class_names) != list(state.data.class_names):
        problems += 1
        st.warning("The model's class names differ from the data set's folder names: "
                   f"model {list(spec.class_names)[:12]}, data {list(state.data.class_names)[:12]}. "
                   "Classes are matched by sorted folder order.", icon=":material/warning:")
    if not problems and not report.converted:  # a conversion is said above, not hidden behind "all readable"
        st.success("All files were readable images in class folders; the classes match the model's outputs.",
                   icon=":material/check_circle:")

    c1, c2 = st.columns(2)
    with c1:
        st.plotly_chart(fig_class_counts(report.class_counts), key="load_counts")
    with c2:
        st.plotly_chart(fig_per_class_accuracy(b["per_class"], b["accuracy"]), key="load_per_class")
    with st.expander("Confusion matrix"):
        st.plotly_chart(fig_confusion(b["confusion"], list(state.data.class_names)), key="load_confusion")



def model_shape(state: AppState) -> str:
    """Classes and input of the loaded classifier, e.g. '10 classes, input 3×32×32'."""
    spec = state.model.spec
    return f"{spec.num_classes} classes, input {spec.input.channels}×{spec.input.height}×{spec.input.width}"


def input_details(state: AppState) -> str:
    """The rest of the Load page's "Current model" line: colour order and normalisation."""
    return (f" ({state.model.spec.input.colour_order}), mean {list(state.model.spec.input.mean)}, "
            f"std {list(state.model.spec.input.std)}")


# ----------------------------------------------------------------------------- Analyse


def analysis_panel(state: AppState) -> None:
    """CAR of every filter (background job), per-layer sensitivity, heat map, filter gallery, per-class CAR."""
    car_analysis(state)


# ----------------------------------------------------------------------------- Prune


def run_name(state: AppState) -> str:
    """The model's name in a new run's folder name."""
    return state.model.spec.arch.replace("pickled:", "")


def prune_job(state: AppState, config, run_dir: Path):
    """The pruning job on a private copy of the session's classifier."""
    return classification_prune_job(private_copy(state.model), state.data, config, run_dir,
                                     data_source=state.data_source, original_bytes=state.model_bytes, car=state.car)


def extra_settings(state: AppState, defaults, cluster, max_drop, extra: dict, running: bool) -> bool:
    """A classifier's CAR method, device, Ray workers, resolution note and per-layer plan (into ``extra``);
    returns whether the chosen device and workers can be used."""
    c1, c2 = st.columns(2, gap="large")
    with c1:
        extra["car"] = car_method_picker(defaults.car, running)
    with c2:
        extra["device"], usable = device_picker(defaults.device, running)
        extra["train_precision"] = precision_picker(defaults.train_precision, extra["device"], running)
    work, work_ok = work_picker("pr", running)
    extra["ray_address"], extra["ray_workers"] = work.address, work.workers
    extra["ray_recovery"] = recovery_toggle("pr", running, work)
    usable = usable and work_ok
    resolution_note(state, float(max_drop))
    with st.expander("Per-layer control: exclude groups, cap their cut", icon=":material/tune:"):
        extra["plan"] = plan_editor(state, cluster, float(max_drop), running)
    return usable


def budget_extras(defaults, extra: dict, running: bool) -> None:
    """Among the budget settings: the time budget, recovery when stalled and the control run (into ``extra``)."""
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


def analyse_car_setting(defaults, running: bool) -> bool:
    """The toggle that stores a CAR analysis of the original in the run; returns its value."""
    return st.toggle("Store a CAR analysis of the original in the run", value=defaults.analyse_car,
                     key="pr_analyse", disabled=running,
                     help="Shown with the removed filters on Review. A finished analysis of the "
                          "Analyse page with the same model, images and settings is reused; "
                          "otherwise it is computed first.")


def config_panels(state: AppState, config, running: bool) -> None:
    """Below the settings: whether the run reuses the Analyse page's analysis, the time estimate, and the
    latency staircase."""
    car_reuse_note(state, config)
    with st.expander("How long will it take?", icon=":material/timer:"):
        estimate_panel(state, config, running)
    with st.expander("Latency staircase: why clusters", icon=":material/stairs:"):
        staircase_panel(running)


def car_reuse_note(state: AppState, config) -> None:
    """Before Start: whether the run will reuse the finished CAR analysis of the Analyse page, and why not."""
    if not config.analyse_car:
        return
    reuse, why = reusable_car(state.car, state.model.model, state.data.val, config)
    st.caption(f"CAR analysis of the original: the finished analysis will be reused ({why})." if reuse else
               f"CAR analysis of the original: computed by the run ({why}).")


def staircase_panel(running: bool) -> None:
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


# ----------------------------------------------------------------------------- Review


def per_class_view(base: dict, pick: dict) -> None:
    """The accuracy change per class of the picked step against the original."""
    st.plotly_chart(V.fig_per_class_change(base["per_class"], pick["per_class"]), key="rv_fig_per_class")


def removed_filters_view(run, sel: str, pick: dict, removed: list[tuple[dict, dict]], car_groups) -> None:
    """Below the removed clusters' table: the filters of one chosen removal (weights, CAR, patches)."""
    if removed:
        removed_gallery(run, sel, removed, car_groups)


def recovery_section(run, hist: list[dict], pick: dict) -> None:
    """The recovery fine-tune of a step, as a background job (``ui.review.recovery_panel``)."""
    st.subheader("Recovery fine-tune")
    recovery_panel(run, [r["step"] for r in hist], pick["step"])


def car_of_removal(run, rec: dict) -> tuple[list | None, list | None]:
    """The run's CAR scores of the removed cluster's group and which of them were measured (None: no analysis;
    an empty list of exact flags: every figure measured)."""
    car = run.car
    car_scores, car_exact = None, None
    if car:
        for g in car.get("groups", []):
            if g["root"] == rec["group"] or rec["group"] in g.get("producers", []):
                car_scores = car["car"].get(str(g["gid"]))
                car_exact = (car.get("exact") or {}).get(str(g["gid"]))  # empty: every figure measured
    return car_scores, car_exact


def removed_gallery(run, sel: str, removed: list[tuple[dict, dict]], car_groups) -> None:
    """The filters of one chosen removal, drawn from the original model: weights, CAR and top-activating
    patches on the run's own images (weights only when those images are gone)."""
    which = st.selectbox("Show the filters removed at step", range(len(removed)), key=f"rv_gal_removal_{sel}",
                         format_func=lambda i: f"{removed[i][0]['step']}: {removal_label(removed[i][1], car_groups)}")
    rec = removed[which][1]
    car_scores, car_exact = car_of_removal(run, rec)
    indices = rec.get("filters_original")
    if not indices:
        st.info("The original channel numbers of these filters were not recorded; they cannot be drawn.")
        return
    try:
        original = run_model(str(run.dir), 0, (run.dir / "original.pt").stat().st_mtime)
        data = data_for_run(run)
        layer = group_display_name(removal_group(rec, (run.car or {}).get("groups")))  # the conv the user knows
        patches = {}
        if data is not None:
            with model_lock(original):
                patches = V.top_activating_patches(original, layer, data.val.images[:256], run.spec.input,
                                                   indices=indices, k=3, size=40)
        else:
            st.caption("The run's data set is not available any more: weights only, no patches.")
        st.caption(f"Layer `{layer}` of the original model; CAR from the run's analysis of the original "
                   "(accuracy points; small = little accuracy lost): exact where measured, screened (a "
                   "first-order estimate, fast CAR) where not.")
        removed_cards(run, original, layer, indices, patches, car_scores, car_exact)
    except PruneScopeError as exc:
        st.error(str(exc))


def removed_cards(run, original, layer: str, indices: list[int], patches: dict, car_scores, car_exact,
                  per_row: int = 6) -> None:
    """One card per removed filter, ``per_row`` to a row: number, CAR (screened or measured), weights, patches."""
    for row in range(0, len(indices), per_row):
        cols = st.columns(per_row)
        for col, f in zip(cols, indices[row:row + per_row]):
            with col.container(border=True):
                car_txt = f"{car_scores[f] * 100:+.2f}" if car_scores is not None and f < len(car_scores) else "—"
                screened = car_exact is not None and f < len(car_exact) and not car_exact[f]
                st.markdown(f"**#{f}** · {'screened CAR' if screened else 'CAR'} {car_txt}")
                st.image(V.filter_weight_image(original, layer, f, size=56, spec=run.spec.input),
                         caption="weights", width=56)
                if patches.get(f):
                    st.image(patches[f], width=36)


# ----------------------------------------------------------------------------- Export


def bundle_view(manifest: dict, bundle_dir, zip_path) -> bool:
    """Nothing of its own: the Export page's view is a classifier's bundle; returns False (not shown here)."""
    return False
