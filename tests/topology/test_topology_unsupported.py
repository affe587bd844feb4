"""Structures the dependency graph cannot follow: the tool says so (or leaves the layers alone) and
never returns a silently wrong model.

* ShuffleNetV2's channel shuffle (a reshape that interleaves channels): Torch-Pruning cannot build
  the graph at all, so the model is refused with a message, in the API, a run and the CLI.
* ConvNeXt's LayerNorm normalises across channels: removing one changes the others, so the
  post-surgery check (pruned output == emulated removal) refuses the residual streams, while the
  MLP groups inside the blocks prune normally.
"""
import subprocess
import sys

import pytest
import torch
import torchvision

from core.errors import PruneScopeError
from core.groups import PruningGraph, UnsafeGroupError, UnsupportedModelError
from core.prune import run_pruning
from core.runs import Run
from tests.helpers import loaded, quick_config, random_dataset, randomize_bn


def test_shufflenet_is_refused_with_a_reason():
    model = torchvision.models.shufflenet_v2_x0_5(num_classes=4)
    with pytest.raises(UnsupportedModelError, match="not supported for pruning.*channel shuffle"):
        PruningGraph(model, (1, 3, 64, 64))


def test_shufflenet_run_fails_cleanly(tmp_path):
    model = torchvision.models.shufflenet_v2_x0_5(num_classes=4).eval()
    with pytest.raises(PruneScopeError, match="not supported"):
        run_pruning(loaded(model, "shufflenet_v2_x0_5", 4, 64), random_dataset(4, size=64), quick_config(),
                    tmp_path / "run")
    status = Run(tmp_path / "run").status
    assert status["state"] == "failed" and "not supported" in status["message"]


def test_shufflenet_cli_says_so_in_one_line(tmp_path):
    weights = tmp_path / "shufflenet.pt"
    torch.save(torchvision.models.shufflenet_v2_x0_5(num_classes=10).state_dict(), weights)
    proc = subprocess.run([sys.executable, "-m", "core", "prune", "--model", str(weights), "--arch",
                           "shufflenet_v2_x0_5", "--data", "sample:vgg_digits", "--out", str(tmp_path / "run"),
                           "--input-size", "64", "64", "--max-steps", "1", "--no-latency"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert "not supported for pruning" in proc.stderr and "Traceback" not in proc.stderr


def test_layernorm_streams_are_refused_and_mlp_groups_prune(tmp_path):
    model = randomize_bn(torchvision.models.convnext_tiny(num_classes=4))
    graph = PruningGraph(model, (1, 3, 32, 32))
    groups = graph.groups()
    stream = next(g for g in groups if len(g.producers) > 2)
    with pytest.raises(UnsafeGroupError, match="differs from the removal"):
        graph.prune(stream.root, list(range(8)))
    mlp = next(g for g in groups if g.root.endswith("block.3"))
    graph.prune(mlp.root, list(range(8)))
    assert graph.module(mlp.root).out_features == mlp.width - 8
    assert graph.check_runs() is None
