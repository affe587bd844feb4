"""Shared fixtures: every test gets its own workspace so runs and uploads never leak between tests."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

# Under pytest-xdist (``-n 2``, see pytest.ini) each worker gets one intra-op thread: two workers with
# one thread each keep both cores busy, where two workers with two OpenMP threads each oversubscribe
# them and slow small convolutions many-fold. Set before torch is imported; subprocesses inherit it.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("MKL_NUM_THREADS", "1")

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


@pytest.fixture(autouse=True)
def _isolated_workspace(tmp_path, monkeypatch):
    monkeypatch.setenv("PRUNESCOPE_WORKSPACE", str(tmp_path / "workspace"))
    yield


@pytest.fixture
def myriad_compiler():
    """The NCS2 compiler is set up (``tests.helpers.needs_myriad``); skips with its reason where it cannot be."""
    from tests.helpers import require_myriad

    require_myriad()


@pytest.fixture
def one_thread():
    """One intra-op thread: on a shared 2-core machine, spinning OpenMP threads slow small convs many-fold."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="session")
def ray_cluster():
    """A local Ray cluster of 2 CPUs, started once per test session (per xdist worker) and shut down after it;
    the tests that need Ray share it (``core.distributed.CarPool`` makes its actors in it and starts none of its
    own). Skips, saying why, where Ray cannot import."""
    import logging

    from core.distributed import ROOT as REPO, ray_available

    ok, why = ray_available()
    if not ok:
        pytest.skip(why)
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
                 logging_level=logging.WARNING, runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}})
    yield ray
    if started:
        ray.shutdown()
