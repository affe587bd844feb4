"""The classification task's CLI commands: ``evaluate``, ``prune`` and ``export`` of a classifier
(``core.cli`` / ``core.cli_engine`` dispatch to them through ``core.tasks.registry``).

    prunescope evaluate --model sample:cifar10_resnet20 --data sample:cifar10
    prunescope prune --model model.pt --arch resnet20 --data images.zip --out RUN
    prunescope export --run RUN --out BUNDLE
"""
from __future__ import annotations

import sys
from pathlib import Path

from ...claim import describe_claim
from ...cli_common import (announce_device, config_from_args, device_from_args, export_exit_code,
                           load_model_and_data, prepare_out, print_bundle, print_costs, print_summary, process_started,
                           progress, progress_printer, removal_text, run_interruptible, summary_exit_code)
from ...evaluate import evaluate_accuracy
from ...export import export_run
from ...jsonout import emit_json
from ...measure import measure_model
from ...prune import Callbacks, PruneConfig, run_pruning


def cmd_evaluate_classification(args) -> int:
    """``evaluate`` of a classifier: accuracy, per-class accuracy, MACs, params, OpenVINO CPU latency."""
    loaded, data = load_model_and_data(args)
    progress("evaluating accuracy on %d selection images" % len(data.val))
    acc = evaluate_accuracy(loaded.model, data.val, loaded.spec.input)
    if not args.no_latency:
        progress("measuring OpenVINO CPU latency (batch 1)")
    # strict=False: a model OpenVINO cannot convert still gets its accuracy; one line says why latency is missing
    figures = measure_model(loaded.model, loaded.spec.input, latency=not args.no_latency, runs=50, warmup=10,
                            strict=False)
    if figures.latency is None and not args.no_latency:
        print(f"note: latency {figures.latency_note}", file=sys.stderr)
    result = {
        "model": loaded.spec.source,
        "arch": loaded.spec.arch,
        "data": data.source,
        "num_val": len(data.val),
        "input": loaded.spec.input.__dict__,
        "accuracy": acc.accuracy,
        "per_class": acc.per_class,
        "confusion": acc.confusion,
        **figures.to_dict(),
        "notes": loaded.notes,
        "data_report": data.report.to_dict(),
        "plausibility": args.plausibility.to_dict(),
    }
    if args.json:
        emit_json(result)
    else:
        print(f"accuracy   {acc.accuracy * 100:.2f}% on {len(data.val)} images")
        print_costs(figures)
        for name, a in acc.per_class.items():
            print(f"  {name:>16}: {a * 100:.1f}%")
    return 0


def cmd_prune_classification(args) -> int:
    """``prune`` of a classifier: the one loop on its image set, one line per accepted step on stderr."""
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
        data_source=args.data, original_bytes=original_bytes, started=process_started(),
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
    from ...advice import run_advice
    from ...runs import Run

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


def cmd_export_classification(args) -> int:
    """``export`` of a classification run's step: the bundle, its agreement and the reproduced accuracy."""
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


