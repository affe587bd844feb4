"""CAR on Ray workers (``core.distributed``) equals CAR in this process, value for value; faults and cancel.

One local Ray cluster of 2 CPUs serves the whole session (``ray_cluster`` in ``tests/conftest.py``); a pool
of 2 actors is made per module. The sample is the bundled digits VGG on 64 selection images: a few seconds.
"""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from core.car import CarResult, CarScorer, compute_car, filter_ablation
from core.distributed import CarPool, WorkSetting, signature_buckets
from core.errors import CancelledError, SettingsError
from core.groups import PruningGraph
from core.models import load_model
from core.sources import load_dataset

ROOT = Path(__file__).resolve().parents[2]
N_IMAGES = 64
SHARE = 0.5  # CPUs each test actor asks for: two pools of 2 actors fit the session's 2-CPU cluster


@pytest.fixture(scope="module")
def sample():
    torch.set_num_threads(1)
    loaded = load_model("sample:vgg_digits")
    data = load_dataset("sample:vgg_digits", loaded.spec.input)
    return loaded, data.val.subset(N_IMAGES)


@pytest.fixture(scope="module")
def reference(sample):
    """Exact CAR (per class, with sensitivity) computed in this process: the reference."""
    loaded, images = sample
    return compute_car(loaded.model, loaded.spec.input, images, n_images=None, sensitivity=True)


@pytest.fixture(scope="module")
def pool(ray_cluster):
    with CarPool(WorkSetting(workers=2), cpus_per_worker=SHARE) as p:
        yield p


def _as_tensors(result) -> dict[str, torch.Tensor]:
    gids = sorted(result.car)
    return {"car": torch.tensor([v for g in gids for v in result.car[g]], dtype=torch.float64),
            "loss_up": torch.tensor([v for g in gids for v in result.loss_up[g]], dtype=torch.float64),
            "per_class": torch.tensor([v for g in gids for v in result.per_class[g]], dtype=torch.float64),
            "sensitivity": torch.tensor([v for g in gids for v in result.sensitivity[g]], dtype=torch.float64)}


def assert_identical(a, b) -> None:
    assert a.baseline_accuracy == b.baseline_accuracy
    assert a.car == b.car and a.loss_up == b.loss_up and a.per_class == b.per_class
    assert a.sensitivity == b.sensitivity
    ta, tb = _as_tensors(a), _as_tensors(b)
    for key in ta:
        assert torch.equal(ta[key], tb[key]), key


def test_distributed_exact_car_equals_single_process(sample, reference, pool):
    loaded, images = sample
    result = compute_car(loaded.model, loaded.spec.input, images, n_images=None, sensitivity=True, pool=pool)
    assert_identical(reference, result)
    places = result.where["ablations_by_place"]
    assert set(places) == {"worker 0", "worker 1"}, "both workers scored, nothing fell back to this process"
    assert sum(places.values()) == reference.where["ablations_by_place"]["local"]
    assert result.where["where"] == "ray-local" and len(result.where["workers"]) == 2
    assert all(w["device"].startswith("cpu") for w in result.where["workers"])
    assert reference.where["where"] == "local"


def test_distributed_fast_car_equals_single_process(sample, pool):
    loaded, images = sample
    local = compute_car(loaded.model, loaded.spec.input, images, n_images=None, sensitivity=False, method="fast")
    remote = compute_car(loaded.model, loaded.spec.input, images, n_images=None, sensitivity=False, method="fast",
                         pool=pool)
    assert local.car == remote.car and local.exact == remote.exact and local.loss_up == remote.loss_up


def test_a_new_state_reaches_the_workers(sample, pool):
    """Between steps the workers get the new state (same structure: its state dict only) and score on it."""
    loaded, images = sample
    model = copy.deepcopy(loaded.model)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(0.9)
    groups = PruningGraph(model, loaded.spec.input.shape(1)).groups()
    ablations = [filter_ablation(g, [f]) for g in groups[:2] for f in range(4)]
    local = CarScorer(model, loaded.spec.input, images).accuracies_and_loss(ablations)
    before = pool._model
    remote = CarScorer(model, loaded.spec.input, images, pool=pool).accuracies_and_loss(ablations)
    assert torch.equal(local[0], remote[0]) and torch.equal(local[1], remote[1])
    if before is not None and before[0] == pool._model[0]:
        assert pool._model[3] is not None, "same structure: only the state dict was sent"


def test_parked_workers_come_back_when_car_needs_them(sample, reference, pool, ray_cluster):
    """A recovery on Ray Train frees the CAR actors' CPUs (``park``); the next CAR makes them again, same values."""
    loaded, images = sample
    old = list(pool.actors)
    pool.park()
    assert pool.actors == []
    for a in old:  # ray.kill is asynchronous: a ping sent at once can still be answered; within 30 s none may be
        deadline = time.monotonic() + 30
        with pytest.raises(ray_cluster.exceptions.RayActorError):
            while time.monotonic() < deadline:
                ray_cluster.get(a.ping.remote(), timeout=30)
                time.sleep(0.2)
    result = compute_car(loaded.model, loaded.spec.input, images, n_images=None, sensitivity=True, pool=pool)
    assert_identical(reference, result)
    assert len(pool.actors) == 2 and set(result.where["ablations_by_place"]) == {"worker 0", "worker 1"}


def test_a_model_the_workers_cannot_rebuild_is_scored_here(sample, pool, tmp_path, monkeypatch):
    """A model whose class the workers cannot import (a module only this process has) is scored in this
    process, with the same values, and the record says why; later calls do not try the workers again."""
    loaded, images = sample
    (tmp_path / "only_here_mod.py").write_text(
        f"from {type(loaded.model).__module__} import {type(loaded.model).__name__} as Base\n"
        "class OnlyHere(Base):\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import only_here_mod

    model = copy.deepcopy(loaded.model)
    model.__class__ = only_here_mod.OnlyHere
    groups = PruningGraph(model, loaded.spec.input.shape(1)).groups()
    ablations = [filter_ablation(g, [f]) for g in groups for f in range(2)]
    local = CarScorer(model, loaded.spec.input, images).accuracies_and_loss(ablations)
    failures = []
    for _ in range(2):
        scorer = CarScorer(model, loaded.spec.input, images, pool=pool)
        out = scorer.accuracies_and_loss(ablations)
        assert torch.equal(out[0], local[0]) and torch.equal(out[1], local[1])
        assert scorer.where()["ablations_by_place"] == {"local": len(ablations)}
        failures.append(sum("failed" in e and "only_here_mod" in e for e in pool.record.events))
    assert 1 <= failures[0] <= 2, "each worker that had a part in flight says why it failed"
    assert failures[1] == failures[0], "the second call went straight to this process"


def test_parts_never_split_a_signature():
    ablations = [{"a": [0]}, {"b": [0]}, {"a": [1]}, {"a": [0], "b": [1]}, {"b": [2]}]
    assert signature_buckets(ablations) == [[0, 2], [1, 4], [3]]


def test_faults_cancel_retry_fallback_and_close(sample, reference, ray_cluster):
    """A cancel stops the parts in flight on every worker; a lost worker's part is retried on the other; with no
    worker left the parts run here; every figure stays the reference's; closing kills every actor."""
    ray = ray_cluster
    loaded, images = sample
    spec = loaded.spec.input
    groups = PruningGraph(loaded.model, spec.shape(1)).groups()
    ablations = [filter_ablation(g, [f]) for g in groups for f in range(g.width)]
    local = CarScorer(loaded.model, spec, images).accuracies_and_loss(ablations)
    with CarPool(WorkSetting(workers=2), cpus_per_worker=SHARE) as p:
        actors = list(p.actors)
        # cancel: set at the first finished part, while the other worker still has one in flight
        cancel = threading.Event()
        scorer = CarScorer(loaded.model, spec, images, pool=p)
        with pytest.raises(CancelledError):
            scorer.accuracies_and_loss(ablations, progress=lambda done: cancel.set(), cancel=cancel)
        assert any(e.startswith("cancelled: 1 part") for e in p.record.events)
        assert all(p.alive), "the cancelled part stopped within the grace time: no worker had to be killed"
        assert sorted(ray.get([a.ping.remote() for a in p.actors], timeout=30)) == [0, 1]
        # a running part sees the cancel: every ablation 4 times on one worker (~8 s here), cancelled after 0.3 s
        images_ref, model_ref = p._ship(loaded.model, scorer.inputs, scorer.labels)
        ref = p.actors[0].evaluate.remote(images_ref, model_ref, ablations * 4, True, True)
        time.sleep(0.3)
        t0 = time.perf_counter()
        ray.cancel(ref)
        with pytest.raises((ray.exceptions.TaskCancelledError, ray.exceptions.RayTaskError)):
            ray.get(ref, timeout=60)
        assert time.perf_counter() - t0 < 1.5, "the worker stopped between batches, not at the end of its part"
        # a worker lost: its part is retried on the other, the values unchanged
        ray.kill(p.actors[1], no_restart=True)
        scorer = CarScorer(loaded.model, spec, images, pool=p)
        out = scorer.accuracies_and_loss(ablations)
        assert torch.equal(out[0], local[0]) and torch.equal(out[1], local[1])
        where = scorer.where()
        assert set(where["ablations_by_place"]) == {"worker 0"}
        assert any(e.startswith("worker 1 lost") and "retried on another worker" in e for e in where["events"])
        # no worker left: the parts run in this process, the values unchanged
        for a in p.actors:
            ray.kill(a, no_restart=True)
        scorer = CarScorer(loaded.model, spec, images, pool=p)
        out = scorer.accuracies_and_loss(ablations)
        assert torch.equal(out[0], local[0]) and torch.equal(out[1], local[1])
        assert scorer.where()["ablations_by_place"].get("local") == len(ablations)
        assert any(e.startswith("worker 0 lost") and "runs in this process" in e for e in p.record.events)
    assert p.actors == [] and ray.is_initialized(), "closing a pool keeps a cluster it did not start"
    for a in actors:
        with pytest.raises(ray.exceptions.RayActorError):
            ray.get(a.ping.remote(), timeout=30)


def test_settings_are_checked():
    with pytest.raises(SettingsError):
        WorkSetting(workers=0).validate()
    with pytest.raises(SettingsError):
        WorkSetting(address="ray:// bad").validate()
    assert WorkSetting().where == "local" and WorkSetting(workers=2).where == "ray-local"
    assert WorkSetting(address="auto").where == "ray"


def _ray_pids() -> set[int]:
    pids = set()
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                cmd = open(f"/proc/{d}/cmdline", "rb").read().replace(b"\0", b" ")
            except OSError:
                continue
            if b"raylet" in cmd or b"gcs_server" in cmd:
                pids.add(int(d))
    return pids


@pytest.mark.slow
def test_cli_analyse_on_a_local_ray_cluster_leaves_nothing_running(tmp_path, reference, ray_cluster):
    """``analyse --ray-workers 1`` starts its own cluster, scores the same CAR as this process, and stops it (one
    worker: the split over two is the tests' above; this one is about the cluster's life)."""
    before = _ray_pids()
    out = tmp_path / "an"
    proc = subprocess.run([sys.executable, "-m", "core", "analyse", "--model", "sample:vgg_digits", "--data",
                           "sample:vgg_digits", "--images", str(N_IMAGES), "--out", str(out), "--threads", "1",
                           "--ray-workers", "1", "--json"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Ray worker(s)" in proc.stderr
    result = CarResult.from_dict(json.loads((out / "car.json").read_text()))
    assert_identical(reference, result)
    assert set(result.where["ablations_by_place"]) == {"worker 0"}
    deadline = time.monotonic() + 20
    while _ray_pids() - before and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not (_ray_pids() - before), "the command's Ray cluster was left running"
