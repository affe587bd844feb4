"""Headless command line: evaluate, analyse, prune, export, bench.

Every user error ends in one line on stderr and a non-zero exit code, never a traceback. Progress
goes to stderr so that ``--json`` output on stdout stays machine-readable.
"""
from __future__ import annotations

import argparse
import sys
import traceback
from pathlib import Path

from .errors import PruneScopeError, one_line, user_message
from .jsonout import emit_json, json_mode

EXIT_USER_ERROR = 2


def _add_model_args(p: argparse.ArgumentParser) -> None:
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


def _add_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help="ImageFolder zip or folder, or sample:NAME")
    p.add_argument("--val-fraction", type=float, default=0.2, help="held-out fraction when the data is not pre-split")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--class-order", metavar="NAMES",
                   help="class folders in the order of the model's outputs, comma-separated (default: sorted)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m core", description="PruneScope: CAR analysis and cluster pruning of CNNs.")
    sub = parser.add_subparsers(dest="command", required=True)

    ev = sub.add_parser("evaluate", help="accuracy, per-class accuracy, MACs, params, OpenVINO CPU latency")
    _add_model_args(ev)
    _add_data_args(ev)
    ev.add_argument("--no-latency", action="store_true", help="skip the OpenVINO latency measurement")
    ev.add_argument("--json", action="store_true", help="print one JSON object on stdout")

    from . import cli_engine

    cli_engine.add_commands(sub, _add_model_args, _add_data_args)
    return parser


def load_model_and_data(args):
    """The model and the data set named on the command line, checked against each other."""
    from .data import load_dataset
    from .models import default_input_spec, load_model, open_input_spec
    from .plausibility import quick_check

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
                        val_fraction=args.val_fraction, seed=args.seed, class_order=_names(args.class_order))
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
    from .car import check_image_count
    from .data import check_split_options

    if spec is not None:
        spec.validate()
    check_split_options(args.val_fraction, args.seed)
    if getattr(args, "images", None) is not None:
        check_image_count(args.images)


def _names(text: str | None) -> list[str] | None:
    return [n.strip() for n in text.split(",") if n.strip()] if text else None


def check_model_code_args(args) -> None:
    """The custom-architecture flags only make sense together; say which one is missing in flag names."""
    from .errors import ModelLoadError

    if args.model_class and not args.model_code:
        raise ModelLoadError("--model-class needs --model-code: the Python file that defines it.")
    if args.model_args is not None and not args.model_code:
        raise ModelLoadError("--model-args only applies to a custom architecture (--model-code and --model-class).")
    if args.model_code and args.arch:
        raise ModelLoadError("--arch and --model-code both name the architecture; give one of them.")
    if args.model_code and args.model.startswith("sample:"):
        raise ModelLoadError("--model-code builds your own architecture: --model must be its weights file, not a sample.")


def cmd_evaluate(args) -> int:
    from .evaluate import count_macs_params, evaluate_accuracy
    from .ov_runtime import measure_latency_ms

    if args.task == "detection":
        from .detection.cli import cmd_evaluate_detection

        return cmd_evaluate_detection(args)
    loaded, data = load_model_and_data(args)
    progress("evaluating accuracy on %d validation images" % len(data.val))
    acc = evaluate_accuracy(loaded.model, data.val, loaded.spec.input)
    macs, params = count_macs_params(loaded.model, loaded.spec.input)
    latency = None
    if not args.no_latency:
        progress("measuring OpenVINO CPU latency (batch 1)")
        latency = measure_latency_ms(loaded.model, loaded.spec.input.shape(1))
    result = {
        "model": loaded.spec.source,
        "arch": loaded.spec.arch,
        "data": data.source,
        "num_val": len(data.val),
        "input": loaded.spec.input.__dict__,
        "accuracy": acc.accuracy,
        "per_class": acc.per_class,
        "confusion": acc.confusion,
        "macs": macs,
        "params": params,
        "latency_ms": latency,
        "notes": loaded.notes,
        "data_report": data.report.to_dict(),
        "plausibility": args.plausibility.to_dict(),
    }
    if args.json:
        emit_json(result)
    else:
        print(f"accuracy   {acc.accuracy * 100:.2f}% on {len(data.val)} images")
        print(f"MACs       {format_macs(macs)}")
        print(f"params     {params / 1e6:.3f} M")
        if latency is not None:
            print(f"latency    {latency:.3f} ms (OpenVINO CPU, batch 1, median)")
        for name, a in acc.per_class.items():
            print(f"  {name:>16}: {a * 100:.1f}%")
    return 0


def format_macs(macs: float) -> str:
    if macs >= 1e9:
        return f"{macs / 1e9:.2f} G"
    return f"{macs / 1e6:.2f} M"


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


COMMANDS = {"evaluate": cmd_evaluate}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from . import cli_engine

    handler = COMMANDS.get(args.command) or cli_engine.COMMANDS[args.command]
    as_json = bool(getattr(args, "json", False))
    with json_mode(as_json) as emitted:  # --json: stdout holds exactly one strict JSON object, whatever happens
        code, error = run_handler(handler, args, as_json)
        if as_json and not emitted():
            emit_json({"error": error or "the command produced no result", "exit_code": code})
    return code


def run_handler(handler, args, as_json: bool) -> tuple[int, str | None]:
    """(exit code, error message or None); user errors are one line on stderr, never a traceback."""
    try:
        return handler(args), None
    except PruneScopeError as exc:
        message = user_message(exc, "cli")
        print(f"error: {message}", file=sys.stderr)
        return EXIT_USER_ERROR, message
    except OSError as exc:  # a path the user named cannot be written or read (read-only, full disk, missing)
        print(f"error: {one_line(exc)}", file=sys.stderr)
        return EXIT_USER_ERROR, one_line(exc)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130, "interrupted"
    except Exception as exc:
        if not as_json:
            raise
        traceback.print_exc(file=sys.stderr)  # a bug: its traceback on stderr, the JSON contract kept
        return 1, f"internal error: {type(exc).__name__}: {exc}"
