"""Training precision (``core.training``): bf16 mixed precision where the hardware computes bfloat16, fp32 elsewhere;
what trains in which arithmetic, what stays float32, and where the setting comes from."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from core import training
from core.cli import build_parser
from core.cli_common import config_from_args
from core.data import ImageSet, normalize
from core.errors import SettingsError
from core.models import InputSpec
from core.prune import PruneConfig
from core.recovery import RecoveryConfig, distillation_loss, recover
from core.tasks.detection.task import DetectionPruneConfig
from core.training import resolve_precision, train_steps

SPEC = InputSpec(height=16, width=16, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(8, 4))


def _images(n: int = 64) -> ImageSet:
    g = torch.Generator().manual_seed(1)
    labels = torch.randint(0, 4, (n,), generator=g)
    images = torch.randint(0, 256, (n, 3, 16, 16), dtype=torch.uint8, generator=g)
    for i, label in enumerate(labels.tolist()):  # learnable: the class shows in the colour
        if label < 3:
            images[i, label] = 255
        else:
            images[i] //= 4
    return ImageSet(images, labels, [str(i) for i in range(4)])


@pytest.mark.parametrize("native, expected", [(True, "bf16"), (False, "fp32")])
def test_auto_trains_in_bf16_only_where_the_device_computes_it_natively(monkeypatch, native, expected):
    monkeypatch.setattr(training, "native_bf16", lambda device: native)
    assert resolve_precision("auto", "cpu") == resolve_precision(None, "cpu") == expected
    assert resolve_precision("fp32", "cpu") == "fp32" and resolve_precision("BF16", "cpu") == "bf16"
    with pytest.raises(SettingsError, match="Unknown training precision 'fp16'"):
        resolve_precision("fp16", "cpu")


def test_native_bf16_reads_the_cpu_flags(monkeypatch):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    assert training.native_bf16("cpu") is False
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True, raising=False)
    assert training.native_bf16("cpu") is True


@pytest.mark.parametrize("precision, dtype", [("bf16", torch.bfloat16), ("fp32", torch.float32)])
def test_bf16_runs_the_convolutions_in_bfloat16_and_keeps_the_weights_float32_and_contiguous(precision, dtype):
    net, seen = _net(), []
    net[0].register_forward_hook(lambda m, i, out: seen.append((out.dtype, out.is_contiguous(
        memory_format=torch.channels_last))))
    params = list(net.parameters())
    before = [p.detach().clone() for p in params]
    opt = torch.optim.SGD(params, lr=0.1)
    x, y = torch.randn(8, 3, 16, 16), torch.randint(0, 4, (8,))
    net.train()
    losses = train_steps(net, opt, 3, lambda: nn.functional.cross_entropy(net(x), y), precision=precision)
    assert len(losses) == 3 and all(np.isfinite(losses))
    assert {d for d, _ in seen} == {dtype}
    assert all(cl for _, cl in seen) == (precision == "bf16")  # channels-last while it trains in bf16
    assert list(net.parameters()) == params, "the optimiser's parameters are still the model's"
    assert all(p.dtype == torch.float32 and p.is_contiguous() for p in net.parameters())
    assert any(not torch.equal(a, b.detach()) for a, b in zip(before, net.parameters())), "it trained"
    assert not net.training
    with pytest.raises(ValueError, match="resolved precision"):  # "auto" read as fp32 would train slower, silently
        train_steps(net, opt, 1, lambda: nn.functional.cross_entropy(net(x), y), precision="auto")


def test_the_distillation_loss_is_float32_from_bfloat16_logits():
    s = torch.randn(4, 10).to(torch.bfloat16)
    t = torch.randn(4, 10).to(torch.bfloat16)
    y = torch.randint(0, 10, (4,))
    loss = distillation_loss(s, t, y, 0.5, 4.0)
    assert loss.dtype == torch.float32
    assert torch.equal(loss, distillation_loss(s.float(), t.float(), y, 0.5, 4.0))


def test_a_bf16_recovery_learns_and_says_what_it_trained_in(monkeypatch):
    monkeypatch.setattr(training, "native_bf16", lambda device: True)
    train, val = _images(256), _images(64)
    def select(m: nn.Module) -> float:
        with torch.no_grad():
            return float((m(normalize(val.images, SPEC)).argmax(1) == val.labels).float().mean())

    net = _net()
    start = select(net.eval())
    result = recover(net, train, SPEC, RecoveryConfig(epochs=3, lr=0.05, batch_size=32, keep="best"), select)
    assert result.precision == "bf16" and result.to_dict()["precision"] == "bf16"
    assert result.best_epoch >= 1 and max(e["selection"] for e in result.epochs) > start
    assert all(p.dtype == torch.float32 and p.is_contiguous() for p in net.parameters())
    fp32 = recover(_net(), train, SPEC, RecoveryConfig(epochs=1, batch_size=32, precision="fp32"), select)
    assert fp32.precision == "fp32"
    with pytest.raises(SettingsError, match="Unknown training precision"):
        RecoveryConfig(precision="half").validate()


def test_the_setting_comes_from_the_cli_and_detection_refuses_bf16():
    base = ["prune", "--model", "m.pt", "--data", "d", "--out", "o"]
    assert config_from_args(build_parser().parse_args(base), PruneConfig).train_precision == "auto"
    assert config_from_args(build_parser().parse_args(base + ["--train-precision", "fp32"]),
                            PruneConfig).train_precision == "fp32"
    with pytest.raises(SettingsError, match="Unknown training precision"):
        PruneConfig(train_precision="fp16").validate()
    assert DetectionPruneConfig().train_precision == "fp32"
    with pytest.raises(SettingsError, match="fp32 only"):
        DetectionPruneConfig(train_precision="bf16").validate()
    recover_args = build_parser().parse_args(["recover", "run", "--train-precision", "bf16"])
    assert recover_args.train_precision == "bf16"
    assert build_parser().parse_args(["recover", "run"]).train_precision == RecoveryConfig().precision == "auto"
