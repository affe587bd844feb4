"""One measurement of a model (core.measure): the same MACs/params on every path, latency with its spread,
differences called significant only beyond the noise, per-layer timing named by PyTorch layer."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from core.architectures import SampleVGG
from core.export import build_bundle
from core.groups import PruningGraph
from core.measure import (LatencyComparison, ModelFigures, compare_latency, compare_times, latency_stats,
                          measure_model, module_of_node, per_layer_timings, ratio_interval)
from core.models import InputSpec, ModelSpec, load_model, load_sample_model
from core.prune import PruneConfig
from core.tasks.classification.task import measure
from core.sample_data import load_sample_dataset

ROOT = Path(__file__).resolve().parents[2]
FIXTURE = ROOT / "tests" / "fixtures" / "cifar_resnet.py"


def _custom_resnet20():
    """The real CIFAR-10 ResNet-20 weights loaded into the user's own architecture file (option-A
    shortcuts through a LambdaLayer), as a user with a training script has it."""
    entry = json.loads((ROOT / "sample_models" / "cifar_manifest.json").read_text())["models"][0]
    spec = InputSpec(height=32, width=32, mean=tuple(entry["mean"]), std=tuple(entry["std"]))
    return load_model(ROOT / "sample_models" / entry["weights"], code_path=FIXTURE, code_name="resnet20",
                      input_spec=spec, class_names=list(entry["class_names"]), trusted=True)


@pytest.mark.parametrize("which", ["vgg_digits", "custom_resnet20"])
def test_macs_and_params_agree_on_load_prune_step0_and_export(which, tmp_path, one_thread):
    loaded = load_sample_model("vgg_digits") if which == "vgg_digits" else _custom_resnet20()
    spec = loaded.spec.input
    data = load_sample_dataset("vgg_digits" if which == "vgg_digits" else "cifar10", spec)
    # Load page: the loaded model as it is
    load = measure_model(loaded.model, spec, latency=False)
    # Prune step 0: the loop measures the model inside its pruning graph (option-A shortcuts converted)
    graph = PruningGraph(copy.deepcopy(loaded.model).eval(), spec.shape(1))
    if which == "custom_resnet20":
        assert len(graph.notes) == 2, "both zero-padded shortcuts are converted to frozen embeddings"
    step0, _ = measure(graph.model, data, spec, PruneConfig(latency=False))
    # Export: a rebuilt step carries the converted shortcuts; the fallback is the model as loaded
    result = build_bundle(graph.model, loaded.model, ModelSpec(loaded.spec.arch, loaded.spec.num_classes, spec,
                                                               list(data.class_names)),
                          data.val.subset(64), tmp_path / "bundle", min_images=32, latency_runs=3)
    exported = result.manifest["models"]
    figures = {"load": (load.macs, load.params), "prune step 0": (step0["macs"], step0["params"]),
               "export (pruned)": (exported["pruned"]["macs"], exported["pruned"]["params"]),
               "export (original)": (exported["original"]["macs"], exported["original"]["params"])}
    assert len(set(figures.values())) == 1, figures
    if which == "custom_resnet20":  # counted by hand in tests/test_figures_consistent.py
        assert figures["load"] == (40_551_040, 269_722)
    # the exported IRs were timed in alternation: medians with spread and a verdict on their difference
    spread = exported["pruned"]["latency_spread"]
    assert spread["latency_q1_ms"] <= spread["latency_ms"] <= spread["latency_q3_ms"]
    assert set(result.manifest["latency_comparison"]) >= {"ratio", "ratio_low", "ratio_high", "p_value", "significant"}


def test_measure_model_gives_latency_with_spread_throughput_and_device(one_thread):
    model = SampleVGG().eval()
    spec = InputSpec(height=32, width=32)
    f = measure_model(model, spec, runs=8, warmup=2, throughput_batch=4, threads=1)
    assert isinstance(f, ModelFigures) and f.macs > 0 and f.params == sum(p.numel() for p in model.parameters())
    assert f.latency.runs == 8 and f.latency.q1_ms <= f.latency.median_ms <= f.latency.q3_ms
    assert set(f.throughput) == {1, 4} and f.throughput[1] == pytest.approx(1000 / f.latency.median_ms)
    assert f.throughput[4] > 0 and "OpenVINO" in f.device and "1 thread" in f.device
    d = f.to_dict()
    assert d["latency_ms"] == f.latency.median_ms and d["latency_runs"] == 8 and set(d["throughput"]) == {"1", "4"}
    # a ModelSpec works as well as its input spec
    assert measure_model(model, ModelSpec("sample_vgg", 10, spec), latency=False).macs == f.macs


class _Fft(nn.Module):
    """Runs in PyTorch, but the ONNX exporter at opset 13 has no FFT: OpenVINO never gets a model."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        return torch.fft.rfft2(self.conv(x)).abs().mean((2, 3))


def test_a_model_openvino_cannot_take_keeps_its_counts_with_a_reason():
    spec = InputSpec(height=16, width=16)
    f = measure_model(_Fft().eval(), spec, strict=False, runs=2)
    assert f.macs == 14 * 14 * 4 * 27 and f.latency is None and f.latency_note.startswith("unavailable: OpenVINO cannot take this model")
    with pytest.raises(Exception):
        measure_model(_Fft().eval(), spec, runs=2)


def test_a_difference_is_significant_only_beyond_the_noise():
    rng = np.random.default_rng(0)
    drift = rng.uniform(0.5, 3.0, 60)  # the machine's noise, shared by both models round by round
    a = 1.0 + drift + rng.normal(0, 0.01, 60)
    slower = compare_times(a, 1.3 + drift + rng.normal(0, 0.01, 60))
    assert slower.significant and slower.ratio > 1 and slower.ratio_low > 1.0 and "+" in slower.label()
    same = compare_times(a, 1.0 + drift + rng.normal(0, 0.01, 60))
    assert not same.significant and "no measurable difference" in same.label()
    # unpaired noise as large as the change: neither the paired test nor the interval can tell
    noisy = compare_times(a, 1.05 + drift + rng.normal(0, 0.5, 60))
    assert not noisy.significant and noisy.ratio_low < 1.0 < noisy.ratio_high
    low, high = ratio_interval(a, 2 * a)
    assert low == pytest.approx(2.0) and high == pytest.approx(2.0)


def test_compare_latency_times_two_real_models_interleaved(one_thread):
    spec = InputSpec(height=32, width=32)
    small = SampleVGG(widths=(8, 8, 8, 8, 8, 8)).eval()
    big = SampleVGG(widths=(128, 128, 128, 128, 128, 128)).eval()  # ~250x the MACs
    c = compare_latency(small, big, spec, runs=20, warmup=3, threads=1)
    assert c.a.runs == c.b.runs == 20 and c.ratio == pytest.approx(c.b.median_ms / c.a.median_ms)
    assert c.ratio_low <= c.ratio <= c.ratio_high
    assert c.significant and c.ratio > 1, c.label()


def test_module_of_node_reads_onnx_scopes():
    modules = {"conv1", "layer1", "layer1.0", "layer1.0.conv1", "features", "features.3", "linear"}
    assert module_of_node("/layer1/layer1.0/conv1/Conv/WithoutBiases", modules) == "layer1.0.conv1"
    assert module_of_node("/conv1/Conv/WithoutBiases", modules) == "conv1"
    assert module_of_node("input_abcd_acdb_/conv1/Conv/WithoutBiases", modules) == "conv1"
    assert module_of_node("/features/features.3/Conv", modules) == "features.3"
    assert module_of_node("/GlobalAveragePool", modules) is None


def test_per_layer_timings_name_every_pytorch_layer(one_thread):
    model = SampleVGG().eval()
    rows = per_layer_timings(model, InputSpec(height=32, width=32), runs=3, warmup=1, threads=1)
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    timed = {r.layer: r for r in rows}
    assert set(convs) <= set(timed) and all(timed[n].op_type == "Convolution" and timed[n].mapped for n in convs)
    assert timed["classifier"].mapped, "the output node is named after the output tensor; it maps back to its layer"
    assert sum(r.share for r in rows) == pytest.approx(1.0)
    assert [r.median_ms for r in rows] == sorted((r.median_ms for r in rows), reverse=True)


def test_a_small_consistent_shift_is_not_called_noise_with_a_small_p():
    """A shift the paired test finds (p small) while the ratio's interval still spans 1 is reported by
    the criterion that failed, never as 'p = 0.004: within the noise' (a contradiction a user saw)."""
    stats = latency_stats([1.0, 1.1, 1.2])
    shift = LatencyComparison(stats, stats, ratio=0.95, ratio_low=0.87, ratio_high=1.04, p_value=0.0043,
                              significant=False)
    assert "includes 1" in shift.label() and "0.0043" not in shift.label()
    untested = LatencyComparison(stats, stats, ratio=0.8, ratio_low=0.7, ratio_high=0.9, p_value=0.2,
                                 significant=False)
    assert "p = 0.2" in untested.label()
