"""Recovery on Ray Train (``core.ray_recovery``): its accuracy lies within the local recovery's run-to-run spread,
and a cancel before the first epoch ends leaves the model as it came.

Ray Train starts a controller and its workers per fit (about 45 s for both tests here on an idle 2-core machine).
They run in the suite; ``PRUNESCOPE_TEST_RAY_TRAIN=0`` skips them."""
from __future__ import annotations

import copy
import os
import threading

import pytest
import torch

from core.distributed import WorkSetting
from core.evaluate import evaluate_accuracy
from core.models import load_model
from core.recovery import RecoveryConfig, recover
from core.sources import load_dataset

pytestmark = [pytest.mark.slow, pytest.mark.skipif(
    os.environ.get("PRUNESCOPE_TEST_RAY_TRAIN") == "0", reason="PRUNESCOPE_TEST_RAY_TRAIN=0: Ray Train recovery skipped")]


@pytest.fixture(scope="module")
def damaged():
    """The digits sample with noise on every weight (selection accuracy far down), and its data."""
    torch.set_num_threads(1)
    loaded = load_model("sample:vgg_digits")
    data = load_dataset("sample:vgg_digits", loaded.spec.input)
    model = copy.deepcopy(loaded.model)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return loaded, data, model


def test_recovery_on_ray_train_is_within_the_local_spread(damaged, ray_cluster):
    from core.ray_recovery import recover_on_ray

    loaded, data, model = damaged
    spec = loaded.spec.input
    select = lambda m: evaluate_accuracy(m, data.val, spec).accuracy  # noqa: E731
    local = []  # the local recovery's run-to-run spread: five seeds (measured: 92.76-94.15 %, Ray 93.31 %)
    for seed in range(5):
        m = copy.deepcopy(model)
        recover(m, data.train, spec, RecoveryConfig(epochs=1, distill=True, seed=seed), select, teacher=loaded.model)
        local.append(select(m))
    m = copy.deepcopy(model)
    result, where = recover_on_ray(m, data.train, data.val, spec, RecoveryConfig(epochs=1, distill=True, seed=0),
                                   WorkSetting(workers=2), teacher=loaded.model)
    assert min(local) <= select(m) <= max(local), (local, select(m))
    assert result.best_epoch == 1 and result.epochs[0]["selection"] == select(m)
    assert [w["rank"] for w in where["workers"]] == [0, 1]
    assert select(model) < min(local) - 0.2, "the damage was real: recovery had work to do"


def test_a_cancel_reaches_every_training_worker(damaged, ray_cluster):
    from core.ray_recovery import recover_on_ray

    loaded, data, model = damaged
    m = copy.deepcopy(model)
    cancel = threading.Event()

    def progress(done, total, message):
        if done > 0:
            cancel.set()

    result, _ = recover_on_ray(m, data.train, data.val, loaded.spec.input, RecoveryConfig(epochs=6, seed=0),
                               WorkSetting(workers=2), cancel=cancel, progress=progress)
    # the cancel is set at the first mini-batch reported; on an idle machine an epoch of the digits can finish
    # before it reaches the workers, so what holds is that the fit stopped early and kept only finished epochs
    assert result.cancelled, "the cancel reached the fit"
    assert len(result.epochs) < 6 and 0 <= result.best_epoch <= len(result.epochs), "it stopped before the last epoch"
    unchanged = all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), model.state_dict().values()))
    assert unchanged == (result.best_epoch == 0), "the model changes only when a finished epoch is kept"
