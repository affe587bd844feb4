"""Issue 16: runs are named as the user knows their files (not the workspace's hashed upload paths), and a run
cancelled before its first step is not offered for review."""
from __future__ import annotations

import threading

from core.architectures import SampleResNet
from core.prune import Callbacks, run_pruning
from core.runs import Run, reviewable, run_reviewable
from core.workspace import atomic_write_json, folder_upload_name, remember_upload_name, upload_name, uploads_dir
from tests.helpers import loaded as make_loaded, quick_config, random_dataset


def stored_upload(name: str) -> str:
    """A data upload as the app stores it: under a hashed name, with the user's name remembered beside it."""
    path = uploads_dir() / "data-0123456789abcdef.zip"
    path.write_bytes(b"zip")
    remember_upload_name(path, name)
    return str(path)


def start_run(tmp_path, data_source: str | None, upload: str = "", cancel_at: int | None = None) -> Run:
    loaded = make_loaded(SampleResNet(num_classes=4), "sample_resnet", 4)
    loaded.spec.upload_name = upload
    cancel = threading.Event()

    def on_step(record):
        if cancel_at is not None and record["step"] >= cancel_at:
            cancel.set()

    run_pruning(loaded, random_dataset(4), quick_config(max_steps=2), tmp_path / "r", Callbacks(step=on_step), cancel,
                data_source=data_source)
    return Run(tmp_path / "r")


def test_a_run_from_uploads_records_and_shows_the_users_file_names(tmp_path):
    source = stored_upload("cifar10 subset.zip")
    run = start_run(tmp_path, source, upload="resnet20-12fdb.th", cancel_at=1)
    assert run.config["upload_names"] == {"model": "resnet20-12fdb.th", "data": "cifar10 subset.zip"}
    assert run.config["data_source"] == source  # what the run reads its data from stays the stored copy
    assert run.model_label == "resnet20-12fdb.th · sample_resnet"
    assert run.data_label == "cifar10 subset.zip"
    assert run.display_name == f"{run.name} — resnet20-12fdb.th · sample_resnet on cifar10 subset.zip"
    assert "uploads" not in run.display_name and "0123456789abcdef" not in run.display_name


def test_old_runs_fall_back_to_the_paths_file_name(tmp_path):
    run = start_run(tmp_path, "/somewhere/workspace/uploads/data-0123456789abcdef.zip", cancel_at=1)
    config = {k: v for k, v in run.config.items() if k != "upload_names"}
    config["model_spec"] = {**config["model_spec"], "source": "/home/me/models/net.pth"}
    config["model_spec"].pop("upload_name")  # written before the field existed
    atomic_write_json(run.dir / "config.json", config)
    old = Run(run.dir)
    assert old.data_label == "data-0123456789abcdef.zip"
    assert old.model_label == "net.pth · sample_resnet"
    sample = {**config, "data_source": "sample:vgg_digits",
              "model_spec": {**config["model_spec"], "source": "sample:vgg_digits"}}
    atomic_write_json(run.dir / "config.json", sample)
    assert Run(run.dir).data_label == "sample:vgg_digits" and Run(run.dir).model_label == "sample:vgg_digits"


def test_upload_name_records():
    path = uploads_dir() / "data-x.zip"
    assert upload_name(path) is None and upload_name(None) is None
    remember_upload_name(path, "mine.zip")
    assert upload_name(path) == "mine.zip"
    (uploads_dir() / ("data-x.zip" + ".name.json")).write_text("{not json")
    assert upload_name(path) is None  # a damaged record names nothing, and breaks nothing
    assert folder_upload_name(["digits/0/a.png", "digits/1/b.png"]) == "digits"
    assert folder_upload_name(["a/0/a.png", "b/1/b.png", "c.png"]) == "3 uploaded files"


def test_a_run_cancelled_before_its_first_step_is_not_reviewable(tmp_path):
    run = start_run(tmp_path, None, cancel_at=0)
    assert [r["step"] for r in run.history] == [0] and run.status["state"] == "cancelled"
    assert not run.reviewable and not run_reviewable(run.dir) and not reviewable(run.history)
    assert not run_reviewable(tmp_path / "nothing here") and not run_reviewable(None)


def test_a_run_with_an_accepted_step_is_reviewable(tmp_path):
    run = start_run(tmp_path, None, cancel_at=1)
    assert [r["step"] for r in run.history] == [0, 1]
    assert run.reviewable and run_reviewable(run.dir)
