"""The criterion registry: what it offers per task, that its criteria score real filters, and that one new
class (the FPGM example of docs/extending.md, run from that file itself) becomes a choice of the CLI and the config."""
from __future__ import annotations

import copy
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from core import criteria
from core.cli import build_parser
from core.criteria import ScoreContext
from core.tasks.detection.prune import DetectionPruneConfig
from core.errors import SettingsError
from core.groups import PruningGraph
from core.models import load_model
from core.prune import PruneConfig

EXTENDING = Path(__file__).resolve().parents[2] / "docs" / "extending.md"


def docs_example() -> str:
    text = EXTENDING.read_text()
    section = text[text.index("## Adding a criterion"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.fixture
def fpgm():
    """The docs' example criterion (docs/extending.md), registered for the test and removed afterwards."""
    before = dict(criteria.REGISTRY)
    namespace = vars(criteria).copy()
    exec(docs_example(), namespace)
    yield criteria.REGISTRY["fpgm"]
    criteria.REGISTRY.clear()
    criteria.REGISTRY.update(before)


def criterion_choices() -> list[str]:
    prune = build_parser()._subparsers._group_actions[0].choices["prune"]
    return next(a for a in prune._actions if a.dest == "criterion").choices


def test_registry_offers_each_task_its_criteria():
    assert criteria.names("classification") == ("car", "l1", "taylor", "random")
    assert criteria.names("detection") == ("car", "l1", "random")
    assert list(criterion_choices()) == list(criteria.names())


def test_validation_reads_the_registry():
    with pytest.raises(SettingsError, match="Unknown criterion 'magic'. Choose one of: car, l1, taylor, random"):
        PruneConfig(criterion="magic").validate()
    with pytest.raises(SettingsError, match="taylor criterion is not available for detection"):
        DetectionPruneConfig(criterion="taylor").validate()


def test_a_new_criterion_class_appears_in_the_cli_and_validates(fpgm):
    assert "fpgm" in criterion_choices()
    args = build_parser().parse_args(["prune", "--model", "m.pt", "--data", "d.zip", "--out", "o",
                                      "--criterion", "fpgm"])
    assert args.criterion == "fpgm"
    PruneConfig(criterion="fpgm").validate()
    DetectionPruneConfig(criterion="fpgm").validate()
    assert "fpgm" in criteria.names("detection")


def test_new_criterion_scores_every_filter_of_a_real_model(fpgm):
    loaded = load_model("sample:vgg_digits")
    graph = PruningGraph(copy.deepcopy(loaded.model), loaded.spec.input.shape(1))
    groups = [g for g in graph.groups() if not g.left_alone]
    scores = fpgm.score(ScoreContext(graph, groups, np.random.default_rng(0)))
    assert set(scores) == {g.gid for g in groups}
    assert all(s.shape == (g.width,) and np.isfinite(s).all() for g, s in zip(groups, scores.values()))


def test_l1_ranks_a_zeroed_filter_first():
    loaded = load_model("sample:vgg_digits")
    graph = PruningGraph(copy.deepcopy(loaded.model), loaded.spec.input.shape(1))
    group = next(g for g in graph.groups() if not g.left_alone)
    conv = graph.module(group.root)
    with torch.no_grad():
        conv.weight[3].zero_()
        if conv.bias is not None:
            conv.bias[3] = 0
    scores = criteria.get("l1").score(ScoreContext(graph, [group], np.random.default_rng(0)))
    assert int(np.argmin(scores[group.gid])) == 3
