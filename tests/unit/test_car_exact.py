"""CAR's emulated removal equals real removal by Torch-Pruning, on both bundled samples."""
from __future__ import annotations

import copy

import pytest
import torch

from core.car import CarScorer, compute_car, filter_ablation
from core.data import normalize
from core.sources import load_dataset
from core.groups import PruningGraph
from core.models import load_model

SAMPLES = ["vgg_digits", "resnet_shapes"]


@pytest.fixture(scope="module", params=SAMPLES)
def sample(request):
    loaded = load_model(f"sample:{request.param}")
    data = load_dataset(f"sample:{request.param}", loaded.spec.input)
    return loaded, data.val.subset(200)


def _filters_to_check(width: int) -> list[int]:
    return sorted({0, width - 1})


def test_emulated_removal_equals_real_removal(sample):
    loaded, images = sample
    spec = loaded.spec.input
    scorer = CarScorer(loaded.model, spec, images)
    graph = PruningGraph(loaded.model, spec.shape(1))
    groups = graph.groups()
    assert groups, "every sample has prunable groups"
    ablations, real_acc = [], []
    x = normalize(images.images, spec)
    for g in groups:
        for f in _filters_to_check(g.width):
            ablations.append(filter_ablation(g, [f]))
            pruned = PruningGraph(copy.deepcopy(loaded.model), spec.shape(1))
            pruned.prune(g.root, [f])
            assert pruned.module(g.producers[0]).weight.shape[0] == g.width - 1, "a channel was really removed"
            with torch.no_grad():
                pred = pruned.model(x).argmax(1)
            real_acc.append(int((pred == images.labels).sum()))
    fast = scorer.accuracies(ablations).sum(1).tolist()
    naive = scorer.accuracies(ablations, fast=False).sum(1).tolist()
    assert fast == real_acc
    assert naive == real_acc


def test_car_scores_cover_every_filter(sample):
    loaded, images = sample
    result = compute_car(loaded.model, loaded.spec.input, images, n_images=120, sensitivity=True)
    for g in result.groups:
        assert len(result.car[g["gid"]]) == g["width"]
        assert len(result.per_class[g["gid"]]) == g["width"]
        fractions = [f for f, _ in result.sensitivity[g["gid"]]]
        assert fractions[0] == 0.0 and fractions == sorted(fractions)
    assert 0.95 <= result.baseline_accuracy <= 1.0
    # Removing 90 % of a group must hurt more than removing its single least important filter.
    worst = min(acc for s in result.sensitivity.values() for _, acc in s)
    assert worst < result.baseline_accuracy


def test_the_bar_counts_every_ablation_alike_the_sensitivitys_too():
    """Issue 27: the Analyse ETA said 17 min for a 5-minute job. The single-filter ablations and the sensitivity's
    ablations cost about the same per image, so the bar gives each the same share: the fraction where the
    sensitivity starts is the single-filter ablations' share of all ablations."""
    from core.car import sensitivity_points

    loaded = load_model("sample:vgg_digits")
    images = load_dataset("sample:vgg_digits", loaded.spec.input).val.subset(20)
    seen = []
    compute_car(loaded.model, loaded.spec.input, images, n_images=20, sensitivity=True,
                progress=lambda f, m: seen.append((f, m)))
    groups = PruningGraph(copy.deepcopy(loaded.model), loaded.spec.input.shape(1)).groups()
    filters, points = sum(g.width for g in groups), sensitivity_points(groups)
    fractions = [f for f, _ in seen]
    assert fractions == sorted(fractions) and fractions[-1] == pytest.approx(1.0)
    first_sensitivity = next(f for f, m in seen if m == "per-layer sensitivity")
    last_single = max(f for f, m in seen if m != "per-layer sensitivity")
    assert last_single == pytest.approx(filters / (filters + points), abs=0.02)
    assert first_sensitivity > last_single
