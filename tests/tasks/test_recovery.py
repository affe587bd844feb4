"""Recovery fine-tune: it restores accuracy that a removal cost, keeps the schedule's last epoch (or, asked, the
best on the selection images), and a cancel keeps the incoming model when no epoch finished; distillation from the
original runs and is validated."""
from __future__ import annotations

import copy
import threading

import pytest
import torch

from core.sources import load_dataset
from core.errors import SettingsError
from core.evaluate import evaluate_accuracy
from core.fingerprint import model_fingerprint
from core.groups import PruningGraph
from core.models import load_model
from core.recovery import RecoveryConfig, augment, distillation_loss, recover


@pytest.fixture(scope="module")
def damaged():
    """The shapes sample with half of its first stage's filters removed (no fine-tuning)."""
    torch.set_num_threads(1)
    loaded = load_model("sample:resnet_shapes")
    spec = loaded.spec.input
    data = load_dataset("sample:resnet_shapes", spec)
    original = copy.deepcopy(loaded.model).eval()
    graph = PruningGraph(loaded.model, spec.shape(1))
    stream = max(graph.groups(), key=lambda g: len(g.consumers))
    graph.prune(stream.root, list(range(stream.width // 2)))
    return graph.model, original, data, spec


def _accuracy(spec, images):
    return lambda m: evaluate_accuracy(m, images, spec).accuracy


def test_recovery_restores_accuracy_and_keeps_the_last_epoch(damaged):
    model, original, data, spec = damaged
    model = copy.deepcopy(model)
    select = _accuracy(spec, data.val.subset(240))
    result = recover(model, data.train.subset(960), spec, RecoveryConfig(epochs=2, lr=0.01, batch_size=32), select)
    assert result.start_selection < 0.9, "the removal must cost accuracy for the test to mean anything"
    assert select(model) == pytest.approx(result.epochs[-1]["selection"])
    assert result.epochs[-1]["selection"] > result.start_selection + 0.05
    assert result.best_epoch == 2 and not result.cancelled


@pytest.mark.parametrize("keep, kept", [("last", 3), ("best", 1)])
def test_the_keep_rule_names_the_epoch_whose_weights_the_model_holds(damaged, keep, kept):
    """A selection score that falls epoch after epoch: "last" keeps epoch 3's weights all the same (picking the
    best of N epochs on the selection images is one more decision on them) and scores only that epoch, "best"
    scores every epoch and keeps epoch 1's."""
    model = copy.deepcopy(damaged[0])
    seen = []

    def falling(m) -> float:  # the start, then epochs 1, 2, 3
        seen.append(model_fingerprint(m))
        return 1.0 - 0.1 * len(seen)

    result = recover(model, damaged[2].train.subset(64), damaged[3],
                     RecoveryConfig(epochs=3, batch_size=32, keep=keep), falling)
    scored = [e["epoch"] for e in result.epochs if e["selection"] is not None]
    assert scored == ([1, 2, 3] if keep == "best" else [3]), "only the rule best picks among the epochs' scores"
    assert len(set(seen)) == 1 + len(scored), "each epoch moved the weights"
    assert result.best_epoch == kept and model_fingerprint(model) == seen[scored.index(kept) + 1]
    assert all(e["seconds"] > 0 for e in result.epochs), "each epoch's training time is recorded"
    with pytest.raises(SettingsError, match="keeps its last or best epoch"):
        RecoveryConfig(keep="middle").validate()


def test_the_kept_epoch_is_kept_even_below_the_incoming_model(damaged):
    """The incoming step's selection figure is no candidate (it reads high on the images that chose it):
    an epoch that scores below it is still the result, for the user to compare on the test images."""
    _, original, data, spec = damaged
    model = copy.deepcopy(original)
    select = _accuracy(spec, data.val.subset(240))
    result = recover(model, data.train.subset(256), spec, RecoveryConfig(epochs=1, lr=5.0, batch_size=32), select)
    assert result.epochs and result.epochs[0]["selection"] < result.start_selection - 0.05, \
        "a far too large rate must harm the well-trained original for the test to mean anything"
    assert result.best_epoch == 1 and select(model) == pytest.approx(result.epochs[0]["selection"])
    assert model_fingerprint(model) != model_fingerprint(original)


def test_cancel_keeps_the_incoming_model_when_no_epoch_finished(damaged):
    model, _, data, spec = damaged
    model = copy.deepcopy(model)
    before = model_fingerprint(model)
    cancel = threading.Event()
    cancel.set()
    result = recover(model, data.train.subset(64), spec, RecoveryConfig(epochs=1, batch_size=32),
                     _accuracy(spec, data.val.subset(64)), cancel=cancel)
    assert result.cancelled and result.best_epoch == 0 and result.epochs == []
    assert model_fingerprint(model) == before


def test_distillation_runs_and_settings_are_checked(damaged):
    model, original, data, spec = damaged
    model = copy.deepcopy(model)
    result = recover(model, data.train.subset(64), spec, RecoveryConfig(epochs=1, batch_size=32, distill=True),
                     _accuracy(spec, data.val.subset(64)), teacher=original)
    assert len(result.epochs) == 1
    with pytest.raises(SettingsError, match="teacher"):
        recover(model, data.train.subset(64), spec, RecoveryConfig(distill=True), lambda m: 0.0)
    for bad in (RecoveryConfig(epochs=0), RecoveryConfig(lr=-1), RecoveryConfig(lr=float("nan"))):
        with pytest.raises(SettingsError):
            bad.validate()


def test_kd_loss_reduces_to_cross_entropy_and_matches_teacher_at_zero():
    s = torch.randn(8, 5)
    y = torch.randint(0, 5, (8,))
    assert distillation_loss(s, torch.randn(8, 5), y, 0.0, 4.0) == pytest.approx(float(torch.nn.functional.cross_entropy(s, y)))
    assert distillation_loss(s, s, y, 1.0, 4.0) == pytest.approx(0.0, abs=1e-6)


def test_augment_shifts_within_bounds_and_flips():
    x = torch.arange(2 * 1 * 4 * 4, dtype=torch.float32).reshape(2, 1, 4, 4)
    g = torch.Generator().manual_seed(0)
    assert torch.equal(augment(x, g, 0, False), x)
    out = augment(x, g, 1, False)
    assert out.shape == x.shape
    for i in range(2):  # every non-zero value of a shifted image is a value of the original image
        vals = set(out[i].flatten().tolist()) - {0.0}
        assert vals <= set(x[i].flatten().tolist())
    flipped = augment(x, torch.Generator().manual_seed(1), 0, True)
    assert all(torch.equal(flipped[i], x[i]) or torch.equal(flipped[i], x[i].flip(2)) for i in range(2))
