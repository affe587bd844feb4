"""Where a job runs: the compute device and the number of CPU threads, both chosen, never inherited.

``auto`` picks CUDA when PyTorch sees a GPU and the CPU otherwise. Threads: torch's default is one per
core of the machine regardless of what else runs; a job sets its count explicitly (default: the cores
this process may use, ``os.sched_getaffinity``), and the run records it.
"""
from __future__ import annotations

import os

import torch

from .errors import SettingsError

DEVICES = ("auto", "cpu", "cuda")


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` | ``cpu`` | ``cuda`` -> a torch device. Raises ``SettingsError`` for CUDA without a GPU."""
    name = (name or "auto").lower()
    if name not in DEVICES:
        raise SettingsError(f"Unknown device '{name}'. Choose one of: {', '.join(DEVICES)}.")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise SettingsError("Device 'cuda' was asked for, but PyTorch sees no CUDA GPU on this machine "
                            "(torch.cuda.is_available() is False); use the CPU ('cpu' or 'auto').")
    return torch.device(name)


def available_cores() -> int:
    """CPU cores this process may run on (respects affinity masks and container CPU sets)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def default_threads() -> int:
    """The intra-op thread count when none is asked for: ``OMP_NUM_THREADS`` where it is a positive whole number
    (torch's own rule, which a user or a test harness sharing the cores set on purpose), else every core this
    process may use. Why it matters: OpenMP threads spin while they wait, so two processes that each take all
    cores of a small machine slow small convolutions many-fold (docs/ray.md measured 2-thread CAR 4-9x slower
    than 1 thread on a shared 2-core machine)."""
    value = os.environ.get("OMP_NUM_THREADS", "").strip()
    if value.isdigit() and int(value) > 0:
        return int(value)
    return available_cores()


def set_threads(threads: int | None = None) -> int:
    """Set torch's intra-op thread count for this process (``None``: :func:`default_threads`); returns it.

    Raises ``SettingsError`` for a count below 1."""
    n = default_threads() if not threads else int(threads)
    if n < 1:
        raise SettingsError(f"The thread count must be at least 1; got {threads}.")
    torch.set_num_threads(n)
    return n


def model_device(model: torch.nn.Module) -> torch.device:
    """The device of a model's parameters (the CPU for a model without parameters)."""
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


class on_device:
    """Context manager: the model's parameters live on ``device`` inside, back on the CPU after.

    Graph surgery (Torch-Pruning traces with CPU example inputs), MAC counting, latency (OpenVINO) and
    saving stay on the CPU; scoring, fine-tuning and evaluation run where the job's device is. The
    model is moved in place (``Module.to``), so every reference to it stays valid.
    """

    def __init__(self, model: torch.nn.Module, device: torch.device | str | None):
        self.model, self.device = model, torch.device(device) if device is not None else None

    def __enter__(self) -> torch.nn.Module:
        if self.device is not None and self.device.type != "cpu":
            self.model.to(self.device)
        return self.model

    def __exit__(self, *exc) -> None:
        if self.device is not None and self.device.type != "cpu":
            self.model.to("cpu")


def describe(device: torch.device, threads: int) -> str:
    """One line for the UI and logs: which device runs the job."""
    if device.type == "cuda":
        return f"GPU: {torch.cuda.get_device_name(device)}"
    return f"CPU, {threads} thread{'s' if threads != 1 else ''}"
