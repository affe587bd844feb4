"""The object detection (SSD) task's UI (one plug-in of :mod:`ui.tasks`): its load form, its data report and
pictures, its per-group CAR analysis, its settings' ranges, its per-class AP and boxes on Review, its bundle on
Export. The pages own the flow and everything the tasks share (state, jobs, progress, threshold, charts)."""
from __future__ import annotations

from pathlib import Path

import streamlit as st

from core.tasks.detection.task import NAME as TASK_NAME
from core.tasks.registry import task_plugin
from core.tasks.detection import visualize as DV
from core.tasks.detection.models import DETECTION_ARCHITECTURES
from core.tasks.detection.prune import DetectionPruneConfig
from core.errors import PruneScopeError
from core.jobs import JobAlreadyRunning, detection_car_job, detection_prune_job
from core.sources import load_voc_dataset
from ui.charts import fig_class_counts
from ui.common import action_button, format_macs, format_params, format_seconds, job_status, page_link, target_panel
from ui.state import (AppState, detection_baseline, detection_data_for_run, detection_groups, detection_pictures,
                      digest, get_registry, get_state, run_model, sample_detection, save_upload)

NAME = TASK_NAME  # AppState.task and a run's recorded task (the core task's own name)
LABEL = task_plugin(NAME).label  # the Load page's task choice, as the core registry names it
METRIC = "mAP@0.5"  # the metric as the pages show it
MODEL_WORD = "Detector"  # what the sidebar calls the loaded model
# The Prune page's settings of this task: the config class, the widget key prefix and two sliders' ranges.
PRUNE_SETTINGS = {"config": DetectionPruneConfig, "prefix": "det_pr", "images": ("Images for screening", 16, 512, 16),
                  "steps": 50}
MODEL_SOURCES = ("Bundled sample detector (ssd_counting)", "Architecture + weights (state dict)")
DATA_SOURCES = ("Bundled counting sample", "Pascal VOC zip")


def format_map(value) -> str:
    return "—" if value is None else f"{value * 100:.2f} %"


# ----------------------------------------------------------------------------- Load


def use_detection(state: AppState, model, info: dict, label: str, key: str, data, data_label: str) -> None:
    """Make a detector and its VOC data the session's model and data, with the baseline measured."""
    state.set_model(model, label, key, task=NAME, info=info)
    state.set_data(data, data_label, data.source)
    state.baseline = detection_baseline(state.key, model, data, tuple(info["mean"]), tuple(info["std"]))


def load_sample_detection_callback() -> None:
    state = get_state()
    try:
        model, entry, data = sample_detection()
        info = {"mean": entry["mean"], "std": entry["std"], "class_names": entry["class_names"],
                "source": f"sample:{entry['name']}"}
        use_detection(state, model, info, f"{entry['name']} (bundled sample detector, {entry['architecture']})",
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
    from core.tasks.detection.loading import load_detector_weights

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
    use_detection(state, model, info, label, key, data, data_label)


def sample_tab(state: AppState) -> None:
    """The bundled sample detector, one click."""
    st.markdown("**ssd_counting**: a small MobileNetV2-style SSD (128×128) trained on generated counting scenes: "
                "heads, squares and triangles on cluttered backgrounds (2000 train / 300 val images).")
    st.button("Load the sample detector", type="primary", key="det_load_sample", icon=":material/play_arrow:",
              on_click=load_sample_detection_callback)
    if st.session_state.get("det_error"):
        st.error(st.session_state["det_error"])


def upload_form(state: AppState) -> None:
    """A detector (sample or architecture + state dict) and a data set (sample or Pascal VOC zip)."""
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


def loaded_details(state: AppState) -> None:
    """Below the shared baseline metrics: how mAP was measured, AP per class, the VOC data report, pictures."""
    model, data, info, b = state.model, state.data, state.model_info, state.baseline
    h, w = model.input_size
    st.caption(f"{METRIC}: Pascal VOC rules on {b['n']} selection images (score threshold 0.01, NMS IoU 0.45); "
               f"MACs and parameters of one {h}×{w} image. Object classes: {', '.join(data.class_names)}.")
    if b["per_class"]:
        st.markdown("**AP per class**: " + " · ".join(f"{k} {format_map(v)}" for k, v in b["per_class"].items()))

    st.subheader("Data set check")
    report = data.report
    st.markdown(f"**{state.data_label}** · {len(data.train)} train and {len(data.val)} selection images · "
                f"{report.num_objects} objects" + (f" · {report.split}" if report.split else ""))
    detection_report(report)
    c1, c2 = st.columns([1, 2])
    with c1:
        if report.class_counts:
            st.plotly_chart(fig_class_counts(report.class_counts), key="det_counts")
    with c2:
        st.markdown("**Selection images**: ground truth in green, detections in red")
        min_score = st.slider("Show detections scoring at least", 0.05, 0.95, 0.3, step=0.05, key="det_min_score")
        n = min(6, len(data.val))
        pictures = detection_pictures(state.key, model, data.val, tuple(info["mean"]), tuple(info["std"]),
                                      tuple(range(n)), float(min_score))
        st.image(pictures, width=200, caption=[f"val image {i}" for i in range(n)])


def model_shape(state: AppState) -> str:
    """Object classes and input of the loaded detector, e.g. '3 object classes + background, input 3×128×128'."""
    h, w = state.model.input_size
    return f"{len(state.model_info.get('class_names', []))} object classes + background, input 3×{h}×{w}"


def input_details(state: AppState) -> str:
    """The rest of the Load page's "Current model" line: the normalisation."""
    return f", mean {list(state.model_info['mean'])}, std {list(state.model_info['std'])}"


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


# ----------------------------------------------------------------------------- Analyse


def analysis_panel(state: AppState) -> None:
    """CAR (mAP drop) of the filters of one layer group at a time: a detector's CAR costs one mAP per filter."""
    if not state.ready:
        st.info("**Load a detector first** on the Load page.", icon=":material/info:")
        page_link("load", "Go to Load")
        return
    registry = get_registry()
    st.markdown(f"For a detector, the CAR of a filter is the **{METRIC} drop** when that filter alone is removed. "
                "Every filter costs one decode + NMS + mAP, so CAR is measured here for the filters of **one layer "
                "group** at a time, on a subset of the selection images. The pruning run scores every filter by "
                "its MultiBox-loss increase and decides each cluster by its exact mAP drop.")
    groups = [g for g in detection_groups(state.key, state.model) if not g.get("left_alone")]
    roots = [g["root"] for g in groups]
    by_root = {g["root"]: g for g in groups}
    st.dataframe([{"layer group": g["root"], "filters": g["width"], "MACs per filter": format_macs(g["macs_per_filter"]),
                   "coupled layers": len(g["producers"])} for g in groups], hide_index=True, width="stretch")
    st.caption("The head's output convolutions fix the [anchors, 4 + classes] output and are never pruned.")
    job_key = state.key
    job = registry.latest("detection-car", job_key)
    if job is not None:
        snap = job.snapshot()
        if snap.state == "done" and (state.car is None or state.car is not snap.result):
            state.car = snap.result
    running = job is not None and job.running

    def start(root: str, n_images: int) -> None:
        try:
            registry.start("detection-car", detection_car_job(state.model, root, state.data.val,
                                                              state.model_info["mean"], state.model_info["std"],
                                                              n_images), key=job_key, meta={"root": root})
            state.car = None
        except JobAlreadyRunning:
            pass

    def cancel() -> None:
        j = registry.latest("detection-car", job_key)
        if j is not None:
            j.request_cancel()

    with st.container(border=True):
        c1, c2, c3 = st.columns([2, 1, 1], vertical_alignment="bottom")
        root = c1.selectbox("Layer group", roots, key="det_an_group",
                            format_func=lambda r: f"{r} · {by_root[r]['width']} filters")
        n_max = len(state.data.val)
        n_images = c2.slider("Selection images", min(10, n_max), n_max, min(48, n_max), key="det_an_images",
                             help="mAP is measured on this many selection images per filter.")
        if running:
            c3.button("Cancel", key="det_an_cancel", on_click=cancel, icon=":material/stop:", width="stretch")
        else:
            action_button(c3, "Compute CAR", start, root, n_images, key="det_an_start", type="primary",
                          icon=":material/play_arrow:", width="stretch")

    @st.fragment(run_every=1.0 if running else None)
    def car_status() -> None:
        job_status(registry, "detection-car", job_key, "Detection CAR", running, what="CAR analysis")

    car_status()
    car = state.car
    if car is None:
        if not running:
            st.info("Choose a layer group and press **Compute CAR**: it runs in the background.",
                    icon=":material/info:")
        return
    st.success(f"CAR of the {car.width} filters of `{car.root}` on {car.n_images} images (baseline {METRIC} "
               f"{format_map(car.baseline_map)}; {format_seconds(car.seconds)}).", icon=":material/check_circle:")
    sort = st.toggle("Lowest CAR first", value=True, key="det_an_sort")
    st.plotly_chart(DV.fig_group_car(car, sort), key="det_an_fig")
    st.caption(f"One bar per filter: {METRIC} points lost when that filter alone is removed. Filters at or below "
               "zero can go at no cost on these images.")
    page_link("prune", "Prune")


# ----------------------------------------------------------------------------- Prune


def run_name(state: AppState) -> str:
    """The detector's architecture in a new run's folder name."""
    return state.model.config["arch"]


def prune_job(state: AppState, config, run_dir: Path):
    """The detection pruning job of the session's detector and VOC data."""
    return detection_prune_job(state.model, state.model_info, state.data, config, run_dir)


def extra_settings(state: AppState, defaults, cluster, max_drop, extra: dict, running: bool) -> bool:
    """Nothing beyond the shared settings; the settings are always usable."""
    return True


def budget_extras(defaults, extra: dict, running: bool) -> None:
    """Nothing beyond the shared budget settings."""


def analyse_car_setting(defaults, running: bool) -> bool:
    """No toggle: the config's default."""
    return defaults.analyse_car


def config_panels(state: AppState, config, running: bool) -> None:
    """Nothing below the settings."""


# ----------------------------------------------------------------------------- Review


def per_class_view(base: dict, pick: dict) -> None:
    """AP per class of the original and the picked step."""
    ap_per_class(base, pick)


def removed_filters_view(run, sel: str, pick: dict, removed: list[tuple[dict, dict]], car_groups) -> None:
    """Below the removed clusters' table: images with the boxes before and after pruning."""
    boxes_before_after(run, sel, pick)


def recovery_section(run, hist: list[dict], pick: dict) -> None:
    """Nothing: the recovery fine-tune is a classifier's."""


def ap_per_class(base: dict, pick: dict) -> None:
    """AP per class of the original and the picked step (the Review page's per-class view for a detector)."""
    if not (base.get("per_class") and pick.get("per_class")):
        st.caption("AP per class was not recorded in this run.")
        return
    st.markdown("**AP per class** (selection images)")
    st.dataframe([{"class": c, "original": format_map(ap), f"step {pick['step']}": format_map(pick["per_class"].get(c)),
                   "change (points)": f"{((pick['per_class'].get(c) or 0) - ap) * 100:+.2f}"}
                  for c, ap in base["per_class"].items()], hide_index=True, width="stretch")


def boxes_before_after(run, sel: str, pick: dict) -> None:
    """Validation images with the boxes of the original and of the picked step, side by side."""
    st.subheader("Images with predicted boxes before and after pruning")
    data = detection_data_for_run(run)
    if data is None:
        st.info("The run's data set is not available any more, so no images can be drawn.")
        return
    c1, c2 = st.columns(2)
    n = c1.slider("Selection images", 1, min(8, len(data.val)), min(4, len(data.val)), key=f"rv_det_n_{sel}")
    min_score = c2.slider("Show detections scoring at least", 0.05, 0.95, 0.3, step=0.05, key=f"rv_det_score_{sel}")
    try:
        mtime = (run.dir / "original.pt").stat().st_mtime
        original = run_model(str(run.dir), 0, mtime)
        pruned = run_model(str(run.dir), pick["step"], mtime)
    except PruneScopeError as exc:
        st.error(str(exc))
        return
    mean, std = tuple(run.spec.input.mean), tuple(run.spec.input.std)
    before = detection_pictures(f"{run.dir}:0", original, data.val, mean, std, tuple(range(n)), float(min_score))
    after = detection_pictures(f"{run.dir}:{pick['step']}", pruned, data.val, mean, std, tuple(range(n)),
                               float(min_score))
    st.caption("Ground truth in green, detections in red.")
    for i in range(n):
        a, b = st.columns(2)
        a.image(before[i], caption=f"val image {i}: original", width=240)
        b.image(after[i], caption=f"val image {i}: step {pick['step']}", width=240)


# ----------------------------------------------------------------------------- Export


def bundle_view(manifest: dict, bundle_dir, zip_path) -> bool:
    """A detection bundle (``detection_bundle_view``); returns True: the Export page shows nothing more."""
    detection_bundle_view(manifest, bundle_dir, zip_path)
    return True


def detection_bundle_view(manifest: dict, bundle_dir, zip_path) -> None:
    """What a detection bundle holds: the target's verdict, OpenVINO mAP against PyTorch, figures, the zip."""
    pruned, original = manifest["models"]["pruned"], manifest["models"]["original"]
    ver = manifest["verification"]
    metric = manifest.get("metric", METRIC)
    st.subheader(f"Detection bundle of step {manifest.get('step')}")
    c1, c2 = st.columns(2)
    with c1.container(border=True):
        target_panel(manifest)
    with c2.container(border=True):
        (st.success if ver["verified"] else st.warning)(
            ver["message"], icon=":material/verified:" if ver["verified"] else ":material/warning:")
        ov = original["verification"]
        st.markdown(f"**Fallback (original)**: {metric} OpenVINO {format_map(ov['map_openvino'])} vs PyTorch "
                    f"{format_map(ov['map_torch'])}.")
    st.dataframe([{"model": label, f"{metric} (PyTorch)": format_map(m["verification"]["map_torch"]),
                   f"{metric} (OpenVINO CPU)": format_map(m["verification"]["map_openvino"]),
                   "MACs": format_macs(m.get("macs")), "parameters": format_params(m.get("params")),
                   "latency (OpenVINO CPU)": f"{m['latency_ms']:.2f} ms" if m.get("latency_ms") else "—"}
                  for label, m in (("pruned (model/)", pruned), ("original (fallback/)", original))],
                 hide_index=True, width="stretch")
    with st.container(border=True):
        top = bundle_dir.name
        blob_note = " + NCS2 blob" if pruned.get("blob") else ""
        st.markdown(f"""**What is in the zip** (`{zip_path.name}`, {zip_path.stat().st_size / 1e6:.2f} MB)

- `{top}/model/`, `{top}/fallback/`: the pruned and the original raw SSD (IR + ONNX{blob_note}), output [1, anchors, 4 + classes]
- `{top}/anchors.npy` + `postprocess.py`: decoding, softmax and NMS on the host (numpy)
- `{top}/deploy.py`: falls back to `fallback/` when a file is missing or altered, fails to compile or fails the self-test;
  `python deploy.py --device MYRIAD --image picture.jpg` prints the detections
- `{top}/manifest.json`, `README.txt`: hashes, figures, input format, class names, target verdicts, verification""")
        st.download_button("Download the bundle (.zip)", data=zip_path.read_bytes(), file_name=zip_path.name,
                           mime="application/zip", type="primary", key="ex_download", icon=":material/download:")
        st.caption(f"Also on disk: `{bundle_dir}`")
