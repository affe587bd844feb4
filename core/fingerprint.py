"""Content fingerprints, so that a result computed once is found again instead of recomputed.

A CAR analysis is valid for exactly one model state on exactly one set of images; both are hashed
(SHA-256 over tensor bytes, shapes and names), and a stored result is reused only when both hashes
and the settings that shaped it match. Hashing ResNet-56's weights and 400 CIFAR images takes a few
milliseconds, far below one filter's CAR.
"""
from __future__ import annotations

import hashlib
import json

import torch
from torch import nn


def _update(h, tensor: torch.Tensor) -> None:
    t = tensor.detach().cpu().contiguous()
    h.update(str((tuple(t.shape), str(t.dtype))).encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")


def model_fingerprint(model: nn.Module) -> str:
    """Hash of the model's state (parameters and buffers by name) and its module structure."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        _update(h, tensor)
    h.update(" ".join(type(m).__name__ for m in model.modules()).encode())
    return h.hexdigest()[:24]


def tensors_fingerprint(*tensors: torch.Tensor) -> str:
    """Hash of tensors' contents, shapes and dtypes (e.g. the score images and their labels)."""
    h = hashlib.sha256()
    for t in tensors:
        _update(h, t)
    return h.hexdigest()[:24]


def settings_fingerprint(settings: dict) -> str:
    """Hash of JSON-serialisable settings (sorted keys)."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:24]
