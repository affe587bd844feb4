"""The OpenVINO side: convert a PyTorch model through ONNX and time it on the CPU runtime.

Conversion goes through ONNX at opset 13 (TorchScript exporter) rather than ``ov.convert_model`` on
the module: the direct path emits newer op versions (e.g. MaxPool-14) that older runtimes, and the
NCS2's 2022.3 toolchain, cannot read.
"""
from __future__ import annotations

import io
import statistics
import time
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from scipy.stats import wilcoxon
from torch import nn

ONNX_OPSET = 13


def export_onnx_bytes(model: nn.Module, input_shape: tuple[int, ...], opset: int = ONNX_OPSET) -> bytes:
    """ONNX of the model with a static input shape (batch included)."""
    model = model.eval()
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.zeros(input_shape),), buf, opset_version=opset, dynamo=False,
                          input_names=["input"], output_names=["logits"], do_constant_folding=True)
    return buf.getvalue()


def to_openvino(model: nn.Module, input_shape: tuple[int, ...]):
    """An ``ov.Model`` of the PyTorch model, converted from its ONNX export."""
    return read_onnx_bytes(export_onnx_bytes(model, input_shape))


def read_onnx_bytes(onnx_bytes: bytes):
    import openvino as ov

    return ov.convert_model(io.BytesIO(onnx_bytes))


def compile_cpu(ov_model, threads: int | None = None, precision: str = "f32"):
    """``precision``: the arithmetic of the CPU plugin, "f32" or "f16" (only where :func:`cpu_has_fp16`)."""
    import openvino as ov

    config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": precision}
    if threads:
        config["INFERENCE_NUM_THREADS"] = threads
    return ov.Core().compile_model(ov_model, "CPU", config)


def cpu_has_fp16() -> bool:
    """Whether this CPU computes in FP16 natively (OpenVINO lists FP16 among its optimisation capabilities);
    on others an f16 precision hint is not honoured, so an FP16 check must be emulated."""
    import openvino as ov

    try:
        return "FP16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    except Exception:  # a runtime without the property: assume not
        return False


def time_compiled(compiled, input_shape: tuple[int, ...], runs: int = 50, warmup: int = 10) -> list[float]:
    """Per-run latencies in ms of a compiled model on a fixed random input (batch as in the shape)."""
    request = compiled.create_infer_request()
    x = np.random.default_rng(0).standard_normal(input_shape).astype(np.float32)
    for _ in range(warmup):
        request.infer([x])
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        request.infer([x])
        times.append((time.perf_counter() - t0) * 1000.0)
    return times


def measure_latency_ms(model: nn.Module, input_shape: tuple[int, ...], runs: int = 50, warmup: int = 10) -> float:
    """Median batch-1 latency of the model on the OpenVINO CPU runtime, in milliseconds."""
    compiled = compile_cpu(to_openvino(model, input_shape))
    return float(statistics.median(time_compiled(compiled, input_shape, runs, warmup)))


def runtime_description(threads: int | None = None) -> str:
    """Where a latency was measured: 'OpenVINO 2026.4.1 CPU (<CPU name>), 2 threads, batch 1, f32'."""
    import openvino as ov

    try:
        cpu = ov.Core().get_property("CPU", "FULL_DEVICE_NAME")
    except Exception:  # a runtime without the property: the name is only for people
        cpu = "CPU"
    return (f"OpenVINO {ov.get_version().split('-')[0]} CPU ({cpu}), "
            f"{threads or 'default'} thread{'s' if threads != 1 else ''}, batch 1, f32")


def read_ir(xml_path):
    """An ``ov.Model`` read from an IR .xml (its .bin next to it)."""
    import openvino as ov

    return ov.Core().read_model(str(xml_path))


def time_interleaved(compiled_models: list, input_shape: tuple[int, ...], runs: int = 50, warmup: int = 10,
                     seed: int = 0) -> list[list[float]]:
    """Per-run latencies in ms of several compiled models, measured in alternation.

    Each round runs every model once, in a shuffled order, so slow drifts of a noisy machine (other
    processes, frequency changes) hit all models alike instead of whichever was timed last.
    """
    x = np.random.default_rng(seed).standard_normal(input_shape).astype(np.float32)
    requests = [c.create_infer_request() for c in compiled_models]
    for _ in range(warmup):
        for r in requests:
            r.infer([x])
    times: list[list[float]] = [[] for _ in requests]
    order = np.arange(len(requests))
    rng = np.random.default_rng(seed + 1)
    for _ in range(runs):
        rng.shuffle(order)
        for i in order:
            t0 = time.perf_counter()
            requests[i].infer([x])
            times[i].append((time.perf_counter() - t0) * 1000.0)
    return times


def measure_latencies_ms(ov_models: list, input_shape: tuple[int, ...], runs: int = 50, warmup: int = 10,
                         threads: int | None = None) -> list[float]:
    """Median batch-1 CPU latency of each ``ov.Model`` (or IR path), timed in alternation."""
    compiled = [compile_cpu(read_ir(m) if isinstance(m, (str, bytes)) or hasattr(m, "__fspath__") else m, threads)
                for m in ov_models]
    return [float(statistics.median(t)) for t in time_interleaved(compiled, input_shape, runs, warmup)]


@dataclass
class LatencyStats:
    """Batch-1 latency of one model in ms: median and interquartile range over timed runs; FPS = 1000 / median."""

    median_ms: float
    q1_ms: float
    q3_ms: float
    runs: int

    @property
    def iqr_ms(self) -> float:
        return self.q3_ms - self.q1_ms

    @property
    def fps(self) -> float:
        return 1000.0 / self.median_ms if self.median_ms > 0 else float("inf")

    def to_dict(self) -> dict:
        return {"latency_ms": self.median_ms, "latency_q1_ms": self.q1_ms, "latency_q3_ms": self.q3_ms,
                "latency_iqr_ms": self.iqr_ms, "fps": self.fps, "latency_runs": self.runs}

    def label(self) -> str:
        return f"{self.median_ms:.3g} ms (IQR {self.q1_ms:.3g}–{self.q3_ms:.3g}), {self.fps:.0f} FPS"


def latency_stats(times_ms: list[float]) -> LatencyStats:
    q1, med, q3 = np.percentile(np.asarray(times_ms, dtype=float), [25, 50, 75])
    return LatencyStats(float(med), float(q1), float(q3), len(times_ms))


def latency_difference(a_ms: list[float], b_ms: list[float], alpha: float = 0.01) -> dict:
    """Whether two models' latencies, timed in alternation (``time_interleaved``), really differ.

    Round ``i`` of ``a`` and of ``b`` ran back to back, so the rounds are paired: the Wilcoxon
    signed-rank test on the per-round differences says whether ``b`` is slower or faster beyond the
    machine's noise. Returns the ratio of medians ``b / a``, the p-value and ``significant``.
    """
    a, b = np.asarray(a_ms, dtype=float), np.asarray(b_ms, dtype=float)
    ratio = float(np.median(b) / np.median(a)) if np.median(a) > 0 else float("nan")
    diff = b - a
    if len(diff) < 6 or not np.any(diff):
        return {"ratio": ratio, "p_value": 1.0, "significant": False}
    p = float(wilcoxon(diff).pvalue)
    return {"ratio": ratio, "p_value": p, "significant": bool(p < alpha)}


def layer_timings(ov_model, input_shape: tuple[int, ...], runs: int = 20, threads: int | None = None,
                  warmup: int = 1) -> list[dict]:
    """Per-layer execution time from OpenVINO's performance counters (``PERF_COUNT``), CPU plugin.

    Returns one dict per executed node (``name``, ``type``, ``exec_type``, ``median_ms``), slowest
    first; nodes the plugin fused away or did not run are left out. Times are medians over ``runs``.
    """
    import openvino as ov

    config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "f32", "PERF_COUNT": True}
    if threads:
        config["INFERENCE_NUM_THREADS"] = threads
    compiled = ov.Core().compile_model(ov_model, "CPU", config)
    request = compiled.create_infer_request()
    x = np.random.default_rng(0).standard_normal(input_shape).astype(np.float32)
    for _ in range(max(warmup, 1)):
        request.infer([x])
    per_node: dict[str, dict] = {}
    for _ in range(runs):
        request.infer([x])
        for info in request.profiling_info:
            if info.status != info.Status.EXECUTED:
                continue
            entry = per_node.setdefault(info.node_name, {"name": info.node_name, "type": info.node_type,
                                                         "exec_type": info.exec_type, "times": []})
            entry["times"].append(info.real_time.total_seconds() * 1000.0)
    rows = [{"name": e["name"], "type": e["type"], "exec_type": e["exec_type"],
             "median_ms": float(np.median(e["times"]))} for e in per_node.values()]
    return sorted(rows, key=lambda r: -r["median_ms"])
