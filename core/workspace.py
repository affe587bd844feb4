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

from .integrity import (MAX_HISTORY_BYTES, MAX_JSON_BYTES, MAX_SIDECAR_BYTES, IntegrityError, read_bounded,
                        read_json_bounded,
                        read_jsonl_bounded)
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


UPLOAD_NAME_SUFFIX = ".name.json"


def remember_upload_name(path: str | Path, name: str) -> None:
    """Keep the name the user uploaded ``path`` under (a file name, or a folder's), beside the stored upload.

    Uploads are stored under names made from their hash, so two uploads never clash; but those names mean
    nothing to the user, so runs record the user's name (:func:`upload_name`) and show it (issue 16).
    """
    atomic_write_json(Path(str(path) + UPLOAD_NAME_SUFFIX), {"name": str(name)})


def upload_name(path: str | Path | None) -> str | None:
    """The user's name for the stored upload ``path`` (see :func:`remember_upload_name`), or None."""
    if not path:
        return None
    try:
        record = read_json_bounded(Path(str(path) + UPLOAD_NAME_SUFFIX), MAX_SIDECAR_BYTES)
    except (OSError, ValueError, IntegrityError):  # a damaged, oversized or unreadable record names nothing
        return None
    name = record.get("name") if isinstance(record, dict) else None
    return name if isinstance(name, str) and name else None


def folder_upload_name(file_names: list[str]) -> str:
    """A folder upload's name for people: the folder all its files share (``digits``), else how many files."""
    tops = {Path(n).parts[0] for n in file_names if len(Path(n).parts) > 1}
    return tops.pop() if len(tops) == 1 else f"{len(file_names)} uploaded files"


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
    old = read_bounded(path, MAX_HISTORY_BYTES).decode("utf-8") if path.exists() else ""
    atomic_write_text(path, old + json.dumps(strict(record), default=_json_default, allow_nan=False) + "\n")


def read_jsonl(path: Path) -> list[dict]:
    """One JSON value per line of ``path`` ([] when absent); bounded, regular files only (``core.integrity``)."""
    return read_jsonl_bounded(path, MAX_HISTORY_BYTES)


def read_json(path: Path, default: Any = None) -> Any:
    """The JSON in ``path`` (``default`` when absent): a regular file of at most ``MAX_JSON_BYTES``, else
    :class:`core.integrity.IntegrityError`; a file that is no JSON raises ``ValueError``."""
    return read_json_bounded(path, MAX_JSON_BYTES, default)


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
