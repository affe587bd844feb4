"""CLI of the recovery fine-tune: ``python -m core recover RUN`` and ``prune --recover-epochs N``."""
from __future__ import annotations

import argparse
import sys

from .cli_common import add_device_args, add_precision_arg, announce_device, print_summary, progress_printer
from .device import set_threads
from .eta import PhaseProgress, format_duration
from .recovery import KEEP_RULES, RecoveryConfig, recover_run_step, recovery_device
from .runs import Run

RECOVERY_DEFAULTS = RecoveryConfig()


def add_recover_command(sub) -> None:
    rc = sub.add_parser("recover", help="recovery fine-tune of a run's step, appended to the run as a new step")
    rc.add_argument("run", help="run folder written by 'prune' or the app")
    rc.add_argument("--step", type=int, help="step to fine-tune (default: the smallest within the run's threshold)")
    rc.add_argument("--epochs", type=int, default=RECOVERY_DEFAULTS.epochs,
                    help=f"passes over the train split (default {RECOVERY_DEFAULTS.epochs})")
    add_recovery_options(rc, "")
    rc.add_argument("--keep", choices=KEEP_RULES, default=RECOVERY_DEFAULTS.keep,
                    help="which finished epoch the step keeps: the last of the cosine schedule (default) or the best "
                         "on the selection images (one more decision on them)")
    add_device_args(rc, default=None)
    add_precision_arg(rc, RECOVERY_DEFAULTS.precision)
    rc.add_argument("--trusted", action="store_true",
                    help="run the run's own pickle or model code even without a trust record in this workspace")
    rc.add_argument("--json", action="store_true")


def add_recovery_options(p: argparse.ArgumentParser, prefix: str) -> None:
    """``--kd``, ``--lr``, ``--batch-size`` (``prefix`` 'recover-' on the prune command)."""
    p.add_argument(f"--{prefix}kd", action="store_true",
                   help="distil from the original model (Hinton et al. 2015: alpha 0.5, temperature 4)")
    p.add_argument(f"--{prefix}lr", type=float, default=RECOVERY_DEFAULTS.lr,
                   help=f"peak learning rate of the cosine schedule (default {RECOVERY_DEFAULTS.lr:g})")
    p.add_argument(f"--{prefix}batch-size", type=int, default=RECOVERY_DEFAULTS.batch_size,
                   help=f"mini-batch size (default {RECOVERY_DEFAULTS.batch_size})")


def recovery_config(epochs: int, kd: bool, lr: float, batch_size: int, precision: str = "auto",
                    keep: str = RECOVERY_DEFAULTS.keep) -> RecoveryConfig:
    config = RecoveryConfig(epochs=epochs, lr=lr, batch_size=batch_size, distill=kd, precision=precision, keep=keep)
    config.validate()
    return config


def eta_printer():
    """A ``progress(PhaseProgress)`` callback printing the phase, its share and the time left on stderr."""
    show = progress_printer("  ")

    def report(p: PhaseProgress) -> None:
        show(p.fraction, f"{p.message} — {format_duration(p.eta_s)} left")

    return report


def cmd_recover(args) -> int:
    config = recovery_config(args.epochs, args.kd, args.lr, args.batch_size, args.train_precision, args.keep)
    set_threads(args.threads)
    run = Run(args.run)  # a bad path: one line, before any work
    step = args.step if args.step is not None else default_step(run)
    device = recovery_device(run, args.device)  # CUDA without a GPU: one line, before any work
    announce_device(device)
    record = recover_run_step(run.dir, step, config, progress=eta_printer(), trusted=args.trusted, device=device)
    print_summary(report_recovery(record), args.json)
    return 0


def default_step(run: Run) -> int:
    """The step the run's own threshold selects (what Export picks); the original when none was accepted."""
    return run.select_step(float(run.config.get("prune", {}).get("max_drop", 1.0)))


def recovery_note(record: dict) -> str | None:
    """What a recovery's figures alone do not say, for people (stderr): nothing was added (a cancel before
    the first epoch ended), or the new step scores below its source on the selection images; else None."""
    rec = record["recovery"]
    if record["step"] is None:
        return "recovery: cancelled before the first epoch finished; nothing was added to the run"
    if record["metric"] < rec["start_selection"]:
        return (f"recovery: step {record['step']} scores {record['metric'] * 100:.2f} % on the selection images, "
                f"below step {record['recovered_from']}'s {rec['start_selection'] * 100:.2f} % (a kept step reads "
                "high on the images that chose it); compare the test figures")
    return None


def report_recovery(record: dict) -> dict:
    """Say :func:`recovery_note` on stderr (when there is one); returns :func:`recovery_summary`."""
    note = recovery_note(record)
    if note:
        print(note, file=sys.stderr, flush=True)
    return recovery_summary(record)


def recovery_summary(record: dict) -> dict:
    """The recovery's figures for the JSON summary; ``kept`` False (``step`` None) when no epoch finished."""
    rec = record["recovery"]
    return {"step": record["step"], "kept": record["step"] is not None, "recovered_from": record["recovered_from"],
            "metric": record["metric"],
            "test_metric": record["test_metric"], "macs": record["macs"], "kd": rec["kd"],
            "best_epoch": rec["best_epoch"], "epochs": rec["epochs"], "cancelled": rec["cancelled"],
            "seconds": rec["seconds"], "device": rec.get("device")}
