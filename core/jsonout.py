"""Machine-readable CLI output that stays machine-readable: ``--json`` puts exactly one strict JSON object on
stdout, whatever happens, and everything else on stderr.

Strict means RFC 8259: no ``NaN`` or ``Infinity`` (Python's ``json`` writes them by default, strict parsers
such as ``jq``, JavaScript's ``JSON.parse`` or ``json.loads(..., parse_constant=raise)`` reject them); an
undefined figure (the accuracy of a class with no validation image) is ``null``.

While a command runs in JSON mode, file descriptor 1 points at stderr, so even output written below Python
(a native library's ``printf``) cannot corrupt stdout; the result is written to the saved real stdout.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import sys
from typing import Any

import numpy as np

_real_stdout: int | None = None  # fd of the real stdout while a command runs in JSON mode
_emitted = False


def strict(obj: Any) -> Any:
    """``obj`` with every non-finite float replaced by None and numpy scalars/arrays as plain Python values."""
    if isinstance(obj, dict):
        return {str(k): strict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return strict(obj.tolist())
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def dumps(obj: Any) -> str:
    """Strict JSON text of ``obj`` (raises ValueError rather than write a non-finite number)."""
    return json.dumps(strict(obj), allow_nan=False, default=str)


def emit_json(obj: Any) -> None:
    """Write the command's one JSON object: to the real stdout in JSON mode, else to stdout."""
    global _emitted
    text = dumps(obj) + "\n"
    if _real_stdout is None:
        sys.stdout.write(text)
        sys.stdout.flush()
        return
    os.write(_real_stdout, text.encode())
    _emitted = True


@contextlib.contextmanager
def json_mode(enabled: bool):
    """Route stdout to stderr for the duration (Python and native writes alike); :func:`emit_json` still
    reaches the real stdout. Yields a function that reports whether the JSON object was written."""
    global _real_stdout, _emitted
    if not enabled:
        yield lambda: False
        return
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    old_stdout, _real_stdout, _emitted = sys.stdout, saved, False
    sys.stdout = sys.stderr
    try:
        yield lambda: _emitted
    finally:
        sys.stdout.flush()
        sys.stdout = old_stdout
        os.dup2(saved, 1)
        os.close(saved)
        _real_stdout = None
