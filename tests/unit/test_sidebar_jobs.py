"""The sidebar's job list (issue 27 item 8): failures stay with their page and do not pile up."""
from __future__ import annotations

import time

from core.errors import PruneScopeError
from core.jobs import JobRegistry
from ui.common import job_line, sidebar_shown


def _finished(registry: JobRegistry, kind: str, fail: str | None = None, key: str | None = None):
    def fn(ctx):
        if fail:
            raise PruneScopeError(fail)
        return {"ok": True}

    job = registry.start(kind, fn, key=key)
    assert job.wait(10)
    time.sleep(0.01)  # distinct start times, as jobs started by a person have
    return job


def test_a_later_job_of_the_same_kind_replaces_old_failures():
    registry = JobRegistry()
    _finished(registry, "load", "This file is a pickle: tick 'I trust this file'", key="a")
    _finished(registry, "load", "The data set has 2 classes but the model outputs 10.", key="a")
    _finished(registry, "car", "CAR failed", key="m")
    ok = _finished(registry, "load", key="a")
    shown = sidebar_shown([j.snapshot() for j in registry.list()], (), time.time())
    assert [s.kind for s in shown] == ["load", "car"], "one line per kind, newest first"
    assert shown[0].id == ok.id and shown[0].state == "done", "the trust error is gone after the load that worked"
    line = job_line(shown[1])
    assert line.startswith("CAR analysis job failed (") and line.endswith("see the Analyse page")
    assert "CAR failed" not in line, "the failure itself is shown in full on its page"


def test_running_jobs_are_listed_and_hide_their_kinds_old_lines():
    registry = JobRegistry()
    _finished(registry, "prune", "boom")
    gate = __import__("threading").Event()
    running = registry.start("prune", lambda ctx: gate.wait(10), key="p2")
    try:
        shown = sidebar_shown([j.snapshot() for j in registry.list()], (), time.time())
        assert [s.id for s in shown] == [running.id]
    finally:
        gate.set()
        running.wait(10)
    old = sidebar_shown([j.snapshot() for j in registry.list()], (), time.time() + 3600)
    assert old == [], "jobs that ended long ago are not listed"
