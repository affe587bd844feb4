"""Analyse: which filters matter, by the task's own analysis of the loaded model (a classifier: CAR of every filter
as a background job, per-layer sensitivity, heat map, filter gallery, per-class CAR; a detector: CAR per layer
group)."""
from __future__ import annotations

from ui.common import need_model, setup_page
from ui.tasks import task_ui

state = setup_page("Analyse", "Which filters matter? CAR (Classification Accuracy Reduction) of a filter is the "
                   "selection accuracy lost when that one filter is removed: exact (every filter removed and "
                   "measured) or fast (screened to first order, exact only where it decides).")
need_model(state, "the analysis")
task_ui(state.task).analysis_panel(state)
