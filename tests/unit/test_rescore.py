"""The pruning loop's filter scores: reused scores equal recomputed ones on an unchanged model, fast
mode's exact decisions equal exact CAR on the shortlisted filters, and only changed groups are rescored."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from core.car import CarScorer, compute_car, filter_ablation
from core.criteria import new_width
from core.groups import PruningGraph
from core.models import load_model
from core.rescore import ScoreBook, car_scores
from core.screen import tiebreak
from core.sources import load_dataset
from core.tasks.classification.task import score_filters

CLUSTER = 8


@pytest.fixture(scope="module")
def sample():
    torch.set_num_threads(1)
    loaded = load_model("sample:vgg_digits")
    data = load_dataset("sample:vgg_digits", loaded.spec.input)
    images = data.val.subset(60)
    graph = PruningGraph(loaded.model, loaded.spec.input.shape(1))
    return loaded, images, graph.groups()


@pytest.fixture(scope="module")
def exact(sample):
    """Exact scores of every filter from an empty book (the reference), with the book that holds them."""
    loaded, images, groups = sample
    scorer = CarScorer(loaded.model, loaded.spec.input, images)
    book = ScoreBook()
    scores, report = car_scores(scorer, groups, book, "exact", CLUSTER)
    return scorer, scores, report, book


def _scores_equal(a: dict, b: dict) -> None:
    assert set(a) == set(b)
    for gid in a:
        np.testing.assert_allclose(a[gid], b[gid], rtol=0, atol=1e-6)  # float32 sums vs float64


def test_exact_scores_equal_a_direct_ablation_of_each_filter(sample, exact):
    """The one exact-CAR implementation (``car_scores``) against removing each filter alone, measured by
    the naive engine (one plain forward pass per ablation, no batching or shared prefix)."""
    groups = sample[2]
    scorer, scores, report, book = exact
    n = len(scorer.labels)
    for g in groups:
        correct, loss_up = scorer.accuracies_and_loss([filter_ablation(g, [f]) for f in range(g.width)], fast=False)
        car = scorer.baseline_accuracy - correct.float().mean(1).numpy()
        np.testing.assert_allclose([book.entries[g.root][f][0] for f in range(g.width)], car, rtol=0, atol=1e-6)
        np.testing.assert_allclose(scores[g.gid], tiebreak(car, loss_up.numpy(), n), rtol=0, atol=1e-6)
    assert any(np.ptp(s) > 0 for s in scores.values()), "some filter's removal changes a prediction"
    assert report.measured == report.total == report.exact == sum(g.width for g in groups)
    assert report.reused == report.screened == 0


def test_the_car_criterion_outside_the_loop_scores_through_the_same_path(sample, exact):
    """``score_filters('car', ...)`` (no score book of its own) gives the loop's exact scores, keyed by root."""
    loaded, images, groups = sample
    scorer, scores = exact[0], exact[1]
    graph = PruningGraph(loaded.model, loaded.spec.input.shape(1))
    by_root = score_filters("car", graph, groups, scorer, images, loaded.spec.input, np.random.default_rng(0))
    _scores_equal(by_root, {g.root: scores[g.gid] for g in groups})


def test_fast_scores_need_a_cluster_size(sample, exact):
    with pytest.raises(ValueError, match="cluster"):
        car_scores(exact[0], sample[2], ScoreBook(), "fast")


def test_scores_reused_from_the_analysis_equal_recomputed_ones(sample, exact):
    loaded, images, groups = sample
    scorer, recomputed = exact[0], exact[1]
    analysis = compute_car(loaded.model, loaded.spec.input, images, n_images=None, sensitivity=False, per_class=False)
    assert analysis.fingerprint == scorer.fingerprint()
    book = ScoreBook()
    assert book.seed_from_analysis(analysis) == sum(g.width for g in groups)
    reused, report = car_scores(scorer, groups, book, "exact", CLUSTER)
    assert report.measured == 0 and report.reused == report.from_analysis == report.total
    _scores_equal(reused, recomputed)


def test_an_analysis_of_other_images_or_another_model_is_not_reused(sample):
    loaded, images, groups = sample
    spec = loaded.spec.input
    scorer = CarScorer(loaded.model, spec, images)
    few = images.subset(30, seed=3)
    small_scorer = CarScorer(loaded.model, spec, few)
    changed = copy.deepcopy(loaded.model)
    with torch.no_grad():
        next(changed.parameters()).mul_(1.01)
    for analysis, target in ((compute_car(loaded.model, spec, few, n_images=None, sensitivity=False, per_class=False),
                              scorer),  # other images
                             (compute_car(changed, spec, few, n_images=None, sensitivity=False, per_class=False),
                              small_scorer)):  # another model state
        book = ScoreBook()
        assert book.seed_from_analysis(analysis) > 0
        _, report = car_scores(target, groups, book, "exact", CLUSTER)
        assert report.reused == 0 and report.measured == report.total


def test_fast_mode_decides_with_exact_car_on_the_shortlist(sample, exact):
    groups = sample[2]
    scorer, exact = exact[0], exact[1]
    book = ScoreBook()
    fast, report = car_scores(scorer, groups, book, "fast", CLUSTER)
    assert 0 < report.measured < report.total, "fast mode measures some filters, not all"
    assert report.screened == report.total - report.exact
    for g in groups:
        mask = book.exact_mask[g.root]
        idx = np.flatnonzero(mask)
        expected = scorer.baseline_accuracy - np.asarray(_accuracy_of(scorer, g, idx))
        np.testing.assert_allclose([book.entries[g.root][f][0] for f in idx], expected, atol=1e-6)
        target = new_width(g.width, CLUSTER)
        if target is None:
            continue
        cluster = np.argsort(fast[g.gid], kind="stable")[:g.width - target]
        assert mask[cluster].all(), "every filter of a candidate cluster has an exact CAR"
        # exact filters are ordered among themselves as exact CAR orders them
        ex = np.flatnonzero(mask)
        np.testing.assert_array_equal(np.argsort(fast[g.gid][ex], kind="stable"),
                                      np.argsort(exact[g.gid][ex], kind="stable"))


def _accuracy_of(scorer: CarScorer, group, filters) -> list[float]:
    correct = scorer.accuracies([group.ablation([int(f)]) for f in filters])
    return correct.float().mean(1).tolist()


def test_only_the_changed_group_is_rescored(sample, exact):
    groups = sample[2]
    scorer, first, _, book = exact
    book = copy.deepcopy(book)
    book.forget(groups[0].root)
    again, report = car_scores(scorer, groups, book, "exact", CLUSTER)
    assert report.rescored_groups == [groups[0].root]
    assert report.measured == groups[0].width
    _scores_equal(first, again)
    _, none = car_scores(scorer, groups, book, "exact", CLUSTER)
    assert none.rescored_groups == [] and none.measured == 0


def test_entries_of_another_width_are_never_reused(sample, exact):
    groups = sample[2]
    scorer, book = exact[0], copy.deepcopy(exact[3])
    g = groups[0]
    book.widths[g.root] = g.width + 8  # as if measured before the group lost a cluster
    _, report = car_scores(scorer, groups, book, "exact", CLUSTER)
    assert report.measured == 0, "scores of the same width are still fresh"
    book.scores.pop(g.root)
    _, report = car_scores(scorer, groups, book, "exact", CLUSTER)
    assert report.measured == g.width and report.reused == 0


def test_fast_mode_scores_a_group_that_cannot_lose_a_cluster_by_its_screen(sample, exact):
    """A group narrower than two clusters has no shortlist (nothing can be removed from it); it still gets
    scores, from the screen alone (a real ResNet-20 run crashed here at its fourth step)."""
    groups = sample[2]
    scorer = exact[0]
    widest = max(g.width for g in groups)
    scores, report = car_scores(scorer, groups, ScoreBook(), "fast", cluster=widest)  # no group can lose one
    assert report.measured == 0 and report.screened == report.total
    assert all(len(scores[g.gid]) == g.width and np.isfinite(scores[g.gid]).all() for g in groups)
