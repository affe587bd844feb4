"""The classification task's registry entry (``core.tasks.registry``): its CLI commands, export and run rebuild."""
from __future__ import annotations

from ...engine import PruneConfig
from ...export import export_run
from ...runs import rebuild_classifier
from ..registry import TaskPlugin, register_task
from .cli import cmd_evaluate_classification, cmd_export_classification, cmd_prune_classification
from .task import METRIC, NAME

PLUGIN = register_task(TaskPlugin(
    name=NAME, label="Image classification", metric_name=METRIC, config_class=PruneConfig,
    provides=frozenset({"filter_costs", "cluster_costs", "gradients"}), recovers=True,
    evaluate_cli=cmd_evaluate_classification, prune_cli=cmd_prune_classification,
    export_cli=cmd_export_classification, export_run=export_run, rebuild_model=rebuild_classifier))
