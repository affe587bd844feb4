"""OpenVINO CPU latency and MACs of original vs pruned models, side by side, in one process.

    python bench/latency.py                         # both bundled samples, pruned here with Torch-Pruning
    python bench/latency.py --pruned-run RUN_DIR    # use a PruneScope run's pruned step for its model
    python bench/latency.py --runs 200 --threads 1 --json

Every model goes the export route (ONNX opset 13 -> OpenVINO) and is compiled for the CPU with the
latency hint at f32. Original and pruned models of one sample are timed in alternation (each round
runs each model once, in shuffled order), so drifts of a noisy machine hit both alike; the median of
the rounds is reported. Without a run folder, the pruned variant is made here with Torch-Pruning's
MagnitudePruner (L2 magnitude, pruning_ratio 0.5, round_to 8, final classifier kept), so the script
runs standalone.
"""
from __future__ import annotations

import json
import statistics
import sys
import time
import warnings

from _common import ROOT, parser  # the repo on sys.path

import torch  # noqa: E402
from torch import nn  # noqa: E402

from core.errors import PruneScopeError  # noqa: E402
from core.evaluate import count_macs_params  # noqa: E402
from core.models import InputSpec, ModelSpec  # noqa: E402
from core.ov_runtime import compile_cpu, time_interleaved, to_openvino  # noqa: E402


def torch_pruning_variant(model: nn.Module, spec: ModelSpec, ratio: float = 0.5, round_to: int = 8) -> nn.Module:
    """A copy of ``model`` with ``ratio`` of each layer's channels removed in multiples of ``round_to``."""
    import copy

    import torch_pruning as tp

    pruned = copy.deepcopy(model).eval()
    linears = [m for m in pruned.modules() if isinstance(m, nn.Linear)]
    ignored = [linears[-1]] if linears else []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pruner = tp.pruner.MagnitudePruner(pruned, torch.zeros(spec.input.shape(1)),
                                           importance=tp.importance.MagnitudeImportance(p=2),
                                           pruning_ratio=ratio, round_to=round_to, ignored_layers=ignored)
        pruner.step()
    return pruned.eval()


def conv_widths(model: nn.Module) -> list[int]:
    return [m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d)]


def sample_pairs(ratio: float, round_to: int) -> list[dict]:
    """(name, spec, original, pruned, how) for each bundled sample; random weights if none are bundled."""
    from core.models import load_model, sample_names

    pairs = []
    try:
        names = sample_names()
    except PruneScopeError:
        names = []
    if names:
        for name in names:
            loaded = load_model(f"sample:{name}")
            pairs.append({"name": name, "spec": loaded.spec, "original": loaded.model.eval(), "note": "bundled weights"})
    else:
        from core.architectures import SampleResNet, SampleVGG

        for name, arch, k in (("sample_vgg (random)", SampleVGG, 10), ("sample_resnet (random)", SampleResNet, 8)):
            torch.manual_seed(0)
            spec = ModelSpec(arch=name.split()[0], num_classes=k, input=InputSpec(height=32, width=32))
            pairs.append({"name": name, "spec": spec, "original": arch(num_classes=k).eval(),
                          "note": "no bundled samples found: random weights (latency and MACs do not depend on them)"})
    for p in pairs:
        p["pruned"] = torch_pruning_variant(p["original"], p["spec"], ratio, round_to)
        p["how"] = f"Torch-Pruning MagnitudePruner, ratio {ratio}, round_to {round_to}"
    return pairs


def run_pair(run_dir: str, step: int | None) -> dict:
    from core.runs import Run

    run = Run(run_dir)
    steps = run.steps()
    if len(steps) < 2:
        raise PruneScopeError(f"Run {run.name} has no pruned step yet (steps: {steps}).")
    step = steps[-1] if step is None else step
    return {"name": run.spec.source or run.spec.arch, "spec": run.spec, "original": run.original().model.eval(),
            "pruned": run.rebuild_step(step).eval(), "how": f"run {run.name}, step {step}", "note": ""}


def bench(pairs: list[dict], runs: int, warmup: int, threads: int | None) -> list[dict]:
    rows = []
    for p in pairs:
        shape = p["spec"].input.shape(1)
        compiled = [compile_cpu(to_openvino(p[k], shape), threads) for k in ("original", "pruned")]
        times = time_interleaved(compiled, shape, runs=runs, warmup=warmup)
        lat = [float(statistics.median(t)) for t in times]
        (m0, p0), (m1, p1) = (count_macs_params(p[k], p["spec"].input) for k in ("original", "pruned"))
        rows.append({
            "model": p["name"], "input": list(shape), "pruned_by": p["how"], "note": p["note"],
            "original": {"macs": m0, "params": p0, "latency_ms": lat[0], "conv_widths": conv_widths(p["original"])},
            "pruned": {"macs": m1, "params": p1, "latency_ms": lat[1], "conv_widths": conv_widths(p["pruned"])},
            "macs_ratio": m1 / m0, "params_ratio": p1 / p0, "latency_ratio": lat[1] / lat[0], "speedup": lat[0] / lat[1],
        })
    return rows


def print_table(rows: list[dict], header: str) -> None:
    print(header)
    print(f"{'model':<24} {'variant':<9} {'MACs':>10} {'params':>9} {'latency ms':>11} "
          f"{'MACs ratio':>10} {'latency ratio':>13} {'speed-up':>8}")
    for r in rows:
        for k in ("original", "pruned"):
            v = r[k]
            tail = (f" {r['macs_ratio']:>10.3f} {r['latency_ratio']:>13.3f} {r['speedup']:>7.2f}x" if k == "pruned"
                    else "")
            print(f"{r['model'] if k == 'original' else '':<24} {k:<9} {v['macs'] / 1e6:>9.2f}M {v['params']:>9d} "
                  f"{v['latency_ms']:>11.3f}{tail}")
        print(f"{'':<24} pruned by {r['pruned_by']}; conv widths {r['original']['conv_widths']} -> "
              f"{r['pruned']['conv_widths']}" + (f"; {r['note']}" if r["note"] else ""))


def main(argv: list[str] | None = None) -> int:
    ap = parser(__doc__)
    ap.add_argument("--pruned-run", action="append", default=[], metavar="DIR",
                        help="PruneScope run folder whose pruned step replaces the Torch-Pruning variant of its model")
    ap.add_argument("--step", type=int, default=None, help="step of --pruned-run to use (default: the last)")
    ap.add_argument("--ratio", type=float, default=0.5, help="Torch-Pruning channel ratio (default 0.5)")
    ap.add_argument("--round-to", type=int, default=8, help="Torch-Pruning round_to (default 8)")
    ap.add_argument("--runs", type=int, default=100, help="timed rounds per model (default 100)")
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--threads", type=int, default=None, help="CPU inference threads (default: OpenVINO's choice)")
    ap.add_argument("--json", action="store_true", help="print the results as JSON")
    args = ap.parse_args(argv)

    import openvino as ov

    t0 = time.perf_counter()
    try:
        from_runs = [run_pair(d, args.step) for d in args.pruned_run]
        pairs = sample_pairs(args.ratio, args.round_to)
    except PruneScopeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    replaced = {p["name"].removeprefix("sample:") for p in from_runs}
    pairs = [p for p in pairs if p["name"] not in replaced] + from_runs
    rows = bench(pairs, args.runs, args.warmup, args.threads)
    if args.json:
        print(json.dumps({"openvino": ov.__version__, "runs": args.runs, "threads": args.threads, "results": rows},
                         indent=2))
    else:
        print_table(rows, f"OpenVINO {ov.__version__} CPU, batch 1, f32, median of {args.runs} interleaved rounds "
                          f"(threads: {args.threads or 'default'}); MACs of conv/linear layers per image")
        print(f"({time.perf_counter() - t0:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
