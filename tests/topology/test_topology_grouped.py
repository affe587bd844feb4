"""Grouped convolutions (RegNet, ResNeXt): removing a channel must keep every conv group the same
size, which Torch-Pruning's surgery does not guarantee (it produces invalid layers). Groups that
touch a grouped conv are left alone with the reason; the residual streams around them still prune."""
import copy

import pytest
import torchvision

from core.groups import PruningGraph, UnsafeGroupError
from core.prune import read_structure
from tests._topology import assert_emulation_matches_surgery, assert_prunes_in_clusters
from tests.helpers import randomize_bn


def _regnet():
    return randomize_bn(torchvision.models.regnet_x_400mf(num_classes=4))


def test_groups_through_grouped_convs_are_left_alone_with_the_reason():
    graph = PruningGraph(_regnet(), (1, 3, 32, 32))
    groups = graph.groups()
    inner = [g for g in groups if g.left_alone]
    assert inner and all("grouped convolution" in g.left_alone for g in inner)
    assert any(not g.left_alone for g in groups), "the streams stay prunable"
    with pytest.raises(UnsafeGroupError, match="grouped convolution"):
        graph.prune(inner[0].root, [0, 1])
    assert graph.check_runs() is None


def test_resnext_left_alone_groups_really_are_unsafe_for_plain_surgery():
    """Why they are left alone: the raw surgery (without our check) leaves an invalid grouped conv."""
    model = randomize_bn(torchvision.models.resnext50_32x4d(num_classes=4))
    graph = PruningGraph(model, (1, 3, 32, 32))
    g = next(g for g in graph.groups() if g.left_alone and g.root.endswith("conv1"))
    raw = PruningGraph(copy.deepcopy(model), (1, 3, 32, 32))
    tp_group = raw.dg.get_pruning_group(raw.module(g.root), raw.dg.get_pruner_of_module(raw.module(g.root)).prune_out_channels, [0, 1])
    try:
        tp_group.prune()
    except RuntimeError:
        return  # the surgery fails outright
    assert raw.check_runs() is not None, "or it leaves a model that does not run"


def test_grouped_stream_emulation_matches_surgery():
    model = _regnet()
    safe = [g for g in PruningGraph(copy.deepcopy(model), (1, 3, 32, 32)).groups() if not g.left_alone]
    assert safe
    assert_emulation_matches_surgery(model, 32, max_groups=len(safe), groups_filter=lambda g: not g.left_alone)


def test_regnet_prunes_streams_in_clusters(tmp_path):
    run = assert_prunes_in_clusters(_regnet(), "regnet_x_400mf", 4, 32, tmp_path)
    left_alone = read_structure(run.dir)["left_alone"]
    assert left_alone and all("grouped convolution" in why for why in left_alone.values())
    for record in run.history[1:]:
        assert not any("conv" in p and ".b." in p for p in record["removed"]["producers"]), record["removed"]
