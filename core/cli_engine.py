"""CLI commands of the pruning engine: analyse, prune, export."""
from __future__ import annotations

import argparse

import contextlib

from . import criteria
from .car import CAR_METHODS, FAST_EXACT_FRACTION, compute_car
from .cli_common import (add_device_args, add_plan_args, add_precision_arg, add_ray_args, add_ray_recovery_arg, work_setting_from_args, announce_device, device_from_args,
                         load_model_and_data, prepare_out, print_summary, progress,
                         progress_printer)
from .clusters import PROFILES
from .distributed import open_pool
from .targets import DEFAULT_TARGET, TARGETS
from .prune import PruneConfig
from .engine import FINAL_STRETCH_EPOCHS, LAST_STRETCH_EPOCHS, RECOVER_MIRROR, RETRY_STRETCH_EPOCHS, STRETCH_EPOCHS
from .tasks.registry import DEFAULT_TASK, task_names, task_plugin
from .runs import Run
from .workspace import atomic_write_json


def default_help(field: str, what: str) -> str:
    """Help text naming each task's default of a ``PruneConfig`` field, read from the config classes."""
    defaults = {n: task_plugin(n).config_class.__dataclass_fields__[field].default
                for n in task_names() if task_plugin(n).config_class is not None}
    base = defaults.pop(DEFAULT_TASK, PruneConfig.__dataclass_fields__[field].default)
    others = ", ".join(f"{n}: {_value(d)}" for n, d in defaults.items() if d != base)
    return f"{what}; default {_value(base)}" + (f" ({others})" if others else "")


def _value(default) -> str:
    return "none" if default is None else f"{default:g}"


def add_commands(sub, add_model_args, add_data_args) -> None:
    an = sub.add_parser("analyse", aliases=["analyze"], help="CAR of every filter, per-class CAR and per-layer sensitivity into a run folder")
    add_model_args(an)
    add_data_args(an)
    an.add_argument("--images", type=int, default=500, help="selection images used for CAR (default 500)")
    an.add_argument("--out", required=True, help="run folder to write (created)")
    an.add_argument("--naive", action="store_true", help="one full evaluation per filter (reference, slow)")
    an.add_argument("--car", choices=CAR_METHODS, default="exact",
                    help="exact: measure every filter; fast: first-order screen of every filter, exact CAR for the "
                         f"lowest-screened {FAST_EXACT_FRACTION * 100:.0f} %% (the result says which figures are exact)")
    add_device_args(an)
    add_ray_args(an)
    an.add_argument("--json", action="store_true")

    pr = sub.add_parser("prune", help="greedy cluster pruning with fine-tuning into a run folder")
    add_model_args(pr)
    add_data_args(pr)
    pr.add_argument("--out", required=True, help="run folder to write (created)")
    pr.add_argument("--criterion", default="car", choices=criteria.names(), metavar="NAME",
                    help="; ".join(f"{n}: {criteria.label(n)}" + criterion_tasks_note(c) for n, c in criteria.REGISTRY.items()))
    pr.add_argument("--cluster", type=int, help="hardware cluster size c (widths stay multiples of c; default 8, "
                                                "or the --profile's)")
    pr.add_argument("--profile", metavar="NAME",
                    help="hardware profile that sets the cluster size: " + ", ".join(f"{n} (c={p.cluster})"
                                                                                      for n, p in PROFILES.items()))
    pr.add_argument("--max-drop", type=float, help=default_help("max_drop", "acceptable metric drop in points"))
    pr.add_argument("--mac-target", type=float, help="stop at this fraction of the original MACs")
    pr.add_argument("--finetune-steps", type=int, help=default_help("finetune_steps", "mini-batches after each step"))
    pr.add_argument("--finetune-lr", type=float, help=default_help("finetune_lr", "fine-tuning learning rate"))
    pr.add_argument("--score-images", type=int,
                    help=default_help("score_images", "images scored (detection: the loss-screening subset)"))
    pr.add_argument("--rescore-every", type=int, help=default_help(
        "rescore_every", "steps between full re-scores (in between only the pruned group is re-scored)"))
    pr.add_argument("--car", choices=CAR_METHODS, help="single-filter CAR: fast (first-order screen of every filter, "
                    "exact CAR for each group's shortlist; default) or exact (every filter)")
    add_device_args(pr)
    add_ray_args(pr)
    add_ray_recovery_arg(pr)
    add_plan_args(pr)
    pr.add_argument("--max-steps", type=int, help=default_help("max_steps", "step limit"))
    pr.add_argument("--clusters-per-step", type=int, metavar="K", help=default_help(
        "clusters_per_step", "the most clusters removed together per step (the best-ranked, one fine-tuning for "
        "all); halved after a step where they break the threshold"))
    pr.add_argument("--step-macs", type=float, metavar="F", help=default_help(
        "step_macs", "a step removes clusters until they save this fraction of the original MACs (at most K); "
        "0 = K clusters per step"))
    pr.add_argument("--time-budget", type=float, metavar="MIN",
                    help="minutes for the whole command, counted from its start (loading included): it stops stepping in "
                         "time for the last step's recovery and the control, keeping the finished steps")
    pr.add_argument("--no-latency", action="store_true", help="skip OpenVINO latency per step")
    pr.add_argument("--no-analysis", action="store_true", help="skip the full CAR analysis of the original")
    pr.add_argument("--recover-epochs", type=int, metavar="N", help=default_help(
        "recover_epochs", "when no cluster fits the threshold, a recovery fine-tune of N epochs becomes a step and "
        "the run goes on from it; the last pruning step is recovered once more, and only recovered steps ship; "
        "0 = stop there, any step ships (classification)"))
    pr.add_argument("--max-recoveries", type=int, metavar="R", help=default_help("max_recoveries",
                                                                                  "recoveries when stalled, the last step's not counted"))
    pr.add_argument("--recover-lr", type=float, help=default_help("recover_lr", "peak learning rate of a recovery"))
    pr.add_argument("--no-recover-kd", action="store_true",
                    help="recover with cross-entropy alone (default: distilled from the original, Hinton et al. 2015)")
    pr.add_argument("--stretch", action=argparse.BooleanOptionalAction, default=None,
                    help="where no cluster fits, first walk on past the threshold (--stretch-macs, --stretch-allowance) "
                         f"and keep those steps only if one recovery ({STRETCH_EPOCHS}x the epochs; up to "
                         f"{LAST_STRETCH_EPOCHS * STRETCH_EPOCHS}x for the last stretch the budget allows, which "
                         f"starts only with room for {FINAL_STRETCH_EPOCHS * STRETCH_EPOCHS}x; "
                         f"{RETRY_STRETCH_EPOCHS * STRETCH_EPOCHS}x for a second try after an undone one) brings the "
                         "model back (default: "
                         "on; --no-stretch recovers the model as it is)")
    pr.add_argument("--stretch-macs", type=float, metavar="F", help=default_help(
        "stretch_macs", "a stretch walks on until it removed this fraction of the original MACs; halved after one "
                        "that did not come back"))
    pr.add_argument("--stretch-allowance", type=float, metavar="X", help=default_help(
        "stretch_allowance", "a stretch's steps may each lose X times the threshold before its recovery "
                             "(none: not checked, the recovery decides)"))
    pr.add_argument("--recover-mirror", choices=RECOVER_MIRROR,
                    help="mirrored images in recoveries: auto (default: on when the original scores mirrored "
                         "selection images within 2 points of the originals), on, or off")
    add_precision_arg(pr, None)
    pr.add_argument("--no-control", action="store_true",
                    help="skip the control (the original given the same fine-tuning and recoveries, reported beside "
                         "the drop)")
    pr.add_argument("--json", action="store_true")
    add_task_args(ev_parser(sub), pr)

    ex = sub.add_parser("export", help="bundle of a run's step for an export target (default ncs2: IR FP16 + ONNX + "
                                       "MYRIAD blob), with the original as fallback")
    ex.add_argument("--run", required=True, help="run folder written by 'prune' or the app")
    pick = ex.add_mutually_exclusive_group()
    pick.add_argument("--step", type=int, help="step to export (default: the last step)")
    pick.add_argument("--max-drop", type=float, help="export the smallest step within this accuracy drop (points)")
    ex.add_argument("--out", required=True, help="bundle folder to create (a .zip is written beside it)")
    ex.add_argument("--target", choices=sorted(TARGETS), default=DEFAULT_TARGET,
                    help="export target: ncs2 (Intel NCS2, compiled by the MYRIAD compiler; default) or openvino-cpu "
                         "(FP32 IR for an x86/ARM host). Exit code 3 when the bundle is written but not ready for it")
    ex.add_argument("--trusted", action="store_true",
                    help="run the run's own pickle or model code even without a trust record in this workspace")
    ex.add_argument("--json", action="store_true")


def cmd_analyse(args) -> int:
    device = device_from_args(args)
    loaded, data = load_model_and_data(args)
    out = prepare_out(args.out)
    announce_device(device)
    setting = work_setting_from_args(args)
    if setting.where != "local":
        progress(f"starting Ray workers ({setting.describe()})")
    with contextlib.ExitStack() as stack:
        pool = open_pool(setting)
        if pool is not None:
            stack.callback(pool.close)  # every actor, and a local cluster the command started, ends with it
            progress(pool.describe())
        result = compute_car(loaded.model, loaded.spec.input, data.val, n_images=args.images,
                             progress=progress_printer(), fast=not args.naive, method=args.car, device=device, pool=pool)
    atomic_write_json(out / "car.json", result.to_dict())
    atomic_write_json(out / "analysis.json", {"model_spec": loaded.spec.to_dict(), "data_source": args.data})
    summary = {"run": str(out), "baseline_accuracy": result.baseline_accuracy, "n_images": result.n_images,
               "filters": sum(len(v) for v in result.car.values()), "groups": len(result.groups),
               "exact_filters": result.n_exact, "mode": result.mode, "seconds": result.seconds,
               "device": str(device),
               "where": {k: v for k, v in result.where.items() if k in ("where", "address", "ablations_by_place", "events")}}
    print_summary(summary, args.json)
    return 0


def criterion_tasks_note(criterion) -> str:
    """`` (classification only)`` for a criterion not every task supplies what it needs; empty otherwise."""
    tasks = criteria.tasks_of(criterion)
    return "" if len(tasks) == len(task_names()) else f" ({', '.join(tasks) or 'no task'} only)"


def add_task_args(evaluate, prune) -> None:
    """``--task`` on evaluate and prune (the registry's tasks), then each task's own flags."""
    helps = "; ".join(f"{n}: {task_plugin(n).cli_help}" for n in task_names() if task_plugin(n).cli_help)
    for p in (evaluate, prune):
        p.add_argument("--task", choices=task_names(), default=DEFAULT_TASK, help=helps or None)
    for name in task_names():
        if task_plugin(name).add_cli_args is not None:
            task_plugin(name).add_cli_args(evaluate, prune)


def ev_parser(sub):
    """The ``evaluate`` sub-parser, defined in ``cli``."""
    return sub.choices["evaluate"]


def cmd_prune(args) -> int:
    """``prune``: the task's own command (``--task``, ``core.tasks.registry``)."""
    return task_plugin(args.task).hook("prune_cli")(args)


def cmd_export(args) -> int:
    """``export``: the command of the task the run records."""
    return task_plugin(Run(args.run).task).hook("export_cli")(args)


COMMANDS = {"analyse": cmd_analyse, "analyze": cmd_analyse, "prune": cmd_prune, "export": cmd_export}
