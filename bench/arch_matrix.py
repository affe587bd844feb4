"""Support matrix: every torchvision classification architecture through the whole PruneScope chain.

For each architecture, with random weights (no downloads) and a small input where the model allows:

  load     save a state dict, load it back through core.models.load_model (the user's path)
  car      CAR of 4 filters in each of the first 3 safe groups on 32 random images (labels = the
           model's own predictions, so the baseline is 100 % and every drop is real)
  prune    remove one cluster of 8 filters (lowest L1) from the first group that takes it; the
           surgery is checked against the emulated removal, refused groups are tried in turn
  export   ONNX (opset 13) + OpenVINO IR FP16 of the pruned model
  verify   OpenVINO CPU vs PyTorch on 32 random images: max |logit diff| within 2 % of the logit range

Each architecture runs in its own process with a time limit, so one crash or hang cannot stop the
table. The NCS2 column is information (the static 2022.3 MYRIAD check), not a pass condition.

    .venv/bin/python bench/arch_matrix.py                # all, prints the table, writes JSON
    .venv/bin/python bench/arch_matrix.py resnet18 vit_b_16   # some
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

from _common import ROOT, machine, parser

STAGES = ("load", "car", "prune", "export", "verify")
# Inputs the architecture needs: ViT/MaxViT have fixed-size position tables, Inception's stem
# needs at least 75 px, and AlexNet/VGG end in an adaptive pool to 6x6/7x7 that ONNX exports only
# when it is a plain average pool (feature map a multiple of it); everything else runs at 64 px.
INPUT_SIZE = {"vit_b_16": 224, "vit_b_32": 224, "vit_l_16": 224, "vit_l_32": 224, "vit_h_14": 224, "maxvit_t": 224,
              "inception_v3": 96, "alexnet": 224,
              **{f"vgg{d}{bn}": 224 for d in (11, 13, 16, 19) for bn in ("", "_bn")}}
CLUSTER = 8
NUM_CLASSES = 10


def run_one(arch: str) -> dict:
    """All stages for one architecture; the first failure ends it with its reason."""
    import numpy as np
    import torch

    from core.car import CarScorer
    from core.data import ImageSet
    from core.export import export_model
    from core.groups import PruningGraph, UnsafeGroupError
    from core.models import InputSpec, build_architecture, load_model
    from core.ncs2 import check_ncs2
    from core.tasks.classification.task import score_filters

    torch.manual_seed(0)
    torch.set_num_threads(2)
    size = INPUT_SIZE.get(arch, 64)
    spec = InputSpec(height=size, width=size)
    row: dict = {"arch": arch, "input": size}
    stage = "load"
    t0 = time.perf_counter()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            weights = Path(tmp) / f"{arch}.pt"
            torch.save({"model": _nontrivial(build_architecture(arch, NUM_CLASSES)).state_dict(), "epoch": 1}, weights)
            loaded = load_model(weights, arch=arch, input_spec=spec)
            weights.unlink()
            model = loaded.model
            row["params_m"] = round(sum(p.numel() for p in model.parameters()) / 1e6, 1)

            stage = "car"
            g = torch.Generator().manual_seed(0)
            n = 16 if size <= 64 else 4
            images = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g)
            probe = ImageSet(images, torch.zeros(n, dtype=torch.long), [str(i) for i in range(NUM_CLASSES)])
            graph = PruningGraph(model, spec.shape(1))
            groups = graph.groups()
            safe = [gr for gr in groups if not gr.left_alone and gr.width >= 2 * CLUSTER]
            row["groups"] = len(groups)
            row["left_alone"] = len(groups) - len([gr for gr in groups if not gr.left_alone])
            if not safe:
                raise RuntimeError(f"no group of {2 * CLUSTER}+ filters can be pruned safely "
                                   f"({groups[0].left_alone if groups else 'no groups'})")
            scorer = CarScorer(graph.model, spec, probe)
            _label_with_own_predictions(scorer)
            ablations = [gr.ablation([f]) for gr in safe[:3] for f in range(4)]
            car = 1.0 - scorer.accuracies(ablations).float().mean(1)
            row["car_max"] = round(float(car.max()), 3)

            stage = "prune"
            scores = score_filters("l1", graph, safe, None, probe, spec, np.random.default_rng(0))
            refused = []
            for gr in safe:
                filters = sorted(np.argsort(scores[gr.root], kind="stable")[:CLUSTER].tolist())
                try:
                    graph.prune(gr.root, filters)
                except UnsafeGroupError as exc:
                    refused.append(f"{gr.root}: {str(exc)[:120]}")
                    continue
                row["pruned"] = f"{gr.label} {gr.width}->{gr.width - CLUSTER}"
                break
            else:
                raise RuntimeError(f"every group refused the surgery; first: {refused[0]}")
            row["refused"] = len(refused)
            pruned = graph.model
            problem = graph.check_runs()
            if problem:
                raise RuntimeError(problem)

            stage = "export"
            out = export_model(pruned, spec, Path(tmp) / "ir")
            ncs2 = check_ncs2(out["xml"])
            row["ncs2"] = "ok" if ncs2.compatible else f"no: {_first_problem(ncs2)}"

            stage = "verify"
            row["rel_diff"] = _ir_vs_torch(out["xml"], pruned, images, spec)
            if row["rel_diff"] > 0.02:
                raise RuntimeError(f"OpenVINO logits differ from PyTorch by {row['rel_diff']:.1%} of their range")
            stage = "done"
    except Exception as exc:
        row["failed_at"] = stage
        row["reason"] = " ".join(f"{type(exc).__name__}: {exc}".split())[:300]
        row["trace_tail"] = traceback.format_exc().strip().splitlines()[-1][:200]
    row["passed"] = STAGES if stage == "done" else STAGES[:STAGES.index(stage)]
    row["seconds"] = round(time.perf_counter() - t0, 1)
    return row


def _label_with_own_predictions(scorer) -> None:
    """Random images have no labels; the model's own predictions make the baseline 100 %."""
    scorer.labels = scorer.images.labels = scorer.base_pred.clone()
    scorer.base_correct = scorer.base_pred == scorer.labels
    scorer.baseline_accuracy = 1.0


def _nontrivial(model):
    """Random weights, but no all-zero layer (ViT's head starts at zero: every logit would be 0 and the
    IR check vacuous) and BatchNorm statistics that are not the identity."""
    import torch

    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2 and not p.any():
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return model


def _limit_memory(gib: int) -> None:
    """A child over this address space fails with MemoryError instead of waking the OOM killer."""
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (gib * 1024**3, gib * 1024**3))


def _first_problem(report) -> str:
    p = report.problems[0]
    return " ".join(str(getattr(p, "message", p)).split())[:80]


def _ir_vs_torch(xml: str, model, images, spec) -> float:
    import numpy as np
    import torch

    from core.data import normalize
    from core.ov_runtime import compile_cpu, read_ir

    x = normalize(images, spec)
    compiled = compile_cpu(read_ir(xml))
    got = np.concatenate([compiled(x[i:i + 1].numpy())[0] for i in range(len(x))])
    with torch.no_grad():
        ref = model(x).numpy()
    return round(float(np.abs(got - ref).max() / (np.abs(ref).max() + 1e-6)), 5)


def run_isolated(arch: str, timeout: int, memory_gib: int) -> dict:
    """One architecture in a child process: a crash, a hang or memory exhaustion stays its own row."""
    cmd = [sys.executable, str(Path(__file__)), "--one", arch, "--memory-gib", str(memory_gib)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {"arch": arch, "failed_at": "?", "reason": f"timed out after {timeout} s", "passed": ()}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    return {"arch": arch, "failed_at": "?", "reason": f"process died (exit {proc.returncode}): {tail[:200]}",
            "passed": ()}


def _ncs2_cell(text: str) -> str:
    """'ok', or the op (type, opset) of the first problem: the layer name is noise in a table."""
    import re

    if not text.startswith("no"):
        return text
    op = re.search(r"\(([^)]*)\)", text)
    return f"no: {op.group(1)}" if op else text


def _reason_cell(row: dict) -> str:
    reason = row.get("reason", "")
    return reason.split(". Typical cause")[0].replace("|", "/")[:160]


def markdown(rows: list[dict]) -> str:
    lines = ["| architecture | input | params (M) | " + " | ".join(STAGES) + " | pruned cluster | NCS2 check | reason of failure |",
             "|---|---|---|" + "---|" * len(STAGES) + "---|---|---|"]
    for r in rows:
        marks = []
        for s in STAGES:
            marks.append("✓" if s in r["passed"] else ("✗" if r.get("failed_at") == s else "·"))
        lines.append(f"| {r['arch']} | {r.get('input', '')} | {r.get('params_m', '')} | " + " | ".join(marks)
                     + f" | {r.get('pruned', '')} | {_ncs2_cell(r.get('ncs2', ''))} | {_reason_cell(r)} |")
    return "\n".join(lines)


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("archs", nargs="*", help="architectures (default: every torchvision classifier)")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--timeout", type=int, default=900, help="seconds per architecture")
    ap.add_argument("--memory-gib", type=int, default=14, help="address-space limit per architecture")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "arch_matrix.json"))
    ap.add_argument("--update", action="store_true",
                    help="replace the rows of the given architectures in --out and print the whole table")
    args = ap.parse_args()
    if args.one:
        import warnings

        warnings.filterwarnings("ignore")
        _limit_memory(args.memory_gib)
        print(json.dumps(run_one(args.one)), flush=True)
        return
    from core.models import torchvision_classifiers

    archs = args.archs or torchvision_classifiers()
    print(f"# {len(archs)} architectures on {machine()}", file=sys.stderr)
    out = Path(args.out)
    kept = [r for r in json.loads(out.read_text()) if r["arch"] not in archs] if args.update and out.exists() else []
    rows = []
    for arch in archs:
        row = run_isolated(arch, args.timeout, args.memory_gib)
        rows.append(row)
        ok = len(row["passed"]) == len(STAGES)
        print(f"{arch:28s} {'PASS' if ok else 'FAIL at ' + str(row.get('failed_at'))} "
              f"{row.get('seconds', '')}s {row.get('reason', '')[:120]}", file=sys.stderr, flush=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(sorted(kept + rows, key=lambda r: r["arch"]), indent=1))
    rows = sorted(kept + rows, key=lambda r: r["arch"])
    passed = sum(len(r["passed"]) == len(STAGES) for r in rows)
    print(markdown(rows))
    print(f"\n{passed}/{len(rows)} architectures pass every stage ({passed / len(rows):.0%}).")


if __name__ == "__main__":
    main()
