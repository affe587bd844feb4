"""Drills of issue 28 ("runs and bundles you can trust"), one per numbered item and per traceback / weak case,
and the three kinds held open before (a model OpenVINO cannot convert, checkpoints with a few non-model entries,
liveness by pid alone), each on an example of our own.

Every refusal is checked as the earlier drills check it (``tests/cli/test_drills.py``): one line on stderr
starting with ``error:``, exit code 2, no traceback; nothing executed (a marker file a payload would create
stays absent); nothing written outside the workspace (snapshots of the folders that must not change); nothing
of the user's deleted; a damaged run listed as damaged with the reason while the good ones keep working.
Inputs are real: the bundled samples, a real pruning run of ``vgg_digits`` and a real bundle exported from it.
"""
from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from core import cli
from core.custom_code import build_from_code
from core.data import folder_upload_to_zip
from core.errors import PruneScopeError, UntrustedRunError
from core.export import BUNDLE_FORMAT, export_run
from core.integrity import IntegrityError, read_bounded, sha256_bytes
from core.jobs import past_runs
from core.models import InputSpec, load_model
from core.plausibility import check_plausibility, near_chance
from core.runs import CODE_COPY, TRUST_RECORD, Run, RunWriter, process_start_time, scan_runs, trusted_hashes
from core.sources import load_dataset
from core.workspace import runs_dir, workspace_root
from tests.cli.test_drills import (ROOT, _prune_until_two_steps, assert_one_error_line, assert_refused, cli_run,
                                   digit_files, make_zip, payload_bytes, snapshot)
from tests.helpers import CLASSIC_LOOP, random_dataset

SPEC32 = InputSpec(height=32, width=32, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
NET = """import torch
import torch.nn as nn


class Net(nn.Module):
    def __init__(self, num_classes=10):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x):
        return self.fc(self.pool(torch.relu(self.conv(x))).flatten(1))


def net(num_classes=10):
    return Net(num_classes)


def loader(path):
    # a function of the same trusted file that loads whatever pickle it is given: never to be called by a run
    return torch.load(path, weights_only=False)
"""


# ----------------------------------------------------------------------------- helpers


def main(argv: list[str], capsys) -> tuple[int, str]:
    code = cli.main(argv)
    return code, capsys.readouterr().err


def refused(argv: list[str], capsys, *needles: str) -> str:
    """``python -m core ARGV`` in-process: exit 2 and one ``error:`` line holding every needle; returns it."""
    code, err = main(argv, capsys)
    assert code == 2, err[-2000:]
    return assert_one_error_line(err, *needles)


def write_code(folder: Path, source: str = NET, name: str = "net.py") -> Path:
    path = folder / name
    path.write_text(source)
    return path


def weights_of(model: nn.Module) -> bytes:
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return buf.getvalue()


def rewrite_json(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def history_lines(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "history.jsonl").read_text().splitlines() if line.strip()]


def write_history(run_dir: Path, records: list) -> None:
    (run_dir / "history.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


# ----------------------------------------------------------------------------- a real run and a real bundle


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> dict:
    """A real pruning run of the vgg_digits sample (2 steps) and a real bundle of its step 1, made once."""
    base = tmp_path_factory.mktemp("integrity")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PRUNESCOPE_WORKSPACE", str(base / "ws"))
        from core.prune import PruneConfig, run_pruning

        loaded = load_model("sample:vgg_digits")
        data = load_dataset("sample:vgg_digits", loaded.spec.input, expected_classes=loaded.spec.num_classes)
        run = base / "20260101-000000-digits-abcdef"
        config = PruneConfig(criterion="l1", cluster=8, max_drop=100.0, finetune_steps=2, batch_size=16,
                             score_images=32, max_steps=2, latency=False, analyse_car=False, patience=0,
                             **CLASSIC_LOOP)
        run_pruning(loaded, data, config, run, data_source="sample:vgg_digits",
                    data_options={"val_fraction": 0.2, "seed": 0, "test_fraction": data.split.get("test_fraction", 0.0),
                                  "split": data.split_record()})
        bundle = base / "bundle"
        export_run(run, step=1, out_path=bundle)
    assert len(Run(run).steps()) >= 2
    return {"run": run, "bundle": bundle}


@pytest.fixture
def good_run(template) -> Path:
    dest = runs_dir() / template["run"].name
    shutil.copytree(template["run"], dest)
    return dest


@pytest.fixture
def bundle(template, tmp_path) -> Path:
    dest = tmp_path / "exports" / "bundle"
    shutil.copytree(template["bundle"], dest)
    return dest


@pytest.fixture
def marker(tmp_path) -> Path:
    return tmp_path / "PAYLOAD_RAN"


@pytest.fixture
def custom_run(tmp_path) -> tuple[Path, Path]:
    """A run of a model built by the user's own (trusted) Python file; returns (run folder, the user's file)."""
    code = write_code(tmp_path)
    weights = weights_of(build_from_code(code, "net", trusted=True))
    loaded = load_model(weights, code_path=code, code_name="net", trusted=True, input_spec=SPEC32)
    out = runs_dir() / "custom"
    writer = RunWriter(out)
    writer.start({"data_source": "sample:vgg_digits", "data_options": {"val_fraction": 0.2, "seed": 0}}, loaded)
    writer.add_step({"step": 0, "metric": 0.1, "macs": 1, "params": 1}, None, [])
    writer.status("done", "finished")
    return out, code


# ----------------------------------------------------------------------------- 1, 2: trust bound to bytes and call


def test_1_code_swapped_after_load_is_never_kept_nor_trusted(tmp_path, marker, capsys):
    """The file is swapped between the load (which ran it) and the run start: the run keeps and trusts the bytes
    that ran; the swapped bytes are neither kept nor trusted, and export without --trusted runs nothing new."""
    code = write_code(tmp_path)
    ran = code.read_bytes()
    loaded = load_model(weights_of(build_from_code(code, "net", trusted=True)), code_path=code, code_name="net",
                        trusted=True, input_spec=SPEC32)
    evil = NET + f"\nopen({str(marker)!r}, 'w').write('ran')\n"
    code.write_text(evil)  # swapped while prune loads its data
    out = runs_dir() / "swapped"
    writer = RunWriter(out)
    writer.start({"data_source": "sample:vgg_digits", "data_options": {"val_fraction": 0.2, "seed": 0}}, loaded)
    writer.add_step({"step": 0, "metric": 0.1, "macs": 1, "params": 1}, None, [])
    writer.status("done")
    assert (out / CODE_COPY).read_bytes() == ran
    assert sha256_bytes(evil.encode()) not in trusted_hashes()
    assert Run(out).original().model(torch.zeros(1, 3, 32, 32)).shape == (1, 10)
    assert not marker.exists()
    # the swapped file put into the run instead: refused, never run, by the CLI too
    (out / CODE_COPY).write_text(evil)
    refused(["export", "--run", str(out), "--out", str(tmp_path / "b")], capsys, "--trusted", "nothing was run")
    assert not marker.exists() and not (tmp_path / "b").exists()


def test_2_trust_covers_the_call_not_only_the_file(custom_run, tmp_path, marker, capsys):
    """config.json pointed at another function of the trusted file, one that loads a pickle named in its
    arguments: refused before anything runs; the trusted call still works."""
    out, _ = custom_run
    evil = out / "weights_of_a_friend.pt"
    evil.write_bytes(payload_bytes(marker))
    rewrite_json(out / "config.json", lambda c: c["model_spec"].update(code_name="loader", code_args=[str(evil)]))
    before = snapshot(workspace_root())
    line = refused(["export", "--run", str(out), "--out", str(tmp_path / "b")], capsys,
                   "loader(", "never trusted", "nothing was run", "--trusted")
    assert "net()" in line  # names the call that was trusted
    assert not marker.exists()
    assert snapshot(workspace_root()) == before
    with pytest.raises(UntrustedRunError):
        Run(out).original()
    assert not marker.exists()
    rewrite_json(out / "config.json", lambda c: c["model_spec"].update(code_name="net", code_args=None))
    assert Run(out).original().model is not None


def test_2_a_trusted_pickle_is_never_imported_as_code(custom_run, tmp_path, marker, capsys):
    """The spec may only name the run's own code copy; a trust of one kind never serves another."""
    out, _ = custom_run
    rewrite_json(out / "config.json", lambda c: c["model_spec"].update(code_file="../../elsewhere.py"))
    refused(["export", "--run", str(out), "--out", str(tmp_path / "b")], capsys, "config.json is damaged",
            "model_code.py")
    assert [d.name for d in scan_runs()[1]] == ["custom"]


# ----------------------------------------------------------------------------- 3: links in run folders


def test_3_steps_linked_outside_the_workspace_makes_recover_write_nothing(good_run, tmp_path, capsys):
    outside = tmp_path / "outside"
    shutil.copytree(good_run / "steps", outside)
    shutil.rmtree(good_run / "steps")
    (good_run / "steps").symlink_to(outside, target_is_directory=True)
    before = snapshot(outside)
    refused(["recover", str(good_run), "--step", "1", "--epochs", "1"], capsys, "symbolic link")
    refused(["export", "--run", str(good_run), "--out", str(tmp_path / "b")], capsys, "symbolic link")
    assert snapshot(outside) == before
    assert not (tmp_path / "b").exists()
    damaged = scan_runs()[1]
    assert [d.name for d in damaged] == [good_run.name] and "symbolic link" in damaged[0].reason


# ----------------------------------------------------------------------------- 4: small inputs, huge costs


def test_4_huge_images_in_a_tiny_zip_are_refused_at_once(tmp_path, capsys):
    """A few KB of 10000x10000 PNGs: the 4,096-pixel limit applies to the size inferred from them; refused
    before anything is decoded, and the unpacked upload is not left behind."""
    big = io.BytesIO()
    Image.new("1", (10000, 10000)).save(big, format="PNG")
    data = tmp_path / "huge.zip"
    data.write_bytes(make_zip([(f"c{c}/{i}.png", big.getvalue()) for c in range(2) for i in range(3)]))
    assert data.stat().st_size < 100_000
    code = write_code(tmp_path)
    weights = tmp_path / "w.pt"
    weights.write_bytes(weights_of(build_from_code(code, "net", [2], trusted=True)))
    before = snapshot(workspace_root())
    t0 = time.time()
    refused(["evaluate", "--model", str(weights), "--model-code", str(code), "--model-class", "net",
             "--model-args", "[2]", "--trusted", "--data", str(data), "--no-latency"], capsys, "10000×10000", "4096")
    assert time.time() - t0 < 60
    assert snapshot(workspace_root()) == before, "no unpacked upload left behind"


@pytest.mark.parametrize("edit, needle", [
    (lambda c: c["model_spec"]["input"].update(height=100000), "input size"),
    (lambda c: c["model_spec"]["input"].update(height=0), "input size"),
    (lambda c: c["model_spec"]["input"].update(height=-3), "input size"),
    (lambda c: c["model_spec"]["input"].update(std=[0, 0, 0]), "std must be positive"),
    (lambda c: c["model_spec"].update(num_classes="10"), "num_classes"),
    (lambda c: c["model_spec"].update(num_classes=7), "fit"),
    (lambda c: c["model_spec"].update(arch="resnet_that_is_not"), "resnet_that_is_not"),
    # a task this tool does not know is said as such, never rebuilt as a classifier (or a detector) by default
    (lambda c: c.update(task="regression"), "names the task 'regression', which this tool does not know"),
    (lambda c: c.update(task=None), "names the task None"),
])
def test_4_and_tracebacks_edited_config_is_one_line_and_listed(good_run, tmp_path, edit, needle, capsys):
    """An input height of 100000 (once OOM-killed at 21 GB), 0 or -3, a std of zeros (once blamed on FP16), an
    edited num_classes or arch: one line before any work; the run is listed as damaged where it cannot open."""
    rewrite_json(good_run / "config.json", edit)
    t0 = time.time()
    refused(["export", "--run", str(good_run), "--out", str(tmp_path / "b")], capsys, needle)
    assert time.time() - t0 < 120 and not (tmp_path / "b").exists()
    if "task" in needle:  # listed as damaged with that reason
        assert [d.name for d in scan_runs()[1]] == [good_run.name] and needle in scan_runs()[1][0].reason


def test_4_config_linked_to_dev_zero_and_a_fifo_step_are_refused(good_run, tmp_path):
    """Unbounded reads: config.json linked to /dev/zero, a FIFO as a step file (once hung export forever)."""
    fifo_run = runs_dir() / "fifo"
    shutil.copytree(good_run, fifo_run)
    (fifo_run / "steps" / "0001.pt").unlink()
    os.mkfifo(fifo_run / "steps" / "0001.pt")
    res = cli_run("export", "--run", str(fifo_run), "--step", "1", "--out", str(tmp_path / "b"), timeout=120)
    assert_refused(res, "FIFO")
    (good_run / "config.json").unlink()
    (good_run / "config.json").symlink_to("/dev/zero")
    res = cli_run("export", "--run", str(good_run), "--out", str(tmp_path / "b2"), timeout=120)
    assert_refused(res, "symbolic link")
    with pytest.raises(IntegrityError, match="device"):
        read_bounded(Path("/dev/zero"), 1024)
    names = {d.name: d.reason for d in scan_runs()[1]}
    assert set(names) == {good_run.name} and "symbolic link" in names[good_run.name]  # the FIFO opens, its step not


# ----------------------------------------------------------------------------- 5: a bundle holding the user's files


def test_5_export_over_a_bundle_holding_user_files_deletes_nothing(good_run, tmp_path, capsys):
    out = tmp_path / "exports" / "b"
    (out / "model").mkdir(parents=True)
    (out / "model" / "model.xml").write_text("<net/>")
    (out / "manifest.json").write_text(json.dumps({"format": BUNDLE_FORMAT, "files": {},
                                                   "models": {"pruned": {"files": {"model/model.xml": "x"}}}}))
    (out / "my_notes.txt").write_text("field measurements, three weeks")
    (out / "model" / "calibration.npy").write_bytes(b"user data")
    before = snapshot(out)
    refused(["export", "--run", str(good_run), "--out", str(out)], capsys, "my_notes.txt", "nothing was changed")
    assert snapshot(out) == before
    assert (out / "my_notes.txt").read_text() == "field measurements, three weeks"


# ----------------------------------------------------------------------------- 6: long non-ASCII upload names


def test_6_long_cjk_file_names_keep_their_extension_and_all_images():
    """70 CJK characters (210 bytes) per name, 60 images per class: every image is kept, as a .png."""
    files = []
    for name, data in digit_files(per_class=60):
        cls, leaf = name.split("/")
        files.append((f"数据/{cls}/{'零一二三四五六七' * 9}{leaf}", data))
    assert len(files[0][0].split("/")[-1].encode()) > 200
    names = zipfile.ZipFile(io.BytesIO(folder_upload_to_zip(files))).namelist()
    assert len(set(names)) == len(files) and all(n.endswith(".png") for n in names)
    assert all(len(part.encode()) <= 255 for n in names for part in n.split("/"))
    ds = load_dataset(folder_upload_to_zip(files), SPEC32)
    assert len(ds.train) + len(ds.val) + len(ds.test) == len(files)


# ----------------------------------------------------------------------------- 7: one damaged run among good ones


@pytest.mark.parametrize("damage, reason", [
    (lambda d: (d / "history.jsonl").write_text((d / "history.jsonl").read_text()[:-25]), "history.jsonl"),
    (lambda d: (d / "status.json").write_text("{not json"), "status.json"),
    (lambda d: write_history(d, [{k: v for k, v in r.items() if k != "macs"} for r in history_lines(d)]), "no macs"),
])
def test_7_a_damaged_run_is_listed_and_the_good_ones_work(template, damage, reason):
    for name in ("20260101-000001-a", "20260101-000002-broken", "20260101-000003-b"):
        shutil.copytree(template["run"], runs_dir() / name)
    damage(runs_dir() / "20260101-000002-broken")
    good, damaged = scan_runs()
    assert [r.name for r in good] == ["20260101-000003-b", "20260101-000001-a"]
    assert [d.name for d in damaged] == ["20260101-000002-broken"] and reason in damaged[0].reason
    assert [r["name"] for r in past_runs()] == ["20260101-000003-b", "20260101-000001-a"]
    model = good[0].rebuild_step(1)
    assert model(torch.zeros(1, 3, 32, 32)).shape == (1, 10)


# ----------------------------------------------------------------------------- 8: weights that are not what was recorded


def _scrambled(path: Path) -> dict:
    saved = torch.load(path, weights_only=True)
    g = torch.Generator().manual_seed(0)
    saved["state_dict"] = {k: (v.flatten()[torch.randperm(v.numel(), generator=g)].view_as(v)
                               if v.is_floating_point() else v) for k, v in saved["state_dict"].items()}
    return saved


def test_8_scrambled_step_weights_are_refused_by_hash_and_by_remeasurement(good_run, tmp_path, capsys):
    step_file = good_run / "steps" / "0001.pt"
    buf = io.BytesIO()
    torch.save(_scrambled(step_file), buf)
    step_file.write_bytes(buf.getvalue())
    refused(["export", "--run", str(good_run), "--step", "1", "--out", str(tmp_path / "b")], capsys,
            "steps/0001.pt", "not the file the tool wrote")
    # the forger rewrites the record's hash too: the figure does not reproduce on the run's own images
    records = history_lines(good_run)
    records[1]["weights_sha256"] = sha256_bytes(buf.getvalue())
    write_history(good_run, records)
    line = refused(["export", "--run", str(good_run), "--step", "1", "--out", str(tmp_path / "b")], capsys,
                   "does not reproduce", "nothing was exported")
    assert f"{100 * records[1]['metric']:.2f} %" in line
    assert not (tmp_path / "b").exists() and not list(tmp_path.glob(".b.*"))


def test_8_and_9_nan_weights_are_never_exported(good_run, tmp_path, capsys):
    step_file = good_run / "steps" / "0001.pt"
    saved = torch.load(step_file, weights_only=True)
    first = next(k for k, v in saved["state_dict"].items() if v.is_floating_point())
    saved["state_dict"][first] = torch.full_like(saved["state_dict"][first], float("nan"))
    buf = io.BytesIO()
    torch.save(saved, buf)
    step_file.write_bytes(buf.getvalue())
    records = history_lines(good_run)
    records[1]["weights_sha256"] = sha256_bytes(buf.getvalue())
    write_history(good_run, records)
    refused(["export", "--run", str(good_run), "--step", "1", "--out", str(tmp_path / "b")], capsys, "NaN", first)
    assert not (tmp_path / "b").exists()


# ----------------------------------------------------------------------------- 9: deploy.py


def deploy(bundle: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "deploy.py", *args], cwd=bundle, capture_output=True, text=True,
                          timeout=300)


def test_9_missing_selftest_means_the_fallback(bundle):
    (bundle / "selftest.npz").unlink()
    proc = deploy(bundle, "--json")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert proc.returncode == 0 and out["which"] == "fallback", proc.stdout + proc.stderr
    assert "selftest.npz is missing" in out["reason"]


def test_9_non_finite_selftest_is_a_failure(bundle):
    with np.load(bundle / "selftest.npz") as data:
        arrays = {k: data[k] for k in data.files}
    arrays["expected_model"] = np.full_like(arrays["expected_model"], np.nan)
    arrays["expected_fallback"] = np.full_like(arrays["expected_fallback"], np.nan)
    np.savez(bundle / "selftest.npz", **arrays)
    rewrite_json(bundle / "manifest.json",
                 lambda m: m["files"].update({"selftest.npz": sha256_bytes((bundle / "selftest.npz").read_bytes())}))
    proc = deploy(bundle, "--json")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert proc.returncode == 0 and out["which"] == "fallback", proc.stdout + proc.stderr
    assert "not finite" in out["reason"]


def test_9_edited_input_shape_and_wrong_array_are_one_line(bundle, tmp_path):
    wrong = tmp_path / "wrong.npy"
    np.save(wrong, np.zeros((5, 7), np.uint8))
    proc = deploy(bundle, "--image", str(wrong))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("ERROR: cannot use image")
    rewrite_json(bundle / "manifest.json", lambda m: m["input"].update(input_shape=[1, 3, 32]))
    proc = deploy(bundle, "--image", str(wrong))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("ERROR: No usable model") and "input_shape" in line


def test_9_bundle_modules_are_verified_and_imported_by_path(bundle, tmp_path, marker):
    """A detection bundle's postprocess.py runs only when its sha256 matches the manifest, and the
    application's own module named ``postprocess`` never shadows it (deploy.py's loader, on a bundle folder)."""
    own = "def postprocess(*a):\n    return 'bundle'\n"
    (bundle / "postprocess.py").write_text(own)
    rewrite_json(bundle / "manifest.json",
                 lambda m: m["files"].update({"postprocess.py": sha256_bytes(own.encode())}))
    app = tmp_path / "app"
    app.mkdir()
    (app / "postprocess.py").write_text("def postprocess(*a):\n    return 'app'\n")
    script = ("import sys, json; sys.path.insert(0, sys.argv[2]); import postprocess; sys.path.insert(0, sys.argv[1]);"
              "import deploy; m = json.load(open(sys.argv[1] + '/manifest.json')); deploy._STATE['bundle_dir'] = "
              "sys.argv[1]; print(deploy._bundle_module('postprocess', m).postprocess())")
    proc = subprocess.run([sys.executable, "-c", script, str(bundle), str(app)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "bundle", proc.stderr
    (bundle / "postprocess.py").write_text(own + f"open({str(marker)!r}, 'w')\n")  # edited after export
    proc = subprocess.run([sys.executable, "-c", script, str(bundle), str(app)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode != 0 and "postprocess.py was altered" in proc.stderr, proc.stderr
    assert not marker.exists()


# ----------------------------------------------------------------------------- 10 and forwards: output layouts


OUTPUTS = {
    "nc11": "return self.fc(self.pool(torch.relu(self.conv(x))).flatten(1))[:, :, None, None]",
    "tuple": "y = self.fc(self.pool(torch.relu(self.conv(x))).flatten(1))\n        return y, y",
    "dict": "return {'logits': self.fc(self.pool(torch.relu(self.conv(x))).flatten(1))}",
}


@pytest.mark.parametrize("kind", list(OUTPUTS))
def test_10_outputs_not_shaped_n_classes_are_refused_not_scored(kind, tmp_path, capsys):
    """(N, C, 1, 1) was scored with argmax over the wrong axis (100 % right read 50 %); tuples and dicts raised."""
    source = NET.replace("return self.fc(self.pool(torch.relu(self.conv(x))).flatten(1))", OUTPUTS[kind])
    code = write_code(tmp_path, source)
    weights = tmp_path / "w.pt"
    weights.write_bytes(weights_of(build_from_code(code, "net", trusted=True)))
    refused(["evaluate", "--model", str(weights), "--model-code", str(code), "--model-class", "net", "--trusted",
             "--data", "sample:vgg_digits", "--input-size", "32", "32", "--no-latency"], capsys, "logits")


def test_input_size_1x1_through_pooling_is_one_line(tmp_path, capsys):
    source = NET.replace("self.pool = nn.AdaptiveAvgPool2d(1)", "self.pool = nn.Sequential(nn.MaxPool2d(2), "
                                                                 "nn.AdaptiveAvgPool2d(1))")
    code = write_code(tmp_path, source)
    weights = tmp_path / "w.pt"
    weights.write_bytes(weights_of(build_from_code(code, "net", trusted=True)))
    refused(["evaluate", "--model", str(weights), "--model-code", str(code), "--model-class", "net", "--trusted",
             "--data", "sample:vgg_digits", "--input-size", "1", "1", "--no-latency"], capsys, "1×1")


# ----------------------------------------------------------------------------- tracebacks: history records


@pytest.mark.parametrize("mutate, needle", [
    (lambda rs: [rs[0], {k: v for k, v in rs[1].items() if k != "metric"}, *rs[2:]], "line 2: step 1 has no metric"),
    (lambda rs: [rs[0], [], *rs[2:]], "line 2: a list"),
    (lambda rs: [rs[0], {**rs[1], "step": "one"}, *rs[2:]], "line 2: step 'one'"),
    (lambda rs: [rs[0], {**rs[1], "metric": "0.9"}, *rs[2:]], "metric '0.9' is not a number"),
])
def test_history_records_of_the_wrong_shape_are_one_line(good_run, tmp_path, mutate, needle, capsys):
    write_history(good_run, mutate(history_lines(good_run)))
    refused(["export", "--run", str(good_run), "--out", str(tmp_path / "b")], capsys, needle)
    refused(["recover", str(good_run), "--epochs", "1"], capsys, needle)
    assert [d.name for d in scan_runs()[1]] == [good_run.name]


def test_truncated_history_names_the_right_line(good_run, tmp_path, capsys):
    text = (good_run / "history.jsonl").read_text()
    (good_run / "history.jsonl").write_text(text[:-30])
    n = len(text.splitlines())
    refused(["export", "--run", str(good_run), "--out", str(tmp_path / "b")], capsys, f"line {n} is not JSON",
            "cut short")


def test_weights_of_another_model_in_a_step_are_one_line(good_run, tmp_path, capsys):
    other = load_model("sample:resnet_shapes").model
    saved = {"state_dict": other.state_dict(), "pruning_history": []}
    buf = io.BytesIO()
    torch.save(saved, buf)
    (good_run / "steps" / "0001.pt").write_bytes(buf.getvalue())
    records = history_lines(good_run)
    records[1]["weights_sha256"] = sha256_bytes(buf.getvalue())
    write_history(good_run, records)
    refused(["export", "--run", str(good_run), "--step", "1", "--out", str(tmp_path / "b")], capsys,
            "step 1's weights do not fit")


# ----------------------------------------------------------------------------- weak cases


def test_nan_weights_are_named_at_load(tmp_path, capsys):
    model = load_model("sample:vgg_digits").model
    sd = model.state_dict()
    key = next(k for k, v in sd.items() if v.is_floating_point())
    sd[key] = sd[key].clone()
    sd[key][0] = float("nan")
    path = tmp_path / "nan.pt"
    torch.save(sd, path)
    refused(["evaluate", "--model", str(path), "--arch", "sample_vgg", "--data", "sample:vgg_digits",
             "--input-size", "32", "32", "--no-latency"], capsys, "NaN", key)


def test_one_image_cannot_be_near_chance():
    """100 % on one image was called 'near chance'; too few images to tell say nothing."""
    assert not near_chance(1.0, 0.5, 1)
    assert near_chance(0.1, 0.1, 400)


def test_twenty_thousand_classes_build_no_square_matrix():
    """The plausibility check of 20,000 classes built a 20k x 20k matrix (3.2 GB); now linear in the classes."""
    data = random_dataset(20_000, size=8, n_train=8, n_val=48)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 20_000)).eval()
    t0 = time.time()
    from core.evaluate import evaluate_accuracy

    acc = evaluate_accuracy(model, data.val, data.input)
    assert acc.confusion == [] and len(acc.per_class) == 20_000
    result = check_plausibility(model, data, data.input, acc.accuracy)
    assert result.fix is None
    assert time.time() - t0 < 60


def test_a_class_without_a_readable_image_is_refused(tmp_path, capsys):
    files = [(n, b) for n, b in digit_files(per_class=6) if not n.startswith("9/")]
    files += [(f"9/{i}.png", b"\x89PNG\r\n\x1a\nbroken") for i in range(4)]
    data = tmp_path / "d.zip"
    data.write_bytes(make_zip(files))
    before = snapshot(workspace_root())
    refused(["evaluate", "--model", "sample:vgg_digits", "--data", str(data), "--no-latency"], capsys,
            "no readable image", "9")
    assert snapshot(workspace_root()) == before


def test_a_string_exclude_in_a_plan_is_refused(tmp_path, capsys):
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"exclude": "features.0"}))
    refused(["prune", "--model", "sample:vgg_digits", "--data", "sample:vgg_digits", "--out", str(tmp_path / "r"),
             "--plan", str(plan)], capsys, "list of layer names")
    assert not (tmp_path / "r").exists()


def test_a_class_folder_linked_to_a_system_folder_is_refused(tmp_path, capsys):
    root = tmp_path / "data"
    for name, data in digit_files(per_class=4):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    shutil.rmtree(root / "9")
    (root / "9").symlink_to("/usr/share", target_is_directory=True)
    refused(["evaluate", "--model", "sample:vgg_digits", "--data", str(root), "--no-latency"], capsys,
            "symbolic link", "/usr/share")


def test_decoder_warnings_become_report_lines(tmp_path):
    """A 32-bit float TIFF holding NaN makes numpy warn while its pixels are scaled to 8 bits; the CLI prints it
    once as a data line naming the first file, never as a raw ``file:line: RuntimeWarning`` dump."""
    files = digit_files(per_class=6)
    pixels = np.random.default_rng(0).random((32, 32)).astype(np.float32)
    pixels[0, 0] = np.nan
    buf = io.BytesIO()
    Image.fromarray(pixels, mode="F").save(buf, format="TIFF")
    files += [(f"3/scan{i}.tif", buf.getvalue()) for i in range(3)]
    data = tmp_path / "d.zip"
    data.write_bytes(make_zip(files))
    res = cli_run("evaluate", "--model", "sample:vgg_digits", "--data", str(data), "--no-latency")
    assert res.returncode == 0, res.stderr
    assert "warnings.warn" not in res.stderr and "Warning:" not in "".join(
        line for line in res.stderr.splitlines() if not line.startswith(("data:", "note:")))
    lines = [line for line in res.stderr.splitlines() if line.startswith("data: RuntimeWarning")]
    assert len(lines) == 1 and "first in 3/scan0.tif" in lines[0], res.stderr


def test_sigterm_during_export_leaves_no_partial_bundle(good_run, tmp_path):
    out = tmp_path / "exports" / "b"
    proc = subprocess.Popen([sys.executable, "-m", "core", "export", "--run", str(good_run), "--step", "1", "--out",
                             str(out)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not list(out.parent.glob(".b.partial-*")):
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert_one_error_line(err, "terminated")
    assert list(out.parent.iterdir()) == [], "no partial bundle, no zip"


def test_a_terminated_cli_process_ends_without_waiting_for_threads_a_library_left(tmp_path):
    """After a SIGTERM the CLI's clean-up has run; a non-daemon thread still sleeping (as a library's can be, left
    by a half-done step) must not keep the process alive. Exit handlers still run (a temporary folder goes)."""
    script = (
        "import tempfile, threading, time\n"
        "from core.cli import exit_process\n"
        "from core.cli_common import EXIT_TERMINATED\n"
        "threading.Thread(target=time.sleep, args=(600,)).start()\n"
        "kept = tempfile.TemporaryDirectory(dir=%r)\n"
        "print(kept.name, flush=True)\n"
        "exit_process(EXIT_TERMINATED)\n" % str(tmp_path))
    res = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert res.returncode == 143, res.stderr
    assert not Path(res.stdout.strip()).exists(), "the exit handlers ran: the temporary folder is gone"


def test_sigterm_during_prune_cancels_keeps_steps_and_exits_143(tmp_path):
    """SIGTERM stops a prune as Ctrl-C does (completed steps kept, the summary printed), with SIGTERM's code."""
    out = tmp_path / "run"
    proc = _prune_until_two_steps(out, "--json", stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143, stderr
    assert "Traceback" not in stderr and "SIGTERM again to stop at once" in stderr
    summary = json.loads(stdout)
    assert summary["state"] == "cancelled" == Run(out).status["state"]
    assert len(Run(out).steps()) >= 3


# ----------------------------------------------------------------------------- the three kinds held open


UNCONVERTIBLE = NET.replace("        return self.fc(self.pool(torch.relu(self.conv(x))).flatten(1))",
                            "        y = self.fc(self.pool(torch.relu(self.conv(x))).flatten(1))\n"
                            "        return y * torch.linalg.inv(self.scale)[0, 0]").replace(
    "        self.fc = nn.Linear(8, num_classes)",
    "        self.fc = nn.Linear(8, num_classes)\n        self.scale = nn.Parameter(torch.eye(2))").replace(
    "nn.Conv2d(3, 8, 3, padding=1)", "nn.Conv2d(3, 32, 3, padding=1)").replace("nn.Linear(8,", "nn.Linear(32,")


def test_kind_a_model_openvino_cannot_convert_keeps_its_accuracy(tmp_path):
    """torch.linalg.inv runs in PyTorch but has no ONNX export: evaluate and prune (latency on, as by default)
    report accuracy, say in one line why latency and export are unavailable, and --json stays one object."""
    code = write_code(tmp_path, UNCONVERTIBLE)
    model = build_from_code(code, "net", trusted=True)
    weights = tmp_path / "w.pt"
    weights.write_bytes(weights_of(model))
    common = ["--model", str(weights), "--model-code", str(code), "--model-class", "net", "--trusted",
              "--data", "sample:vgg_digits", "--input-size", "32", "32"]
    res = cli_run("evaluate", *common, "--json")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["accuracy"] is not None and out["latency_ms"] is None and "OpenVINO cannot take" in out["latency_note"]
    notes = [line for line in res.stderr.splitlines() if "latency unavailable" in line]
    assert len(notes) == 1 and "Traceback" not in res.stderr
    run = tmp_path / "run"
    res = cli_run("prune", *common, "--out", str(run), "--criterion", "l1", "--max-steps", "1", "--finetune-steps",
                  "1", "--score-images", "16", "--no-analysis", "--recover-epochs", "0", "--no-control", "--json")
    assert res.returncode == 0, res.stderr
    summary = json.loads(res.stdout)
    assert summary["baseline_metric"] is not None and summary["baseline_latency_ms"] is None
    assert sum("latency unavailable" in line for line in res.stderr.splitlines()) == 1
    res = cli_run("export", "--run", str(run), "--out", str(tmp_path / "b"), "--trusted")
    assert_refused(res, "ONNX")
    assert not (tmp_path / "b").exists()


def test_kind_checkpoint_with_a_few_non_model_entries_loads_and_says_what_it_ignored():
    sd = load_model("sample:vgg_digits").model.state_dict()
    for prefix in ("module.", "model."):
        ckpt = {**{prefix + k: v for k, v in sd.items()}, "epoch": torch.tensor(12), "best_acc1": torch.tensor(0.93),
                "arch": "vgg", "optimizer": {"lr": 0.1}}
        buf = io.BytesIO()
        torch.save(ckpt, buf)
        loaded = load_model(buf.getvalue(), arch="sample_vgg", input_spec=InputSpec(height=32, width=32))
        assert torch.equal(loaded.model.state_dict()[next(iter(sd))], sd[next(iter(sd))])
        notes = " ".join(loaded.notes)
        assert "epoch" in notes and "best_acc1" in notes and "arch" in notes and "optimizer" in notes, notes
    # what is not a few scalars stays a misfit: a real layer of another model is never dropped silently
    ckpt = {**sd, "head.weight": torch.zeros(10, 8)}
    buf = io.BytesIO()
    torch.save(ckpt, buf)
    with pytest.raises(PruneScopeError, match="unexpected"):
        load_model(buf.getvalue(), arch="sample_vgg", input_spec=InputSpec(height=32, width=32))


def test_kind_liveness_tells_its_own_process_from_a_stranger(good_run):
    """A pid now held by another process read 'running' forever; pid + start time tell them apart."""
    stranger = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        time.sleep(0.3)
        status = json.loads((good_run / "status.json").read_text())
        started = process_start_time(stranger.pid)
        assert started is not None
        # the writer died; the stranger got its pid (recorded start time differs)
        (good_run / "status.json").write_text(json.dumps({**status, "state": "running", "pid": stranger.pid,
                                                          "pid_start": started - 3600, "updated": time.time()}))
        assert Run(good_run).status["state"] == "interrupted"
        # a status from before start times were recorded: the stranger started after its last update
        (good_run / "status.json").write_text(json.dumps({**status, "state": "running", "pid": stranger.pid,
                                                          "updated": started - 600}))
        assert Run(good_run).status["state"] == "interrupted"
        # the real writer, alive: running
        (good_run / "status.json").write_text(json.dumps({**status, "state": "running", "pid": stranger.pid,
                                                          "pid_start": started, "updated": time.time()}))
        assert Run(good_run).status["state"] == "running"
    finally:
        stranger.kill()
        stranger.wait(30)


def test_trust_record_is_read_with_a_bound(tmp_path):
    """trusted_files.json linked to /dev/zero trusts nothing (and does not hang)."""
    (workspace_root() / TRUST_RECORD).symlink_to("/dev/zero")
    assert trusted_hashes() == {}
