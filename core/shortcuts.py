"""Zero-padded ("option A") shortcuts made prunable.

The CIFAR ResNet of He et al., the most common CIFAR ResNet in public code, widens the identity
shortcut between stages with ``F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, p, p))`` inside a lambda. The
dependency graph cannot see through that: Torch-Pruning treats the pad as element-wise, couples the
16-, 32- and 64-channel streams index by index and, once pruned, the padded channels land on the
wrong positions — a model that runs, has the right output shape, and is silently wrong.

The fix is exact and cheap: such a shortcut *is* a 1x1 convolution with stride s whose weight
embeds input channel i at output channel i + p. Replacing the parameter-free module with that frozen
convolution lets every stream become its own group; removing a channel of the narrow stream removes
a column of the embedding, removing one of the wide stream removes a row. The embedding is rebuilt
from the model's structure, so it is kept out of the state dict: converted and unconverted models
save and load the same weights.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

MARKER = "_prunescope_zero_pad"


def convert_zero_pad_shortcuts(model: nn.Module, input_shape: tuple[int, ...]) -> list[str]:
    """Replace every parameter-free module that subsamples and zero-pads channels; returns notes."""
    found = _padding_modules(model, input_shape)
    notes = []
    for name, (stride, before, after, c_in) in found.items():
        model.set_submodule(name, embedding_conv(c_in, stride, before, after))
        notes.append(f"{name}: zero-padded shortcut ({c_in} -> {c_in + before + after} channels, stride {stride}) "
                     "replaced by an equivalent frozen 1x1 convolution so that its streams prune consistently.")
    return notes


def embedding_conv(c_in: int, stride: int, before: int, after: int) -> nn.Conv2d:
    """A frozen 1x1 conv equal to ``F.pad(x[:, :, ::s, ::s], (0, 0, 0, 0, before, after))``."""
    conv = nn.Conv2d(c_in, c_in + before + after, kernel_size=1, stride=stride, bias=False)
    with torch.no_grad():
        conv.weight.zero_()
        for i in range(c_in):
            conv.weight[before + i, i, 0, 0] = 1.0
    conv.weight.requires_grad_(False)
    setattr(conv, MARKER, (stride, before, after))
    conv.register_state_dict_post_hook(_drop_embedding)
    conv.register_load_state_dict_pre_hook(_keep_embedding)
    return conv


def is_shortcut_embedding(module: nn.Module) -> bool:
    """Whether ``module`` is a frozen 1x1 embedding made by :func:`embedding_conv`."""
    return hasattr(module, MARKER)


def refreeze(model: nn.Module) -> None:
    """Pruning re-wraps weights as trainable parameters; the embeddings must stay fixed."""
    for m in model.modules():
        if hasattr(m, MARKER):
            m.weight.requires_grad_(False)


def _drop_embedding(module, state_dict, prefix, local_metadata):
    state_dict.pop(prefix + "weight", None)


def _keep_embedding(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
    state_dict.setdefault(prefix + "weight", module.weight.detach().clone())


def _padding_modules(model: nn.Module, input_shape: tuple[int, ...]) -> dict[str, tuple[int, int, int, int]]:
    """Parameter-free modules whose output is their input, subsampled, with zero channels around it."""
    seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    names = {m: n for n, m in model.named_modules()}
    candidates = [m for n, m in model.named_modules()
                  if n and not hasattr(m, MARKER) and not any(True for _ in m.parameters()) and not any(True for _ in m.buffers())]

    def hook(mod, args, out):
        x = args[0] if args else None
        if isinstance(x, torch.Tensor) and isinstance(out, torch.Tensor) and x.dim() == 4 and out.dim() == 4 \
                and out.shape[1] > x.shape[1] and names[mod] not in seen:
            seen[names[mod]] = (x.detach().clone(), out.detach().clone())

    handles = [m.register_forward_hook(hook) for m in candidates]
    try:
        with torch.no_grad():
            model.eval()(torch.randn(input_shape, generator=torch.Generator().manual_seed(0)))
    finally:
        for h in handles:
            h.remove()
    found = {}
    for name in sorted(seen, key=len):
        if any(name.startswith(outer + ".") for outer in found):
            continue
        match = _as_zero_pad(*seen[name])
        if match is not None:
            found[name] = (*match, seen[name][0].shape[1])
    return found


def _as_zero_pad(x: torch.Tensor, out: torch.Tensor) -> tuple[int, int, int] | None:
    """(stride, pad before, pad after) if ``out`` equals the subsampled, channel-padded ``x``."""
    if x.abs().sum() == 0 or out.shape[2] == 0:
        return None
    stride = -(-x.shape[2] // out.shape[2])
    sub = x[:, :, ::stride, ::stride]
    if sub.shape[2:] != out.shape[2:]:
        return None
    extra = out.shape[1] - x.shape[1]
    for before in range(extra + 1):
        if torch.equal(F.pad(sub, (0, 0, 0, 0, before, extra - before)), out):
            return stride, before, extra - before
    return None
