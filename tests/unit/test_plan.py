"""Per-layer control (core.plan): excluded groups are never touched, capped groups never go below their
floor, plans read off the sensitivity curves, and groups named as the user knows them."""
from __future__ import annotations

import copy
import json

import numpy as np
import pytest

from core.architectures import SampleVGG, cifar_resnet20
from core.car import CarResult, compute_car
from core.criteria import lowest_clusters
from core.errors import SettingsError
from core.groups import PruningGraph, group_display_name
from core.models import load_sample_model
from core.plan import PrunePlan, largest_safe_fraction, plan_from_sensitivity
from core.sample_data import load_sample_dataset


def _l1_scores(graph: PruningGraph, groups) -> dict[int, np.ndarray]:
    """Filter norms of each group's root: a real ranking, enough to pick real candidate clusters."""
    out = {}
    for g in groups:
        w = graph.module(g.root).weight.detach()
        out[g.gid] = w.abs().flatten(1).sum(1).numpy()[: g.width]
    return out


def _prune_until_nothing_is_allowed(graph: PruningGraph, plan: PrunePlan, cluster: int) -> int:
    """The loop's use of a plan without training: take the first allowed candidate until none is left."""
    original = graph.widths()
    steps = 0
    while True:
        groups = graph.groups()
        allowed = plan.filter_candidates(lowest_clusters(groups, _l1_scores(graph, groups), cluster, key=lambda g: g.gid),
                                         original)
        if not allowed:
            return steps
        graph.prune(allowed[0].group.root, allowed[0].filters)
        assert graph.check_runs() is None
        steps += 1


def test_an_excluded_group_is_never_touched_and_a_capped_one_keeps_75_percent():
    graph = PruningGraph(cifar_resnet20().eval(), (1, 3, 32, 32))
    # by the names a user knows: the residual stream of stage 3 (rooted at the shortcut embedding) and a conv
    plan = PrunePlan(exclude={"layer3.0.conv2"}, max_fraction={"layer2.1.conv1": 0.25}).validate(graph.groups())
    assert plan.exclude == {"layer3.0.shortcut"} and plan.max_fraction == {"layer2.1.conv1": 0.25}
    before = graph.widths()
    steps = _prune_until_nothing_is_allowed(graph, plan, cluster=8)
    after = graph.widths()
    assert steps > 5, "the other groups were pruned"
    for name in ("layer3.0.conv2", "layer3.1.conv2", "layer3.2.conv2"):
        assert after[name] == before[name] == 64
    assert after["layer2.1.conv1"] == 24 >= 0.75 * before["layer2.1.conv1"]
    assert after["layer2.2.conv1"] == 8, "an uncapped group of the same width goes down to one cluster"


def test_the_cap_is_a_fraction_of_the_original_width_rounded_to_whole_filters():
    graph = PruningGraph(SampleVGG().eval(), (1, 3, 32, 32))
    groups = graph.groups()
    plan = PrunePlan(max_fraction={"features.0": 0.5, "features.3": 0.3}).validate(groups)
    assert plan.min_width("features.0", 16) == 8 and plan.min_width("features.3", 16) == 12
    cands = {c.group.root: c for c in lowest_clusters(groups, _l1_scores(graph, groups), 8, key=lambda g: g.gid)}
    assert plan.allows(cands["features.0"], 16) and not plan.allows(cands["features.3"], 16)
    # 16 -> 8 loses 50 %: over a 40 % cap (floor ceil(9.6) = 10 filters)
    assert not PrunePlan(max_fraction={"features.0": 0.4}).allows(cands["features.0"], 16)
    kept = {c.group.root for c in plan.filter_candidates(list(cands.values()), graph.widths())}
    assert kept == set(cands) - {"features.3"}


def test_unknown_names_and_bad_fractions_are_refused_with_the_valid_names():
    groups = PruningGraph(cifar_resnet20().eval(), (1, 3, 32, 32)).groups()
    with pytest.raises(SettingsError) as exc:
        PrunePlan(exclude={"layer9.conv", "layer1.0.conv1"}, max_fraction={"nope": 0.2}).validate(groups)
    msg = str(exc.value)
    assert "layer9.conv, nope" in msg and "Valid groups:" in msg and "layer3.0.conv2 (+3 coupled)" in msg
    assert "layer3.0.shortcut" not in msg, "groups are listed by the layers a user knows"
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(SettingsError, match="fraction"):
            PrunePlan(max_fraction={"layer1.0.conv1": bad}).validate(groups)


def test_plan_round_trips_through_json_and_describes_itself():
    groups = PruningGraph(cifar_resnet20().eval(), (1, 3, 32, 32)).groups()
    plan = PrunePlan(exclude={"layer3.0.shortcut"}, max_fraction={"layer1.0.conv1": 0.25}, source="by hand")
    again = PrunePlan.from_dict(json.loads(json.dumps(plan.to_dict())))
    assert again == plan
    lines = plan.describe(groups)
    assert lines == ["layer3.0.conv2 (+3 coupled): excluded (never pruned)",
                     "layer1.0.conv1: at most 25 % of its 16 filters (keeps >= 12)"]
    assert PrunePlan().describe() == ["no per-layer limits: every group may be pruned"]


def test_a_group_is_named_by_its_first_real_convolution():
    groups = PruningGraph(cifar_resnet20().eval(), (1, 3, 32, 32)).groups()
    by_root = {g.root: g for g in groups}
    assert group_display_name(by_root["layer3.0.shortcut"]) == "layer3.0.conv2"
    assert by_root["layer2.0.shortcut"].label == "layer2.0.conv2 (+3 coupled)"
    assert group_display_name(by_root["layer3.0.shortcut"].to_dict()) == "layer3.0.conv2"
    assert group_display_name({"root": "old.root", "producers": ["old.root"]}) == "old.root"  # older CAR results


def test_largest_safe_fraction_stops_at_the_first_breach():
    curve = [(0.0, 0.90), (0.1, 0.90), (0.2, 0.895), (0.3, 0.85), (0.4, 0.89)]
    assert largest_safe_fraction(curve, 0.90, 1.0) == 0.2  # 0.4 is within again, but 0.3 already breached
    assert largest_safe_fraction(curve, 0.90, 10.0) == 0.4
    assert largest_safe_fraction([(0.0, 0.9), (0.1, 0.5)], 0.9, 1.0) == 0.0


def _car(sensitivity: dict, widths: dict) -> CarResult:
    groups = [{"gid": gid, "root": f"conv{gid}", "width": w, "producers": [f"conv{gid}"], "left_alone": None}
              for gid, w in widths.items()]
    return CarResult(0.9, 100, ["a", "b"], groups, {gid: [0.0] * w for gid, w in widths.items()}, sensitivity=sensitivity)


def test_plan_from_sensitivity_caps_excludes_and_rounds_to_clusters():
    base = 0.9
    curves = {
        0: [(0.0, base)] + [(f, base - 0.002 * i) for i, f in enumerate((0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9), 1)],
        1: [(0.0, base), (0.1, base - 0.05)],  # 10 % already costs 5 points
        2: [(0.0, base), (0.1, base), (0.2, base), (0.3, base - 0.05)],  # 20 % of 32 = 6.4 < one cluster of 8
        3: [(0.0, base), (0.1, base), (0.2, base), (0.3, base - 0.05)],  # 20 % of 64 = 12.8 >= 8
    }
    plan = plan_from_sensitivity(_car(curves, {0: 32, 1: 32, 2: 32, 3: 64}), max_points=1.0, cluster=8)
    assert plan.max_fraction == {"conv0": 0.5, "conv3": 0.2}
    assert plan.exclude == {"conv1", "conv2"}
    assert "within 1 points" in plan.source and "costs more" in plan.notes["conv1"]
    with pytest.raises(SettingsError, match="sensitivity"):
        plan_from_sensitivity(_car({}, {0: 32}), 1.0, 8)


def test_plan_from_a_real_analysis_holds_in_a_real_prune(one_thread):
    loaded = load_sample_model("vgg_digits")
    spec = loaded.spec.input
    data = load_sample_dataset("vgg_digits", spec)
    car = compute_car(loaded.model, spec, data.val, n_images=60, per_class=False)
    plan = plan_from_sensitivity(car, max_points=2.0, cluster=8)
    graph = PruningGraph(copy.deepcopy(loaded.model).eval(), spec.shape(1))
    groups = graph.groups()
    plan = plan.validate(groups)
    assert not plan.empty and len(plan.describe(groups)) == len(plan.exclude | set(plan.max_fraction))
    before = graph.widths()
    _prune_until_nothing_is_allowed(graph, plan, cluster=8)
    after = graph.widths()
    for root in plan.exclude:
        assert after[root] == before[root]
    for root, f in plan.max_fraction.items():
        assert after[root] >= (1 - f) * before[root] - 1e-9
