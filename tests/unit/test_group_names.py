"""Issue 16: groups reach the user in network order (first layer first) and by the convolutions the user
knows, never by the frozen 1x1 embedding that stands in for an option-A shortcut (``layer3.0.shortcut``).

Checked on the option-A CIFAR ResNet-20 of core.architectures, whose residual streams the dependency graph
roots at those embeddings, through every place a group name is formed: the groups themselves, a CAR
result's figures, the filter gallery's layers, a plan read off the sensitivity curves and a prune step's
record.
"""
from __future__ import annotations

import copy

import pytest
import torch

from core import visualize as V
from core.architectures import cifar_resnet20
from core.car import compute_car
from core.criteria import Cluster
from core.groups import PruningGraph, group_display_name, group_label, removal_group, removal_label
from core.plan import plan_from_sensitivity
from core.engine import removed_record
from tests.helpers import random_dataset


def forward_order(model: torch.nn.Module) -> list[str]:
    """Conv and linear layers in the order the forward pass runs them (independent of core.groups)."""
    names = {m: n for n, m in model.named_modules()}
    order: list[str] = []
    handles = [m.register_forward_hook(lambda mod, i, o: order.append(names[mod]))
               for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    with torch.no_grad():
        model.eval()(torch.zeros(1, 3, 32, 32))
    for h in handles:
        h.remove()
    return order


@pytest.fixture(scope="module")
def analysed():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = cifar_resnet20().eval()
    data = random_dataset(10, n_val=20)
    car = compute_car(model, data.input, data.val, n_images=20, sensitivity=True, per_class=True, method="fast")
    yield model, car
    torch.set_num_threads(threads)


def test_groups_come_in_network_order():
    model = cifar_resnet20().eval()
    graph = PruningGraph(copy.deepcopy(model), (1, 3, 32, 32))
    groups = graph.groups()
    ran = forward_order(graph.model)
    names = [group_display_name(g) for g in groups]
    assert [g.gid for g in groups] == list(range(len(groups)))
    assert names == sorted(names, key=ran.index)  # first layer first
    assert names[0] == "conv1" and names[-1] == "layer3.2.conv1"
    assert names.index("layer2.0.conv1") < names.index("layer2.0.conv2") < names.index("layer2.1.conv1")
    assert any(g.root.endswith("shortcut") for g in groups)  # the case this is about: streams rooted there


def test_no_user_facing_group_name_says_shortcut(analysed):
    model, car = analysed
    shortcut_rooted = [g for g in car.groups if "shortcut" in g["root"]]
    assert len(shortcut_rooted) == 2  # the streams of stages 2 and 3
    labels = [group_label(g) for g in car.groups]
    heat = V.fig_car_heatmap(car)
    labels += list(heat.data[0].y)
    labels += [t.name for t in V.fig_sensitivity(car).data]
    for g in car.groups:
        labels.append(V.fig_car_per_filter(car, g["gid"]).layout.title.text)
        labels.append(V.fig_per_class_car(car, g["gid"], 0).layout.title.text)
    labels += [layer for _, layer in V.gallery_layers(model, car.groups)]
    labels += plan_from_sensitivity(car, 100.0, 4).describe(car.groups) + plan_from_sensitivity(car, 0.0, 4).describe(
        car.groups)
    assert labels and not [x for x in labels if "shortcut" in x]
    assert "layer3.0.conv2 (+3 coupled)" in labels


def test_heat_map_and_gallery_run_first_layer_first(analysed):
    model, car = analysed
    rows = [y.rsplit(" [", 1)[0].split(" (+")[0] for y in V.fig_car_heatmap(car).data[0].y]
    ran = forward_order(model)
    assert rows == sorted(rows, key=ran.index) and rows[0] == "conv1"
    layers = [layer for _, layer in V.gallery_layers(model, car.groups)]
    assert layers == sorted(layers, key=ran.index) and layers[0] == "conv1"


def test_prune_step_record_names_the_conv_not_the_shortcut():
    graph = PruningGraph(cifar_resnet20().eval(), (1, 3, 32, 32))
    stream = next(g for g in graph.groups() if g.root == "layer3.0.shortcut")
    record = removed_record(Cluster(group=stream, filters=[0, 1], macs_saved=1.0), {})
    assert record["group"] == "layer3.0.shortcut"  # the key surgery and old runs use stays
    assert removal_label(record) == "layer3.0.conv2 (+3 coupled)"
    old = {k: v for k, v in record.items() if k != "display"}  # a run written before issue 16
    assert removal_label(old, [stream.to_dict()]) == "layer3.0.conv2 (+3 coupled)"
    assert group_display_name(removal_group(old, [stream.to_dict()])) == "layer3.0.conv2"
