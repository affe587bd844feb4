"""A task's UI is one plug-in (issue 25): the pages and ui modules ask ``ui.tasks.task_ui(name)`` for a task's
panels instead of comparing the task with a literal name, and every registered plug-in implements the whole
interface of ``ui/tasks.py`` (so a new task's UI module that misses a member fails here, not on a page)."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# the same pattern as `grep -rnE 'task ?(==|!=) ?"|task ?(==|!=) ?'"'"` over ui/, pages/ and streamlit_app.py
LITERAL_TASK_COMPARISON = re.compile(r"""task ?(==|!=) ?["']""")
MAX_LITERAL_COMPARISONS = 2


def _sources() -> list[Path]:
    return sorted([*(ROOT / "ui").rglob("*.py"), *(ROOT / "pages").rglob("*.py"), ROOT / "streamlit_app.py"])


def literal_task_comparisons() -> list[str]:
    return [f"{path.relative_to(ROOT).as_posix()}:{n}: {line.strip()}"
            for path in _sources() for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
            if LITERAL_TASK_COMPARISON.search(line)]


def test_the_scan_sees_the_pages_and_finds_a_comparison():
    names = {p.relative_to(ROOT).as_posix() for p in _sources()}
    assert {"ui/tasks.py", "pages/1_Load.py", "pages/3_Prune.py", "streamlit_app.py"} <= names
    assert LITERAL_TASK_COMPARISON.search('if state.task == "detection":')
    assert LITERAL_TASK_COMPARISON.search("x = 'Detector' if state.task=='detection' else 'Model'")
    assert not LITERAL_TASK_COMPARISON.search('by_name[n]["run"].task == run.task')


def test_no_branch_on_a_literal_task_name_outside_the_registry():
    found = literal_task_comparisons()
    assert len(found) <= MAX_LITERAL_COMPARISONS, "branches on a task name (ask ui.tasks.task_ui): " + "; ".join(found)
    assert all(f.startswith("ui/tasks.py:") for f in found), ("a task-name comparison outside ui/tasks.py "
                                                            "(ask ui.tasks.task_ui instead): " + "; ".join(found))


def _plugins():
    from ui.tasks import PLUGINS

    return sorted(PLUGINS.items())


def test_the_registry_holds_both_tasks_under_their_own_names():
    from ui.tasks import DEFAULT_TASK, PLUGINS, task_labels, task_ui

    assert list(PLUGINS) == ["classification", "detection"] and DEFAULT_TASK == "classification"
    assert all(plugin.NAME == name for name, plugin in PLUGINS.items())
    assert task_labels() == {"Image classification": "classification", "Object detection (SSD)": "detection"}
    assert task_ui("detection").METRIC == "mAP@0.5" and task_ui("classification").METRIC == "Accuracy"
    with pytest.raises(KeyError, match="No UI for the task 'regression'"):
        task_ui("regression")


def interface_problems(plugin) -> list[str]:
    """What a UI plug-in lacks of ``ui.tasks.INTERFACE``: a missing member, a function that is not callable or has
    no docstring."""
    from ui.tasks import FUNCTIONS, INTERFACE

    problems = [f"{m}: missing" for m in INTERFACE if not hasattr(plugin, m)]
    for m in FUNCTIONS:
        fn = getattr(plugin, m, None)
        if fn is not None and not callable(fn):
            problems.append(f"{m}: not callable")
        elif fn is not None and not (fn.__doc__ or "").strip():
            problems.append(f"{m}: no docstring")
    return problems


@pytest.mark.parametrize("name,plugin", _plugins(), ids=[n for n, _ in _plugins()])
def test_every_plugin_implements_the_whole_interface(name, plugin):
    from ui.tasks import FACTS, FUNCTIONS, INTERFACE

    assert INTERFACE == FACTS + FUNCTIONS
    assert interface_problems(plugin) == [], f"the UI plug-in {name!r} does not implement ui/tasks.py's interface"
    assert set(plugin.PRUNE_SETTINGS) == {"config", "prefix", "images", "steps"}


def test_the_interface_is_documented_in_the_registry():
    import ui.tasks

    doc = ui.tasks.__doc__
    assert [m for m in ui.tasks.INTERFACE if f"``{m}" not in doc] == []


def test_the_check_catches_a_plugin_missing_a_member():
    import types

    from ui.tasks import INTERFACE, PLUGINS

    partial = types.ModuleType("ui.regression")
    for member in INTERFACE:
        setattr(partial, member, getattr(PLUGINS["detection"], member))
    del partial.recovery_section
    partial.bundle_view = lambda manifest, bundle_dir, zip_path: False  # no docstring
    assert interface_problems(partial) == ["recovery_section: missing", "bundle_view: no docstring"]
