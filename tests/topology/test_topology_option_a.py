"""The CIFAR ResNet of He et al. with option-A shortcuts (subsample + zero-padded channels in a lambda).

Torch-Pruning alone couples the 16-, 32- and 64-channel streams through the pad index by index and
returns a model that runs with the right output shape but computes something else. PruneScope turns
each such shortcut into its exact frozen 1x1-conv equivalent, so every stream is its own group and a
removal crosses the shortcut consistently; the pruning check refuses what it cannot make exact.
"""
import copy
import importlib.util
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from core.car import CarScorer, filter_ablation
from core.evaluate import evaluate_accuracy
from core.export import export_model, verify_ir
from core.groups import PruningGraph, UnsafeGroupError
from core.models import load_model
from core.ncs2 import check_ncs2
from core.prune import read_structure
from tests._topology import assert_emulation_matches_surgery, assert_prunes_in_clusters
from tests.helpers import random_dataset, randomize_bn

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "cifar_resnet.py"
SHAPE = (1, 3, 32, 32)


def _cifar():
    spec = importlib.util.spec_from_file_location("cifar_resnet_fixture", FIXTURE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _resnet20(num_classes=4):
    torch.manual_seed(0)
    return randomize_bn(_cifar().resnet20(num_classes=num_classes))


def test_shortcuts_become_frozen_embeddings_and_streams_separate_groups():
    model = _resnet20()
    keys_before = set(model.state_dict())
    graph = PruningGraph(model, SHAPE)
    assert [n.split(":")[0] for n in graph.notes] == ["layer2.0.shortcut", "layer3.0.shortcut"]
    assert set(model.state_dict()) == keys_before, "the embedding is structure, not weights"
    assert not model.layer2[0].shortcut.weight.requires_grad
    streams = {g.width: g for g in graph.groups() if "conv1" in g.producers or g.root.endswith("shortcut")}
    assert sorted(streams) == [16, 32, 64]
    assert {"conv1", "layer1.0.conv2", "layer1.2.conv2"} <= set(streams[16].producers)
    assert "layer2.0.shortcut" in streams[16].consumers and "layer2.0.shortcut" in streams[32].producers


def test_conversion_is_exact():
    model = _resnet20()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        before = model(x)
        PruningGraph(model, SHAPE)
        after = model(x)
    assert torch.allclose(before, after, atol=1e-5)


def test_emulation_matches_surgery_across_the_shortcuts():
    assert_emulation_matches_surgery(_resnet20(), 32, max_groups=20)


def test_emulated_accuracy_equals_real_removal_for_a_cluster_across_a_shortcut():
    model = _resnet20(num_classes=4)
    data = random_dataset(4, size=32, n_val=96)
    graph = PruningGraph(model, SHAPE)
    stream = next(g for g in graph.groups() if g.width == 16 and "conv1" in g.producers)
    cluster = list(range(3, 11))
    emulated = CarScorer(graph.model, data.input, data.val).accuracies([filter_ablation(stream, cluster)])
    real = PruningGraph(copy.deepcopy(graph.model), SHAPE)
    real.prune(stream.root, cluster)
    assert real.model.layer1[0].conv2.out_channels == 8
    assert real.model.layer2[0].shortcut.in_channels == 8, "the shortcut lost the same channels as the stream"
    assert real.model.layer2[0].shortcut.out_channels == 32, "the wide stream is untouched"
    measured = evaluate_accuracy(real.model, data.val, data.input).accuracy
    assert float(emulated.float().mean()) == pytest.approx(measured, abs=1e-9)


def test_a_pruning_run_rebuilds_from_the_users_file(tmp_path):
    weights = tmp_path / "resnet20.pt"
    torch.save({"state_dict": _resnet20().state_dict(), "epoch": 3}, weights)
    lm = load_model(weights, code_path=FIXTURE, code_name="resnet20", code_args={"num_classes": 4}, trusted=True)
    lm.spec.input.height = lm.spec.input.width = 32
    lm.spec.input.mean, lm.spec.input.std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    run = assert_prunes_in_clusters(lm.model, lm.spec.arch, 4, 32, tmp_path, steps=3, lm=lm)
    assert (tmp_path / "run" / "model_code.py").is_file()
    notes = read_structure(tmp_path / "run")["notes"]
    assert any(n.startswith("layer2.0.shortcut") for n in notes), notes
    pruned = run.rebuild_step(run.history[-1]["step"])
    exported = export_model(pruned, lm.spec, tmp_path / "ir")
    ncs2 = check_ncs2(exported["xml"])
    assert ncs2.compatible, ncs2.problems
    check = verify_ir(exported["xml"], pruned, random_dataset(4, size=32, n_val=200).val, lm.spec)
    assert check.max_abs_logit_diff < 0.05 and check.agreement >= 0.97


class _InlinePadBlock(nn.Module):
    """Option A written inline in forward: no module to convert, so the check must refuse the stream."""

    def __init__(self, c_in, c_out):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, 3, 2, 1, bias=False)
        self.pad = (c_out - c_in) // 2

    def forward(self, x):
        return F.relu(self.conv(x) + F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad)))


def test_inline_pad_stream_is_refused_not_silently_broken():
    model = nn.Sequential(nn.Conv2d(3, 16, 3, 1, 1), nn.ReLU(), _InlinePadBlock(16, 32), _InlinePadBlock(32, 64),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 4)).eval()
    graph = PruningGraph(model, SHAPE)
    # The inline pad makes the graph map more channels onto a consumer than it reads: the stream is in no group
    # and listed as left alone with that reason, and surgery on it is refused.
    assert "0" not in {p for g in graph.groups() for p in g.producers}
    assert "maps" in graph.left_alone()["0"]
    with pytest.raises(UnsafeGroupError, match="left alone"):
        graph.prune("0", list(range(8)))
    with torch.no_grad():
        assert graph.model(torch.randn(2, 3, 32, 32)).shape == (2, 4), "the refused change was undone"
