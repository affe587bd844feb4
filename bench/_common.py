"""Shared bits of the benchmark scripts: the repo and ``sample_models`` on sys.path, sample loading,
argument parsing, the prune-result rows and table printing."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
SAMPLE_MODELS = ROOT / "sample_models"  # train_cifar.py (the real CIFAR-10 data and its split) lives here
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
if str(SAMPLE_MODELS) not in sys.path:  # last, so that its train*.py scripts shadow no other module
    sys.path.append(str(SAMPLE_MODELS))

SAMPLES = ("vgg_digits", "resnet_shapes")


def load_sample(name: str):
    from core.sources import load_dataset
    from core.models import load_model

    loaded = load_model(f"sample:{name}")
    return loaded, load_dataset(f"sample:{name}", loaded.spec.input)


def table(rows: list[dict], columns: list[str]) -> str:
    widths = {c: max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in columns}
    lines = ["  ".join(c.ljust(widths[c]) for c in columns), "  ".join("-" * widths[c] for c in columns)]
    lines += ["  ".join(str(r.get(c, "")).ljust(widths[c]) for c in columns) for r in rows]
    return "\n".join(lines)


def machine() -> str:
    import os
    import platform

    import torch

    gpu = f", GPU: {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__} "
            f"({torch.get_num_threads()} threads){gpu}")


def parser(doc: str | None) -> argparse.ArgumentParser:
    """A bench's argument parser, described by the first line of its docstring (``--help``)."""
    return argparse.ArgumentParser(description=doc.strip().splitlines()[0] if doc else None)


def parse_with_data(ap: argparse.ArgumentParser, data: Path, argv: list[str] | None = None) -> argparse.Namespace | None:
    """The arguments of a bench that needs real data at ``data``; None, after one ``skipped:`` line, when the
    data is absent (a fresh clone has no ``../shared/data``: the bench then measures nothing and exits 0).
    With a ``--threads`` argument, torch uses that many threads from here on."""
    args = ap.parse_args(argv)
    if not Path(data).exists():
        print(f"skipped: the real data is not at {data} (nothing is measured without it).")
        return None
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    return args


def summary_line(label: str, summary: dict, metric: str, unit: str, seconds: float) -> str:
    """One finished prune run (``core.engine.run_summary``) as a progress line: steps, MACs and metric, before -> after."""
    return (f"{label}: {summary['steps']} steps, MACs {summary['baseline_macs'] / 1e6:.2f} M -> "
            f"{summary['final_macs'] / 1e6:.2f} M, {metric} {summary['baseline_metric'] * 100:.2f}{unit} -> "
            f"{summary['final_metric'] * 100:.2f}{unit} ({summary['reason']}; {seconds:.0f} s)")


def result_rows(base: dict, summaries: dict[str, dict], latency_ms: dict[str, float], metric: str) -> list[dict]:
    """The prune-result table: the original (from ``base``, a run summary) and one row per labelled run
    (``summaries``, labels ``c<cluster>``), with MACs, MAC ratio, the metric (percent) and its drop in
    points, and the latency (``latency_ms``, also keyed ``original``) with its ratio to the original's."""
    rows = [{"model": "original", "cluster": "-", "MACs_M": f"{base['baseline_macs'] / 1e6:.2f}", "MAC_ratio": "1.00x",
             metric: f"{base['baseline_metric'] * 100:.2f}", "drop_pts": "0.00",
             "latency_ms": f"{latency_ms['original']:.3f}", "latency_ratio": "1.00"}]
    for label, s in summaries.items():
        rows.append({"model": label, "cluster": label[1:], "MACs_M": f"{s['final_macs'] / 1e6:.2f}",
                     "MAC_ratio": f"{s['baseline_macs'] / s['final_macs']:.2f}x",
                     metric: f"{s['final_metric'] * 100:.2f}",
                     "drop_pts": f"{(s['baseline_metric'] - s['final_metric']) * 100:.2f}",
                     "latency_ms": f"{latency_ms[label]:.3f}",
                     "latency_ratio": f"{latency_ms[label] / latency_ms['original']:.2f}"})
    return rows
