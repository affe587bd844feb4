"""Fuzz: random mutations of a valid data zip and of a valid checkpoint (issue 15).

Every mutated input either loads or is refused with one line (a ``PruneScopeError``; exit code 2
on the CLI): never another exception, never a traceback, never a hang. The bulk runs in-process
through the core loaders; a handful go through ``python -m core`` to check the exit code end to end.
Seeds are fixed, so a failure names the input that caused it and can be replayed.
"""
from __future__ import annotations

import io
import signal
import subprocess
import sys
import traceback
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from core.data import COMPLETE_MARKER
from core.sources import load_dataset
from core.errors import PruneScopeError
from core.models import SAMPLE_DIR, InputSpec, load_model, sample_entry
from core.sample_data import make_sample_images
from core.workspace import workspace_root

ROOT = Path(__file__).resolve().parents[2]
DIGITS = sample_entry("vgg_digits")
SPEC = InputSpec(height=32, width=32, mean=tuple(DIGITS["mean"]), std=tuple(DIGITS["std"]))
SECONDS_PER_INPUT = 30  # far above the few milliseconds an input takes; only a hang reaches it


class Hang(Exception):
    pass


def _alarm(signum, frame):
    raise Hang()


def mutate(data: bytes, rng: np.random.Generator, hot: int = 0) -> bytes:
    """One random mutation: flipped bytes, truncation, inserted or overwritten bytes, or a repeated span.
    With ``hot``, half of the positions fall in the first or last ``hot`` bytes (headers, directories)."""
    raw = bytearray(data)

    def pos() -> int:
        if hot and rng.random() < 0.5:
            p = int(rng.integers(0, min(hot, len(raw))))
            return p if rng.random() < 0.5 else len(raw) - 1 - p
        return int(rng.integers(0, len(raw)))

    kind = int(rng.integers(0, 5))
    if kind == 0:
        for _ in range(int(rng.integers(1, 9))):
            raw[pos()] ^= int(rng.integers(1, 256))
    elif kind == 1:
        del raw[pos():]
    elif kind == 2:
        p = pos()
        raw[p:p] = rng.bytes(int(rng.integers(1, 64)))
    elif kind == 3:
        p = pos()
        raw[p:p + int(rng.integers(1, 64))] = bytes([int(rng.choice([0, 255]))]) * int(rng.integers(1, 64))
    else:
        p = pos()
        raw[p:p] = raw[p:p + int(rng.integers(1, 256))]
    return bytes(raw)


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr, "RGB").save(buf, format="PNG")
    return buf.getvalue()


def _jpeg(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr, "RGB").save(buf, format="JPEG")
    return buf.getvalue()


def digit_members() -> list[tuple[str, bytes]]:
    """Two images of each of the ten digits (one PNG, one JPEG): a valid data set for the digits sample."""
    arr, labels, names = make_sample_images("digits")
    out = []
    for c in range(10):
        a, b = np.flatnonzero(labels == c)[:2]
        out += [(f"digits/{names[c]}/a.png", _png(arr[a])), (f"digits/{names[c]}/b.jpg", _jpeg(arr[b]))]
    return out


def make_zip(members: list[tuple[str, bytes]], compression: int) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=compression) as zf:
        for name, data in members:
            zf.writestr(name, data)
    return buf.getvalue()


def data_inputs(n_zip_stored: int, n_zip_deflated: int, n_members: int, seed: int = 15):
    """(label, mutated zip bytes): whole archives mutated, and archives of mutated images."""
    rng = np.random.default_rng(seed)
    members = digit_members()
    stored, deflated = make_zip(members, zipfile.ZIP_STORED), make_zip(members, zipfile.ZIP_DEFLATED)
    for i in range(n_zip_stored):
        yield f"stored zip #{i}", mutate(stored, rng, hot=2048)
    for i in range(n_zip_deflated):
        yield f"deflated zip #{i}", mutate(deflated, rng, hot=2048)
    for i in range(n_members):
        k = int(rng.integers(0, len(members)))
        changed = list(members)
        changed[k] = (members[k][0], mutate(members[k][1], rng, hot=128))
        yield f"member {members[k][0]} #{i}", make_zip(changed, zipfile.ZIP_STORED)


def checkpoint_inputs(n: int, seed: int = 16):
    rng = np.random.default_rng(seed)
    base = (SAMPLE_DIR / DIGITS["weights"]).read_bytes()
    for i in range(n):
        yield f"checkpoint #{i}", mutate(base, rng, hot=4096)


def check_each(inputs, load) -> dict[str, int]:
    """Run ``load`` on every input under a time bound; fail listing every input that raised something
    other than a one-line ``PruneScopeError`` or hung."""
    outcomes = {"loaded": 0, "refused": 0}
    problems = []
    old = signal.signal(signal.SIGALRM, _alarm)
    try:
        for label, data in inputs:
            signal.alarm(SECONDS_PER_INPUT)
            try:
                load(data)
                outcomes["loaded"] += 1
            except PruneScopeError as exc:
                text = str(exc)
                if "\n" in text or not text.strip():
                    problems.append(f"{label}: message not one line: {text!r}")
                outcomes["refused"] += 1
            except Hang:
                problems.append(f"{label}: no answer within {SECONDS_PER_INPUT} s")
            except BaseException as exc:  # noqa: BLE001 - any other kind is the failure being looked for
                problems.append(f"{label}: {type(exc).__name__}: {exc}\n{traceback.format_exc(limit=-3)}")
            finally:
                signal.alarm(0)
    finally:
        signal.signal(signal.SIGALRM, old)
    assert not problems, "\n".join(problems[:10])
    return outcomes


def test_mutated_data_zips_load_or_are_refused_in_one_line():
    outcomes = check_each(data_inputs(100, 50, 100), lambda data: load_dataset(data, SPEC, expected_classes=10))
    assert outcomes["loaded"] > 0 and outcomes["refused"] > 0, outcomes  # the mutations reach both outcomes
    uploads = workspace_root() / "uploads"
    left = [p.name for p in uploads.iterdir()] if uploads.exists() else []
    assert not [n for n in left if ".partial" in n or ".stale" in n], left  # no half-unpacked archive remains
    assert all((uploads / n / COMPLETE_MARKER).exists() for n in left), left  # only loaded ones are kept


def test_mutated_checkpoints_load_or_are_refused_in_one_line():
    outcomes = check_each(checkpoint_inputs(150), lambda data: load_model(data, arch="sample_vgg", input_spec=SPEC))
    assert outcomes["refused"] > 0, outcomes


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "core", "evaluate", "--no-latency", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


def _assert_loaded_or_one_line(res: subprocess.CompletedProcess, label: str) -> None:
    assert res.returncode in (0, 2), (label, res.returncode, res.stderr[-2000:])
    assert "Traceback" not in res.stderr, (label, res.stderr)
    if res.returncode == 2:
        lines = res.stderr.strip().splitlines()
        assert lines[-1].startswith("error: ") and sum(line.startswith("error: ") for line in lines) == 1, (label, lines)


@pytest.mark.parametrize("which", ["data", "checkpoint"])
def test_a_handful_through_the_cli(which, tmp_path):
    inputs = list(data_inputs(2, 1, 0, seed=151)) if which == "data" else list(checkpoint_inputs(3, seed=161))
    for i, (label, data) in enumerate(inputs):
        path = tmp_path / (f"{i}.zip" if which == "data" else f"{i}.pt")
        path.write_bytes(data)
        args = (["--model", "sample:vgg_digits", "--data", str(path)] if which == "data" else
                ["--model", str(path), "--arch", "sample_vgg", "--input-size", "32", "32", "--mean",
                 *map(str, DIGITS["mean"]), "--std", *map(str, DIGITS["std"]), "--data", "sample:vgg_digits"])
        _assert_loaded_or_one_line(_cli(*args), label)
