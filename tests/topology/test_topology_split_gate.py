"""Structures the dependency graph mis-tracks or leaves out (issue 13, items 7 and 8).

* ``torch.split``: Torch-Pruning maps the channels to the wrong branch (unequal sizes: out of range;
  equal halves: swapped), so the producing conv's group is left alone with its reason, while
  analyse and prune still run on the other groups.
* A conv feeding a one-channel broadcast gate (``x * sigmoid(gate(x))``) belongs to no group: it is
  listed as left alone with its reason (in the graph, the CAR result and the run's structure.json).
* The kind: every conv/linear with prunable outputs is in a group or listed, for several models.
"""
import json

import pytest
import torch
import torchvision
from torch import nn

from core.car import compute_car
from core.groups import PruningGraph, UnsafeGroupError
from core.prune import run_pruning
from core.runs import Run
from tests.helpers import loaded, quick_config, random_dataset


class SplitNet(nn.Module):
    def __init__(self, sizes=(16, 32)):
        super().__init__()
        self.sizes = list(sizes)
        self.c1 = nn.Conv2d(3, 48, 3, padding=1)
        self.a = nn.Conv2d(sizes[0], 16, 3, padding=1)
        self.b = nn.Conv2d(sizes[1], 16, 3, padding=1)
        self.fc = nn.Linear(32, 4)

    def forward(self, x):
        p, q = torch.split(torch.relu(self.c1(x)), self.sizes, dim=1)
        return self.fc(torch.cat([self.a(p), self.b(q)], 1).mean((2, 3)))


class GateNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 32, 3, padding=1)
        self.gate = nn.Conv2d(32, 1, 1)
        self.c2 = nn.Conv2d(32, 16, 3, padding=1)
        self.fc = nn.Linear(16, 4)

    def forward(self, x):
        x = torch.relu(self.c1(x))
        x = x * torch.sigmoid(self.gate(x))
        return self.fc(torch.relu(self.c2(x)).mean((2, 3)))


def test_unequal_split_is_left_alone_with_its_reason():
    graph = PruningGraph(SplitNet().eval(), (1, 3, 16, 16))
    assert "c1" not in {g.root for g in graph.groups()}
    assert "torch.split" in graph.left_alone()["c1"]
    with pytest.raises(UnsafeGroupError, match="torch.split"):
        graph.prune("c1", [0, 1, 20, 30])
    assert graph.widths()["c1"] == 48


def test_unequal_split_analyses_and_prunes_the_other_groups(tmp_path):
    model = SplitNet().eval()
    car = compute_car(model, loaded(model, "split", 4, 16).spec.input, random_dataset(4, size=16).val, n_images=16,
                      sensitivity=False)
    assert "c1" in car.left_alone and "c1" not in {g["root"] for g in car.groups}
    run_pruning(loaded(model, "split", 4, 16), random_dataset(4, size=16), quick_config(max_steps=2), tmp_path / "run")
    structure = json.loads((tmp_path / "run" / "structure.json").read_text())
    assert "torch.split" in structure["left_alone"]["c1"]
    history = Run(tmp_path / "run").history
    assert len(history) >= 2, "the other groups were pruned"
    assert all(r["widths"]["c1"] == 48 for r in history)
    assert history[-1]["macs"] < history[0]["macs"]


def test_equal_split_is_left_alone_too():
    """Even equal halves are mis-tracked (Torch-Pruning swaps the branches), so CAR would be wrong there too."""
    model = SplitNet((24, 24)).eval()
    graph = PruningGraph(model, (1, 3, 16, 16))
    assert "c1" not in {g.root for g in graph.groups()}
    assert "torch.split" in graph.left_alone()["c1"]
    with pytest.raises(UnsafeGroupError, match="torch.split"):
        graph.prune("c1", [0, 1, 20, 30])
    assert graph.widths()["c1"] == 48 and graph.check_runs() is None


def test_conv_feeding_a_broadcast_gate_is_listed_not_lost():
    graph = PruningGraph(GateNet().eval(), (1, 3, 16, 16))
    left = graph.left_alone()
    assert "single output channel" in left["c1"]
    assert "gate" not in left  # one output channel: nothing to prune there


@pytest.mark.parametrize("build", [GateNet, SplitNet, lambda: torchvision.models.resnet18(num_classes=4),
                                   lambda: torchvision.models.mobilenet_v2(num_classes=4)])
def test_every_prunable_layer_is_in_a_group_or_listed(build):
    graph = PruningGraph(build().eval(), (1, 3, 32, 32))
    covered = {p for g in graph.groups() for p in g.producers} | set(graph.left_alone())
    outputs = {graph.names[m] for m in graph.output_layers}
    prunable = {n for n, w in graph.widths().items() if w >= 2 and n not in outputs}
    assert prunable - covered == set()
