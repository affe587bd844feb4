"""Object detection in the app: Load (sample detector: mAP, boxes; a bad VOC zip: its error), Review of a small
detection run (mAP labels, before/after images), Export of that run (detection bundle, mAP verification)."""
from __future__ import annotations

import io
import json
import re
import shutil
import zipfile

import numpy as np
import pytest
import torch

from core.ncs2_compiler import compiler_status
from tests.app.apptest_tools import (assert_no_exception, goto, images, new_app, texts, wait_until)

DETECTION = "Object detection (SSD)"
_RUN: list = []


pytestmark = pytest.mark.usefixtures("one_thread")


def with_detector(page: str = "load"):
    at = goto(new_app().run(), "load")
    at.radio(key="load_task").set_value(DETECTION).run()
    assert_no_exception(at)
    at.button(key="det_load_sample").click().run()
    assert_no_exception(at)
    return goto(at, page) if page != "load" else at


def test_load_sample_detector_shows_map_and_boxes():
    at = with_detector()
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["mAP@0.5"].endswith("%") and float(metrics["mAP@0.5"].rstrip(" %")) > 90
    assert metrics["MACs"] != "—"
    page = texts(at)
    assert "AP per class" in page and "ground truth in green" in page
    assert images(at) == 6
    assert at.session_state["prunescope"].task == "detection"


def test_home_shows_the_loaded_detection_data_set():
    """Home's data card with a detector loaded: a detection set has train and validation images, no test split."""
    at = with_detector("home")
    page = texts(at)
    assert re.search(r"\d+ train / \d+ selection images, \d+ classes", page), page


def test_bad_voc_zip_shows_the_specific_error():
    at = goto(new_app().run(), "load")
    at.radio(key="load_task").set_value(DETECTION).run()
    at.radio(key="det_data_source").set_value("Pascal VOC zip").run()
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:  # annotations without a single <object>: nothing to detect
        zf.writestr("VOC/JPEGImages/a.txt", b"not an image")
        zf.writestr("VOC/Annotations/a.xml", b"<annotation><filename>a.jpg</filename></annotation>")
    at.file_uploader(key="det_voc_zip").set_value(("bad.zip", buf.getvalue(), "application/zip"))
    at.button(key="det_load_upload").click().run()
    assert_no_exception(at)
    errors = [e.value for e in at.error]
    assert errors and "The data set could not be used" in errors[0], errors
    assert "No usable image" in errors[0], errors  # the loader's own reason, not a generic failure
    assert at.session_state["prunescope"].data is None


@pytest.fixture(scope="module")
def detection_run_template(tmp_path_factory):
    from core.tasks.detection.prune import DetectionPruneConfig, run_detection_pruning
    from core.tasks.detection.sample import load_sample_detection
    from core.tasks.detection.sample_model import load_sample_detector

    torch.set_num_threads(1)
    model, entry = load_sample_detector("ssd_counting")
    data = load_sample_detection("counting")
    data.val = data.val.subset(np.arange(48))
    out = tmp_path_factory.mktemp("det") / "20260101-000000-sample_ssd-abcdef"
    config = DetectionPruneConfig(cluster=8, max_steps=2, finetune_steps=2, score_images=16, filter_images=8,
                                  exact_candidates=1, latency=False, max_drop=5.0)
    run_detection_pruning(model, entry, data, config, out)
    return out


@pytest.fixture
def detection_run(detection_run_template):
    from core.workspace import runs_dir

    dest = runs_dir() / detection_run_template.name
    shutil.copytree(detection_run_template, dest)
    return dest


def test_review_and_export_of_a_detection_run(detection_run):
    at = goto(new_app().run(), "review")
    assert at.selectbox(key="rv_run").value == detection_run.name
    page = texts(at)
    assert "metric **mAP@0.5**" in page and "mAP@0.5" in [m.label for m in at.metric]
    assert "Images with predicted boxes before and after pruning" in page
    n = at.slider(key=f"rv_det_n_{detection_run.name}").value
    captions = [c for e in at.get("image") for c in [i.caption for i in e.proto.imgs]]
    assert sum("original" in c for c in captions) == n and sum("step" in c for c in captions) == n
    assert "AP per class" in page
    # Export dispatches on the run's task: a detection bundle verified by mAP on OpenVINO
    goto(at, "export")
    at.button(key="ex_start").click().run()
    wait_until(at, lambda a: "Detection bundle of step" in texts(a) or any("failed" in e.value for e in a.error),
               timeout=180, interval=2)
    page = texts(at)
    assert "Detection bundle of step" in page, page[-1500:]
    assert "mAP@0.5 on OpenVINO CPU" in page
    assert "**Target: Intel NCS2 (Myriad X)" in page
    if compiler_status()[0]:  # the MYRIAD compiler's verdict, with the blob's stage count
        assert re.search(r"\*\*Ready\*\*: compiled for NCS2 \(Myriad X\) by the OpenVINO 2021.4.2 MYRIAD compiler: "
                         r"\d+ KB, \d+ stages", page), page[-2000:]
        assert "+ NCS2 blob" in page
    else:
        assert "not verified by the NCS2 compiler (static check only)" in page
    assert any(e.label.startswith("Static NCS2 check (OpenVINO 2022.3 op table)") for e in at.expander), \
        "the same target panel as a classifier's bundle"
    assert at.get("download_button")


def conv_weight_shapes_onnx(path) -> list[tuple]:
    import onnx

    return sorted(tuple(t.dims) for t in onnx.load(str(path)).graph.initializer if len(t.dims) == 4)


def conv_weight_shapes(model) -> list[tuple]:
    return sorted(tuple(m.weight.shape) for m in model.modules() if isinstance(m, torch.nn.Conv2d))


def test_export_of_a_non_default_step_of_a_detection_run(detection_run):
    """The step picked on Export is the step in the bundle, whatever the threshold would have picked
    (it used to export the threshold's pick into a folder named after the chosen step)."""
    from core.runs import Run
    from core.workspace import workspace_root

    run = Run(detection_run)
    at = goto(new_app().run(), "export")
    default = at.selectbox(key=f"ex_step_{run.name}").value
    steps = run.steps()
    chosen = next(s for s in reversed(steps) if s != default and s != 0) if len(steps) > 2 else \
        next(s for s in steps if s != default)
    assert conv_weight_shapes(run.rebuild_step(chosen)) != conv_weight_shapes(run.rebuild_step(default))
    at.selectbox(key=f"ex_step_{run.name}").set_value(chosen).run()
    at.button(key="ex_start").click().run()
    wait_until(at, lambda a: "Detection bundle of step" in texts(a) or any("failed" in e.value for e in a.error),
               timeout=180, interval=2)
    assert f"Detection bundle of step {chosen}" in texts(at)
    bundle = workspace_root() / "exports" / f"{run.name}-step{chosen:04d}"
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["step"] == chosen
    assert manifest["models"]["pruned"]["macs"] == run.record(chosen)["macs"]
    # the exported network itself is the chosen step's: its conv shapes, not the threshold pick's
    assert conv_weight_shapes_onnx(bundle / "model" / "model.onnx") == conv_weight_shapes(run.rebuild_step(chosen))


def test_detection_prune_view_offers_the_hardware_profiles():
    from core.clusters import PROFILES

    at = with_detector("prune")
    picker = at.selectbox(key="det_pr_profile")
    assert picker.value == "ncs2" and "Cluster size" in texts(at)
    assert {picker.format_func(n) for n in PROFILES} <= set(picker.options)
    picker.set_value("cpu-avx512").run()
    assert_no_exception(at)
    assert PROFILES["cpu-avx512"].description in texts(at)
    at.selectbox(key="det_pr_profile").set_value("custom").run()
    assert at.number_input(key="det_pr_cluster").value >= 1
