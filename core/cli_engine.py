"""CLI commands of the pruning engine: analyse, prune, export."""
from __future__ import annotations

import contextlib
import sys
from pathlib import Path

from . import criteria
from .car import CAR_METHODS, FAST_EXACT_FRACTION, compute_car
from .cli_common import (add_device_args, add_plan_args, add_ray_args, add_ray_recovery_arg, work_setting_from_args, announce_device, config_from_args, device_from_args,
                         export_exit_code, load_model_and_data, prepare_out, print_bundle, print_summary, progress,
                         progress_printer, removal_text, run_interruptible, summary_exit_code)
from .claim import describe_claim
from .clusters import PROFILES
from .distributed import open_pool
from .detection.cli import add_detection_args, cmd_export_detection, cmd_prune_detection
from .tasks.detection import DetectionPruneConfig
from .export import export_run
from .targets import DEFAULT_TARGET, TARGETS
from .jsonout import emit_json
from .prune import Callbacks, PruneConfig, run_pruning
from .runs import Run
from .workspace import atomic_write_json


def default_help(field: str, what: str) -> str:
    """Help text naming each task's default of a ``PruneConfig`` field, read from the config classes."""
    cls, det = PruneConfig.__dataclass_fields__[field].default, DetectionPruneConfig.__dataclass_fields__[field].default
    return f"{what}; default {_value(cls)}" + ("" if det == cls else f" (detection: {_value(det)})")


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
                    help="; ".join(f"{n}: {criteria.label(n)}" + ("" if len(c.tasks) > 1 else f" ({c.tasks[0]} only)")
                                   for n, c in criteria.REGISTRY.items()))
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
                    help="minutes for the whole run: it stops before a step would pass them, keeping the finished steps")
    pr.add_argument("--no-latency", action="store_true", help="skip OpenVINO latency per step")
    pr.add_argument("--no-analysis", action="store_true", help="skip the full CAR analysis of the original")
    pr.add_argument("--recover-epochs", type=int, metavar="N", help=default_help(
        "recover_epochs", "when no cluster fits the threshold, a recovery fine-tune of N epochs becomes a step and "
        "the run goes on from it (also once at the MAC target); 0 = stop there (classification)"))
    pr.add_argument("--max-recoveries", type=int, metavar="R", help=default_help("max_recoveries",
                                                                                  "recoveries per run"))
    pr.add_argument("--recover-lr", type=float, help=default_help("recover_lr", "peak learning rate of a recovery"))
    pr.add_argument("--no-recover-kd", action="store_true",
                    help="recover with cross-entropy alone (default: distilled from the original, Hinton et al. 2015)")
    pr.add_argument("--no-control", action="store_true",
                    help="skip the control (the original given the same fine-tuning and recoveries, reported beside "
                         "the drop)")
    pr.add_argument("--json", action="store_true")
    add_detection_args(ev_parser(sub), pr)

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


def ev_parser(sub):
    """The ``evaluate`` sub-parser, defined in ``cli``."""
    return sub.choices["evaluate"]


def cmd_prune(args) -> int:
    if args.task == "detection":
        return cmd_prune_detection(args)
    config = config_from_args(args, PruneConfig)
    config.analyse_car = not args.no_analysis
    device = device_from_args(args)
    loaded, data = load_model_and_data(args)
    out = prepare_out(args.out)
    announce_device(device)
    printer = progress_printer("  ")
    original_bytes = loaded.pickle_bytes  # the bytes that were unpickled, never the file read again (issue 28)
    summary = run_interruptible(lambda cancel: run_pruning(
        loaded, data, config, out, Callbacks(step=print_step, event=printer.event), cancel=cancel,
        data_source=args.data, original_bytes=original_bytes,
        data_options={"val_fraction": args.val_fraction, "seed": args.seed,
                      "test_fraction": data.split.get("test_fraction", 0.0), "split": data.split_record()}))
    if summary.get("claim"):
        print(f"claim: {describe_claim(summary['claim'])}", file=sys.stderr)
    no_step_advice(out)
    print_summary(summary, args.json)
    return summary_exit_code(summary)


def no_step_advice(out: Path) -> None:
    """On stderr, for a run that finished without keeping a pruning step: why and what to change
    (``core.advice.run_advice``, the advice Review shows, naming the flags)."""
    from .advice import run_advice
    from .runs import Run

    advice = run_advice(Run(out), interface="cli")
    for line in (advice.lines() if advice else []):
        print(line, file=sys.stderr)


def print_step(r: dict) -> None:
    """One line per accepted step: selection accuracy with its paired drop and interval, test beside it."""
    line = f"step {r['step']}: accuracy {r['metric'] * 100:.2f}%"
    paired = r.get("paired") or {}
    if r["step"] and "selection" in paired:
        sel = paired["selection"]
        line += f" (drop {sel['drop_points']:+.2f}, 95 % CI {sel['ci_low_points']:+.2f}..{sel['ci_high_points']:+.2f})"
    if r.get("test_metric") is not None:
        line += f"  test {r['test_metric'] * 100:.2f}%"
        if r["step"] and "test" in paired:
            line += f" (drop {paired['test']['drop_points']:+.2f})"
    line += f"  MACs {r['macs'] / 1e6:.2f} M"
    line += removal_text(r)
    print(line, file=sys.stderr, flush=True)
    if r.get("resolution_warning"):
        progress(f"warning: {r['resolution_warning']}")
    if r["step"] == 0 and r.get("latency_note"):  # once: the original's, e.g. a model OpenVINO cannot convert
        progress(f"note: latency {r['latency_note']}")


def cmd_export(args) -> int:
    if Run(args.run).task == "detection":
        return cmd_export_detection(args)
    result = export_run(args.run, step=args.step, max_drop=args.max_drop, out_path=args.out,
                        progress=progress_printer(), trusted=args.trusted, target=args.target)
    if result.get("unverified"):
        progress(f"note: {result['unverified']}")
    if args.json:
        emit_json(result)
    else:
        print_bundle(result, f"agreement {result['agreement'] * 100:.2f}%")
        rep = (result.get("reproduced") or {}).get("pruned")
        if rep:
            print(f"reproduced: step {rep['step']} records {rep['recorded'] * 100:.2f}%, re-measured "
                  f"{rep['measured'] * 100:.2f}% on its {rep['n_images']} selection images")
    return export_exit_code(result)


COMMANDS = {"analyse": cmd_analyse, "analyze": cmd_analyse, "prune": cmd_prune, "export": cmd_export}
