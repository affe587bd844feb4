"""Export page: default step from the threshold, the target choice, the export job, the MYRIAD compiler's verdict,
verification, the zip."""
from __future__ import annotations

import re
import zipfile

from core.ncs2_compiler import compiler_status
from core.runs import Run
from core.targets import TARGETS
from core.workspace import workspace_root
from tests.app.apptest_tools import (assert_no_exception, goto, new_app, texts, wait_until)


def test_empty_state_points_to_prune():
    at = goto(new_app().run(), "export")
    assert "Nothing to export yet" in texts(at)


def test_export_of_the_threshold_pick(sample_run):
    run = Run(sample_run)
    at = goto(new_app().run(), "review")
    at.slider(key=f"rv_thr_{sample_run.name}").set_value(5.0).run()
    pick = at.session_state["prunescope"].export_step
    goto(at, "export")
    assert at.selectbox(key=f"ex_step_{sample_run.name}").value == pick
    assert "the Review threshold (5.0 points) picked it" in texts(at)
    assert at.radio(key="ex_target").value == "ncs2" and list(at.radio(key="ex_target").options) == [
        t.label for t in TARGETS.values()]
    at.button(key="ex_start").click().run()
    assert_no_exception(at)
    wait_until(at, lambda a: "Bundle of step" in texts(a) or a.error, timeout=180)
    assert not at.error, at.error[0].value
    page = texts(at)
    compiled = compiler_status()[0]
    if compiled:  # the verdict is the MYRIAD compiler's, with the blob's size and stage count
        assert re.search(r"\*\*Ready\*\*: compiled for NCS2 \(Myriad X\) by the OpenVINO 2021.4.2 MYRIAD compiler: "
                         r"\d+ KB, \d+ stages", page), page[-2000:]
        assert "`model.blob` (NCS2 blob, compiled by the MYRIAD compiler)" in page
    else:
        assert "not verified by the NCS2 compiler (static check only)" in page
    assert "Verified: the IR agrees with PyTorch" in page
    # issue 27: each verification line names its model (the original's is the fallback line)
    assert f"**Pruned model (`model/`), step {pick}**: Verified" in page or \
        f"**Pruned model (`model/`), step {pick}**: Not verified" in page
    assert "**Fallback (original)**" in page
    assert "fallback/model.xml" in page and "deploy.py" in page
    assert len(at.get("download_button")) == 1
    # latency as median with IQR and FPS; the difference stated only as the manifest's comparison says
    table = at.dataframe[-1].value
    assert all("IQR" in v and "FPS" in v for v in table["latency (OpenVINO CPU, median, IQR, FPS)"])
    assert "Pruned vs original latency:" in page
    at.button(key="ex_layers").click().run()
    assert_no_exception(at)
    layers = at.dataframe[-1].value
    assert list(layers.columns) == ["layer", "operation", "median (ms)", "share"] and len(layers) >= 3
    zip_path = workspace_root() / "exports" / f"{run.name}-step{pick:04d}.zip"
    names = zipfile.ZipFile(zip_path).namelist()
    top = zip_path.stem
    for f in ("model/model.xml", "model/model.bin", "model/model.onnx", "fallback/model.xml", "fallback/model.bin",
              "deploy.py", "manifest.json", *(("model/model.blob", "fallback/model.blob") if compiled else ())):
        assert f"{top}/{f}" in names
    # the bundle is found again on a fresh visit (no second export needed)
    again = goto(new_app().run(), "export")
    again.selectbox(key=f"ex_step_{sample_run.name}").set_value(pick).run()
    assert "**Target: Intel NCS2" in texts(again) and again.button(key="ex_start").label == "Export again"
