"""One model, one set of figures: MACs and parameters do not change when the pruning graph is built
(the option-A shortcut's frozen 1x1 embedding counts as the pad it replaces)."""
from __future__ import annotations

import copy

from core.architectures import cifar_resnet20
from core.evaluate import count_macs_params
from core.groups import PruningGraph
from core.models import InputSpec


def test_macs_and_params_equal_before_and_after_the_graph_converts_shortcuts():
    model = cifar_resnet20().eval()
    spec = InputSpec(height=32, width=32, mean=(0.5,) * 3, std=(0.25,) * 3)
    before = count_macs_params(model, spec)
    graph = PruningGraph(copy.deepcopy(model), spec.shape(1))
    assert graph.notes, "the CIFAR ResNet's two zero-padded shortcuts are converted"
    assert count_macs_params(graph.model, spec) == before
    assert before[1] == sum(p.numel() for p in model.parameters()) == 269722
    # by hand: stem 32*32*16*3*9 + stage 1 6*(32*32*16*16*9) + stage 2 (16*16*32*16*9 + 5*16*16*32*32*9)
    # + stage 3 (8*8*64*32*9 + 5*8*8*64*64*9) + linear 64*10
    assert before[0] == 442_368 + 14_155_776 + 1_179_648 + 11_796_480 + 1_179_648 + 11_796_480 + 640
