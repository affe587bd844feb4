"""The detection task's registry entry (``core.tasks.registry``): an SSD's mAP@0.5, its CLI, export and rebuild."""
from __future__ import annotations

from ...errors import PruneScopeError
from ..registry import TaskPlugin, register_task
from .cli import add_detection_args, cmd_evaluate_detection, cmd_export_detection, cmd_prune_detection
from .export import export_detection_run
from .models import output_layer_names, rebuild_detector
from .task import METRIC, NAME, DetectionPruneConfig


def rebuild_run_detector(run, trusted: bool):
    """A detection run's original detector, fresh, from ``config.json``'s ``detector_config`` (no pickle)."""
    detector_config = run.config.get("detector_config")
    if not isinstance(detector_config, dict):
        raise PruneScopeError(f"{run.name}/config.json is damaged (no detector_config).")
    return rebuild_detector(detector_config)


PLUGIN = register_task(TaskPlugin(
    name=NAME, label="Object detection (SSD)", metric_name=METRIC, config_class=DetectionPruneConfig,
    provides=frozenset({"filter_costs", "cluster_costs"}), recovers=False,
    evaluate_cli=cmd_evaluate_detection, prune_cli=cmd_prune_detection, export_cli=cmd_export_detection,
    cli_help="an SSD (--arch sample_ssd | ssd_mobilenet_v2 | ssdlite320_mobilenet_v3_large) on a Pascal VOC "
             "zip/folder; the metric is mAP@0.5",
    add_cli_args=add_detection_args, export_run=export_detection_run, rebuild_model=rebuild_run_detector,
    run_output_layers=lambda run: output_layer_names(run.fresh_model())))
