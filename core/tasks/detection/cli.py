"""``--task detection`` for the CLI's evaluate, prune and export (dispatched to from ``core.cli`` / ``core.cli_engine``).

    python -m core evaluate --task detection --model sample:ssd_counting --data sample:counting
    python -m core prune --task detection --model sample:ssd_counting --data sample:counting --out RUN
    python -m core prune --task detection --model weights.pt --arch ssd_mobilenet_v2 --data voc.zip --out RUN
    python -m core export --run RUN --out BUNDLE        # a detection run is recognised by its config
"""
from __future__ import annotations

import sys
from pathlib import Path

from ...cli_common import (check_model_code_args, config_from_args, export_exit_code, prepare_out, print_bundle,
                          print_costs, print_summary, process_started, progress, progress_printer, removal_text,
                          run_interruptible, summary_exit_code)
from ...errors import ModelLoadError
from ...jsonout import emit_json
from ...models import extract_state_dict, load_state_dict_strict, read_checkpoint
from ...engine import Callbacks
from ...measure import measure_model
from ...sources import load_voc_dataset
from .evaluate import evaluate_map
from .export import export_detection_run
from .models import DETECTION_ARCHITECTURES, build_detector
from .prune import DetectionPruneConfig, detection_spec, run_detection_pruning
from .sample_model import detector_entry, load_sample_detector


def add_detection_args(evaluate, prune) -> None:
    """Prune's detection-only settings (``--task`` itself is ``core.cli_engine``'s, its choices the registry's)."""
    prune.add_argument("--optimizer", choices=("adamw", "sgd"), help="detection fine-tuning optimizer (default adamw)")
    prune.add_argument("--exact-candidates", type=int, help="detection: screened clusters given an exact mAP per step")
    prune.add_argument("--map-images", type=int, help="detection: validation images for mAP (default: all)")


def load_detector_and_data(args):
    """(detector, info, DetectionData) named on the command line; the data at the detector's input size."""
    check_model_code_args(args)
    if args.model_code:
        raise ModelLoadError("--model-code is not supported for detection; choose a detection --arch.")
    sample = args.model.startswith("sample:")
    if sample:
        entry = detector_entry(args.model.split(":", 1)[1])
        class_names, arch = list(entry["class_names"]), entry["architecture"]
        size = tuple(args.input_size or entry["input_size"][-2:])
    else:
        if not args.arch or args.arch not in DETECTION_ARCHITECTURES:
            raise ModelLoadError(f"A detector's weights need --arch, one of: {', '.join(DETECTION_ARCHITECTURES)}.")
        arch, class_names, entry = args.arch, None, None
        size = tuple(args.input_size or DETECTION_ARCHITECTURES[arch].input_size)
    data = load_voc_dataset(args.data, size, class_names=class_names, val_fraction=args.val_fraction, seed=args.seed)
    model, info = _detector(args, arch, entry, data.class_names, size)
    return model, info, data


def _detector(args, arch: str, entry: dict | None, class_names: list[str], size: tuple[int, int]):
    if entry is not None and args.input_size is None:
        model, info = load_sample_detector(entry["name"])
        info = dict(info)
    else:
        path = Path(args.model) if entry is None else None
        if path is not None and not path.is_file():
            raise ModelLoadError(f"The weights file {path} does not exist.")
        model = build_detector(arch, len(class_names) + 1, size, **(entry or {}).get("options", {}))
        obj, _ = read_checkpoint(path.read_bytes()) if path else (None, None)
        if obj is not None:
            state_dict, _, _ = extract_state_dict(obj)
            load_state_dict_strict(model, state_dict, arch)
        arch_defaults = DETECTION_ARCHITECTURES[arch]
        info = {"mean": list(arch_defaults.mean), "std": list(arch_defaults.std)} if entry is None else dict(entry)
    info["class_names"] = list(class_names)
    info["source"] = args.model
    if args.mean:
        info["mean"] = list(args.mean)
    if args.std:
        info["std"] = list(args.std)
    return model.eval(), info


def cmd_evaluate_detection(args) -> int:
    model, info, data = load_detector_and_data(args)
    spec = detection_spec(model, info)
    progress(f"evaluating mAP@0.5 on {len(data.val)} validation images")
    result = evaluate_map(model, data.val, info["mean"], info["std"])
    figures = measure_model(model, spec.input, latency=not args.no_latency, runs=50, warmup=10)
    out = {"task": "detection", "model": args.model, "arch": model.config["arch"], "data": data.source,
           "num_val": len(data.val), "map": result.map, "per_class": result.per_class, **figures.to_dict(),
           "data_report": data.report.to_dict()}
    if args.json:
        emit_json(out)
        return 0
    print(f"mAP@0.5    {result.map * 100:.2f} on {len(data.val)} images")
    print_costs(figures)
    for name, ap in result.per_class.items():
        print(f"  {name:>16}: AP {ap * 100:.1f}")
    return 0


def cmd_prune_detection(args) -> int:
    config = config_from_args(args, DetectionPruneConfig)
    model, info, data = load_detector_and_data(args)
    out = prepare_out(args.out)

    def on_step(r: dict) -> None:
        print(f"step {r['step']}: mAP {r['metric'] * 100:.2f}  MACs {r['macs'] / 1e6:.2f} M"
              + removal_text(r),
              file=sys.stderr, flush=True)

    summary = run_interruptible(lambda cancel: run_detection_pruning(
        model, info, data, config, out, Callbacks(progress_printer("  "), on_step), cancel=cancel,
        data_options={"val_fraction": args.val_fraction, "seed": args.seed}, started=process_started()))
    print_summary(summary, args.json)
    return summary_exit_code(summary)


def cmd_export_detection(args) -> int:
    result = export_detection_run(args.run, step=args.step, max_drop=args.max_drop, out_path=args.out,
                                  progress=progress_printer(), target=getattr(args, "target", None))
    if args.json:
        emit_json(result)
        return export_exit_code(result)
    print_bundle(result, result["verification_message"])
    return export_exit_code(result)
