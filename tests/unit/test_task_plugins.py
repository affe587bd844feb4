"""A task is one plug-in in core (issue 25): nothing in ``core/`` compares a task with a literal task name, the
criteria are chosen by what they need rather than by name, and the registry refuses what it does not know with
one clear line (``core.tasks.registry``)."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from core import criteria
from core.errors import PruneScopeError, SettingsError
from core.tasks.registry import DEFAULT_TASK, run_task_name, task_names, task_plugin

ROOT = Path(__file__).resolve().parents[2]
LITERAL_TASK_COMPARISON = re.compile(r"""task ?(==|!=) ?["']|["'](classification|detection)["'] ?(==|!=)""")
LITERAL_CRITERION_COMPARISON = re.compile(r"""criterion ?(==|!=|in) ?[("']""")


def scan(pattern: re.Pattern, roots: tuple[str, ...]) -> list[str]:
    return [f"{path.relative_to(ROOT).as_posix()}:{n}: {line.strip()}"
            for root in roots for path in sorted((ROOT / root).rglob("*.py"))
            for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1) if pattern.search(line)]


def test_the_scans_see_a_branch():
    assert LITERAL_TASK_COMPARISON.search('    if run.task != "classification":')
    assert LITERAL_TASK_COMPARISON.search("export = x if Run(d).task == 'detection' else y")
    assert LITERAL_CRITERION_COMPARISON.search('if self.config.criterion == "car":')
    assert LITERAL_CRITERION_COMPARISON.search('if config.criterion in ("taylor",):')
    assert not LITERAL_TASK_COMPARISON.search('if run.task != NAME:')


def test_core_never_branches_on_a_task_name():
    """The CLI, the jobs, the runs, the recovery and the export ask ``task_plugin(name)`` instead."""
    assert scan(LITERAL_TASK_COMPARISON, ("core",)) == []


def test_no_branch_on_a_criterion_name_outside_the_criteria():
    """A criterion says what it needs (``Criterion.needs``) and what it costs (``scoring_work``)."""
    found = [f for f in scan(LITERAL_CRITERION_COMPARISON, ("core", "ui", "pages"))
             if not f.startswith("core/criteria.py:")]
    assert found == []


def test_the_built_in_tasks_are_registered_with_their_hooks():
    assert task_names()[:2] == ("classification", "detection") and DEFAULT_TASK == "classification"
    for name in ("classification", "detection"):
        plugin = task_plugin(name)
        assert plugin.name == name and plugin.config_class.task == name
        for hook in ("evaluate_cli", "prune_cli", "export_cli", "export_run", "rebuild_model"):
            assert callable(plugin.hook(hook)), (name, hook)
    assert task_plugin("classification").recovers and not task_plugin("detection").recovers


def test_criteria_are_offered_by_what_the_task_provides():
    assert criteria.names("classification") == ("car", "l1", "taylor", "random")
    assert criteria.names("detection") == ("car", "l1", "random")  # no gradients supplied: no Taylor
    assert criteria.get("car", "detection").measures_removals and not criteria.get("l1").measures_removals


def test_the_registry_refuses_an_unknown_task_in_one_line():
    with pytest.raises(SettingsError, match="Unknown task 'segmentation'. Known tasks: classification, detection"):
        task_plugin("segmentation")
    assert run_task_name({}) == DEFAULT_TASK  # a run folder from before tasks were recorded
    assert run_task_name({"task": "detection"}) == "detection"
    for damaged in ("regression", None, ["detection"]):  # never silently a classifier (its model would not rebuild)
        with pytest.raises(PruneScopeError, match="config.json names the task .* which this tool does not know"):
            run_task_name({"task": damaged}, "r1")
