"""Device and thread settings: CPU works, CUDA without a GPU is one clear error, threads are set."""
from __future__ import annotations

import json

import pytest
import torch

from core import cli
from core.device import available_cores, resolve_device, set_threads
from core.errors import SettingsError


def test_cpu_and_auto():
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_without_a_gpu_is_a_clear_error():
    with pytest.raises(SettingsError, match="no CUDA GPU"):
        resolve_device("cuda")


def test_unknown_device_and_threads(monkeypatch):
    with pytest.raises(SettingsError, match="Unknown device"):
        resolve_device("tpu")
    old = torch.get_num_threads()
    try:
        assert set_threads(1) == 1 and torch.get_num_threads() == 1
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        assert set_threads(None) == available_cores()
        monkeypatch.setenv("OMP_NUM_THREADS", "1")  # a harness sharing the cores said one: honoured, as torch does
        assert set_threads(None) == 1 and torch.get_num_threads() == 1
        monkeypatch.setenv("OMP_NUM_THREADS", "many")  # not a count: ignored
        assert set_threads(None) == available_cores()
        with pytest.raises(SettingsError):
            set_threads(-2)
    finally:
        torch.set_num_threads(old)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cli_cuda_without_a_gpu_is_one_line_and_exit_2(tmp_path, capsys):
    code = cli.main(["analyse", "--model", "sample:vgg_digits", "--data", "sample:vgg_digits", "--images", "10",
                     "--out", str(tmp_path / "an"), "--device", "cuda"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and "no CUDA GPU" in err[0] and "Traceback" not in err[0]
    assert not (tmp_path / "an").exists(), "nothing is written before the device is checked"


def test_cli_device_cpu_runs_and_says_where(tmp_path, capfd):
    old = torch.get_num_threads()
    try:
        code = cli.main(["analyse", "--model", "sample:vgg_digits", "--data", "sample:vgg_digits", "--images", "10",
                         "--car", "fast", "--out", str(tmp_path / "an"), "--device", "cpu", "--threads", "1", "--json"])
        out = capfd.readouterr()  # --json writes to the real stdout (file descriptor 1)
        assert code == 0
        assert json.loads(out.out)["device"] == "cpu"
        assert "device: CPU, 1 thread" in out.err
        assert torch.get_num_threads() == 1
        assert "ETA" in out.err or "elapsed" in out.err, "progress lines carry the phase's timing"
    finally:
        torch.set_num_threads(old)
