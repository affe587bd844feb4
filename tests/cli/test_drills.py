"""Drills of bad input, faults and races (issue 15), kept as tests so that what holds keeps holding.

Every refusal is checked the same way: one line on stderr starting with ``error:``, exit code 2, no
traceback, no payload run (a marker file the payload would create stays absent), and nothing left
behind (the workspace holds the same files, of the same sizes, before and after).
"""
from __future__ import annotations

import errno
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from core import cli
from core.custom_code import build_from_code, keep_uploaded_code
from core.data import folder_upload_to_zip, safe_extract_zip
from core.sources import load_dataset
from core.errors import DataError, PruneScopeError, UntrustedPickleError, UntrustedRunError
from core.jobs import JobAlreadyRunning, JobRegistry
from core.models import InputSpec, load_model, sample_entry
from core.runs import PICKLE_COPY, Run, RunWriter, record_trust
from core.sample_data import make_sample_images
from core.workspace import workspace_root

ROOT = Path(__file__).resolve().parents[2]
DIGITS = sample_entry("vgg_digits")
DIGITS_SPEC = InputSpec(height=32, width=32, mean=tuple(DIGITS["mean"]), std=tuple(DIGITS["std"]))


# ----------------------------------------------------------------------------- helpers


def cli_run(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """``python -m core ARGS`` in the test's own workspace (the fixture's environment is inherited)."""
    return subprocess.run([sys.executable, "-m", "core", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def assert_refused(res: subprocess.CompletedProcess, *needles: str) -> str:
    """Exit code 2, no traceback, and the error as one line, the last on stderr (progress lines may come
    before it); returns that line."""
    assert res.returncode == 2, (res.returncode, res.stderr[-2000:])
    return assert_one_error_line(res.stderr, *needles)


def assert_one_error_line(stderr: str, *needles: str) -> str:
    assert "Traceback" not in stderr, stderr
    lines = stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], stderr[-2000:]
    for n in needles:
        assert n in errors[0], (n, errors[0])
    return errors[0]


def _main(argv: list[str], capsys) -> tuple[int, str]:
    code = cli.main(argv)
    return code, capsys.readouterr().err


def snapshot(folder: Path) -> dict[str, int]:
    """Every file under ``folder`` with its size: equal snapshots = nothing added, removed or grown."""
    if not folder.exists():
        return {}
    return {str(p.relative_to(folder)): p.stat().st_size for p in folder.rglob("*") if p.is_file()}


def png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr, "RGB").save(buf, format="PNG")
    return buf.getvalue()


def digit_files(per_class: int = 6, names: list[str] | None = None) -> list[tuple[str, bytes]]:
    arr, labels, default_names = make_sample_images("digits")
    names = names or list(default_names)
    return [(f"{names[c]}/{i:03d}.png", png(arr[idx]))
            for c in range(10) for i, idx in enumerate(np.flatnonzero(labels == c)[:per_class])]


def make_zip(files: list[tuple[str, bytes]], compression: int = zipfile.ZIP_DEFLATED) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=compression) as zf:
        for name, data in files:
            zf.writestr(name, data)
    return buf.getvalue()


class Payload:
    """Pickles to 'call open(marker, "w")': unpickling it creates the marker file, so a marker proves code ran."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def payload_bytes(marker: Path) -> bytes:
    buf = io.BytesIO()
    torch.save(Payload(marker), buf)
    return buf.getvalue()


def tiny_digits_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(8, 10)).eval()


def module_bytes(model: nn.Module) -> bytes:
    buf = io.BytesIO()
    torch.save(model, buf)
    return buf.getvalue()


RUN_CONFIG = {"data_source": "sample:vgg_digits", "data_options": {"val_fraction": 0.2, "seed": 0},
              "prune": {"criterion": "l1", "cluster": 8}}


def write_run(out: Path, loaded, original_bytes: bytes | None = None, metric: float = 0.9) -> Run:
    """A run folder as the app and the CLI write it: config, originals, step 0 (its selection ``metric``; export
    re-measures it, issue 28), done."""
    writer = RunWriter(out)
    writer.start(dict(RUN_CONFIG), loaded, original_bytes)
    writer.add_step({"step": 0, "metric": metric, "macs": 1, "params": 1, "latency_ms": None}, None, [])
    writer.status("done", "finished")
    return Run(out)


@pytest.fixture
def marker(tmp_path) -> Path:
    return tmp_path / "PAYLOAD_RAN"


@pytest.fixture
def pickled_run(tmp_path) -> Run:
    """A run made from a trusted pickled module, as `prune --trusted` or the app make it."""
    data = module_bytes(tiny_digits_model())
    loaded = load_model(data, trusted=True, input_spec=DIGITS_SPEC)
    return write_run(workspace_root() / "runs" / "pickled", loaded, data)


# ----------------------------------------------------------------------------- 1: run folders are data


def test_run_from_trusted_pickle_reopens_and_records_its_trust(pickled_run):
    config = json.loads((pickled_run.dir / "config.json").read_text())
    digest = config["trust"]["files"][PICKLE_COPY]
    assert len(digest) == 64
    model = pickled_run.original().model  # trusted when the run started: opens without asking again
    assert model(torch.zeros(1, 3, 32, 32)).shape == (1, 10)


def test_replaced_pickle_in_a_run_is_refused_and_never_runs(pickled_run, marker):
    """The security hole: config.json says 'pickled', the pickle is replaced by a payload."""
    (pickled_run.dir / PICKLE_COPY).write_bytes(payload_bytes(marker))
    with pytest.raises(UntrustedRunError) as info:
        Run(pickled_run.dir).rebuild_step(0)  # what the Review page does when the run is selected
    assert "changed since the run was made" in str(info.value)
    assert not marker.exists()
    before = snapshot(workspace_root())
    res = cli_run("export", "--run", str(pickled_run.dir), "--out", str(workspace_root() / "bundle"))
    line = assert_refused(res, "--trusted", "changed since the run was made")
    assert "I trust this file" not in line  # item 9: the CLI names its own control
    assert not marker.exists()
    assert snapshot(workspace_root()) == before


def test_foreign_pickled_run_needs_explicit_trust(pickled_run, tmp_path, monkeypatch):
    """A run folder copied in from elsewhere (no trust recorded in this workspace) runs nothing until trusted."""
    monkeypatch.setenv("PRUNESCOPE_WORKSPACE", str(tmp_path / "other_workspace"))
    with pytest.raises(UntrustedRunError) as info:
        Run(pickled_run.dir).original()
    assert "no record of trusting" in str(info.value) and "I trust this file" in str(info.value)
    assert Run(pickled_run.dir).original(trusted=True).model is not None  # --trusted: the user's explicit choice
    record_trust((pickled_run.dir / PICKLE_COPY).read_bytes(), "pickle")  # the Load page, file trusted there
    assert Run(pickled_run.dir).original().model is not None


def test_pickle_put_into_a_state_dict_run_is_never_read(tmp_path, marker):
    """A run of a named architecture never unpickles: an added pickle and an edited config change nothing."""
    run = write_run(workspace_root() / "runs" / "plain", load_model("sample:vgg_digits"))
    (run.dir / PICKLE_COPY).write_bytes(payload_bytes(marker))
    (run.dir / "original.pt").write_bytes(payload_bytes(marker))  # the weights file replaced too
    with pytest.raises(PruneScopeError, match="damaged"):
        Run(run.dir).original()
    assert not marker.exists(), "weights are read with weights_only=True"


def test_replaced_model_code_in_a_run_is_refused(tmp_path, marker):
    code = tmp_path / "net.py"
    code.write_text("import torch.nn as nn\ndef net():\n    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), "
                    "nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))\n")
    weights = io.BytesIO()
    torch.save(build_from_code(code, "net", trusted=True).state_dict(), weights)
    loaded = load_model(weights.getvalue(), code_path=code, code_name="net", trusted=True, input_spec=DIGITS_SPEC)
    run = write_run(workspace_root() / "runs" / "custom", loaded)
    assert Run(run.dir).original().model is not None  # its own trusted copy reopens
    evil = code.read_text() + f"open({str(marker)!r}, 'w').write('x')\n"
    (run.dir / "model_code.py").write_text(evil)
    with pytest.raises(UntrustedRunError):
        Run(run.dir).original()
    assert not marker.exists()


def test_damaged_run_files_are_one_line(digits_run, capsys):
    (digits_run.dir / "history.jsonl").write_text('{"step": 0, "accuracy": 0.9\n')
    code, err = _main(["export", "--run", str(digits_run.dir), "--out", str(digits_run.dir.parent / "b")], capsys)
    assert code == 2
    assert_one_error_line(err, "history.jsonl is damaged")
    (digits_run.dir / "config.json").write_text("{not json")
    code, err = _main(["export", "--run", str(digits_run.dir), "--out", str(digits_run.dir.parent / "b")], capsys)
    assert code == 2
    assert_one_error_line(err, "config.json is damaged")


def test_uploaded_code_changed_on_disk_is_not_reused(tmp_path):
    """The upload cache: a kept model file altered afterwards is replaced by the upload the user trusts."""
    source = b"import torch.nn as nn\ndef net():\n    return nn.Linear(2, 2)\n"
    path = keep_uploaded_code(source, "model.py")
    path.write_bytes(source + b"open('/tmp/x', 'w')\n")
    assert keep_uploaded_code(source, "model.py") == path and path.read_bytes() == source


def test_untrusted_pickle_upload_names_the_interfaces_control(tmp_path, marker):
    """Item 9 and a held drill: a pickle as an upload runs nothing; each interface names its own switch."""
    evil = tmp_path / "evil.pt"
    evil.write_bytes(payload_bytes(marker))
    with pytest.raises(UntrustedPickleError) as info:
        load_model(evil.read_bytes())
    assert "I trust this file" in str(info.value) and "--trusted" not in str(info.value)
    before = snapshot(workspace_root())
    res = cli_run("evaluate", "--model", str(evil), "--data", "sample:vgg_digits", "--no-latency")
    line = assert_refused(res, "--trusted", "not loaded")
    assert "I trust this file" not in line
    res = cli_run("evaluate", "--model", str(evil), "--arch", "sample_vgg", "--data", "sample:vgg_digits",
                  "--no-latency")
    assert_refused(res, "--trusted")
    assert not marker.exists()
    assert snapshot(workspace_root()) == before


# ----------------------------------------------------------------------------- 2, 3: zips


def _bomb_zip(path: Path, entries: int = 100, size: int = 10_000_000) -> None:
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as zf:
        zeros = b"\0" * size
        for i in range(entries):
            zf.writestr(f"c{i % 2}/{i:03d}.png", zeros)


def test_zip_bomb_split_over_many_entries_is_refused_before_unpacking(tmp_path):
    bomb = tmp_path / "bomb.zip"
    _bomb_zip(bomb)
    assert bomb.stat().st_size < 2_000_000  # about 1 MB that would expand to 1 GB
    with pytest.raises(DataError, match="zip bomb"):
        load_dataset(bomb, DIGITS_SPEC)
    before = snapshot(workspace_root())
    res = cli_run("evaluate", "--model", "sample:vgg_digits", "--data", str(bomb), "--no-latency")
    assert_refused(res, "zip bomb", "Nothing was unpacked")
    assert snapshot(workspace_root()) == before


def test_single_entry_bomb_is_refused(tmp_path):
    """Held drill: one entry of 50 MB of zeros."""
    data = make_zip(digit_files(1) + [("0/bomb.png", b"\0" * 50_000_000)])
    dest = tmp_path / "out"
    with pytest.raises(DataError, match="zip bomb"):
        safe_extract_zip(data, dest=dest)
    assert not dest.exists() and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", ["../evil.png", "../../evil.png", "/abs/evil.png", "c:/evil.png", "c:\\evil.png",
                                  "0\\..\\..\\evil.png", "0/../../evil.png", "\\\\server\\share\\evil.png"])
def test_zip_slip_variants_write_nothing(tmp_path, name):
    """Held drill: no entry escapes, and a refused archive writes nothing at all."""
    data = make_zip(digit_files(2) + [(name, b"x")])
    before = snapshot(workspace_root())
    with pytest.raises(DataError, match="Unsafe path"):
        load_dataset(data, DIGITS_SPEC)
    assert snapshot(workspace_root()) == before
    assert not list(tmp_path.rglob("evil.png")) and not (ROOT / "evil.png").exists()


def test_symlink_entry_is_refused(tmp_path):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        info = zipfile.ZipInfo("0/link.png")
        info.external_attr = (0o120777 << 16)
        zf.writestr(info, "/etc/passwd")
    with pytest.raises(DataError, match="symbolic link"):
        safe_extract_zip(buf.getvalue(), dest=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def _corrupt_crc(data: bytes, member: str) -> bytes:
    """Flip one byte inside a stored member's data: its CRC no longer matches."""
    info = zipfile.ZipFile(io.BytesIO(data)).getinfo(member)
    start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
    raw = bytearray(data)
    raw[start + 40] ^= 0xFF
    return bytes(raw)


def test_bad_crc_entry_is_one_line_and_leaves_nothing(tmp_path):
    files = digit_files(3)
    bad = _corrupt_crc(make_zip(files, zipfile.ZIP_STORED), files[4][0])
    with pytest.raises(DataError, match="damaged"):
        load_dataset(bad, DIGITS_SPEC)
    path = tmp_path / "bad_crc.zip"
    path.write_bytes(bad)
    before = snapshot(workspace_root())
    res = cli_run("evaluate", "--model", "sample:vgg_digits", "--data", str(path), "--no-latency")
    assert_refused(res, "damaged", "CRC")
    assert snapshot(workspace_root()) == before


def test_refused_data_set_leaves_no_unpacked_files():
    """A zip that unpacks fine but is refused afterwards (one class) keeps nothing in the workspace."""
    before = snapshot(workspace_root())
    with pytest.raises(DataError, match="1 class folder"):  # item 6: one class folder is one, not zero
        load_dataset(make_zip([(n, b) for n, b in digit_files(4) if n.startswith("0/")]), DIGITS_SPEC)
    assert snapshot(workspace_root()) == before


_CONCURRENT_LOAD = """
import sys, time
from pathlib import Path
from core.data import load_dataset
from core.models import InputSpec
go = Path(sys.argv[2])
while not go.exists():
    time.sleep(0.005)
ds = load_dataset(Path(sys.argv[1]), InputSpec(height=16, width=16))
print(len(ds.train) + len(ds.val) + len(ds.test))  # all three roles
"""


def test_two_processes_unpacking_the_same_new_zip_both_succeed(tmp_path):
    arr = np.random.default_rng(0).integers(0, 255, (16, 16, 3), dtype=np.uint8)
    one = png(arr)
    path = tmp_path / "data.zip"
    path.write_bytes(make_zip([(f"c{c}/{i:04d}.png", one) for c in range(3) for i in range(500)], zipfile.ZIP_STORED))
    go = tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, "-c", _CONCURRENT_LOAD, str(path), str(go)], cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    time.sleep(2.0)  # both interpreters are up and waiting
    go.touch()
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0 and "Traceback" not in err, err
        assert out.strip() == "1500"
    uploads = workspace_root() / "uploads"
    folders = [p.name for p in uploads.iterdir()]
    assert len(folders) == 1 and folders[0].startswith("data-"), folders  # one published copy, no leftovers
    assert (uploads / folders[0] / ".complete").exists()
    assert len(list((uploads / folders[0]).rglob("*.png"))) == 1500
    assert load_dataset(path, InputSpec(height=16, width=16)).report.num_classes == 3  # the cache stays usable


# ----------------------------------------------------------------------------- 4: settings and file-system faults


@pytest.mark.parametrize("args, needle", [
    (["--input-size", "-32", "-32"], "input size"),
    (["--input-size", "0", "32"], "input size"),
    (["--val-fraction", "1.5"], "validation fraction"),
    (["--val-fraction", "0"], "validation fraction"),
    (["--val-fraction", "nan"], "validation fraction"),
    (["--seed", "-1"], "seed"),
    (["--std", "0", "1", "1"], "std must be positive"),
])
def test_bad_settings_are_refused_before_any_work(args, needle, capsys):
    """In-process for speed (``python -m core`` exits with what ``main`` returns); one real process below."""
    before = snapshot(workspace_root())
    code, err = _main(["evaluate", "--model", "sample:vgg_digits", "--data", "sample:vgg_digits", "--no-latency",
                       *args], capsys)
    assert code == 2 and err.strip() == assert_one_error_line(err, needle)
    assert snapshot(workspace_root()) == before


@pytest.mark.parametrize("args, needle", [
    (["--finetune-lr", "-1"], "learning rate"),
    (["--finetune-lr", "0"], "learning rate"),
    (["--val-fraction", "1.5"], "validation fraction"),
    (["--max-drop", "-3"], "threshold"),
])
def test_bad_prune_settings_leave_no_failed_run(tmp_path, args, needle, capsys):
    out = tmp_path / "run"
    before = snapshot(workspace_root())
    code, err = _main(["prune", "--model", "sample:vgg_digits", "--data", "sample:vgg_digits", "--out", str(out),
                       "--no-latency", "--no-analysis", *args], capsys)
    assert code == 2 and err.strip() == assert_one_error_line(err, needle)
    assert not out.exists(), "no failed run left behind"
    assert snapshot(workspace_root()) == before


def test_negative_learning_rate_in_a_real_process(tmp_path):
    """The issue's case end to end: refused at once with exit code 2, no run folder."""
    res = cli_run("prune", "--model", "sample:vgg_digits", "--data", "sample:vgg_digits", "--out",
                  str(tmp_path / "run"), "--finetune-lr", "-1")
    assert_refused(res, "learning rate")
    assert not (tmp_path / "run").exists()


def test_detection_settings_are_checked_too(capsys):
    code, err = _main(["evaluate", "--task", "detection", "--model", "sample:ssd_counting", "--data",
                       "sample:counting", "--input-size", "-32", "-32"], capsys)
    assert code == 2
    assert_one_error_line(err, "input size")
    code, err = _main(["evaluate", "--task", "detection", "--model", "sample:ssd_counting", "--data",
                       "sample:counting", "--val-fraction", "1.5"], capsys)
    assert code == 2
    assert_one_error_line(err, "validation fraction")


def test_analyse_image_count_is_checked_first(tmp_path, capsys):
    code, err = _main(["analyse", "--model", "sample:vgg_digits", "--data", "sample:vgg_digits", "--out",
                       str(tmp_path / "a"), "--images", "0"], capsys)
    assert code == 2
    assert_one_error_line(err, "at least 1 validation image")
    assert not (tmp_path / "a").exists()


@pytest.fixture
def digits_run(tmp_path) -> Run:
    """The sample's original as step 0 of a run, with its real figure on the run's selection images."""
    from core.evaluate import evaluate_accuracy
    from core.sources import load_run_dataset

    loaded = load_model("sample:vgg_digits")
    val = load_run_dataset(RUN_CONFIG, loaded.spec.input, expected_classes=loaded.spec.num_classes).val
    return write_run(workspace_root() / "runs" / "digits", loaded,
                     metric=evaluate_accuracy(loaded.model, val, loaded.spec.input).accuracy)


def test_export_into_read_only_folder_is_one_line(digits_run, tmp_path, monkeypatch, capsys):
    """``--out`` on a read-only file system (EROFS; the tests run as root, so chmod cannot simulate it)."""
    ro = tmp_path / "readonly"
    real_mkdir = Path.mkdir

    def mkdir(self, *a, **kw):
        if str(self).startswith(str(ro)):
            raise OSError(errno.EROFS, "Read-only file system", str(self))
        return real_mkdir(self, *a, **kw)

    monkeypatch.setattr(Path, "mkdir", mkdir)
    code, err = _main(["export", "--run", str(digits_run.dir), "--out", str(ro / "bundle")], capsys)
    assert code == 2
    assert_one_error_line(err, "Cannot write the bundle", "Read-only file system")
    assert not ro.exists()


def test_disk_full_while_zipping_leaves_neither_bundle_nor_zip(digits_run, tmp_path, monkeypatch, capsys):
    out = tmp_path / "exports" / "bundle"
    real_write = zipfile.ZipFile.write
    calls = []

    def write(self, filename, *a, **kw):
        calls.append(filename)
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(self, filename, *a, **kw)

    monkeypatch.setattr(zipfile.ZipFile, "write", write)
    code, err = _main(["export", "--run", str(digits_run.dir), "--out", str(out)], capsys)
    assert code == 2, err
    assert_one_error_line(err, "No space left on device", "nothing was written")
    assert not out.exists() and not out.with_suffix(".zip").exists()
    assert list((tmp_path / "exports").iterdir()) == [], "no temporary folder or zip left behind"
    # the same export with room on the disk: bundle and zip appear together, then the tampered bundle falls back
    monkeypatch.setattr(zipfile.ZipFile, "write", real_write)
    code, err = _main(["export", "--run", str(digits_run.dir), "--out", str(out), "--json"], capsys)
    assert code == 0, err
    assert out.is_dir() and zipfile.ZipFile(out.with_suffix(".zip")).testzip() is None
    _tampered_bundle_falls_back(out)


def _tampered_bundle_falls_back(bundle: Path) -> None:
    """Held drill: an altered pruned model in a bundle makes deploy.py use the original."""
    binary = bundle / "model" / "model.bin"
    raw = bytearray(binary.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    binary.write_bytes(bytes(raw))
    proc = subprocess.run([sys.executable, "deploy.py", "--json"], cwd=bundle, capture_output=True, text=True,
                          timeout=300)
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert proc.returncode == 0 and out["which"] == "fallback", proc.stdout + proc.stderr


# ----------------------------------------------------------------------------- 6, 7, 8: counts, names, report


def test_non_ascii_class_folders_keep_their_names():
    names = list("零一二三四五六七八九")
    files = [(f"数据/{n}", b) for n, b in digit_files(4, names)]
    ds = load_dataset(folder_upload_to_zip(files), DIGITS_SPEC)
    assert sorted(ds.class_names) == sorted(names) and ds.report.num_classes == 10


def test_folder_names_stay_distinct_when_sanitised():
    files = [("a:b/1.png", b"1"), ("a?b/1.png", b"2"), ("a_b/1.png", b"3"), ("ok/1.png", b"4"), ("ok/1.png", b"5")]
    names = zipfile.ZipFile(io.BytesIO(folder_upload_to_zip(files))).namelist()
    assert len(names) == 5 and len({n.split("/")[0] for n in names[:3]}) == 3, names
    assert all(":" not in n and "?" not in n for n in names)


def test_text_output_prints_the_data_report_on_stderr(tmp_path):
    files = digit_files(6) + [("3/notes.txt", b"hello"), ("5/broken.png", b"\x89PNG\r\n\x1a\nbroken")]
    path = tmp_path / "data.zip"
    path.write_bytes(make_zip(files))
    res = cli_run("evaluate", "--model", "sample:vgg_digits", "--data", str(path), "--no-latency")
    assert res.returncode == 0, res.stderr
    assert "not an image, skipped: 3/notes.txt" in res.stderr
    assert "unreadable image, skipped: 5/broken.png" in res.stderr
    assert "accuracy" in res.stdout


# ----------------------------------------------------------------------------- held: kill -9 and double start


def _prune_until_two_steps(out, *extra: str, **popen) -> subprocess.Popen:
    """A long CLI prune of the sample, returned once two steps are on disk (still running)."""
    proc = subprocess.Popen([sys.executable, "-m", "core", "prune", "--model", "sample:vgg_digits", "--data",
                             "sample:vgg_digits", "--out", str(out), "--criterion", "l1", "--no-latency",
                             "--no-analysis", "--finetune-steps", "2", "--max-drop", "50", "--max-steps", "50", *extra],
                            cwd=ROOT, **popen)
    history = out / "history.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if history.exists() and len(history.read_text().splitlines()) >= 3:
            break
        time.sleep(0.2)
    assert proc.poll() is None, "the run ended before two steps were on disk"
    return proc


def test_kill_9_during_prune_keeps_steps_and_reads_interrupted(tmp_path):
    out = tmp_path / "run"
    proc = _prune_until_two_steps(out, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(30)
    run = Run(out)
    assert run.status["state"] == "interrupted"
    steps = run.steps()
    assert len(steps) >= 3
    widths = []
    for step in steps:  # every recorded step still rebuilds and runs
        model = run.rebuild_step(step)
        assert model(torch.zeros(1, 3, 32, 32)).shape == (1, 10)
        widths.append(sum(m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d)))
    assert widths[-1] < widths[0], "the kept steps really are pruned"


def test_ctrl_c_during_prune_cancels_keeps_steps_and_prints_the_summary(tmp_path):
    """Ctrl-C is a cancel, not a crash: the run stops at its next check, reads 'cancelled' with every
    completed step kept, the JSON summary still comes out, and the exit code is 130."""
    out = tmp_path / "run"
    proc = _prune_until_two_steps(out, "--json", stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr and "completed steps are kept" in stderr
    summary = json.loads(stdout)
    run = Run(out)
    assert summary["state"] == "cancelled" == run.status["state"]
    assert summary["steps"] == len(run.steps()) - 1 >= 2
    model = run.rebuild_step(run.steps()[-1])
    assert model(torch.zeros(1, 3, 32, 32)).shape == (1, 10)


def test_double_start_is_refused_and_changes_nothing(digits_run):
    before = snapshot(digits_run.dir)
    res = cli_run("prune", "--model", "sample:vgg_digits", "--data", "sample:vgg_digits", "--out",
                  str(digits_run.dir), "--no-latency", "--no-analysis")
    assert_refused(res, "not empty")
    assert snapshot(digits_run.dir) == before
    registry = JobRegistry()
    release = threading.Event()
    first = registry.start("prune", lambda ctx: release.wait(30), key="same")
    with pytest.raises(JobAlreadyRunning) as info:
        registry.start("prune", lambda ctx: None, key="same")
    assert info.value.job is first
    release.set()
    first.wait(30)


def test_export_never_replaces_what_is_not_a_bundle(digits_run, tmp_path, capsys):
    """An existing folder of anything else, the run folder itself, a file, or a foreign zip beside the
    bundle name: refused with one line before any work, nothing changed. An earlier bundle is replaced."""
    docs = tmp_path / "important"
    docs.mkdir()
    (docs / "thesis.txt").write_text("years of work")
    run_before = snapshot(digits_run.dir)
    for out in (docs, digits_run.dir):
        code, err = _main(["export", "--run", str(digits_run.dir), "--out", str(out)], capsys)
        assert code == 2
        assert_one_error_line(err, "not a PruneScope bundle", "nothing was changed")
    assert (docs / "thesis.txt").read_text() == "years of work"
    assert snapshot(digits_run.dir) == run_before
    a_file = tmp_path / "notes.txt"
    a_file.write_text("x")
    code, err = _main(["export", "--run", str(digits_run.dir), "--out", str(a_file)], capsys)
    assert code == 2 and a_file.read_text() == "x"
    (tmp_path / "fresh.zip").write_bytes(b"someone else's zip")
    code, err = _main(["export", "--run", str(digits_run.dir), "--out", str(tmp_path / "fresh")], capsys)
    assert code == 2 and (tmp_path / "fresh.zip").read_bytes() == b"someone else's zip"
    bundle = tmp_path / "bundle"
    for _ in range(2):  # a bundle of our own is replaced, atomically, with its zip
        code, err = _main(["export", "--run", str(digits_run.dir), "--out", str(bundle)], capsys)
        assert code in (0, 3), err
    assert (bundle / "manifest.json").is_file() and (tmp_path / "bundle.zip").is_file()


def test_settings_a_sample_would_ignore_are_refused(capsys):
    for extra in (["--mean", "0", "0", "0"], ["--input-size", "20", "20"]):
        code, err = _main(["evaluate", "--model", "sample:vgg_digits", "--data", "sample:vgg_digits", "--no-latency",
                           *extra], capsys)
        assert code == 2
        assert_one_error_line(err, "sample fixes its own input size and normalisation")
    code, err = _main(["evaluate", "--model", "sample:vgg_digits", "--data", "sample:vgg_digits", "--no-latency",
                       "--class-order", "9,8,7,6,5,4,3,2,1,0"], capsys)
    assert code == 2
    assert_one_error_line(err, "sample data set has its own class order")


def test_run_folder_json_is_strict(tmp_path):
    """A class with one image has no validation image: its accuracy is null in the run's files, not NaN."""
    files = [(n, b) for n, b in digit_files(per_class=6) if not n.startswith("9/")]
    files += [(n, b) for n, b in digit_files(per_class=1) if n.startswith("9/")]
    data = tmp_path / "d.zip"
    data.write_bytes(make_zip(files))
    out = tmp_path / "run"
    res = cli_run("prune", "--model", "sample:vgg_digits", "--data", str(data), "--out", str(out), "--criterion", "l1",
                  "--max-steps", "1", "--finetune-steps", "1", "--score-images", "16", "--no-latency", "--no-analysis")
    assert res.returncode == 0, res.stderr

    def refuse(constant):
        raise ValueError(f"non-standard JSON constant {constant}")

    baseline = json.loads((out / "baseline.json").read_text(), parse_constant=refuse)
    assert baseline["per_class"]["9"] is None
    for line in (out / "history.jsonl").read_text().splitlines():
        json.loads(line, parse_constant=refuse)
