"""Content fingerprints, so that a result computed once is found again instead of recomputed.

A CAR analysis is valid for exactly one model state on exactly one set of images; both are hashed
(SHA-256 over tensor bytes, shapes and names), and a stored result is reused only when both hashes
and the settings that shaped it match. Hashing ResNet-56's weights and 400 CIFAR images takes a few
milliseconds, far below one filter's CAR.

A model's fingerprint is of what it computes, not of how its classes are named: its parameters and
buffers, the input shape it is fingerprinted at, and the structure of its graph (the leaf modules in the
order one forward pass calls them, each with what it computes and its output shape). Building a
``PruningGraph`` replaces an option-A ResNet's zero-padding shortcut (a user's ``LambdaLayer``) by an
equal frozen 1x1 convolution (``core.shortcuts``): both are described as the same zero-padding, so an
analysis of the converted copy still belongs to the model as loaded.
"""
from __future__ import annotations

import hashlib
import json

import torch
from torch import nn

from .shortcuts import MARKER, _as_zero_pad

def _update(h, tensor: torch.Tensor) -> None:
    t = tensor.detach().cpu().contiguous()
    h.update(str((tuple(t.shape), str(t.dtype))).encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")


def model_fingerprint(model: nn.Module, input_shape: tuple[int, ...] | None = None) -> str:
    """Hash of what ``model`` computes: its state (parameters and buffers by name, exact bytes) and its graph's
    structure (:func:`graph_structure`), traced at ``input_shape`` (``(1, C, H, W)``; the batch size is
    ignored). Without a shape the structure is its leaf modules in definition order (no trace)."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        _update(h, tensor)
    h.update(json.dumps(graph_structure(model, input_shape)).encode())
    return h.hexdigest()[:24]


def graph_structure(model: nn.Module, input_shape: tuple[int, ...] | None = None) -> list:
    """The leaf modules of ``model`` as one forward pass at ``input_shape`` calls them: ``[name, what it
    computes, output shape]`` per call (a fixed random input, eval mode, no gradients; the model's mode is
    restored). "What it computes" is the module's kind, except that a zero-padding shortcut, as the user
    wrote it or as the frozen 1x1 embedding ``core.shortcuts`` puts in its place, is ``zero-pad(stride,
    before, after)`` in both forms. Without ``input_shape``, or when the forward pass fails, the leaf modules
    in definition order with their kinds (no shapes)."""
    leaves = [(n, m) for n, m in model.named_modules() if not any(True for _ in m.children())]
    if input_shape is not None:
        try:
            return ["traced", input_shape_key(input_shape), *_trace(model, leaves, input_shape)]
        except Exception:  # a model that cannot run on a random input: its static structure still counts
            pass
    return ["static", *[[n, _kind(m)] for n, m in leaves]]


def input_shape_key(input_shape: tuple[int, ...]) -> list[int]:
    """The input shape a fingerprint is taken at, without the batch size."""
    return [int(d) for d in tuple(input_shape)[1:]]


def _kind(module: nn.Module, x: torch.Tensor | None = None, out=None) -> str:
    marker = getattr(module, MARKER, None)
    if marker is not None:
        return f"zero-pad{tuple(marker)}"
    if x is not None and isinstance(out, torch.Tensor) and x.dim() == 4 and out.dim() == 4 \
            and out.shape[1] > x.shape[1] and not any(True for _ in module.parameters()):
        match = _as_zero_pad(x, out)
        if match is not None:
            return f"zero-pad{tuple(match)}"
    return type(module).__name__


def _trace(model: nn.Module, leaves: list[tuple[str, nn.Module]], input_shape: tuple[int, ...]) -> list:
    calls: list = []
    names = {id(m): n for n, m in leaves}

    def hook(mod, args, out):
        x = args[0] if args and isinstance(args[0], torch.Tensor) else None
        shape = list(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        calls.append([names[id(mod)], _kind(mod, x, out), shape])

    first = next((p for p in model.parameters() if p.is_floating_point()), None)
    device = first.device if first is not None else torch.device("cpu")
    dtype = first.dtype if first is not None else torch.float32
    x = torch.randn((1, *input_shape_key(input_shape)), generator=torch.Generator().manual_seed(0))
    handles = [m.register_forward_hook(hook) for _, m in leaves]
    modes = [(m, m.training) for m in model.modules()]
    try:
        with torch.no_grad():
            model.eval()(x.to(device=device, dtype=dtype))
    finally:
        for h in handles:
            h.remove()
        for m, training in modes:
            m.training = training
    return calls


def tensors_fingerprint(*tensors: torch.Tensor) -> str:
    """Hash of tensors' contents, shapes and dtypes (e.g. the score images and their labels)."""
    h = hashlib.sha256()
    for t in tensors:
        _update(h, t)
    return h.hexdigest()[:24]


def settings_fingerprint(settings: dict) -> str:
    """Hash of JSON-serialisable settings (sorted keys)."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:24]
