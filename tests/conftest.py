"""Shared fixtures: every test gets its own workspace so runs and uploads never leak between tests."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


@pytest.fixture(autouse=True)
def _isolated_workspace(tmp_path, monkeypatch):
    monkeypatch.setenv("PRUNESCOPE_WORKSPACE", str(tmp_path / "workspace"))
    yield


@pytest.fixture
def one_thread():
    """One intra-op thread: on a shared 2-core machine, spinning OpenMP threads slow small convs many-fold."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
