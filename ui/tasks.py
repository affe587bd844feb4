"""The UI task registry (issue 25: a task is one plug-in): each task's UI is one module, registered here by
its ``NAME``; the pages call ``task_ui(state.task).member(...)`` (or ``task_ui(run.task)``) and never branch on a
task name. A new task's UI is a module with every member of :data:`INTERFACE` added to :data:`PLUGINS`
(``tests/unit/test_ui_task_plugins.py`` checks both). Where a task has nothing for a panel, its function draws
nothing or returns the neutral value.

The interface, by page (``state``: the session's ``ui.state.AppState``; ``run``: a ``core.runs.Run``):

Facts
    ``NAME``: the task's name (``AppState.task``, a run's recorded task); ``LABEL``: its label in the Load
    page's task choice; ``METRIC``: the metric as shown (``Accuracy``, ``mAP@0.5``); ``MODEL_WORD``: what the
    sidebar calls the loaded model; ``PRUNE_SETTINGS``: the Prune page's config class (``config``), widget key
    prefix (``prefix``), score-images slider (``images``: label, low, high, step) and step limit (``steps``).
Load
    ``sample_tab(state)``: the "Bundled sample" tab; ``upload_form(state)``: the "Upload your own" tab;
    ``model_shape(state)``: classes and input of the loaded model (also on Home); ``input_details(state)``: the
    rest of the "Current model" line; ``loaded_details(state)``: everything below the baseline metrics.
Analyse
    ``analysis_panel(state)``: the whole analysis of the loaded model.
Prune
    ``run_name(state)``: the model's name in a run folder's name; ``prune_job(state, config, run_dir)``: the
    job function; ``extra_settings(state, defaults, cluster, max_drop, extra, running)``: the settings below
    the shared three columns (into ``extra``), returns whether they can be used; ``budget_extras(defaults,
    extra, running)``: budget settings between "Clusters per step" and the latency toggle;
    ``analyse_car_setting(defaults, running)``: the "store a CAR analysis" choice after the latency toggle;
    ``config_panels(state, config, running)``: panels below the settings (reuse note, estimate, staircase).
Review
    ``per_class_view(base, pick)``: the per-class change beside the widths; ``removed_filters_view(run, sel,
    pick, removed, car_groups)``: below the removed clusters' table; ``recovery_section(run, hist, pick)``:
    a recovery fine-tune section.
Export
    ``bundle_view(manifest, bundle_dir, zip_path)``: the task's own view of a bundle; returns whether it drew
    one (the Export page's view, of a classifier's bundle, follows when it did not).
"""
from __future__ import annotations

from types import ModuleType

from ui import classification, detection

FACTS = ("NAME", "LABEL", "METRIC", "MODEL_WORD", "PRUNE_SETTINGS")
FUNCTIONS = ("sample_tab", "upload_form", "model_shape", "input_details", "loaded_details", "analysis_panel",
             "run_name", "prune_job", "extra_settings", "budget_extras", "analyse_car_setting", "config_panels",
             "per_class_view", "removed_filters_view", "recovery_section", "bundle_view")
INTERFACE = FACTS + FUNCTIONS

PLUGINS: dict[str, ModuleType] = {p.NAME: p for p in (classification, detection)}  # in the Load page's order
DEFAULT_TASK = next(iter(PLUGINS))  # what a record without a task was made by


def task_ui(name: str) -> ModuleType:
    """The UI plug-in of the task ``name``."""
    try:
        return PLUGINS[name]
    except KeyError:
        raise KeyError(f"No UI for the task {name!r}; the registered tasks are {', '.join(PLUGINS)} "
                       "(ui/tasks.py: PLUGINS).") from None


def task_labels() -> dict[str, str]:
    """The Load page's task choice: label -> task name, in registration order."""
    return {p.LABEL: name for name, p in PLUGINS.items()}


def metric_name(task: str) -> str:
    """The metric the task measures, as shown (``Accuracy``, ``mAP@0.5``)."""
    return task_ui(task).METRIC
