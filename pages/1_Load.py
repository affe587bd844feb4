"""Load: a model (weights + architecture, weights + the user's own Python file, or a trusted pickle) and a data
set, or the bundled sample."""
from __future__ import annotations

import streamlit as st

from core.custom_code import keep_uploaded_code, model_candidates, probe_shapes, whole_models
from core.sources import load_dataset
from core.errors import PruneScopeError
from core.models import InputSpec, list_architectures, load_model, sample_entry, sample_names
from core.plausibility import apply_fix, check_plausibility, describe_fix
from core.runs import remember_trusted_model
from core.workspace import folder_upload_name, remember_upload_name
from ui.charts import fig_class_counts, fig_confusion, fig_per_class_accuracy
from ui.common import format_pct, metrics_row, page_link, setup_page
from ui.detection import detection_load_page
from ui.state import DEFAULT_SAMPLE, baseline, digest, files_to_zip, load_sample_callback, load_uploaded_data

state = setup_page("Load", "A trained model and its data set: upload your own or take the bundled sample.")
TASKS = ("Image classification", "Object detection (SSD)")
task = st.radio("Task", TASKS, index=1 if state.task == "detection" else 0, horizontal=True, key="load_task",
                help="Classification: a classifier and an ImageFolder data set. Detection: an SSD detector and a "
                     "Pascal VOC data set; pruning is then scored by mAP@0.5.")
if task == TASKS[1]:
    detection_load_page(state)
    st.stop()

MODEL_KINDS = ("Weights (state dict) + architecture", "Whole pickled model (trusted files only)",
               "Custom architecture (Python file) + weights")
DATA_KINDS = ("Zip archive", "Folder")


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
        if code["file"] is None:
            raise PruneScopeError("Choose the Python file (.py) that defines the model.")
        code_path = keep_uploaded_code(code["file"].getvalue(), code["file"].name)
        return load_model(model_bytes, trusted=trusted, input_spec=spec, code_path=code_path, code_name=code["name"],
                          code_args=code["args"])
    return load_model(model_bytes, arch=arch if kind == MODEL_KINDS[0] else None, trusted=trusted, input_spec=spec)


def load_upload(kind: str, model_file, trusted: bool, arch: str | None, spec: InputSpec, data_kind: str, data_files,
                code: dict) -> None:
    """Load model + data from the uploads; every user error ends as one clear message."""
    if model_file is None:
        if state.model is None:
            st.error("Choose a model file (.pt / .pth) first.")
            return
        if not data_files:
            st.error("Choose a model file and a data set to upload (or a data set for the current model).")
            return
        loaded = state.model  # add a data set to the model loaded before
    else:
        model_bytes = model_file.getvalue()
        try:
            loaded = read_model(kind, model_bytes, trusted, arch, spec, code)
        except PruneScopeError as exc:
            st.error(f"**The model could not be loaded.** {exc}", icon=":material/error:")
            return
        loaded.spec.upload_name = model_file.name  # issue 16: runs name the user's file, not the stored copy
        if trusted:  # issue 15: runs holding this pickle or code may run it now
            remember_trusted_model(loaded, model_bytes)
        key = (f"upload:{digest(model_bytes)}:{loaded.spec.arch}:{loaded.spec.code_file}:{loaded.spec.code_args}:"
               f"{spec.height}x{spec.width}:{spec.mean}:{spec.std}")
        state.set_model(loaded, f"uploaded {loaded.spec.arch} ({len(model_bytes) / 1e6:.1f} MB)", key,
                        model_bytes if loaded.spec.pickled else None)
    if not data_files:
        st.warning("Model loaded. Now add a data set (a zip of class folders, or a folder) and press "
                   "**Load and validate** again to check and measure it.")
        return
    try:
        if data_kind == DATA_KINDS[0]:
            raw = data_files.getvalue()
            label = f"uploaded zip ({len(raw) / 1e6:.1f} MB)"
        else:
            raw = files_to_zip([(f.name, f.getvalue()) for f in data_files])
            label = f"uploaded folder ({len(data_files)} files)"
        data, path = load_uploaded_data(raw, loaded)  # issue 15: a refused upload leaves nothing behind
        remember_upload_name(path, data_files.name if data_kind == DATA_KINDS[0]
                             else folder_upload_name([f.name for f in data_files]))
    except PruneScopeError as exc:
        st.error(f"**The data set could not be used.** {exc}", icon=":material/error:")
        return
    loaded.spec.input = data.input  # the size the data gave a model that does not fix it
    if loaded.spec.class_names is None:
        loaded.spec.class_names = list(data.class_names)
    state.set_data(data, label, str(path))
    state.baseline = baseline(state.key, loaded, data)
    st.session_state["load_plausibility"] = (state.key, check_plausibility(loaded.model, data, loaded.spec.input,
                                                                           state.baseline["accuracy"]))


def apply_plausibility_fix(fix) -> None:
    """The one-click fix of a near-chance baseline: the normalisation (and class order) found, re-measured."""
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


tab_sample, tab_upload = st.tabs(["Bundled sample", "Upload your own"])
with tab_sample:
    names = sample_names()
    name = st.selectbox("Sample", names, index=names.index(DEFAULT_SAMPLE) if DEFAULT_SAMPLE in names else 0,
                        key="load_sample_name")
    entry = sample_entry(name)
    st.markdown(f"**{entry['architecture']}** trained on **{entry['dataset']}**: {entry['dataset_description']}  \n"
                f"Reported accuracy {format_pct(entry['accuracy'])} on {entry['num_val_images']} validation images.")
    st.button("Load the sample", type="primary", key="load_sample", icon=":material/play_arrow:",
              on_click=load_sample_callback, args=(name,))
    if st.session_state.get("sample_error"):
        st.error(st.session_state["sample_error"])

with tab_upload:
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
    if st.button("Load and validate", type="primary", key="load_upload", icon=":material/task_alt:"):
        try:
            spec = InputSpec(height=int(height), width=int(width), mean=parse_floats(mean_text, 3, "mean"),
                             std=parse_floats(std_text, 3, "std"))
        except PruneScopeError as exc:
            st.error(str(exc))
        else:
            with st.spinner("Loading and validating..."):
                load_upload(kind, model_file, trusted, arch, spec, data_kind, data_files, code)

# ----------------------------------------------------------------------------- what is loaded
st.divider()
if state.model is None:
    st.info("Nothing loaded yet: take the sample or upload a model and a data set above.", icon=":material/info:")
    st.stop()

st.subheader("Current model")
spec = state.model.spec
st.markdown(f"**{state.model_label}** · {spec.num_classes} classes · input "
            f"{spec.input.channels}×{spec.input.height}×{spec.input.width} ({spec.input.colour_order}), "
            f"mean {list(spec.input.mean)}, std {list(spec.input.std)}")
for note in state.model.notes:
    st.caption(f"Note: {note}")
if state.data is None:
    st.stop()

b = state.baseline
st.subheader("Baseline")
metrics_row(b)
st.caption(f"Accuracy on {b['n']} validation images; MACs and parameters of one {spec.input.height}×{spec.input.width} "
           f"image; latency: {b['latency_note']}.")
plaus_key, plaus = st.session_state.get("load_plausibility", (None, None))
if plaus is not None and plaus_key == state.key and plaus.suspect:  # issue 13: a baseline near or below chance
    st.warning(plaus.message(), icon=":material/warning:")
    if plaus.fix is not None:
        st.button(f"Apply: {describe_fix(plaus.fix)}", key="load_apply_fix", icon=":material/auto_fix_high:",
                  on_click=apply_plausibility_fix, args=(plaus.fix,))

st.subheader("Data set validation")
report = state.data.report
st.markdown(f"**{state.data_label}** · {report.num_classes} classes · {len(state.data.train)} training and "
            f"{len(state.data.val)} validation images" + (" (pre-split train/val)" if report.presplit else
                                                          " (20 % held out for validation, stratified)"))
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
    st.info("Converted to the model's colour mode: " + ", ".join(f"{n} {mode} image(s)" for mode, n in report.converted.items()),
            icon=":material/palette:")
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

st.markdown("**Next**")
c1, c2, _ = st.columns([1, 1, 3])
with c1:
    page_link("analyse", "Analyse the filters")
with c2:
    page_link("prune", "Prune")
