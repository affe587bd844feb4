"""Integrity of what the tool reads back: bounded reads, no links, paths that stay inside, sha256 checks.

A run folder or a bundle may come from someone else or be edited on disk (``docs/threat-model.md``).
Everything read back from one goes through this module:

- :func:`read_bounded` reads a *regular* file of at most ``limit`` bytes: a FIFO (which would block a
  reader forever), a device (``/dev/zero``, endless), a symbolic link (which may point anywhere) or a file
  over the limit is refused with one line, before more than ``limit + 1`` bytes are read;
- :func:`refuse_links` refuses a folder that is, or holds, a symbolic link where the tool reads or writes
  (a run's ``steps/`` linked elsewhere made ``recover`` write outside the workspace);
- :func:`inside` checks that a path, links resolved, stays under a root;
- :func:`verify_bytes` compares the sha256 of bytes with the digest recorded where the file is referred
  to (a history record for a step's weights, ``config.json`` for the originals, a manifest for a bundle).

Every failure is an :class:`IntegrityError`, a :class:`~core.errors.PruneScopeError`: one line for the
user, never a traceback, and nothing was run or written.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import stat
from pathlib import Path
from typing import Any

from .errors import PruneScopeError

# Size limits on files the tool reads back (bytes). Generous for real use, far below what hurts a machine.
MAX_JSON_BYTES = 16 * 1024 * 1024        # config.json, status.json, car.json, structure.json, a manifest ...
MAX_HISTORY_BYTES = 64 * 1024 * 1024     # history.jsonl: thousands of step records
MAX_SIDECAR_BYTES = 1024 * 1024          # trusted_files.json entries, upload-name sidecars, plans
MAX_WEIGHTS_BYTES = 8 * 1024 * 1024 * 1024  # a step's or an original's weights (a ViT-H is 2.5 GB in f32)
MAX_CODE_BYTES = 8 * 1024 * 1024         # a model's Python file


class IntegrityError(PruneScopeError):
    """A file read back is not what the tool wrote: a link, not a regular file, too large, or its sha256
    differs from the record that refers to it. Nothing was run or written."""


def sha256_bytes(data: bytes) -> str:
    """Hex sha256 of ``data`` (64 characters)."""
    return hashlib.sha256(data).hexdigest()


def read_bounded(path: str | Path, limit: int, what: str | None = None) -> bytes:
    """The bytes of the regular file ``path``, refused (:class:`IntegrityError`) when it is a symbolic link,
    not a regular file (a FIFO, a device such as ``/dev/zero``, a folder) or larger than ``limit`` bytes.

    Opened with ``O_NOFOLLOW | O_NONBLOCK`` so that neither a link nor a FIFO is followed or waited on, and
    checked with ``fstat`` on the open descriptor (no race between the check and the read). At most
    ``limit + 1`` bytes are read, so a file that grows while read is refused too. ``what`` names the file
    in messages (default: its name). ``FileNotFoundError`` passes through for callers with a default.
    """
    path = Path(path)
    label = what or path.name
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise
    except OSError as exc:
        if path.is_symlink():
            raise IntegrityError(f"{label} is a symbolic link (to {os.readlink(path)}); the tool reads no links "
                                 "in its folders, so it was not read.") from None
        raise IntegrityError(f"{label} cannot be read ({exc.strerror or exc}).") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            kind = ("a FIFO" if stat.S_ISFIFO(info.st_mode) else "a device" if stat.S_ISCHR(info.st_mode)
                    or stat.S_ISBLK(info.st_mode) else "a folder" if stat.S_ISDIR(info.st_mode) else "not a file")
            raise IntegrityError(f"{label} is {kind}, not a regular file; it was not read.")
        if info.st_size > limit:
            raise IntegrityError(f"{label} is {_size(info.st_size)}, over the {_size(limit)} such a file may have; "
                                 "it was not read.")
        os.set_blocking(fd, True)
        chunks, total = [], 0
        while total <= limit:
            chunk = os.read(fd, min(1 << 20, limit + 1 - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
        if total > limit:
            raise IntegrityError(f"{label} grew past {_size(limit)} while it was read; it was not used.")
        return b"".join(chunks)
    finally:
        os.close(fd)


def read_json_bounded(path: str | Path, limit: int = MAX_JSON_BYTES, default: Any = None,
                      what: str | None = None) -> Any:
    """``json.loads`` of :func:`read_bounded` (``default`` when the file does not exist). A file that is no
    JSON raises ``ValueError`` (as ``json`` does); one that is no regular file or too large,
    :class:`IntegrityError`."""
    try:
        data = read_bounded(path, limit, what)
    except FileNotFoundError:
        return default
    return json.loads(data.decode("utf-8"))


def read_jsonl_bounded(path: str | Path, limit: int = MAX_HISTORY_BYTES, what: str | None = None) -> list:
    """One JSON value per non-empty line of ``path`` (``[]`` when it does not exist). A line that is no JSON
    raises ``ValueError`` naming its line number in the file (1-based, blank lines counted)."""
    try:
        data = read_bounded(path, limit, what)
    except FileNotFoundError:
        return []
    out = []
    for number, line in enumerate(data.decode("utf-8", errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError as exc:  # its own position is within the line: say the file's line number
            raise ValueError(f"line {number} is not JSON: {exc.msg} at character {exc.pos + 1}"
                             + ("" if line.rstrip().endswith(("}", "]")) else " (the line is cut short)")) from None
    return out


def verify_bytes(data: bytes, expected: str | None, label: str) -> None:
    """Raise :class:`IntegrityError` unless ``sha256(data) == expected``; ``expected`` None passes (a file
    written before files carried a hash: :func:`core.runs.Run.unverified` says so to the user)."""
    if expected is None:
        return
    digest = sha256_bytes(data)
    if not isinstance(expected, str) or digest != expected:
        shown = expected[:12] if isinstance(expected, str) else repr(expected)[:20]
        raise IntegrityError(f"{label} is not the file the tool wrote (damaged or replaced: its sha256 is "
                             f"{digest[:12]}…, the record says {shown}…); it was not used.")


def inside(path: str | Path, root: str | Path) -> bool:
    """Whether ``path``, with every link resolved, lies under ``root`` (resolved too)."""
    try:
        Path(path).resolve().relative_to(Path(root).resolve())
    except ValueError:
        return False
    return True


def refuse_links(folder: str | Path, names: tuple[str, ...] | None = None, label: str | None = None) -> None:
    """Refuse (:class:`IntegrityError`) when ``folder`` is a symbolic link or holds one among ``names``
    (default: every entry, one level deep, and the entries of its ``steps/``). The tool writes no links,
    so one there was put by someone else; following it could read or write anywhere."""
    folder = Path(folder)
    label = label or folder.name
    if folder.is_symlink():
        raise IntegrityError(f"{label} is a symbolic link (to {os.readlink(folder)}); a run folder is never one. "
                             "Nothing was read or written.")
    if not folder.is_dir():
        return
    entries = [folder / n for n in names] if names is not None else list(folder.iterdir())
    steps = folder / "steps"
    if names is None and steps.is_dir() and not steps.is_symlink():
        entries += list(steps.iterdir())
    for entry in entries:
        if entry.is_symlink():
            raise IntegrityError(f"{label}/{entry.relative_to(folder).as_posix()} is a symbolic link (to "
                                 f"{os.readlink(entry)}); run folders hold no links, so it was refused. Nothing "
                                 "was read or written.")


def finite_number(value: Any) -> bool:
    """Whether ``value`` is an int or float (not a bool, not a string) and finite."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _size(n: int) -> str:
    for unit, step in (("GB", 1 << 30), ("MB", 1 << 20), ("KB", 1 << 10)):
        if n >= step:
            return f"{n / step:.1f} {unit}"
    return f"{n} bytes"
