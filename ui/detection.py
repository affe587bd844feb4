"""The object-detection (SSD) parts of the pages: each function lays out one page's detection view and calls
``core.detection``. The pages call these when the task (Load) or the run (Review, Export) is detection."""
from __future__ import annotations

import shutil

import streamlit as st

from core.detection import visualize as DV
from core.errors import PruneScopeError
from core.jobs import JobAlreadyRunning, detection_car_job, detection_prune_job
from core import visualize as V
from ui.charts import fig_class_counts
from ui.common import (format_macs, format_params, format_pct, format_seconds, job_progress, job_status, page_link,
                       state_badge)
from ui.state import AppState, detection_baseline, digest, get_registry, sample_detection, save_upload

METRIC = "mAP@0.5"
MODEL_SOURCES = ("Bundled sample detector (ssd_counting)", "Architecture + weights (state dict)")
DATA_SOURCES = ("Bundled counting sample", "Pascal VOC zip")


def format_map(value) -> str:
    return "—" if value is None else f"{value * 100:.2f} %"


# ----------------------------------------------------------------------------- Load


def load_sample_detection_callback() -> None:
    from ui.state import get_state

    state = get_state()
    try:
        model, entry, data = sample_detection()
        info = {"mean": entry["mean"], "std": entry["std"], "class_names": entry["class_names"],
                "source": f"sample:{entry['name']}"}
        state.set_detection(model, info, f"{entry['name']} (bundled sample detector, {entry['architecture']})",
                            f"sample:{entry['name']}", data, f"{entry['dataset']} (bundled sample data set)")
        st.session_state.pop("det_error", None)
    except PruneScopeError as exc:
        st.session_state["det_error"] = str(exc)


def _parse_floats(text: str, what: str) -> tuple[float, ...]:
    try:
        vals = tuple(float(v) for v in text.replace(";", ",").split(",") if v.strip())
    except ValueError:
        raise PruneScopeError(f"The {what} must be 3 numbers separated by commas, e.g. 0.5, 0.5, 0.5.") from None
    if len(vals) != 3:
        raise PruneScopeError(f"The {what} must have 3 values (R, G, B); got {len(vals)}.")
    return vals


def load_detection_upload(state: AppState, model_source: str, arch: str, size: tuple[int, int], mean_text: str,
                          std_text: str, weights_file, data_source: str, voc_file) -> None:
    """Load the chosen detector and data set; every user error ends as one clear message."""
    from core.detection.data import load_voc_dataset
    from core.detection.loading import load_detector_weights

    try:
        if model_source == MODEL_SOURCES[0]:
            model, entry, sample_data = sample_detection()
            size = tuple(model.input_size)
            info = {"mean": entry["mean"], "std": entry["std"], "class_names": entry["class_names"],
                    "source": f"sample:{entry['name']}"}
            class_names = list(entry["class_names"])
        else:
            if weights_file is None:
                raise PruneScopeError("Choose the detector's weights file (.pt / .pth, a state dict).")
            info = {"mean": _parse_floats(mean_text, "mean"), "std": _parse_floats(std_text, "std")}
            class_names = None
        if data_source == DATA_SOURCES[0]:
            data = load_voc_dataset("sample:counting", size, class_names=class_names)
            data_label = "counting (bundled sample data set)"
        else:
            if voc_file is None:
                raise PruneScopeError("Choose a Pascal VOC zip (JPEGImages/ + Annotations/).")
            raw = voc_file.getvalue()
            path = save_upload(raw, "voc", ".zip")
            data = load_voc_dataset(path, size, class_names=class_names)
            data.source = str(path)
            data_label = f"uploaded VOC zip ({len(raw) / 1e6:.1f} MB)"
    except PruneScopeError as exc:
        st.error(f"**The data set could not be used.** {exc}", icon=":material/error:")
        return
    if model_source == MODEL_SOURCES[1]:
        weights = weights_file.getvalue()
        try:
            model = load_detector_weights(arch, weights, data.num_classes, size)
        except PruneScopeError as exc:
            st.error(f"**The detector could not be loaded.** {exc}", icon=":material/error:")
            return
        info = {**info, "class_names": list(data.class_names), "source": f"upload:{digest(weights)}"}
        label, key = f"uploaded {arch} ({len(weights) / 1e6:.1f} MB)", f"upload:{digest(weights)}:{arch}:{size}"
    else:
        label, key = f"{info['source'].split(':', 1)[1]} (bundled sample detector)", info["source"]
    state.set_detection(model, info, label, key, data, data_label)


def detection_load_page(state: AppState) -> None:
    from core.detection.models import DETECTION_ARCHITECTURES

    tab_sample, tab_upload = st.tabs(["Bundled sample", "Upload your own"])
    with tab_sample:
        st.markdown("**ssd_counting**: a small MobileNetV2-style SSD (128×128) trained on generated counting scenes: "
                    "heads, squares and triangles on cluttered backgrounds (2000 train / 300 val images).")
        st.button("Load the sample detector", type="primary", key="det_load_sample", icon=":material/play_arrow:",
                  on_click=load_sample_detection_callback)
        if st.session_state.get("det_error"):
            st.error(st.session_state["det_error"])
    with tab_upload:
        left, right = st.columns(2, gap="large")
        with left:
            st.subheader("Detector")
            model_source = st.radio("Model", MODEL_SOURCES, key="det_model_source")
            arch, size, mean_text, std_text, weights_file = None, (128, 128), "", "", None
            if model_source == MODEL_SOURCES[1]:
                archs = list(DETECTION_ARCHITECTURES)
                arch = st.selectbox("Architecture", archs, key="det_arch",
                                    format_func=lambda a: f"{a} ({DETECTION_ARCHITECTURES[a].input_size[0]} px)",
                                    help="The number of classes is taken from the data set (+1 for the background).")
                st.caption(DETECTION_ARCHITECTURES[arch].description)
                default = DETECTION_ARCHITECTURES[arch].input_size
                c1, c2 = st.columns(2)
                h = c1.number_input("Input height (px)", 32, 1024, default[0], key=f"det_h_{arch}")
                w = c2.number_input("Input width (px)", 32, 1024, default[1], key=f"det_w_{arch}")
                size = (int(h), int(w))
                mean_text = st.text_input("Normalisation mean (R, G, B)", "0.5, 0.5, 0.5", key="det_mean")
                std_text = st.text_input("Normalisation std (R, G, B)", "0.5, 0.5, 0.5", key="det_std")
                weights_file = st.file_uploader("Weights (state dict .pt / .pth)", type=["pt", "pth", "bin", "ckpt"],
                                                key="det_weights")
        with right:
            st.subheader("Data set")
            data_source = st.radio("Data", DATA_SOURCES, key="det_data_source")
            voc_file = None
            if data_source == DATA_SOURCES[1]:
                st.markdown("A zip with `JPEGImages/` and `Annotations/` (one VOC XML per image), optionally "
                            "`ImageSets/Main/train.txt` and `val.txt`. Bad files are skipped and listed; boxes "
                            "outside the image are clipped or rejected and listed.")
                voc_file = st.file_uploader("Pascal VOC zip", type=["zip"], key="det_voc_zip")
        if st.button("Load and validate", type="primary", key="det_load_upload", icon=":material/task_alt:"):
            with st.spinner("Loading and validating..."):
                load_detection_upload(state, model_source, arch, size, mean_text, std_text, weights_file, data_source,
                                      voc_file)

    st.divider()
    if not state.det_ready or state.task != "detection":
        st.info("Nothing loaded yet: take the sample detector or upload a detector and a VOC data set above.",
                icon=":material/info:")
        return
    detection_summary(state)


def detection_summary(state: AppState) -> None:
    model, data, info = state.detector, state.det_data, state.det_info
    if state.det_baseline is None:
        state.det_baseline = detection_baseline(state.det_run_key, model, data, tuple(info["mean"]), tuple(info["std"]))
    b = state.det_baseline
    st.subheader("Current detector")
    h, w = model.input_size
    st.markdown(f"**{state.det_label}** · {len(data.class_names)} object classes ({', '.join(data.class_names)}) + "
                f"background · input 3×{h}×{w}, mean {list(info['mean'])}, std {list(info['std'])}")
    c1, c2, c3 = st.columns(3)
    c1.metric(METRIC, format_map(b["map"]))
    c2.metric("MACs", format_macs(b["macs"]))
    c3.metric("Parameters", format_params(b["params"]))
    st.caption(f"{METRIC}: Pascal VOC rules on {b['n']} validation images (score threshold 0.01, NMS IoU 0.45); "
               f"MACs and parameters of one {h}×{w} image.")
    if b["per_class"]:
        st.markdown("**AP per class**: " + " · ".join(f"{k} {format_map(v)}" for k, v in b["per_class"].items()))

    st.subheader("Data set validation")
    report = data.report
    st.markdown(f"**{state.det_data_label}** · {len(data.train)} training and {len(data.val)} validation images · "
                f"{report.num_objects} objects" + (f" · {report.split}" if report.split else ""))
    detection_report(report)
    c1, c2 = st.columns([1, 2])
    with c1:
        if report.class_counts:
            st.plotly_chart(fig_class_counts(report.class_counts), key="det_counts")
    with c2:
        st.markdown("**Validation images**: ground truth in green, detections in red")
        min_score = st.slider("Show detections scoring at least", 0.05, 0.95, 0.3, step=0.05, key="det_min_score")
        n = min(6, len(data.val))
        pictures = DV.detection_images(model, data.val, info["mean"], info["std"], range(n), min_score)
        st.image(pictures, width=200, caption=[f"val image {i}" for i in range(n)])
    st.markdown("**Next**")
    c1, c2, _ = st.columns([1, 1, 3])
    with c1:
        page_link("analyse", "Analyse the filters")
    with c2:
        page_link("prune", "Prune")


def detection_report(report) -> None:
    """The problems validation found, by file."""
    problems = [
        (report.missing_annotation, "image(s) without an annotation file were skipped"),
        (report.missing_image, "annotation(s) without an image were skipped"),
        (report.malformed_xml, "annotation file(s) could not be parsed (malformed XML) and were skipped"),
        (report.corrupt_images, "image(s) could not be decoded and were skipped"),
        (report.skipped_files, "file(s) skipped: neither an image nor an annotation"),
        (report.clipped_boxes, "box(es) reached outside the image and were clipped"),
        (report.rejected_boxes, "box(es) were rejected (empty, inverted or wholly outside the image)"),
        (report.images_without_objects, "image(s) have no object"),
    ]
    shown = 0
    for files, text in problems:
        if files:
            shown += 1
            st.warning(f"{len(files)} {text}.", icon=":material/warning:")
            with st.expander(f"Which: {text.split(' ', 1)[0]} ({len(files)})"):
                st.code("\n".join(map(str, files[:500])), language=None)
    if report.unknown_classes:
        shown += 1
        st.warning("Objects of classes the detector does not know were dropped: "
                   + ", ".join(f"{k} ({v})" for k, v in report.unknown_classes.items()), icon=":material/warning:")
    for w in report.warnings:
        shown += 1
        st.warning(w, icon=":material/warning:")
    if report.converted:
        st.info("Converted to RGB: " + ", ".join(f"{n} {mode} image(s)" for mode, n in report.converted.items()))
    if not shown:
        st.success("Every image had a readable annotation and every box lay inside its image.",
                   icon=":material/check_circle:")
