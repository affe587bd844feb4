"""The selection images that decide a step are apart from those that scored its filters (issue 23: a ranking
chosen on the score images reads low on them, a winner's curse), when there are enough of them."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from core.data import DataReport, DataSet, ImageSet
from core.evaluate import Accuracy
from core.models import InputSpec
from core.prune import PruneConfig
from core.tasks.classification.task import ClassificationTask, decision_mask_of, score_images_of, score_indices_of


def _images(n: int, classes: int = 10) -> ImageSet:
    labels = torch.arange(n) % classes
    return ImageSet(torch.zeros(n, 3, 8, 8, dtype=torch.uint8), labels, [f"c{i}" for i in range(classes)],
                    [f"img{i}.png" for i in range(n)])


def test_with_enough_images_the_deciding_ones_never_score():
    val, config = _images(1000), PruneConfig(score_images=400)
    mask = decision_mask_of(val, config)
    scored = score_indices_of(val, config)
    assert mask.sum() == 600 and not mask[scored].any(), "the 400 score images take no decision"
    assert score_images_of(val, config).ids == [val.ids[i] for i in scored]
    assert score_images_of(val, config).ids == val.subset(400, seed=config.seed).ids, "the Analyse page's images"


def test_a_small_selection_set_decides_on_all_its_images():
    val, config = _images(700), PruneConfig(score_images=400)
    assert decision_mask_of(val, config).all(), "700 < 2 x 400: halving the deciding images would cost resolution"


def test_a_flip_on_a_score_image_does_not_move_the_decision():
    val = _images(1000)
    spec = InputSpec(height=8, width=8)
    data = DataSet(train=_images(20), val=val, class_names=val.class_names, input=spec, report=DataReport(),
                   test=_images(0))
    task = ClassificationTask(spec, data, PruneConfig(score_images=400, latency=False))
    base = np.ones(1000, dtype=bool)
    task._baseline_correct = {"selection": base}
    scored = score_indices_of(val, task.config)
    after = base.copy()
    after[scored[:50]] = False  # 50 score images now wrong: 5 points on all of val, none where it decides
    acc = Accuracy(after.mean(), {}, [], 1000, torch.from_numpy(after))
    assert task.decision_drop(acc) == 0.0
    deciding = np.flatnonzero(decision_mask_of(val, task.config))
    after[deciding[:6]] = False  # 6 of the 600 deciding images: 1 point
    assert task.decision_drop(Accuracy(after.mean(), {}, [], 1000, torch.from_numpy(after))) == pytest.approx(1.0)
