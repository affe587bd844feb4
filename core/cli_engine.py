"""CLI commands of the pruning engine: analyse, prune, export."""
from __future__ import annotations

import sys
import time
from dataclasses import fields
from pathlib import Path

from .errors import PruneScopeError
from .jsonout import emit_json


def _progress_printer(prefix: str = ""):
    last = [0.0]

    def show(fraction: float, message: str) -> None:
        now = time.monotonic()
        if now - last[0] >= 1.0 or fraction >= 1.0:
            last[0] = now
            print(f"{prefix}[{fraction * 100:5.1f}%] {message}", file=sys.stderr, flush=True)

    return show


def add_commands(sub, add_model_args, add_data_args) -> None:
    an = sub.add_parser("analyse", aliases=["analyze"], help="CAR of every filter, per-class CAR and per-layer sensitivity into a run folder")
    add_model_args(an)
    add_data_args(an)
    an.add_argument("--images", type=int, default=500, help="validation images used for CAR (default 500)")
    an.add_argument("--out", required=True, help="run folder to write (created)")
    an.add_argument("--naive", action="store_true", help="one full evaluation per filter (reference, slow)")
    an.add_argument("--json", action="store_true")

    pr = sub.add_parser("prune", help="greedy cluster pruning with fine-tuning into a run folder")
    add_model_args(pr)
    add_data_args(pr)
    pr.add_argument("--out", required=True, help="run folder to write (created)")
    pr.add_argument("--criterion", default="car", help="car | l1 | taylor | random")
    pr.add_argument("--cluster", type=int, default=8, help="hardware cluster size c (widths stay multiples of c)")
    pr.add_argument("--max-drop", type=float, default=1.0, help="acceptable accuracy drop in points")
    pr.add_argument("--mac-target", type=float, help="stop at this fraction of the original MACs")
    pr.add_argument("--finetune-steps", type=int, help="default 40 (detection: 20)")
    pr.add_argument("--finetune-lr", type=float, help="default 0.01 (detection: 1e-4, AdamW)")
    pr.add_argument("--score-images", type=int, help="default 400 (detection: 128, the loss-screening subset)")
    pr.add_argument("--rescore-every", type=int, help="default 1 (detection: 10)")
    pr.add_argument("--max-steps", type=int, default=200)
    pr.add_argument("--no-latency", action="store_true", help="skip OpenVINO latency per step")
    pr.add_argument("--no-analysis", action="store_true", help="skip the full CAR analysis of the original")
    pr.add_argument("--json", action="store_true")
    from .detection.cli import add_detection_args

    add_detection_args(ev_parser(sub), pr)

    ex = sub.add_parser("export", help="OpenVINO IR FP16 + ONNX bundle of a run's step, with the original as fallback")
    ex.add_argument("--run", required=True, help="run folder written by 'prune' or the app")
    pick = ex.add_mutually_exclusive_group()
    pick.add_argument("--step", type=int, help="step to export (default: the last step)")
    pick.add_argument("--max-drop", type=float, help="export the smallest step within this accuracy drop (points)")
    ex.add_argument("--out", required=True, help="bundle folder to create (a .zip is written beside it)")
    ex.add_argument("--trusted", action="store_true",
                    help="run the run's own pickle or model code even without a trust record in this workspace")
    ex.add_argument("--json", action="store_true")


def _prepare_out(path: str) -> Path:
    out = Path(path)
    if out.exists() and any(out.iterdir()):
        raise PruneScopeError(f"{out} exists and is not empty; choose a new run folder.")
    out.mkdir(parents=True, exist_ok=True)
    return out


def cmd_analyse(args) -> int:
    from .car import compute_car
    from .cli import load_model_and_data
    from .workspace import atomic_write_json

    loaded, data = load_model_and_data(args)
    out = _prepare_out(args.out)
    result = compute_car(loaded.model, loaded.spec.input, data.val, n_images=args.images,
                         progress=_progress_printer(), fast=not args.naive)
    atomic_write_json(out / "car.json", result.to_dict())
    atomic_write_json(out / "analysis.json", {"model_spec": loaded.spec.to_dict(), "data_source": args.data})
    summary = {"run": str(out), "baseline_accuracy": result.baseline_accuracy, "n_images": result.n_images,
               "filters": sum(len(v) for v in result.car.values()), "groups": len(result.groups),
               "seconds": result.seconds}
    print_summary(summary, args.json)
    return 0


def ev_parser(sub):
    """The ``evaluate`` sub-parser, defined in ``cli``."""
    return sub.choices["evaluate"]


def config_from_args(args, config_class):
    """A pruning config from the command line; options left out keep the task's own defaults."""
    given = {"criterion": args.criterion, "cluster": args.cluster, "max_drop": args.max_drop,
             "mac_target": args.mac_target, "finetune_steps": args.finetune_steps, "finetune_lr": args.finetune_lr,
             "score_images": args.score_images, "rescore_every": args.rescore_every, "max_steps": args.max_steps,
             "latency": not args.no_latency, "seed": args.seed}
    for extra in ("optimizer", "exact_candidates", "map_images"):
        if extra in config_class.__dataclass_fields__:
            given[extra] = getattr(args, extra, None)
    config = config_class(**{k: v for k, v in given.items() if v is not None})
    config.validate()
    return config


def print_summary(summary: dict, as_json: bool) -> None:
    if as_json:
        emit_json(summary)
    else:
        for k, v in summary.items():
            print(f"{k}: {v}")


def cmd_prune(args) -> int:
    from .cli import load_model_and_data
    from .prune import Callbacks, PruneConfig, run_pruning

    if args.task == "detection":
        from .detection.cli import cmd_prune_detection

        return cmd_prune_detection(args)
    config = config_from_args(args, PruneConfig)
    config.analyse_car = not args.no_analysis
    loaded, data = load_model_and_data(args)
    out = _prepare_out(args.out)

    def on_step(r: dict) -> None:
        print(f"step {r['step']}: accuracy {r['accuracy'] * 100:.2f}%  MACs {r['macs'] / 1e6:.2f} M"
              + (f"  removed {len(r['removed']['filters'])} from {r['removed']['group']}" if r.get("removed") else ""),
              file=sys.stderr, flush=True)

    original_bytes = Path(args.model).read_bytes() if loaded.spec.pickled else None
    summary = run_pruning(loaded, data, config, out, Callbacks(_progress_printer("  "), on_step),
                          data_source=args.data, original_bytes=original_bytes,
                          data_options={"val_fraction": args.val_fraction, "seed": args.seed})
    print_summary(summary, args.json)
    return 0


def cmd_export(args) -> int:
    from .export import export_run
    from .runs import Run

    if Run(args.run).task == "detection":
        from .detection.cli import cmd_export_detection

        return cmd_export_detection(args)
    result = export_run(args.run, step=args.step, max_drop=args.max_drop, out_path=args.out,
                        progress=_progress_printer(), trusted=args.trusted)
    if args.json:
        emit_json(result)
    else:
        print(f"bundle: {result['bundle']}  (zip: {result['zip']})")
        print(f"step {result['step']}: NCS2 {'compatible' if result['ncs_compatible'] else 'NOT compatible'}; "
              f"verified: {result['verified']} (agreement {result['agreement'] * 100:.2f}%)")
        for p in result["ncs2_problems"]:
            print(f"  NCS2 problem: {p}")
    return _export_exit_code(result)


def _export_exit_code(result: dict) -> int:
    """0 for the NCS2-ready, verified bundle asked for; else the reason on stderr and a non-zero code."""
    from .export import EXIT_NOT_READY, bundle_shortfall

    shortfall = bundle_shortfall(result)
    if shortfall is None:
        return 0
    print(f"error: {shortfall}", file=sys.stderr)
    return EXIT_NOT_READY


COMMANDS = {"analyse": cmd_analyse, "analyze": cmd_analyse, "prune": cmd_prune, "export": cmd_export}
