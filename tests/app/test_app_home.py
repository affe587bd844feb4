"""Home page: what the tool does, one-click start with the sample, the workspace's runs at a glance."""
from __future__ import annotations

import json
import subprocess
import sys

from tests.app.apptest_tools import (assert_no_exception, goto, new_app, texts, with_sample)


def test_home_explains_and_points_to_load():
    at = new_app().run()
    assert_no_exception(at)
    page = texts(at)
    assert at.title[0].value == "PruneScope"
    for word in ("CAR", "clusters sized to the hardware", "NCS2", "fallback"):
        assert word in page
    assert "No model loaded." in page and "No runs yet" in page
    assert any(p.proto.page.endswith("1_Load.py") or "Load" in p.proto.label for p in at.main.get("page_link"))


def test_one_click_sample_fills_the_glance():
    at = with_sample()
    page = texts(at)
    assert "Loaded **vgg_digits**: 99.72 %" in page
    assert "Accuracy **99.72 %** · MACs **9.9 M**" in page
    assert "1438 train / 359 selection / 0 test images" in page  # the glossary's words (issue 27)
    assert any("Model: vgg_digits" in c.value for c in at.sidebar.caption), "the sidebar sees the sample at once"
    # the loaded sample is there on every page of the session
    goto(at, "analyse")
    assert "Load a model first" not in texts(at)


def test_runs_are_listed_and_interrupted_ones_flagged(sample_run):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    status = json.loads((sample_run / "status.json").read_text())
    (sample_run / "status.json").write_text(json.dumps({**status, "state": "running", "pid": dead.pid}))
    at = new_app().run()
    assert_no_exception(at)
    table = at.dataframe[0].value
    assert list(table["run"]) == [sample_run.name] and list(table["state"]) == ["interrupted"]
    assert int(table["steps"].iloc[0]) == 2
    assert "1 run(s) were interrupted" in texts(at)
