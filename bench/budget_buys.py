"""What a time budget buys, before Start, against what budgeted runs reached.

    python bench/budget_buys.py RUN_DIR [RUN_DIR ...]

For each finished run folder (e.g. the upload runs ``bench/real_cifar.py --upload`` keeps under
``workspace/bench_real_cifar``): the pre-run estimate the Prune page shows for the run's own settings
(``core.estimate.estimate_prune_time``, rates measured now on this machine, the run's selection and training
image counts) and its "what the budget buys" range of MACs left; beside it the MACs left that the estimate
counted before, each removal summed per filter at the original widths with every simulated step taken (with no
recovery counted, the budgets of these runs bought every step); then what the run reached: its wall time, the
MACs left at the step it ships and at its last step. The run's model is rebuilt from the run folder
(``Run.original``, trusted: these are runs made here). Run it on an otherwise idle machine: the rates are timed now.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import sys
from pathlib import Path

from _common import machine, table

from core.estimate import _step_widths, estimate_prune_time, measure_rates
from core.evaluate import count_macs_params
from core.groups import PruningGraph
from core.prune import PruneConfig
from core.runs import Run
from core.training import resolve_precision


class PerFilterSum:
    """The saving the estimate counted before :class:`core.estimate.MacModel`: ``macs_per_filter`` per removed
    filter, at the original widths (a consumer's saving at its original output width)."""

    def __init__(self, groups):
        self.per_filter = {g.gid: g.macs_per_filter for g in groups}

    def saving(self, widths: dict[int, int], gid: int, new_width: int) -> float:
        return (widths[gid] - new_width) * self.per_filter[gid]


def old_fractions(model, spec, config: PruneConfig) -> dict:
    """The MACs left that the per-filter sum (the estimate before MacModel) gave at both ends, all steps taken."""
    groups = [g for g in PruningGraph(copy.deepcopy(model), spec.shape(1)).groups() if not g.left_alone]
    total = count_macs_params(model, spec)[0]
    budget = (1 - config.mac_target) * total if config.mac_target is not None else math.inf
    step_macs = None if not config.step_macs else config.step_macs * total
    out = {}
    for name, biggest in (("fast", True), ("slow", False)):
        saved: list[float] = []
        _step_widths(groups, config.cluster, budget, config.max_steps, biggest, config.clusters_per_step, step_macs,
                     saved, PerFilterSum(groups))
        out[name] = 1.0 - (saved[-1] / total if saved else 0.0)
    return out


def row(run_dir: Path) -> dict:
    run = Run(run_dir)
    prune = json.loads((run_dir / "config.json").read_text())["prune"]
    config = PruneConfig(**{k: v for k, v in prune.items() if k in {f.name for f in dataclasses.fields(PruneConfig)}})
    counts = run.config["data_options"]["split"]["counts"]
    model = run.original(trusted=True).model
    spec = run.spec.input
    rates = measure_rates(model, spec, config.batch_size, config.latency,
                          resolve_precision(config.train_precision, "cpu"))
    est = estimate_prune_time(model, run.spec, counts["selection"], config, rates=rates, n_train=counts["train"])
    buys = est.budget_buys or {}
    old = old_fractions(model, spec, config)
    status = json.loads((run_dir / "status.json").read_text())
    base = run.history[0]["macs"]
    shipped = run.select_step(config.max_drop)
    return {"run": run_dir.name, "budget min": f"{config.time_budget:g}" if config.time_budget else "none",
            "buys: MACs left (slow..fast)": (f"{buys['slow']['mac_fraction']:.0%}..{buys['fast']['mac_fraction']:.0%}"
                                             if buys else "-"),
            "before: per-filter sum, every step": f"{old['slow']:.0%}..{old['fast']:.0%}",
            "run wall min": f"{(status['updated'] - status['pid_start']) / 60:.1f}",
            "shipped: MACs left": f"{run.record(shipped)['macs'] / base:.0%} (step {shipped})",
            "last step: MACs left": f"{run.history[-1]['macs'] / base:.0%}"}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", type=Path, help="finished run folders")
    args = ap.parse_args()
    print(machine())
    rows = []
    for run_dir in args.runs:
        if not (run_dir / "history.jsonl").exists():
            print(f"{run_dir}: not a run folder; skipped")
            continue
        rows.append(row(run_dir))
    if rows:
        print(table(rows, list(rows[0])))
    return 0 if rows else 1


if __name__ == "__main__":
    sys.exit(main())
