"""Where uploads and runs live on disk, and the atomic writes that keep them whole.

Every file of a run is written to a temporary name in the same folder and renamed into place, so a
reader (or an app restarted after a crash) sees either the old file or the new one, never half.
"""
from __future__ import annotations

import json
import os
import re
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from .jsonout import strict

ENV_VAR = "PRUNESCOPE_WORKSPACE"


def workspace_root() -> Path:
    """The workspace folder: $PRUNESCOPE_WORKSPACE, else ./workspace; created on first use."""
    root = Path(os.environ.get(ENV_VAR) or "workspace").resolve()
    root.mkdir(parents=True, exist_ok=True)
    return root


def uploads_dir() -> Path:
    path = workspace_root() / "uploads"
    path.mkdir(parents=True, exist_ok=True)
    return path


def runs_dir() -> Path:
    path = workspace_root() / "runs"
    path.mkdir(parents=True, exist_ok=True)
    return path


def new_run_dir(prefix: str = "run") -> Path:
    """A fresh, uniquely named run folder; names sort by creation time."""
    safe = re.sub(r"[^A-Za-z0-9_-]+", "-", prefix).strip("-") or "run"
    path = runs_dir() / f"{time.strftime('%Y%m%d-%H%M%S')}-{safe}-{uuid.uuid4().hex[:6]}"
    path.mkdir(parents=True)
    return path


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, obj: Any) -> None:
    # strict JSON (NaN/Infinity -> null): run folders are read by other tools too, and strict parsers reject NaN
    atomic_write_text(path, json.dumps(strict(obj), indent=2, default=_json_default, allow_nan=False) + "\n")


def atomic_torch_save(path: Path, obj: Any) -> None:
    """torch.save through a temporary file, so an interrupted save never leaves a truncated checkpoint."""
    import io

    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


def append_jsonl(path: Path, record: dict) -> None:
    """Append one record by rewriting the file atomically: a crash leaves the previous complete file."""
    path = Path(path)
    old = path.read_text(encoding="utf-8") if path.exists() else ""
    atomic_write_text(path, old + json.dumps(strict(record), default=_json_default, allow_nan=False) + "\n")


def read_jsonl(path: Path) -> list[dict]:
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def read_json(path: Path, default: Any = None) -> Any:
    path = Path(path)
    if not path.exists():
        return default
    return json.loads(path.read_text(encoding="utf-8"))


def _json_default(obj: Any) -> Any:
    try:
        import numpy as np

        if isinstance(obj, np.generic):
            return obj.item()
        if isinstance(obj, np.ndarray):
            return obj.tolist()
    except ImportError:  # pragma: no cover
        pass
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")
