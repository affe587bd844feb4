"""Issue 28 in the app (AppTest): one damaged run in the workspace (a truncated history, a bad status, a record
missing a key, a config linked elsewhere) never breaks Home, Review or Export; the app lists it as damaged,
with the reason, and the good run stays reachable on every page. A run whose files carry no sha256 (written
before files were hashed) is shown, marked unverified."""
from __future__ import annotations

import json
import shutil

import pytest

from core.workspace import runs_dir
from tests.app.apptest_tools import assert_no_exception, goto, new_app, texts


def _truncate_history(d):
    (d / "history.jsonl").write_text((d / "history.jsonl").read_text()[:-25])


def _bad_status(d):
    (d / "status.json").write_text("[1, 2")


def _record_missing_key(d):
    lines = [json.loads(x) for x in (d / "history.jsonl").read_text().splitlines() if x.strip()]
    lines[1].pop("metric")
    (d / "history.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))


def _linked_config(d):
    (d / "config.json").unlink()
    (d / "config.json").symlink_to("/dev/zero")


@pytest.mark.parametrize("damage, reason", [
    (_truncate_history, "history.jsonl is damaged"),
    (_bad_status, "status.json is damaged"),
    (_record_missing_key, "has no metric"),
    (_linked_config, "symbolic link"),
])
def test_a_damaged_run_is_listed_and_every_page_still_works(sample_run, damage, reason):
    broken = runs_dir() / "20250101-000000-broken-000000"  # sorts after the good run: newest first is the good one
    shutil.copytree(sample_run, broken)
    damage(broken)
    at = new_app().run()
    assert_no_exception(at)
    page = texts(at)
    assert "1 damaged run(s)" in page and broken.name in page and reason in page, page[-3000:]
    assert list(at.dataframe[0].value["run"]) == [sample_run.name]
    for name, key in (("review", "rv_run"), ("export", "ex_run")):
        goto(at, name)
        page = texts(at)
        assert "1 damaged run(s)" in page and reason in page
        box = at.selectbox(key=key)
        assert box.value == sample_run.name and broken.name not in box.options
    goto(at, "review")
    assert "metric **accuracy**" in texts(at)  # the good run is reviewed as before


def test_a_run_without_hashes_is_marked_unverified(sample_run):
    """Runs written before files were hashed: shown on Review and Export with an 'unverified' note."""
    config = json.loads((sample_run / "config.json").read_text())
    config.pop("files", None)
    (sample_run / "config.json").write_text(json.dumps(config))
    lines = [json.loads(x) for x in (sample_run / "history.jsonl").read_text().splitlines() if x.strip()]
    (sample_run / "history.jsonl").write_text("".join(json.dumps({k: v for k, v in r.items()
                                                                  if k != "weights_sha256"}) + "\n" for r in lines))
    at = goto(new_app().run(), "review")
    assert "Unverified" in texts(at) and "original.pt" in texts(at)
    goto(at, "export")
    assert "Unverified" in texts(at)
