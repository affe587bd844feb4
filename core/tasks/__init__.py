"""The tasks the one pruning loop (``core.engine``) runs, one plug-in each.

- ``core.tasks.base``: the ``Task`` protocol, what the loop calls (metric, decision, scoring, fine-tuning);
- ``core.tasks.registry``: every task by name (``TaskPlugin``: label, metric, config class, CLI commands,
  export entry, run rebuild), so that the CLI, the jobs, the runs and the export never branch on a name;
- ``core.tasks.classification.task``: top-1 accuracy, exact CAR, cross-entropy;
- ``core.tasks.detection``: an SSD's mAP@0.5, MultiBox-loss screen + exact mAP (a package: data, models,
  loss, metrics, export, CLI and the task itself in ``task``).

This ``__init__`` imports nothing, so that ``core.tasks.detection.postprocess`` stays importable without torch
(it is copied into the deploy script as it is).
"""
