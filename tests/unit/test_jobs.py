"""JobRegistry: start, progress snapshots, cancel within one step, no double start, interrupted runs."""
from __future__ import annotations

import copy
import json
import subprocess
import sys
import threading
import time
from dataclasses import replace

import pytest

from core.architectures import SampleVGG
from core.errors import PruneScopeError
from core.jobs import JobAlreadyRunning, JobRegistry, past_runs, phased_job, prune_job, reusable_car
from core.runs import Run
from core.tasks.classification.task import score_images_of
from core.workspace import new_run_dir
from tests.helpers import loaded as make_loaded, quick_config, random_dataset


def wait_until(predicate, timeout=20.0, interval=0.02):
    end = time.time() + timeout
    while time.time() < end:
        if predicate():
            return True
        time.sleep(interval)
    return False


def stepping_job(n_steps: int, step_seconds: float, gate: threading.Event | None = None):
    """A fake job: ``n_steps`` steps of ``step_seconds``, checking the cancel flag between steps."""

    def fn(ctx):
        for i in range(n_steps):
            if gate is not None:
                gate.wait(10)
            ctx.check_cancel()
            time.sleep(step_seconds)
            ctx.step({"step": i, "value": i * i})
            ctx.progress((i + 1) / n_steps, f"step {i} done")
        return {"state": "done", "steps": n_steps}

    return fn


def test_start_reports_progress_and_result():
    reg = JobRegistry()
    gate = threading.Event()
    job = reg.start("demo", stepping_job(4, 0.01, gate), meta={"who": "test"})
    snap = job.snapshot()
    assert snap.state == "running" and snap.running and snap.progress == 0.0 and snap.steps == []
    assert snap.eta is None, "no ETA before any progress"
    assert reg.active("demo") == [job] and reg.get(job.id) is job and reg.latest("demo") is job
    gate.set()
    assert job.wait(10)
    snap = job.snapshot()
    assert snap.state == "done" and snap.progress == 1.0 and snap.eta == 0.0
    assert [s["step"] for s in snap.steps] == [0, 1, 2, 3]
    assert snap.result == {"state": "done", "steps": 4}
    assert snap.meta == {"who": "test"} and snap.finished >= snap.started
    assert reg.active() == []


def test_snapshot_is_a_copy_and_eta_is_extrapolated():
    reg = JobRegistry()
    release = threading.Event()

    def fn(ctx):
        ctx.step({"step": 0, "widths": {"a": 8}})
        time.sleep(0.4)
        ctx.progress(0.25, "quarter")
        release.wait(10)

    job = reg.start("demo", fn)
    assert wait_until(lambda: job.snapshot().progress == 0.25)
    snap = job.snapshot()
    snap.steps[0]["widths"]["a"] = 999  # mutating the copy must not touch the job
    assert job.snapshot().steps[0]["widths"]["a"] == 8
    assert snap.message == "quarter"
    # 25 % done after ~0.4 s: about three times that was left when it was reported, counting down since
    assert snap.eta == pytest.approx(3 * 0.4, rel=0.25)
    time.sleep(0.3)
    later = job.snapshot()
    assert later.eta == pytest.approx(snap.eta - 0.3, abs=0.15), "it counts down while the fraction waits"
    time.sleep(1.2)
    assert job.snapshot().eta is None, "past the extrapolation it is not known (issue 27: it used to climb)"
    release.set()
    assert job.wait(10)


def test_double_start_is_refused_while_running():
    reg = JobRegistry()
    gate = threading.Event()
    first = reg.start("prune", stepping_job(2, 0.0, gate))
    with pytest.raises(JobAlreadyRunning) as info:
        reg.start("prune", stepping_job(2, 0.0))
    assert info.value.job is first and "already running" in str(info.value)
    assert len(reg.list("prune")) == 1, "starting twice does not start two jobs"
    other = reg.start("prune", stepping_job(1, 0.0), key="another-model")  # a different key is independent
    other.wait(10)
    gate.set()
    assert first.wait(10)
    again = reg.start("prune", stepping_job(1, 0.0))  # once finished, a new job may start
    assert again is not first and again.wait(10) and again.snapshot().state == "done"


def test_cancel_takes_effect_within_one_step_and_keeps_completed_steps():
    reg = JobRegistry()
    job = reg.start("demo", stepping_job(100, 0.05))
    assert wait_until(lambda: len(job.snapshot().steps) >= 3)
    t0 = time.time()
    assert reg.cancel(job.id)
    assert job.snapshot().state in ("cancelling", "cancelled")
    assert job.wait(5)
    assert time.time() - t0 < 0.5, "stops within one step (0.05 s) plus scheduling slack"
    snap = job.snapshot()
    assert snap.state == "cancelled" and "cancelled" in snap.message
    assert [s["step"] for s in snap.steps] == list(range(len(snap.steps))) and len(snap.steps) >= 3
    assert not reg.cancel(job.id), "cancelling a finished job is a no-op"


def test_failures_are_reported_not_raised():
    reg = JobRegistry()
    user = reg.start("a", lambda ctx: (_ for _ in ()).throw(PruneScopeError("The cluster size is too large.")))
    bug = reg.start("b", lambda ctx: 1 / 0)
    assert user.wait(5) and bug.wait(5)
    assert user.snapshot().state == "failed" and user.snapshot().error == "The cluster size is too large."
    assert user.traceback is None
    assert bug.snapshot().state == "failed" and bug.snapshot().error.startswith("ZeroDivisionError")
    assert "Traceback" in bug.traceback


def test_finished_jobs_are_forgotten_beyond_the_limit():
    reg = JobRegistry(keep_finished=2)
    for i in range(4):
        reg.start("demo", lambda ctx: None, key=str(i)).wait(5)
    reg.start("demo", lambda ctx: None, key="last").wait(5)
    assert len(reg.list()) <= 3


# ----------------------------------------------------------------------------- with the real engine


@pytest.fixture(scope="module")
def tiny():
    data = random_dataset(4, size=16, n_train=32, n_val=24)
    return make_loaded(SampleVGG(num_classes=4), "sample_vgg", 4, size=16), data


def test_prune_job_cancel_keeps_completed_steps(tiny):
    loaded, data = tiny
    reg = JobRegistry()
    run_dir = new_run_dir("jobtest")
    config = quick_config(max_steps=50, cluster=2, finetune_steps=3)
    job = reg.start("prune", prune_job(loaded, data, config, run_dir, data_source="random"), run_dir=run_dir,
                    total_steps=config.max_steps + 1)
    assert wait_until(lambda: len(job.snapshot().steps) >= 2, timeout=60)
    reg.cancel(job.id)
    assert job.wait(60)
    snap = job.snapshot()
    assert snap.state == "cancelled"
    run = Run(run_dir)
    assert run.status["state"] == "cancelled"
    hist = run.history
    assert len(hist) >= 2 and len(hist) < 51, "stopped long before the step limit"
    assert [r["step"] for r in hist] == list(range(len(hist)))
    assert [s["step"] for s in snap.steps] == [r["step"] for r in hist], "the job saw exactly the steps on disk"
    run.rebuild_step(hist[-1]["step"])  # the last completed step is whole
    assert reg.for_run(run_dir) is job
    assert 0 < snap.progress < 1


def test_prune_job_runs_to_the_end(tiny):
    loaded, data = tiny
    reg = JobRegistry()
    run_dir = new_run_dir("jobtest")
    job = reg.start("prune", prune_job(loaded, data, quick_config(max_steps=2), run_dir), run_dir=run_dir)
    assert job.wait(60)
    snap = job.snapshot()
    assert snap.state == "done", snap.error
    assert snap.result["steps"] == 2 and [s["step"] for s in snap.steps] == [0, 1, 2]
    assert snap.progress == 1.0


def test_interrupted_run_is_listed_with_its_steps(tiny):
    loaded, data = tiny
    run_dir = new_run_dir("crashed")
    from core.prune import run_pruning

    run_pruning(loaded, data, quick_config(max_steps=1), run_dir)
    # the process that owned this run died while it was running: a pid that no longer exists
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    status = json.loads((run_dir / "status.json").read_text())
    status.update(state="running", pid=dead.pid)
    (run_dir / "status.json").write_text(json.dumps(status))
    listed = {r["name"]: r for r in past_runs(JobRegistry())}
    entry = listed[run_dir.name]
    assert entry["state"] == "interrupted" and entry["steps"] == 1
    assert "completed steps are kept" in Run(run_dir).status["message"]
    assert [r["step"] for r in Run(run_dir).history] == [0, 1]


def test_prune_job_reuses_a_given_car_analysis(tiny):
    """A finished analysis of the same model, images and settings is stored, not recomputed, and the
    job's log says so (issue 16)."""
    from core.car import compute_car

    loaded, data = tiny
    config = quick_config(max_steps=1, analyse_car=True, criterion="car")
    scored = len(score_images_of(data.val, config))  # at most half of the selection images score
    car = compute_car(loaded.model, loaded.spec.input, data.val, n_images=scored, sensitivity=True)
    run_dir = new_run_dir("jobtest")
    job = JobRegistry().start("prune", prune_job(loaded, data, config, run_dir, car=car),
                              run_dir=run_dir)
    assert job.wait(60) and job.snapshot().state == "done", job.snapshot().error
    run = Run(run_dir)
    assert run.car["reused_from"] and run.car["car"] == {str(k): v for k, v in car.car.items()}
    assert any("reused the finished analysis" in line for line in job.snapshot().log)
    if len(run.history) > 1:  # step 1 measured nothing the analysis already knew (core.rescore)
        scoring = run.history[1]["car_scoring"]
        assert scoring["from_analysis"] > 0 and scoring["measured"] < scoring["total"]


def test_prune_job_recomputes_an_analysis_made_with_other_settings(tiny):
    """An analysis on other images (here: fewer than the run scores on) is not passed off as the run's."""
    from core.car import compute_car

    loaded, data = tiny
    config = quick_config(max_steps=1, analyse_car=True)
    car = compute_car(loaded.model, loaded.spec.input, data.val, n_images=8, sensitivity=True)
    run_dir = new_run_dir("jobtest")
    job = JobRegistry().start("prune", prune_job(loaded, data, config, run_dir, car=car),
                              run_dir=run_dir)
    assert job.wait(120) and job.snapshot().state == "done", job.snapshot().error
    run = Run(run_dir)
    assert "reused_from" not in run.car and run.car["n_images"] == len(score_images_of(data.val, config))
    assert run.config["prune"]["analyse_car"] is True
    assert any("computed for this run" in line and "8 images" in line for line in job.snapshot().log)
    assert reusable_car(car, loaded.model, data.val, replace(config, score_images=8))[0]
    changed = copy.deepcopy(loaded.model)
    next(changed.parameters()).data.add_(1.0)
    assert reusable_car(car, changed, data.val, replace(config, score_images=8)) == (False, "the model changed")


def test_reuse_is_one_decision_on_the_analysis_own_fingerprint(tiny):
    """The page, the job's log and the run decide reuse alike (core.tasks.classification.task.analysis_reuse): an
    analysis on the same number of images but another subset (another seed), without sensitivity, or
    screened (fast) for an exact run is recomputed, each with its reason; a run it serves reuses it."""
    from core.car import compute_car
    from core.tasks.classification.task import ClassificationTask

    loaded, data = tiny
    config = quick_config(score_images=8, criterion="car", car="exact")
    car = compute_car(loaded.model, loaded.spec.input, data.val, n_images=8, sensitivity=True)
    assert reusable_car(car, loaded.model, data.val, config) == (True, "same model, 8 images, exact CAR")
    assert reusable_car(car.to_dict(), loaded.model, data.val, config)[0], "a stored car.json serves as well"
    assert reusable_car(car, loaded.model, data.val, replace(config, seed=1)) == (False, "other selection images")
    assert reusable_car(replace(car, sensitivity={}), loaded.model, data.val, config) == (
        False, "it has no per-layer sensitivity")
    assert not reusable_car(replace(car, fingerprint={}), loaded.model, data.val, config)[0]
    screened = replace(car, exact={gid: [False] + [True] * (len(v) - 1) for gid, v in car.car.items()})
    assert reusable_car(screened, loaded.model, data.val, replace(config, car="fast"))[0]
    assert reusable_car(screened, loaded.model, data.val, config) == (
        False, "it screened some filters (fast CAR); the run measures every filter (exact CAR)")
    # the run acts on the same decision: reused for the matching config, recomputed for the other seed
    events = []
    for cfg, expected in ((config, True), (replace(config, seed=1), False)):
        task = ClassificationTask(loaded.spec.input, data, cfg, analysis=car)
        out = task.analyse(copy.deepcopy(loaded.model), threading.Event(), lambda f, m=None: events.append(m))
        assert ("reused_from" in out) is expected


def test_working_sets_recall_by_token_then_latest():
    sets = JobRegistry().working_sets
    assert sets.recall("a") is None
    sets.remember("a", "set of tab a")
    sets.remember("b", "set of tab b")
    assert sets.recall("a") == "set of tab a" and sets.recall("unknown") == "set of tab b"
    assert sets.recall(None) == "set of tab b"
    sets.clear()
    assert sets.recall("a") is None


def test_phased_job_passes_results_on_reports_phases_and_cancels_between_them():
    gate, seen = threading.Event(), []

    def second(results):
        seen.append(results["read"])
        gate.wait(10)
        return results["read"] * 2

    reg = JobRegistry()
    job = reg.start("load", phased_job([("read", lambda r: 21), ("measure", second), ("never", lambda r: 1 / 0)]))
    wait_until(lambda: seen)
    snap = job.snapshot()
    assert snap.message == "measure (phase 2 of 3)" and abs(snap.progress - 1 / 3) < 1e-9
    job.request_cancel()
    gate.set()
    assert job.wait(10) and job.snapshot().state == "cancelled"  # the third phase never ran
    done = reg.start("load", phased_job([("read", lambda r: 21), ("measure", lambda r: r["read"] * 2)]))
    assert done.wait(10) and done.snapshot().result == {"read": 21, "measure": 42}

    def refuse(results):
        raise PruneScopeError("The data set could not be used: no images.")

    failed = reg.start("load", phased_job([("read", refuse)]))
    assert failed.wait(10) and failed.snapshot().error == "The data set could not be used: no images."
