"""What every CLI command shares: the model/data flags, loading them, progress on stderr, run folders.

The leaf of the CLI module tree: ``core.cli`` (the entry point), ``core.cli_engine`` (analyse, prune,
export) and ``core.tasks.detection.cli`` (the detection task) import it, and it imports none of them.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

import torch

from .car import check_image_count
from .clusters import get_profile
from .data import check_split_options
from .device import DEVICES, describe, resolve_device, set_threads
from .errors import ModelLoadError, PruneScopeError, SettingsError
from .eta import EtaTracker, format_duration
from .export import EXIT_NOT_READY, bundle_shortfall
from .integrity import MAX_SIDECAR_BYTES, read_bounded
from .jsonout import emit_json
from .plan import PrunePlan
from .runs import process_start_time, removals
from .training import PRECISIONS
from .models import default_input_spec, load_model, open_input_spec
from .plausibility import quick_check
from .sources import load_dataset

EXIT_USER_ERROR = 2


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="weights file (.pt/.pth) or sample:NAME")
    p.add_argument("--arch", help="architecture of a state dict (e.g. resnet18, sample_resnet)")
    p.add_argument("--trusted", action="store_true",
                   help="allow loading a pickled module or running --model-code (both run code from the file)")
    p.add_argument("--model-code", metavar="PATH",
                   help="Python file defining a custom architecture; --model is then its weights (needs --trusted)")
    p.add_argument("--model-class", metavar="NAME", help="class or factory function in --model-code that builds the model")
    p.add_argument("--model-args", metavar="JSON",
                   help='arguments for --model-class: a JSON object (keywords, e.g. \'{"num_classes": 4}\') or list')
    p.add_argument("--input-size", type=int, nargs=2, metavar=("H", "W"), help="model input size (default: per architecture)")
    p.add_argument("--mean", type=float, nargs="+", help="mean of the model's normalisation, one value per input channel")
    p.add_argument("--std", type=float, nargs="+", help="std of the model's normalisation, one value per input channel")


def add_device_args(p: argparse.ArgumentParser, default: str | None = "auto") -> None:
    """``--device`` and ``--threads``; ``default`` None: a run's own device (``recover``: where it pruned)."""
    p.add_argument("--device", choices=DEVICES, default=default,
                   help="where CAR, fine-tuning and evaluation run: auto (CUDA when PyTorch sees a GPU), cpu or cuda"
                        + ("" if default else " (default: where the run pruned, when this machine has it)"))
    p.add_argument("--threads", type=int, metavar="N",
                   help="CPU threads for PyTorch (default: OMP_NUM_THREADS when set, else the cores this process may use)")


def add_precision_arg(p: argparse.ArgumentParser, default: str | None) -> None:
    """``--train-precision``: the arithmetic of fine-tuning and recoveries (``core.training.PRECISIONS``)."""
    p.add_argument("--train-precision", choices=PRECISIONS, default=default,
                   help="arithmetic of fine-tuning and recoveries: auto (default: bf16 mixed precision where the "
                        "device computes bfloat16 natively, else fp32; detection: fp32 only), fp32 or bf16; accuracy is measured in fp32")


def add_ray_args(p: argparse.ArgumentParser) -> None:
    """``--ray-address`` and ``--ray-workers``: where CAR's ablations run (``core.distributed``)."""
    p.add_argument("--ray-address", metavar="ADDR",
                   help="score CAR on an existing Ray cluster: 'auto' (the cluster this machine belongs to) or "
                        "ray://HOST:10001 (its head's Ray Client port); default: this process")
    p.add_argument("--ray-workers", type=int, metavar="N",
                   help="Ray workers for CAR: without --ray-address, a local Ray cluster of N workers started for this "
                        "command and stopped after it; with it, N workers on that cluster (default: one per CPU)")


def add_ray_recovery_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ray-recovery", action="store_true",
                   help="run the recoveries on the Ray workers too (Ray Train TorchTrainer, DDP, the same schedule, "
                        "distillation and best-epoch rule); needs --ray-address or --ray-workers")


def work_setting_from_args(args):
    """The ``core.distributed.WorkSetting`` of ``--ray-address`` / ``--ray-workers`` (checked)."""
    from .distributed import WorkSetting

    return WorkSetting(getattr(args, "ray_address", None), getattr(args, "ray_workers", None)).validate()


def device_from_args(args):
    """Resolve ``--device`` and set ``--threads`` before any work (CUDA without a GPU: ``SettingsError``);
    :func:`announce_device` says which device runs once the inputs are checked."""
    device = resolve_device(args.device)
    set_threads(args.threads)
    return device


def announce_device(device) -> None:
    progress(f"device: {describe(device, torch.get_num_threads())}")


def add_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help="ImageFolder zip or folder, or sample:NAME")
    p.add_argument("--val-fraction", type=float, default=0.2,
                   help="share of a data set without train/ and val/ folders that becomes selection images (see "
                        "'python -m core glossary')")
    p.add_argument("--test-fraction", type=float,
                   help="test images, reported and never used for a decision: share of all images when the data is "
                        "not pre-split (default 0.2), of val/ when it is (default 0.5; a test/ folder is used as is); "
                        "0 for none (classification)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--class-order", metavar="NAMES",
                   help="class folders in the order of the model's outputs, comma-separated (default: sorted)")


def load_model_and_data(args):
    """The model and the data set named on the command line, checked against each other."""
    spec = None
    if args.input_size or args.mean or args.std:
        spec = default_input_spec(args.arch) if args.arch else open_input_spec()
        if args.input_size:
            spec.height, spec.width = args.input_size
        if args.mean:
            spec.mean = tuple(args.mean)
        if args.std:
            spec.std = tuple(args.std)
    check_model_code_args(args)
    check_settings(spec, args)
    loaded = load_model(args.model, arch=args.arch, trusted=args.trusted, input_spec=spec, code_path=args.model_code,
                        code_name=args.model_class, code_args=args.model_args)
    data = load_dataset(args.data, loaded.spec.input, expected_classes=loaded.spec.num_classes,
                        val_fraction=args.val_fraction, seed=args.seed, class_order=_names(args.class_order),
                        test_fraction=args.test_fraction)
    loaded.spec.input = data.input  # the size the data gave a model that does not fix it (issue 13)
    args.plausibility = quick_check(loaded.model, data, loaded.spec.input)  # a near-chance baseline, said first
    # stderr keeps --json output on stdout clean: what was inferred, the data report, the plausibility check
    for line in ([f"note: {n}" for n in loaded.notes + data.report.notes] + [f"data: {n}" for n in data.report.notices()]
                 + args.plausibility.cli_lines()):
        print(line, file=sys.stderr)
    if loaded.spec.class_names is None:
        loaded.spec.class_names = data.class_names
    return loaded, data


def check_settings(spec, args) -> None:
    """Every setting checked before any work starts (issue 15: a bad one used to fail minutes later)."""
    if spec is not None:
        spec.validate()
    check_split_options(args.val_fraction, args.seed, getattr(args, "test_fraction", None))
    if getattr(args, "images", None) is not None:
        check_image_count(args.images)


def _names(text: str | None) -> list[str] | None:
    return [n.strip() for n in text.split(",") if n.strip()] if text else None


def check_model_code_args(args) -> None:
    """The custom-architecture flags only make sense together; say which one is missing in flag names."""
    if args.model_class and not args.model_code:
        raise ModelLoadError("--model-class needs --model-code: the Python file that defines it.")
    if args.model_args is not None and not args.model_code:
        raise ModelLoadError("--model-args only applies to a custom architecture (--model-code and --model-class).")
    if args.model_code and args.arch:
        raise ModelLoadError("--arch and --model-code both name the architecture; give one of them.")
    if args.model_code and args.model.startswith("sample:"):
        raise ModelLoadError("--model-code builds your own architecture: --model must be its weights file, not a sample.")


def format_macs(macs: float) -> str:
    if macs >= 1e9:
        return f"{macs / 1e9:.2f} G"
    return f"{macs / 1e6:.2f} M"


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def process_started() -> float | None:
    """When this process started, in ``time.time()`` seconds, or None where the system does not say
    (``core.runs.process_start_time``, from ``/proc``).

    Why: a command's time budget (``--time-budget``) is the user's wait for the command, and the interpreter's
    imports (about 2 s here) and the loading of the model and images come before the run; counted from the run's
    own start, our ResNet-20 upload's 15-minute command took 900.7 s (``core.engine.run_task``'s ``started``)."""
    return process_start_time(os.getpid())


class ProgressPrinter:
    """Progress on stderr, at most once a second (and at 100 %), with the phase's elapsed time and ETA.

    ``progress(fraction, message)`` is one phase (e.g. a CAR analysis); ``event(p)`` takes the pruning
    loop's structured ``Progress(phase, step, fraction, message)`` and times each ``(phase, step)`` on
    its own: the ETA is the phase's remaining fraction at the rate measured over its recent reports
    (``core.eta.EtaTracker``), never one overall fraction extrapolated over phases of other rates.
    """

    def __init__(self, prefix: str = "", interval_s: float = 1.0):
        self.prefix, self.interval_s = prefix, interval_s
        self.tracker = EtaTracker()
        self._last = float("-inf")

    def __call__(self, fraction: float, message: str) -> None:
        self.show("", fraction, message)

    def event(self, p) -> None:
        """A structured report: timed per (phase, step, part) on the part's own fraction when it has one."""
        key = " ".join(str(x) for x in (p.phase, p.step or "", p.part) if x != "")
        part_fraction = p.fraction if p.part_fraction is None else p.part_fraction
        self.show(key, p.fraction, p.message, part_fraction)

    def show(self, phase: str, fraction: float, message: str, part_fraction: float | None = None) -> None:
        done = fraction if part_fraction is None else part_fraction
        state = self.tracker.update(phase, done, 1.0, message)
        now = time.monotonic()
        if now - self._last < self.interval_s and done < 1.0:
            return
        self._last = now
        timing = f"{format_duration(state.phase_elapsed_s)} elapsed"
        if done < 1.0:
            timing += f", ETA {format_duration(state.eta_s)}" + (" for this part" if part_fraction is not None else "")
        print(f"{self.prefix}[{fraction * 100:5.1f}%] {message} ({timing})", file=sys.stderr, flush=True)


def progress_printer(prefix: str = "") -> ProgressPrinter:
    """A ``progress(fraction, message)`` callback for stderr with elapsed time and ETA (``ProgressPrinter``)."""
    return ProgressPrinter(prefix)


def prepare_out(path: str) -> Path:
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise PruneScopeError(f"{out} is a file, not a folder; choose a new run folder.")
    if out.exists() and any(out.iterdir()):
        raise PruneScopeError(f"{out} exists and is not empty; choose a new run folder.")
    out.mkdir(parents=True, exist_ok=True)
    return out


def print_costs(figures) -> None:
    """What ``evaluate`` prints of any model's cost (``core.measure.measure_model``'s figures): MACs,
    parameters (millions) and, when measured, OpenVINO CPU latency at batch 1."""
    print(f"MACs       {format_macs(figures.macs)}")
    print(f"params     {figures.params / 1e6:.3f} M")
    if figures.latency is not None:
        print(f"latency    {figures.latency.label()} (OpenVINO CPU, batch 1)")


def print_bundle(result: dict, verification: str) -> None:
    """What ``export`` prints of a bundle (``core.export.export_run`` or its detection twin): where it is,
    the target's verdict on each model (for the NCS2: the MYRIAD compiler's, with the blob's stages, or the
    failing layer), whether the step is verified (``verification``: the task's evidence, e.g. the agreement
    with PyTorch), and each problem."""
    print(f"bundle: {result['bundle']}  (zip: {result['zip']})")
    target = result.get("target", "ncs2")
    per_model = (result.get("targets") or {}).get(target)
    if per_model:
        for key, label in (("pruned", "model/   "), ("original", "fallback/")):
            r = per_model[key]
            print(f"{target} {label} {r['verdict']}")
            if r.get("disagreement"):
                print(f"  note: {r['disagreement']}")
            if r.get("cross_check_2021"):
                print(f"  cross-check: {r['cross_check_2021']}")
        print(f"step {result['step']}: verified: {result['verified']} ({verification})")
    else:
        print(f"step {result['step']}: NCS2 {'compatible' if result['ncs_compatible'] else 'NOT compatible'}; "
              f"verified: {result['verified']} ({verification})")
    for p in result.get("ncs2_problems") or []:
        print(f"  NCS2 problem: {p}")


def removal_text(record: dict) -> str:
    """What a step removed, for its progress line: ``  removed 8 from layer1.0.conv1`` (several, comma-joined)."""
    rems = removals(record)
    return ("  removed " + ", ".join(f"{len(r['filters'])} from {r['group']}" for r in rems)) if rems else ""


def print_summary(summary: dict, as_json: bool) -> None:
    if as_json:
        emit_json(summary)
    else:
        for k, v in summary.items():
            print(f"{k}: {v}")


def cluster_from_args(args) -> int | None:
    """``--cluster``, or the cluster size of ``--profile``; both given must agree (None: the config's default)."""
    profile = getattr(args, "profile", None)
    if profile is None:
        return args.cluster
    cluster = get_profile(profile).cluster
    if args.cluster is not None and args.cluster != cluster:
        raise SettingsError(f"--cluster {args.cluster} contradicts --profile {profile} (cluster {cluster}); "
                            "give one of them.")
    return cluster


def config_from_args(args, config_class):
    """A pruning config from the command line; options left out keep the task's own defaults."""
    given = {"criterion": args.criterion, "cluster": cluster_from_args(args), "max_drop": args.max_drop,
             "mac_target": args.mac_target, "finetune_steps": args.finetune_steps, "finetune_lr": args.finetune_lr,
             "score_images": args.score_images, "rescore_every": args.rescore_every, "max_steps": args.max_steps,
             "clusters_per_step": getattr(args, "clusters_per_step", None),
             "latency": not args.no_latency, "seed": args.seed}
    step_macs = getattr(args, "step_macs", None)
    if step_macs is not None:
        given["step_macs"] = step_macs if step_macs > 0 else None
    for name in ("time_budget", "recover_epochs", "max_recoveries", "recover_lr", "stretch_macs", "stretch_allowance"):
        given[name] = getattr(args, name, None)
    if getattr(args, "no_recover_kd", False):
        given["recover_kd"] = False
    if getattr(args, "no_control", False):
        given["control"] = False
    if getattr(args, "stretch", None) is not None:
        given["stretch"] = bool(args.stretch)
    if getattr(args, "recover_mirror", None) is not None:
        given["recover_mirror"] = args.recover_mirror
    if getattr(args, "ray_recovery", False):
        given["ray_recovery"] = True
    for extra in ("optimizer", "exact_candidates", "map_images", "car", "device", "train_precision", "ray_address",
                  "ray_workers"):
        if extra in config_class.__dataclass_fields__:
            given[extra] = getattr(args, extra, None)
    plan = plan_from_args(args)
    if plan is not None:
        given["plan"] = plan
    config = config_class(**{k: v for k, v in given.items() if v is not None})
    config.validate()
    return config


def add_plan_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--exclude", nargs="+", metavar="LAYER", default=[],
                   help="groups never pruned, by any layer of the group (e.g. layer1.0.conv1)")
    p.add_argument("--max-fraction", nargs="+", metavar="LAYER=F", default=[],
                   help="the most a group may lose, as a fraction of its original width (e.g. layer3.0.conv2=0.25)")
    p.add_argument("--plan", metavar="JSON", help="a pruning plan file ({\"exclude\": [...], \"max_fraction\": {...}})")


def plan_from_args(args) -> dict | None:
    """The per-layer plan of ``--plan``, ``--exclude`` and ``--max-fraction`` (None when none is given);
    names are checked against the model's groups when the run starts. Raises ``SettingsError``."""
    if not (getattr(args, "plan", None) or getattr(args, "exclude", None) or getattr(args, "max_fraction", None)):
        return None
    plan = {"exclude": [], "max_fraction": {}}
    if args.plan:
        try:
            loaded = json.loads(read_bounded(Path(args.plan), MAX_SIDECAR_BYTES, Path(args.plan).name))
        except (OSError, ValueError) as exc:
            raise SettingsError(f"Cannot read the pruning plan {args.plan}: {exc}") from None
        if not isinstance(loaded, dict):
            raise SettingsError(f"The pruning plan {args.plan} must be a JSON object with 'exclude' and 'max_fraction'.")
        checked = PrunePlan.from_dict(loaded)  # types checked: a string 'exclude' is not read letter by letter
        plan["exclude"] = sorted(checked.exclude)
        plan["max_fraction"] = dict(checked.max_fraction)
    plan["exclude"] += list(args.exclude or [])
    for item in args.max_fraction or []:
        name, sep, value = item.rpartition("=")
        try:
            plan["max_fraction"][name] = float(value)
        except ValueError:
            sep = ""
        if not sep or not name:
            raise SettingsError(f"--max-fraction takes LAYER=FRACTION (e.g. layer3.0.conv2=0.25); got '{item}'.")
    return plan


def export_exit_code(result: dict) -> int:
    """0 for the NCS2-ready, verified bundle asked for; else the reason on stderr and a non-zero code."""
    shortfall = bundle_shortfall(result)
    if shortfall is None:
        return 0
    print(f"error: {shortfall}", file=sys.stderr)
    return EXIT_NOT_READY


EXIT_INTERRUPTED = 130  # the shell's code for a run stopped by Ctrl-C (128 + SIGINT)
EXIT_TERMINATED = 128 + signal.SIGTERM  # 143: stopped by SIGTERM (kill, a service manager, a CI timeout)
_STOPPED_BY: list[int] = []  # the signal that cancelled the current long job, for its exit code


class Terminated(BaseException):
    """SIGTERM arrived: raised in the main thread so that every ``finally`` / ``except BaseException`` cleans
    up (a half-built bundle, an unpacked upload) before the process exits with :data:`EXIT_TERMINATED`.
    A BaseException, like KeyboardInterrupt, so that no ``except Exception`` swallows it."""


def raise_terminated(_signum=None, _frame=None) -> None:
    """The CLI's SIGTERM handler outside long jobs (``core.cli.main`` installs it); remembers the signal, so
    the exit code says SIGTERM even when the exception is turned into another on its way up."""
    _STOPPED_BY.append(signal.SIGTERM)
    raise Terminated()


def sigterm_received() -> bool:
    """Whether a SIGTERM reached this process's CLI (:func:`raise_terminated` or a long job's handler)."""
    return signal.SIGTERM in _STOPPED_BY


@contextlib.contextmanager
def interrupt_cancels(cancel: threading.Event):
    """Ctrl-C (SIGINT) or SIGTERM during a long job sets ``cancel`` instead of killing the process, so the job
    stops at its next check with its completed work kept and its run folder marked ``cancelled`` (a killed
    run reads as failed); a second signal interrupts at once. The exit code then says which signal stopped
    it (:func:`summary_exit_code`: 130 for SIGINT, 143 for SIGTERM). Only the main thread can take
    signals; elsewhere this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, _frame) -> None:
        if cancel.is_set():
            if signum == signal.SIGTERM:
                _STOPPED_BY.append(signum)
                raise Terminated()
            raise KeyboardInterrupt
        _STOPPED_BY.append(signum)
        cancel.set()
        name = "Ctrl-C" if signum == signal.SIGINT else "SIGTERM"
        print(f"interrupted: stopping at the next check, completed steps are kept ({name} again to stop at once)",
              file=sys.stderr, flush=True)

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def run_interruptible(run) -> dict:
    """``run(cancel)`` (a pruning run of any task, given its cancel event) with Ctrl-C as that cancel;
    returns its summary (``state`` 'cancelled' after a Ctrl-C). :func:`summary_exit_code` gives the exit."""
    cancel = threading.Event()
    with interrupt_cancels(cancel):
        return run(cancel)


def summary_exit_code(summary: dict) -> int:
    """0 for a finished run; for one stopped by a signal (its steps are kept) 128 + that signal:
    :data:`EXIT_INTERRUPTED` (Ctrl-C) or :data:`EXIT_TERMINATED` (SIGTERM)."""
    if summary.get("state") != "cancelled":
        return 0
    return EXIT_TERMINATED if _STOPPED_BY and _STOPPED_BY[-1] == signal.SIGTERM else EXIT_INTERRUPTED
