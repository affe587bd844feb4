"""Does the model fit in FP16? The NCS2 computes activations in FP16, whose largest finite value is 65,504;
a model whose hidden activations exceed it runs to inf/NaN on the device even though its FP32 output,
and an IR checked on a CPU that computes in f32, look fine.

Measured, not assumed: the peak |activation| of every module on validation images in FP32, and a run
of the model in torch float16 (an emulation of FP16 arithmetic) that finds the first module whose
output stops being finite.
"""
from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from .data import ImageSet, normalize
from .models import InputSpec

FP16_MAX = 65504.0
CHECK_IMAGES = 64


@dataclass
class Fp16Range:
    n_images: int
    peaks: dict[str, float] = field(default_factory=dict)  # module -> max |output| in FP32 over the images
    overflows: dict[str, float] = field(default_factory=dict)  # modules whose FP32 output exceeds FP16_MAX
    fp16_finite: bool | None = None  # the torch float16 run stays finite (None: it could not run)
    first_nonfinite: str | None = None  # first module, in execution order, whose float16 output is inf/NaN
    note: str = ""

    @property
    def ok(self) -> bool:
        return not self.overflows and self.fp16_finite is not False

    def problems(self) -> list[tuple[str, str]]:
        """(layer, reason) for each way FP16 fails this model, the worst first."""
        out = [(name, f"activations of '{name}' reach {peak:.4g} on selection images, beyond FP16's maximum "
                      "65,504: on the NCS2 (FP16 arithmetic) they overflow to inf/NaN. Rescale that layer (e.g. fold "
                      "a scale into the next layer) or deploy the fallback on a CPU.")
               for name, peak in sorted(self.overflows.items(), key=lambda kv: -kv[1])[:3]]
        if self.fp16_finite is False and not self.overflows:
            where = self.first_nonfinite or "the output"
            out.append((where, f"the model's output becomes inf/NaN when computed in FP16 (first at '{where}'), "
                               "though every module output fits FP16: a value inside a module overflows."))
        return out

    def to_dict(self) -> dict:
        d = asdict(self)
        d["peaks"] = dict(sorted(self.peaks.items(), key=lambda kv: -kv[1])[:10])  # the largest ten
        return d


def measure_fp16_range(model: nn.Module, images: ImageSet, spec: InputSpec, n_images: int = CHECK_IMAGES) -> Fp16Range:
    """Peak activations (FP32) and a float16 run of ``model`` on up to ``n_images`` validation images."""
    subset = images.subset(n_images)
    x = normalize(subset.images, spec)
    result = Fp16Range(len(subset))
    if len(subset) == 0:
        result.note = "no selection images: activation ranges not measured"
        return result
    with torch.no_grad(), _hooks(model, lambda name, t: _peak(result.peaks, name, t)):
        out32 = model.eval()(x)
    result.overflows = {k: v for k, v in result.peaks.items() if v > FP16_MAX}
    if not torch.isfinite(out32).all():
        result.note = "the FP32 output is already not finite"
        return result
    result.fp16_finite, result.first_nonfinite, result.note = _float16_run(model, x)
    return result


def _float16_run(model: nn.Module, x: torch.Tensor) -> tuple[bool | None, str | None, str]:
    first: list[str] = []

    def spot(name: str, t: torch.Tensor) -> None:
        if not first and not torch.isfinite(t).all():
            first.append(name)

    try:
        half = copy.deepcopy(model).half().eval()
        with torch.no_grad(), _hooks(half, spot):
            out16 = half(x.half())
    except Exception as exc:  # an op without a float16 CPU kernel: the range check above still holds
        return None, None, f"float16 run not possible on this CPU ({type(exc).__name__}); ranges checked in FP32 only"
    finite = bool(torch.isfinite(out16).all())
    return finite, (first[0] if first else None) if not finite else None, ""


def _peak(peaks: dict[str, float], name: str, t: torch.Tensor) -> None:
    if t.is_floating_point() and t.numel():
        value = float(t.detach().abs().max())
        if math.isnan(value):
            value = math.inf
        peaks[name] = max(peaks.get(name, 0.0), value)


class _hooks:
    """Forward hooks on every named submodule calling ``fn(name, output tensor)`` (tuples: each tensor)."""

    def __init__(self, model: nn.Module, fn):
        self.model, self.fn, self.handles = model, fn, []

    def __enter__(self):
        for name, m in self.model.named_modules():
            if name:
                self.handles.append(m.register_forward_hook(self._make(name)))
        return self

    def _make(self, name: str):
        def hook(module, inputs, output):
            for t in (output if isinstance(output, (tuple, list)) else (output,)):
                if isinstance(t, torch.Tensor):
                    self.fn(name, t)
        return hook

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        return False
