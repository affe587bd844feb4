"""One measurement of a model: MACs, parameters, and OpenVINO CPU latency with its spread.

Every page, the CLI, the pruning loop and the export read a model's figures from here, so the same
model shows the same MACs and parameters everywhere (counted by :func:`core.evaluate.count_macs_params`
on the real forward pass, the frozen option-A shortcut embeddings counted as the pad they replace) and
its latency always as a median with the interquartile range of timed runs.

Latency on a shared machine drifts (other processes, frequency changes), so a single number taken on one
page and another taken minutes later on the next differ by more than pruning changes them. A *difference*
is therefore only measured here, by :func:`compare_latency`: both models in one process, in alternation,
with a paired test; a page shows a latency change as fact only when ``significant`` says it exceeds the
noise.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from torch import nn

from .evaluate import count_macs_params
from .errors import one_line
from .models import InputSpec, ModelSpec
from .ov_runtime import (LatencyStats, compile_cpu, export_onnx_bytes, latency_difference, latency_stats, layer_timings,
                         read_ir, read_onnx_bytes, runtime_description, time_interleaved, to_openvino)

DEFAULT_RUNS = 30
DEFAULT_WARMUP = 5
# A difference counts only when the paired test rejects "no difference" at this level AND the
# bootstrap interval of the ratio of medians excludes 1 (see compare_latency).
SIGNIFICANCE_ALPHA = 0.05
RATIO_CONFIDENCE = 0.95
BOOTSTRAP_RESAMPLES = 2000


@dataclass
class LatencyComparison:
    """Two models timed in alternation in one process: ``b`` relative to ``a``.

    ``ratio``: median(b) / median(a); ``ratio_low``..``ratio_high``: its 95 % bootstrap interval over the
    paired rounds; ``p_value``: paired Wilcoxon signed-rank test on the per-round differences.
    """

    a: LatencyStats
    b: LatencyStats
    ratio: float
    ratio_low: float
    ratio_high: float
    p_value: float
    significant: bool

    @property
    def change(self) -> float:
        """Relative change of ``b`` against ``a`` (-0.35 = 35 % faster)."""
        return self.ratio - 1.0

    def label(self) -> str:
        """'-35 % (95 % CI -40 … -30 %)' when significant, else a statement that it is within the noise."""
        if not self.significant:
            # name the criterion that failed: a small p with an interval spanning 1 is a consistent but
            # too small shift, not a contradiction (see compare_times)
            why = (f"its 95 % CI {self.ratio_low:.2f}–{self.ratio_high:.2f} includes 1"
                   if self.ratio_low <= 1.0 <= self.ratio_high else
                   f"paired test p = {self.p_value:.2g}, not below {SIGNIFICANCE_ALPHA:g}")
            return f"no measurable difference (ratio {self.ratio:.2f}: {why})"
        return (f"{self.change * 100:+.0f} % (95 % CI {(self.ratio_low - 1) * 100:+.0f} … "
                f"{(self.ratio_high - 1) * 100:+.0f} %, p = {self.p_value:.2g})")

    def to_dict(self) -> dict:
        return {"a": self.a.to_dict(), "b": self.b.to_dict(), "ratio": self.ratio, "ratio_low": self.ratio_low,
                "ratio_high": self.ratio_high, "p_value": self.p_value, "significant": self.significant}


@dataclass
class ModelFigures:
    """MACs (per image), parameters, and OpenVINO CPU latency of one model.

    ``latency``: batch-1 median and IQR in ms (None when not measured, ``latency_note`` says why);
    ``throughput``: images per second per batch size (batch 1 is 1000 / median latency; a larger batch
    is timed as one synchronous inference of that batch); ``comparison``: this model (``b``) against the
    ``reference`` it was timed with, when one was given.
    """

    macs: int
    params: int
    latency: LatencyStats | None = None
    throughput: dict[int, float] = field(default_factory=dict)
    device: str = ""
    latency_note: str = ""
    comparison: LatencyComparison | None = None

    @property
    def latency_ms(self) -> float | None:
        return None if self.latency is None else self.latency.median_ms

    @property
    def fps(self) -> float | None:
        return None if self.latency is None else self.latency.fps

    def to_dict(self) -> dict:
        """The keys of a run's history record (``macs``, ``params``, ``latency_ms``) plus the spread."""
        out = {"macs": self.macs, "params": self.params, "latency_ms": self.latency_ms}
        if self.latency is not None:
            out.update(self.latency.to_dict())
        out["throughput"] = {str(b): v for b, v in self.throughput.items()}
        out["latency_device"] = self.device
        if self.latency_note:
            out["latency_note"] = self.latency_note
        if self.comparison is not None:
            out["latency_comparison"] = self.comparison.to_dict()
        return out


@dataclass
class LayerTiming:
    """One PyTorch layer's share of an OpenVINO CPU inference (batch 1).

    ``layer``: the PyTorch module name when the OpenVINO nodes could be mapped back to it, else the
    OpenVINO node name; ``nodes``: the executed OpenVINO nodes summed into this row (BatchNorm and ReLU
    are fused into the convolution by the plugin); ``median_ms``: sum of their median times; ``share``:
    fraction of the sum over all rows.
    """

    layer: str
    op_type: str
    median_ms: float
    share: float
    nodes: list[str]
    mapped: bool

    def to_dict(self) -> dict:
        return {"layer": self.layer, "op_type": self.op_type, "median_ms": self.median_ms, "share": self.share,
                "nodes": self.nodes, "mapped": self.mapped}


def _input_spec(spec: InputSpec | ModelSpec) -> InputSpec:
    return spec.input if isinstance(spec, ModelSpec) else spec


def _as_ov(model, input_shape: tuple[int, ...]):
    """An ``ov.Model`` from a PyTorch module (through ONNX), an IR path, or an ``ov.Model`` as it is."""
    if isinstance(model, nn.Module):
        return to_openvino(model, input_shape)
    if isinstance(model, (str, Path)):
        return read_ir(model)
    return model


def time_models(models: list, spec: InputSpec | ModelSpec, runs: int = DEFAULT_RUNS, warmup: int = DEFAULT_WARMUP,
                threads: int | None = None, batch: int = 1) -> list[list[float]]:
    """Per-run latencies in ms of each model (PyTorch module, IR path or ``ov.Model``), timed in alternation."""
    shape = _input_spec(spec).shape(batch)
    compiled = [compile_cpu(_as_ov(m, shape), threads) for m in models]
    return time_interleaved(compiled, shape, runs=runs, warmup=warmup)


def ratio_interval(a_ms, b_ms, confidence: float = RATIO_CONFIDENCE, resamples: int = BOOTSTRAP_RESAMPLES,
                   seed: int = 0) -> tuple[float, float]:
    """Percentile-bootstrap interval of median(b) / median(a), resampling the paired rounds together."""
    a, b = np.asarray(a_ms, dtype=float), np.asarray(b_ms, dtype=float)
    idx = np.random.default_rng(seed).integers(0, len(a), size=(resamples, len(a)))
    ratios = np.median(b[idx], axis=1) / np.median(a[idx], axis=1)
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(ratios, [tail, 100 - tail])
    return float(low), float(high)


def compare_times(a_ms, b_ms, alpha: float = SIGNIFICANCE_ALPHA) -> LatencyComparison:
    """Compare two latency series of paired rounds (``time_interleaved``): ``b`` against ``a``.

    Significant only when both hold: the paired Wilcoxon test (``core.ov_runtime.latency_difference``)
    gives p < ``alpha``, and the bootstrap interval of the ratio of medians excludes 1. The test alone
    flags consistent but tiny shifts on long series; the interval alone ignores the pairing. Requiring
    both keeps a page from stating a change the machine's noise could have made.
    """
    test = latency_difference(a_ms, b_ms, alpha=alpha)
    low, high = ratio_interval(a_ms, b_ms)
    significant = bool(test["significant"] and (high < 1.0 or low > 1.0))
    return LatencyComparison(latency_stats(list(a_ms)), latency_stats(list(b_ms)), test["ratio"], low, high,
                             test["p_value"], significant)


def compare_latency(model_a, model_b, spec: InputSpec | ModelSpec, runs: int = 50, warmup: int = 10,
                    threads: int | None = None) -> LatencyComparison:
    """Time two models (PyTorch modules, IR paths or ``ov.Model``) interleaved on the OpenVINO CPU
    runtime, batch 1, and say whether ``model_b`` really differs from ``model_a`` (see :func:`compare_times`)."""
    a, b = time_models([model_a, model_b], spec, runs=runs, warmup=warmup, threads=threads)
    return compare_times(a, b)


def throughput(model, spec: InputSpec | ModelSpec, batch: int, runs: int = 10, warmup: int = 2,
               threads: int | None = None) -> float:
    """Images per second at ``batch`` images per synchronous inference (median over ``runs``)."""
    (times,) = time_models([model], spec, runs=runs, warmup=warmup, threads=threads, batch=batch)
    return batch * 1000.0 / float(np.median(times))


def measure_model(model: nn.Module, spec: InputSpec | ModelSpec, *, latency: bool = True, runs: int = DEFAULT_RUNS,
                  warmup: int = DEFAULT_WARMUP, reference: nn.Module | None = None, throughput_batch: int | None = None,
                  threads: int | None = None, strict: bool = True) -> ModelFigures:
    """MACs, parameters and (``latency=True``) OpenVINO CPU batch-1 latency of a PyTorch classifier.

    ``spec``: the model's input (an ``InputSpec``, or a ``ModelSpec`` whose ``input`` is used).
    ``reference``: another model timed in alternation with this one; ``comparison`` then says whether this
    model differs from it beyond the noise. ``throughput_batch``: also time a batch of that size.
    ``strict=False``: a model OpenVINO cannot convert still gets MACs and parameters; ``latency_note`` says
    why its latency is missing (otherwise the error propagates).
    """
    ispec = _input_spec(spec)
    macs, params = count_macs_params(model, ispec)
    figures = ModelFigures(macs, params)
    if not latency:
        figures.latency_note = "not measured"
        return figures
    try:
        if reference is not None:
            figures.comparison = compare_latency(reference, model, ispec, runs=runs, warmup=warmup, threads=threads)
            figures.latency = figures.comparison.b
        else:
            (times,) = time_models([model], ispec, runs=runs, warmup=warmup, threads=threads)
            figures.latency = latency_stats(times)
        figures.throughput[1] = figures.latency.fps
        if throughput_batch and throughput_batch > 1:
            figures.throughput[throughput_batch] = throughput(model, ispec, throughput_batch, threads=threads)
    except Exception as exc:  # OpenVINO cannot convert every model; the counts still stand
        if strict:
            raise
        figures.latency, figures.throughput = None, {}
        figures.latency_note = (f"unavailable: OpenVINO cannot take this model ({one_line(exc, 200)}), so neither "
                                "its latency nor an export (IR, NCS2 bundle) can be made; accuracy, MACs and "
                                "parameters stand")
        return figures
    figures.device = runtime_description(threads) + f", median of {figures.latency.runs} runs"
    return figures


def module_of_node(node_name: str, modules: set[str]) -> str | None:
    """The PyTorch module an OpenVINO node came from, read off its ONNX scope name.

    The TorchScript ONNX exporter names nodes ``/layer1/layer1.0/conv1/Conv``: each scope is either a
    module's full name or its attribute name under the previous scope. Returns the deepest module found,
    or None (e.g. the output node, named after the output tensor).
    """
    current = None
    for part in node_name.strip("/").split("/"):
        if current and f"{current}.{part}" in modules:
            current = f"{current}.{part}"
        elif part in modules and (current is None or part.startswith(current + ".")):
            current = part
    return current


def per_layer_timings(model: nn.Module, spec: InputSpec | ModelSpec, runs: int = 20, warmup: int = 5,
                      threads: int | None = None) -> list[LayerTiming]:
    """Per-layer batch-1 time on the OpenVINO CPU runtime from its performance counters (``PERF_COUNT``).

    OpenVINO nodes are mapped back to PyTorch module names through their ONNX scope names
    (:func:`module_of_node`); nodes of one module are summed into one row. Layout reorders placed before a
    layer count towards it. Rows are slowest first; shares sum to 1.
    """
    ispec = _input_spec(spec)
    modules = {n for n, _ in model.named_modules() if n}
    onnx_bytes = export_onnx_bytes(model, ispec.shape(1))
    # OpenVINO names a node that produces a model output after the output tensor ("logits"); the ONNX graph
    # says which scoped node that was
    producer = {out: node.name for node in onnx.load_from_string(onnx_bytes).graph.node for out in node.output}
    rows = layer_timings(read_onnx_bytes(onnx_bytes), ispec.shape(1), runs=runs, threads=threads, warmup=warmup)
    merged: dict[str, dict] = {}
    for r in rows:
        name = module_of_node(producer.get(r["name"], r["name"]), modules)
        key = name or r["name"]
        entry = merged.setdefault(key, {"ms": 0.0, "nodes": [], "types": {}, "mapped": name is not None})
        entry["ms"] += r["median_ms"]
        entry["nodes"].append(r["name"])
        entry["types"][r["type"]] = entry["types"].get(r["type"], 0.0) + r["median_ms"]
    total = sum(e["ms"] for e in merged.values()) or 1.0
    out = [LayerTiming(key, max(e["types"], key=e["types"].get), e["ms"], e["ms"] / total, e["nodes"], e["mapped"])
           for key, e in merged.items()]
    return sorted(out, key=lambda t: -t.median_ms)
