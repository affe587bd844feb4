"""Every task the tool knows, by name: one ``TaskPlugin`` each, so that nothing outside a task branches on its name.

The CLI (``evaluate`` / ``prune`` / ``export``), the background jobs, run reading (``core.runs.Run``), the
recovery fine-tune and the export entry ask ``task_plugin(name)`` for what differs between tasks; the one
pruning loop (``core.engine``) asks the ``Task`` object itself (``core.tasks.base``). The criteria read
``provides``: a criterion is offered for a task only when the task supplies what it ``needs``
(``core.criteria.Criterion.needs``).

The built-in tasks are loaded on first use by module name (``BUILTIN``), as package entry points are, so this
module imports no task and every task module may import it. A new task is one module that calls
``register_task(TaskPlugin(...))`` at import (see docs/extending.md, "Adding a task", and the regression task
of ``tests/tasks/test_add_a_task.py``).
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Callable

from ..errors import PruneScopeError, SettingsError

# Name -> the module whose import registers it. Runs from before the task was recorded are classification.
BUILTIN = {"classification": "core.tasks.classification.plugin", "detection": "core.tasks.detection.plugin"}
DEFAULT_TASK = "classification"

_REGISTRY: dict[str, "TaskPlugin"] = {}


@dataclass(frozen=True)
class TaskPlugin:
    """What the tool outside the loop needs of one task.

    ``name``: the task's key (``config.json``'s ``task``, ``--task``); ``label``: how the pages name it;
    ``metric_name`` / ``metric_unit``: what a record's ``metric`` (a fraction 0..1) is, shown in the unit;
    ``config_class``: its ``core.engine.PruneConfig`` (sub)class; ``provides``: what its ``ScoreContext``
    supplies to criteria (``filter_costs``, ``cluster_costs``, ``gradients``); ``recovers``: whether a run's
    step can get the recovery fine-tune (``core.recovery``).

    Hooks (None: the tool says the task does not offer it):

    - ``evaluate_cli(args) -> int``, ``prune_cli(args) -> int``, ``export_cli(args) -> int``: the CLI commands
      (an exit code); ``add_cli_args(evaluate_parser, prune_parser)``: the task's own flags;
    - ``export_run(run_dir, step=, max_drop=, out_path=, progress=, target=) -> dict``: one step of a run as a
      bundle (``core.bundle``);
    - ``rebuild_model(run, trusted) -> nn.Module``: a run's original model, fresh, from its folder;
    - ``run_output_layers(run) -> list[str] | None``: layers a run never prunes (None: the classifier output).
    """

    name: str
    label: str
    metric_name: str
    metric_unit: str = "%"
    config_class: type | None = None
    provides: frozenset[str] = frozenset()
    recovers: bool = False
    cli_help: str = ""  # what ``--task NAME`` means, for the CLI's help
    evaluate_cli: Callable[[Any], int] | None = None
    prune_cli: Callable[[Any], int] | None = None
    export_cli: Callable[[Any], int] | None = None
    add_cli_args: Callable[[Any, Any], None] | None = None
    export_run: Callable[..., dict] | None = None
    rebuild_model: Callable[[Any, bool], Any] | None = None
    run_output_layers: Callable[[Any], Any] = field(default=lambda run: None)

    def hook(self, name: str) -> Callable:
        """The hook ``name``; SettingsError saying the task does not offer it when it is None."""
        fn = getattr(self, name)
        if fn is None:
            raise SettingsError(f"The {self.name} task does not offer {name.replace('_', ' ')}.")
        return fn


def register_task(plugin: TaskPlugin) -> TaskPlugin:
    """Make ``plugin`` a task everywhere (CLI ``--task``, runs, criteria, export); returns it.

    Registering a name again replaces the entry (a module reloaded in a test); ValueError for an empty name."""
    if not plugin.name or not plugin.name.isidentifier():
        raise ValueError(f"A task needs a name that is an identifier; got {plugin.name!r}.")
    _REGISTRY[plugin.name] = plugin
    return plugin


def unregister_task(name: str) -> None:
    """Remove a task registered by :func:`register_task` (a test's task, after the test); a built-in task is
    loaded again on next use."""
    _REGISTRY.pop(name, None)


def _load_builtin() -> None:
    for name, module in BUILTIN.items():
        if name not in _REGISTRY:
            importlib.import_module(module)


def task_names() -> tuple[str, ...]:
    """Every registered task's name, the built-in ones first."""
    _load_builtin()
    return tuple(BUILTIN) + tuple(n for n in _REGISTRY if n not in BUILTIN)


def task_plugin(name: str) -> TaskPlugin:
    """The task ``name``; SettingsError naming the known tasks otherwise."""
    _load_builtin()
    if name not in _REGISTRY:
        raise SettingsError(f"Unknown task '{name}'. Known tasks: {', '.join(task_names())}.")
    return _REGISTRY[name]


def run_task_name(config: dict, run_name: str = "the run") -> str:
    """The task a run's ``config.json`` records: the default for a run from before tasks were recorded (no
    ``task`` key); PruneScopeError naming the known tasks for any other value it does not know (a damaged
    folder, or one written by a tool with another task), never a silent fallback that rebuilds the wrong model."""
    if "task" not in config:
        return DEFAULT_TASK
    name = config["task"]
    if isinstance(name, str) and name in task_names():
        return name
    raise PruneScopeError(f"Run {run_name}: config.json names the task {name!r}, which this tool does not know "
                          f"(known tasks: {', '.join(task_names())}); the run is damaged or from another tool.")
