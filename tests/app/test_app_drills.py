"""Drills of issue 15 in the app (AppTest): a tampered run and a damaged zip end in one message, never an
uncaught exception, and run nothing."""
from __future__ import annotations

import json

from core.runs import PICKLE_COPY
from tests.app.apptest_tools import (assert_no_exception, click_load, goto, new_app, texts)
from tests.app.test_app_load import digits_files, make_zip, upload_page, weights_bytes
from tests.cli.test_drills import _corrupt_crc, payload_bytes


def test_review_of_a_run_whose_config_claims_a_pickle_runs_nothing(sample_run, tmp_path):
    """The security hole: config.json edited to say 'pickled', a payload as the pickle; the Review page opens it."""
    marker = tmp_path / "PAYLOAD_RAN"
    config = json.loads((sample_run / "config.json").read_text())
    config["model_spec"].update(pickled=True, arch="pickled:Sequential")
    (sample_run / "config.json").write_text(json.dumps(config))
    (sample_run / PICKLE_COPY).write_bytes(payload_bytes(marker))
    at = goto(new_app().run(), "review")
    assert at.selectbox(key="rv_run").value == sample_run.name
    assert_no_exception(at)
    assert not marker.exists(), "the payload ran"
    errors = [e.value for e in at.error]
    assert any("nothing was run" in e and "I trust this file" in e and "--trusted" not in e for e in errors), errors


def test_zip_with_a_bad_crc_is_one_message_in_the_app():
    files = digits_files(per_class=4)
    bad = _corrupt_crc(make_zip(files), files[5][0])
    at = upload_page()
    at.file_uploader(key="load_model_file").set_value(("weights.pt", weights_bytes(), "application/octet-stream"))
    at.file_uploader(key="load_data_zip").set_value(("data.zip", bad, "application/zip"))
    click_load(at)
    assert_no_exception(at)
    assert len(at.error) == 1 and "damaged" in at.error[0].value and "CRC" in at.error[0].value
    assert "\n" not in at.error[0].value
    assert "data set" in texts(at)
