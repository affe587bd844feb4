"""Device and thread settings: CPU works, CUDA without a GPU is one clear error, threads are set."""
from __future__ import annotations

import pytest
import torch

from core.device import available_cores, resolve_device, set_threads
from core.errors import SettingsError


def test_cpu_and_auto():
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_without_a_gpu_is_a_clear_error():
    with pytest.raises(SettingsError, match="no CUDA GPU"):
        resolve_device("cuda")


def test_unknown_device_and_threads():
    with pytest.raises(SettingsError, match="Unknown device"):
        resolve_device("tpu")
    old = torch.get_num_threads()
    try:
        assert set_threads(1) == 1 and torch.get_num_threads() == 1
        assert set_threads(None) == available_cores()
        with pytest.raises(SettingsError):
            set_threads(-2)
    finally:
        torch.set_num_threads(old)
