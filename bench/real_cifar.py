"""Real models at real speed: CIFAR-10 ResNets of He et al. on real CIFAR-10 images.

    python bench/real_cifar.py [--images 400] [--image-seed 123] [--exact-fraction 0.05] [--threads 2]

Needs ``../shared/data/cifar10_train_jpeg.zip`` (skips with a message when it is absent) and the
weights that ``sample_models/train_cifar.py`` wrote (``sample_models/cifar_manifest.json``); a model
without trained weights is reported as missing, never measured on random weights.

Part 1 — CAR of every filter of the original, exact vs fast, side by side in one process on the same
score images (held-out images, never seen in training): wall time of each and their ratio, Spearman's
rho between the two (ties averaged), and the recall of the exact lowest 10 % among the fast lowest
10 % (a fast pick counts when its exact CAR is within the exact lowest 10 %, ties at the cut included).
Then the same two figures for the screen with each ``--screen-spreads`` value (the assumed error of a
first-order margin change, as a fraction of it; 0 = hard first-order flips), from the same exact CAR:
how the product's spread (``core.screen.SCREEN_RELATIVE_ERROR``) was chosen. ``--image-seed`` draws
another sample of held-out score images, to check a choice on images it was not made on.

Part 2 (``--prune``) — the prune flow end to end, as a user runs it: ``python -m core prune ...
--max-drop 1.0 --cluster 8`` in a subprocess, once per ``--flows`` entry (``fast``: the default;
``exact``: ``--car exact``; ``fast-rescore1``: a full re-score every step; ``fast-k4``: four clusters
per step), on an ImageFolder the bench
writes: ``train/`` 10,000 fine-tuning images from the training split, ``val/`` 2,000 selection images
and ``test/`` the other 3,000, both from the 5,000 held out (the model never trained on them). Reported:
wall time, steps, MAC ratio, the selection drop the run saw, the drop on the held-out test images
(measured here on the rebuilt step), the OpenVINO CPU latency ratio (original and pruned timed in
alternation; a paired Wilcoxon test says whether it is real) and, with ``--recover-epochs N``, the test
drop after the recovery fine-tune and its time. ``--mac-target`` / ``--max-drop`` set a harder cut.
``--recover-original`` gives the original the same recovery: the
control when the original was trained for fewer epochs than the recovery adds (the recovered drop vs it).
``--device cuda --no-latency`` runs part 2 on a GPU server without OpenVINO (no latency column).

Part 3 (``--upload``) — a user's upload, judged on images no decision and no report of the run touched:
``train/`` 5,000 fine-tuning images from the training split and ``val/`` 2,000 held-out images (the tool
splits them into 1,000 selection and 1,000 test images, as for any user's ``val/``); the other 3,000
held-out images are the **unseen** set, scored here on each step rebuilt from the run folder. Per flow
(``--upload-flows``: ``previous`` = the defaults before issue 23: one cluster per step, no recovery, no
control; ``no-stretch`` = the defaults before stretches and mirrored recoveries were on; ``default`` = today's
defaults), side by side in one process: wall time, steps, MAC ratio, the
shipped step's selection, test-split and unseen drops from the original as given, its unseen drop from
the control (the original given the same training), and whether the run's claimed test interval contains
the unseen drop; then per step the three drops, where the winner's curse shows as a selection drop that
stays low while the unseen drop grows.
"""
from __future__ import annotations

import argparse
import json
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from scipy.stats import spearmanr

from _common import ROOT, machine, parse_with_data, table

sys.path.insert(0, str(ROOT / "sample_models"))
import train_cifar  # noqa: E402

from core.architectures import CifarResNet  # noqa: E402
from core.cli_common import EXIT_INTERRUPTED  # noqa: E402
from core.car import FAST_EXACT_FRACTION, compute_car  # noqa: E402
from core.data import ImageSet, normalize  # noqa: E402
from core.device import DEVICES  # noqa: E402
from core.groups import PruningGraph  # noqa: E402
from core.evaluate import count_macs_params, evaluate_accuracy  # noqa: E402
from core.models import InputSpec  # noqa: E402
from core.ov_runtime import compile_cpu, latency_difference, time_interleaved, to_openvino  # noqa: E402
from core.engine import run_claim  # noqa: E402
from core.runs import Run, removals  # noqa: E402
from core.stats import paired_drop  # noqa: E402
from core.screen import SCREEN_RELATIVE_ERROR, global_shortlist, screen_filters, screened_order_scores  # noqa: E402


def score_images(n: int, seed: int = 123) -> tuple[ImageSet, np.ndarray, np.ndarray]:
    """``n`` held-out images (drawn with ``seed``) and the training-set mean/std the models were trained with."""
    images, labels, classes, _ = train_cifar.cached_arrays(train_cifar.DATA_ZIP)
    train_idx, held_idx = train_cifar.held_out_split(labels, train_cifar.HELD_OUT_PER_CLASS, train_cifar.SPLIT_SEED)
    mean = images[train_idx].reshape(-1, 3).mean(0) / 255.0
    std = images[train_idx].reshape(-1, 3).std(0) / 255.0
    pick = np.sort(np.random.default_rng(seed).choice(held_idx, n, replace=False))
    subset = ImageSet(torch.from_numpy(images[pick]).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(labels[pick]),
                      classes)
    return subset, mean, std


def car_exact_vs_fast(model: torch.nn.Module, spec: InputSpec, images: ImageSet, exact_fraction: float) -> dict:
    """The product's own ``compute_car`` both ways, timed back to back on the same images, after an untimed
    fast run that warms both up (thread pools, allocator, first-call overheads favour neither)."""
    compute_car(model, spec, images, n_images=None, sensitivity=False, per_class=False, method="fast",
                exact_fraction=exact_fraction)
    t0 = time.perf_counter()
    exact = compute_car(model, spec, images, n_images=None, sensitivity=False, per_class=False)
    t_exact = time.perf_counter() - t0
    t0 = time.perf_counter()
    fast = compute_car(model, spec, images, n_images=None, sensitivity=False, per_class=False, method="fast",
                       exact_fraction=exact_fraction)
    t_fast = time.perf_counter() - t0
    gids = sorted(exact.car)
    e = np.concatenate([exact.car[g] for g in gids])
    f = np.concatenate([fast.car[g] for g in gids])
    return {"filters": len(e), "exact CAR s": round(t_exact, 1), "fast CAR s": round(t_fast, 1),
            "ratio": round(t_exact / t_fast, 1), "exact in fast": fast.n_exact, **ranking_quality(e, f),
            "exact": exact}


def ranking_quality(e: np.ndarray, f: np.ndarray) -> dict:
    """Spearman's rho of a ranking ``f`` against exact CAR ``e`` (ties averaged) and the recall of the exact
    lowest 10 % among the lowest 10 % of ``f`` (a pick counts when its exact CAR is within the exact
    lowest 10 %, ties at the cut included)."""
    k = max(1, len(e) // 10)
    cut = np.sort(e)[k - 1]
    recall = float(np.mean(e[np.argsort(f, kind="stable")[:k]] <= cut + 1e-12))
    return {"Spearman rho": round(float(spearmanr(e, f).statistic), 3), "recall low 10%": round(recall, 2)}


def screen_spreads(model: torch.nn.Module, spec: InputSpec, images: ImageSet, exact, exact_fraction: float,
                   spreads: list[float]) -> list[dict]:
    """Fast CAR's ranking with each screen spread, from one exact CAR of every filter: the screen picks the
    lowest-screened ``exact_fraction``, whose exact values replace their screened ones (as ``compute_car``
    does: its exact shortlist equals exact CAR, tests/unit/test_screen.py)."""
    groups = PruningGraph(model, spec.shape(1)).groups()
    gids = sorted(g.gid for g in groups)
    e = np.concatenate([exact.car[g] for g in gids])
    rows = []
    for spread in spreads:
        screen = screen_filters(model, normalize(images.images, spec), images.labels, groups, relative_error=spread)
        picks = global_shortlist(screened_order_scores(screen, groups), groups, exact_fraction)
        f = {g: screen.car[g].astype(float).copy() for g in gids}
        for g, idx in picks.items():
            f[g][idx] = np.asarray(exact.car[g], dtype=float)[idx]
        label = f"{spread:g}" + (" (product)" if spread == SCREEN_RELATIVE_ERROR else "") + (" (hard flips)" if spread == 0 else "")
        rows.append({"screen spread": label, **ranking_quality(e, np.concatenate([f[g] for g in gids]))})
    return rows


def write_imagefolder(root: Path, images: np.ndarray, labels: np.ndarray, classes: list[str],
                     roles: dict[str, np.ndarray]) -> Path:
    """``root/<role>/<class>/<index>.png`` for each role's indices (PNG: the decoded pixels, unchanged)."""
    for role, idx in roles.items():
        for c in classes:
            (root / role / c).mkdir(parents=True, exist_ok=True)
        for i in idx.tolist():
            Image.fromarray(images[i]).save(root / role / classes[labels[i]] / f"{i:05d}.png")
    return root


def prune_roles(labels: np.ndarray, train_images: int, selection_images: int, seed: int = 1) -> dict[str, np.ndarray]:
    """Fine-tuning images from the 45,000-image training split; selection and test images both from the
    5,000 held out (stratified, disjoint): the model never trained on either, as with a user's own
    validation set. Selection images drawn from the training split score ~3.5 points too high on the
    ResNet-20 and under-state a step's drop (the first bench run measured -0.15 on them vs +0.68 held out)."""
    train_idx, held_idx = train_cifar.held_out_split(labels, train_cifar.HELD_OUT_PER_CLASS, train_cifar.SPLIT_SEED)
    rng = np.random.default_rng(seed)
    classes = np.unique(labels[held_idx])
    per_class = selection_images // len(classes)
    selection = np.concatenate([rng.permutation(held_idx[labels[held_idx] == c])[:per_class] for c in classes])
    return {"val": np.sort(selection), "train": np.sort(rng.permutation(train_idx)[:train_images]),
            "test": np.setdiff1d(held_idx, selection)}


UPLOAD_FLOWS = {  # name -> the prune options it adds to --max-drop and --cluster 8
    "previous": ["--clusters-per-step", "1", "--step-macs", "0", "--recover-epochs", "0", "--no-control"],
    "default": [],
    "longer-recoveries": ["--recover-epochs", "5", "--max-recoveries", "6"],  # the budget spent on recovery
    "no-stretch": ["--no-stretch", "--recover-mirror", "off"],  # the defaults before stretches were (2026-12-05)
    # stretches that walk on past the threshold (12 % of the MACs, steps within 3x it) before one recovery
    "walked-stretch": ["--stretch-macs", "0.12", "--stretch-allowance", "3"],
    "six-recoveries": ["--max-recoveries", "6"],  # the default before the budget governed (2026-12-05)
    "ten-recoveries": ["--max-recoveries", "10"],  # the default before the one-cluster retry (2026-12-05, sixth session)
    "fp32": ["--train-precision", "fp32"],  # training in float32, the default before bf16 mixed precision (2026-12-05)
}
FLOWS = {"fast": ["--car", "fast"], "exact": ["--car", "exact"],
         "fast-rescore1": ["--car", "fast", "--rescore-every", "1"],
         "fast-k4": ["--car", "fast", "--clusters-per-step", "4"]}  # name -> the prune options it adds


def prune_command(depth: int, record: dict, folder: Path, out: Path, flow: str, args) -> list[str]:
    """``python -m core prune ...`` as a user types it: the defaults, ``--max-drop`` / ``--cluster 8``,
    the flow's options and, when asked, a MAC target and a recovery fine-tune."""
    weights = ROOT / "sample_models" / record["weights"]
    cmd = [sys.executable, "-m", "core", "prune", "--model", str(weights), "--arch", f"cifar_resnet{depth}",
           "--input-size", "32", "32", "--mean", *map(str, record["mean"]), "--std", *map(str, record["std"]),
           "--data", str(folder), "--out", str(out), "--max-drop", f"{args.max_drop:g}", "--cluster", "8",
           *FLOWS[flow], "--threads", str(args.threads), "--device", args.device, "--json"]
    if args.no_latency:
        cmd += ["--no-latency"]
    if args.mac_target:
        cmd += ["--mac-target", f"{args.mac_target:g}"]
    if args.max_steps:
        cmd += ["--max-steps", str(args.max_steps)]
    if args.recover_epochs:
        cmd += ["--recover-epochs", str(args.recover_epochs)]
    return cmd


def run_cli(cmd: list[str], log, max_minutes: float | None) -> tuple[str, int]:
    """Run a CLI command with its progress on ``log``; after ``max_minutes`` it gets Ctrl-C (SIGINT), which
    the prune command takes as a cancel that keeps the completed steps. Returns (stdout, exit code)."""
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=log, text=True)
    try:
        stdout, _ = proc.communicate(timeout=max_minutes * 60 if max_minutes else None)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGINT)
        stdout, _ = proc.communicate()
    return stdout, proc.returncode


def prune_flow(depth: int, record: dict, folder: Path, held_out: ImageSet, flow: str, args, out: Path) -> dict:
    """One prune run, timed; the pruned (and the recovered) step rebuilt and scored on the held-out test
    images here, independently of the run's own records."""
    t0 = time.perf_counter()
    log_path = out.parent / f"{out.name}.log"
    with open(log_path, "w") as log:  # the CLI's progress lines, kept beside the run
        stdout, code = run_cli(prune_command(depth, record, folder, out, flow, args), log, args.max_minutes)
        wall = time.perf_counter() - t0
        if code == EXIT_INTERRUPTED and args.recover_epochs:  # stopped at the time limit: recover as a user would
            _, code_r = run_cli(recover_command(out, args), log, None)
            code = code if code_r == 0 else code_r
        if code in (0, EXIT_INTERRUPTED) and args.recover_epochs and args.recover_original and \
                any(r.get("recovered_from") not in (None, 0) for r in Run(out).history):  # a pruned step recovered
            control_code = recover_original(out, log, args)
            code = code if control_code == 0 else control_code
    if code not in (0, EXIT_INTERRUPTED):
        return {"flow": flow, "steps": f"failed ({code}): see {log_path}"}
    try:
        summary = json.loads(stdout)
    except json.JSONDecodeError:  # interrupted outside the prune loop (e.g. in its recovery): no summary
        return {"flow": flow, "steps": f"interrupted without a summary: see {log_path}"}
    if code == EXIT_INTERRUPTED:
        summary["reason"] = f"time limit ({args.max_minutes:g} min): Ctrl-C, steps kept"
    run = Run(out)
    hist = run.history
    recovered = next((r for r in hist if r.get("recovered_from") not in (None, 0)), None)
    control = next((r for r in hist if r.get("recovered_from") == 0), None)
    pruned = run.record(recovered["recovered_from"]) if recovered else \
        next(r for r in reversed(hist) if r.get("recovered_from") is None)
    spec = InputSpec(height=32, width=32, mean=tuple(record["mean"]), std=tuple(record["std"]))
    original, final = run.rebuild_step(0).eval(), run.rebuild_step(pruned["step"]).eval()
    acc0 = evaluate_accuracy(original, held_out, spec).accuracy
    acc1 = evaluate_accuracy(final, held_out, spec).accuracy
    macs0, _ = count_macs_params(original, spec)
    macs1, _ = count_macs_params(final, spec)
    row = {"flow": flow, "wall min": round(wall / 60, 1), "steps": pruned["step"],
           "MAC ratio": f"{macs0 / macs1:.2f}x", "selection drop": f"{(hist[0]['metric'] - pruned['metric']) * 100:.2f}",
           "held-out drop": f"{(acc0 - acc1) * 100:.2f}", "held-out acc": f"{acc1 * 100:.2f}",
           "latency ratio": "not measured" if args.no_latency else openvino_speedup(original, final, spec, args.threads),
           "stop": summary.get("reason", "")}
    if recovered is not None:
        acc2 = evaluate_accuracy(run.rebuild_step(recovered["step"]).eval(), held_out, spec).accuracy
        row["recovered held-out drop"] = f"{(acc0 - acc2) * 100:.2f}"
        row["recovery min"] = round(recovered["recovery"]["seconds"] / 60, 1)
        if control is not None:  # the same training given to the original: what the recovery itself adds
            acc3 = evaluate_accuracy(run.rebuild_step(control["step"]).eval(), held_out, spec).accuracy
            row["original trained alike acc"] = f"{acc3 * 100:.2f}"
            row["recovered drop vs it"] = f"{(acc3 - acc2) * 100:.2f}"
    return row


def upload_roles(labels: np.ndarray, train_images: int = 5000, val_images: int = 2000, seed: int = 2
                 ) -> dict[str, np.ndarray]:
    """A user-sized upload: ``train`` from the 45,000-image training split, ``val`` stratified from the 5,000
    held out, and ``unseen``: the rest of the held out, which the run never reads."""
    train_idx, held_idx = train_cifar.held_out_split(labels, train_cifar.HELD_OUT_PER_CLASS, train_cifar.SPLIT_SEED)
    rng = np.random.default_rng(seed)
    classes = np.unique(labels[held_idx])
    per_class = val_images // len(classes)
    val = np.concatenate([rng.permutation(held_idx[labels[held_idx] == c])[:per_class] for c in classes])
    return {"train": np.sort(rng.permutation(train_idx)[:train_images]), "val": np.sort(val),
            "unseen": np.setdiff1d(held_idx, val)}


def upload_command(depth: int, record: dict, folder: Path, out: Path, flow: str, args) -> list[str]:
    """``python -m core prune`` on the upload folder with the flow's options (``UPLOAD_FLOWS``)."""
    weights = ROOT / "sample_models" / record["weights"]
    cmd = [sys.executable, "-m", "core", "prune", "--model", str(weights), "--arch", f"cifar_resnet{depth}",
           "--input-size", "32", "32", "--mean", *map(str, record["mean"]), "--std", *map(str, record["std"]),
           "--data", str(folder), "--out", str(out), "--max-drop", f"{args.max_drop:g}", "--cluster", "8",
           *UPLOAD_FLOWS[flow], "--threads", str(args.threads), "--device", args.device, "--json"]
    if args.no_latency:
        cmd += ["--no-latency"]
    if args.mac_target:
        cmd += ["--mac-target", f"{args.mac_target:g}"]
    if args.time_budget:
        cmd += ["--time-budget", f"{args.time_budget:g}"]
    return cmd


def upload_flow(depth: int, record: dict, folder: Path, unseen: ImageSet, flow: str, args, out: Path
                ) -> tuple[dict, list[dict]]:
    """One prune run on the upload, timed; the shipped step (the run's claim), every step and the control
    rebuilt from the run folder and scored here on the unseen images. Returns the flow's row and its
    per-step rows."""
    t0 = time.perf_counter()
    log_path = out.parent / f"{out.name}.log"
    with open(log_path, "w") as log:
        stdout, code = run_cli(upload_command(depth, record, folder, out, flow, args), log, args.max_minutes)
    wall = time.perf_counter() - t0
    if code not in (0, EXIT_INTERRUPTED):
        return {"flow": flow, "steps": f"failed ({code}): see {log_path}"}, []
    run = Run(out)
    hist = run.history
    spec = InputSpec(height=32, width=32, mean=tuple(record["mean"]), std=tuple(record["std"]))
    unseen_correct = {r["step"]: evaluate_accuracy(run.rebuild_step(r["step"]).eval(), unseen, spec).correct.numpy()
                      for r in hist}
    unseen_acc = {step: float(correct.mean()) for step, correct in unseen_correct.items()}
    base = hist[0]

    def drop(a, b):
        return None if a is None or b is None else round((a - b) * 100, 2)

    steps = [{"model": f"ResNet-{depth}", "flow": flow, "step": r["step"],
              "kind": step_kind(r),
              "MAC ratio": f"{base['macs'] / r['macs']:.2f}x", "selection drop": drop(base["metric"], r["metric"]),
              "decision drop": (r.get("decision") or {}).get("drop_points"),
              "test drop": drop(base.get("test_metric"), r.get("test_metric")),
              "unseen drop": drop(unseen_acc[0], unseen_acc[r["step"]])} for r in hist]
    claim = json.loads(stdout).get("claim") if stdout.strip().startswith("{") else None
    claim = claim or run_claim(run)
    shipped = claim["step"]
    rec = run.record(shipped)
    control = run.control()
    control_correct = evaluate_accuracy(control, unseen, spec).correct.numpy() if control is not None else None
    unseen_drop = (unseen_acc[0] - unseen_acc[shipped]) * 100
    test = claim.get("test") or {}
    contains = (test["ci_low_points"] <= unseen_drop <= test["ci_high_points"]) if test else None
    row = {"model": f"ResNet-{depth}", "flow": flow, "wall min": round(wall / 60, 1),
           "steps": len(hist) - 1, "shipped": shipped, "MAC ratio": f"{base['macs'] / rec['macs']:.2f}x",
           "selection drop": drop(base["metric"], rec["metric"]),
           "test drop (claimed CI)": (f"{test['drop_points']:+.2f} ({test['ci_low_points']:+.2f}..{test['ci_high_points']:+.2f})"
                                      if test else "none"),
           "unseen drop (95 % CI)": paired_text(unseen_correct[0], unseen_correct[shipped]),
           "unseen vs control (95 % CI)": "no control" if control_correct is None else
           paired_text(control_correct, unseen_correct[shipped]),
           "CI contains unseen": contains, "stop": run.status.get("message", "")}
    return row, steps


def paired_text(before, after) -> str:
    """'+1.23 (+0.30..+2.16)': the points ``after`` loses against ``before`` on the same images (per-image
    correctness), with its paired 95 % interval (``core.stats.paired_drop``)."""
    d = paired_drop(before, after)
    return f"{d.drop_points:+.2f} ({d.low_points:+.2f}..{d.high_points:+.2f})"


def step_kind(record: dict) -> str:
    """What a step was: ``N cluster(s)``, ``recovery``, and for a stretch (``core.engine.stretch_step``) which half
    it is and whether the loop undid it; a step taken after the loop went back (``core.engine.Fallback``) names the
    step it went back to."""
    kind = "recovery" if record.get("recovered_from") is not None else f"{len(removals(record))} cluster(s)"
    if record.get("stretch"):
        kind += " (stretch" + (", undone)" if record.get("undone") else ")")
    if record.get("from_step") is not None:
        kind += f" from step {record['from_step']}"
    return kind


def upload_table(args, trained: dict) -> None:
    """Part 3: every ``--upload-flows`` entry on the same upload, one after the other in this process."""
    all_images, labels, classes, _ = train_cifar.cached_arrays(train_cifar.DATA_ZIP)
    roles = upload_roles(labels)
    unseen = ImageSet(torch.from_numpy(all_images[roles["unseen"]]).permute(0, 3, 1, 2).contiguous(),
                      torch.from_numpy(labels[roles["unseen"]]), classes)
    rows, step_rows = [], []
    work = ROOT / "workspace" / "bench_real_cifar"
    work.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="prunescope-upload-") as tmp:
        folder = write_imagefolder(Path(tmp) / "upload", all_images, labels, classes,
                                   {"train": roles["train"], "val": roles["val"]})
        print(f"upload: train/ {len(roles['train'])} and val/ {len(roles['val'])} images; unseen: "
              f"{len(roles['unseen'])} other held-out images", flush=True)
        for depth in args.depths:
            name = f"cifar10_resnet{depth}"
            if name not in trained:
                rows.append({"model": f"ResNet-{depth}", "flow": "not trained yet"})
                continue
            for flow in args.upload_flows:
                out = work / f"upload-{depth}-{flow}"
                shutil.rmtree(out, ignore_errors=True)
                row, steps = upload_flow(depth, trained[name], folder, unseen, flow, args, out)
                rows.append(row)
                step_rows += steps
                print(table([row], list(row)), flush=True)
    options = f"--max-drop {args.max_drop:g} --cluster 8" + (f" --mac-target {args.mac_target:g}" if args.mac_target else "") \
        + (f" --time-budget {args.time_budget:g}" if args.time_budget else "")
    print()
    print("Per step (points; selection: all selection images; decision: those of them that decided, apart from the "
          "score images when there are enough; the test images were claimed; the unseen images touched nothing):")
    print(table(step_rows, ["model", "flow", "step", "kind", "MAC ratio", "selection drop", "decision drop", "test drop",
                            "unseen drop"]))
    print()
    print(f"A user's upload (python -m core prune ... {options}), the shipped step (the run's own threshold, accepted "
          f"on its test images); drops in points, unseen = {len(roles['unseen'])} images:")
    print(table(rows, ["model", "flow", "wall min", "steps", "shipped", "MAC ratio", "selection drop",
                       "test drop (claimed CI)", "unseen drop (95 % CI)", "unseen vs control (95 % CI)", "CI contains unseen", "stop"]))


def recover_command(out: Path, args, step: int | None = None) -> list[str]:
    """``python -m core recover`` of a run with the bench's epochs, device and threads (``step`` None: the
    step the run's threshold selects, as a user's plain ``recover``)."""
    return [sys.executable, "-m", "core", "recover", str(out), *(["--step", str(step)] if step is not None else []),
            "--epochs", str(args.recover_epochs), "--device", args.device, "--threads", str(args.threads), "--json"]


def recover_original(out: Path, log, args) -> int:
    """The recovery fine-tune given to the original (step 0) too, with the same epochs and device: the control
    for an original trained for fewer epochs than the recipe that made it (its recovered step gains from
    training it never had). Appended to the run like any recovery; returns the exit code."""
    return run_cli(recover_command(out, args, step=0), log, None)[1]


def openvino_speedup(original, final, spec: InputSpec, threads: int) -> str:
    """The pruned model's OpenVINO CPU speed-up at batch 1 (interleaved runs; "n.s." when not significant)."""
    compiled = [compile_cpu(to_openvino(m, spec.shape(1)), threads) for m in (original, final)]
    t_orig, t_final = time_interleaved(compiled, spec.shape(1), runs=200, warmup=20)
    lat = latency_difference(t_orig, t_final)
    return f"{1 / lat['ratio']:.2f}x" + ("" if lat["significant"] else " (n.s.)")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=400)
    ap.add_argument("--image-seed", type=int, default=123, help="which held-out score images (part 1)")
    ap.add_argument("--exact-fraction", type=float, default=FAST_EXACT_FRACTION)
    ap.add_argument("--screen-spreads", type=float, nargs="*", default=[0.0, SCREEN_RELATIVE_ERROR, 0.5],
                    help="screen spreads compared on the same exact CAR (part 1; none: skip)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", choices=DEVICES, default="cpu",
                    help="where the prune flows score, fine-tune and recover (part 2; default cpu)")
    ap.add_argument("--no-latency", action="store_true",
                    help="part 2 without OpenVINO latency (a machine without OpenVINO, e.g. a GPU server)")
    ap.add_argument("--prune", action="store_true", help="also run part 2: the prune flows (tens of minutes)")
    ap.add_argument("--no-car", action="store_true", help="skip part 1 (exact vs fast CAR of the original)")
    ap.add_argument("--depths", type=int, nargs="+", default=[20, 56])
    ap.add_argument("--train-images", type=int, default=10000, help="fine-tuning images written for part 2")
    ap.add_argument("--selection-images", type=int, default=2000)
    ap.add_argument("--flows", nargs="+", default=["fast", "exact"], choices=list(FLOWS))
    ap.add_argument("--max-drop", type=float, default=1.0, help="the prune threshold, points (default 1.0)")
    ap.add_argument("--mac-target", type=float, help="also stop at this fraction of the original MACs")
    ap.add_argument("--max-steps", type=int, help="step limit of every flow (default: the CLI's)")
    ap.add_argument("--recover-epochs", type=int, default=0, help="recovery fine-tune after each flow (epochs)")
    ap.add_argument("--recover-original", action="store_true",
                    help="give the original the same recovery fine-tune (the control for an under-trained original)")
    ap.add_argument("--upload", action="store_true", help="run part 3: a user's upload (tens of minutes)")
    ap.add_argument("--upload-flows", nargs="+", default=list(UPLOAD_FLOWS), choices=list(UPLOAD_FLOWS))
    ap.add_argument("--time-budget", type=float, help="part 3: the prune command's --time-budget (minutes)")
    ap.add_argument("--max-minutes", type=float, help="stop each prune run after this long (Ctrl-C: its steps are "
                    "kept, then recovered when asked)")
    args = parse_with_data(ap, train_cifar.DATA_ZIP)
    if args is None:
        return 0
    manifest = json.loads(train_cifar.MANIFEST.read_text()) if train_cifar.MANIFEST.exists() else {"models": []}
    trained = {m["name"]: m for m in manifest["models"]}
    images, mean, std = score_images(args.images, args.image_seed)
    print(f"machine: {machine()}; score images: {args.images} held-out CIFAR-10 images (seed {args.image_seed})")
    if not args.no_car:
        car_table(args, trained, images)
    if args.prune:
        prune_table(args, trained)
    if args.upload:
        upload_table(args, trained)
    return 0


def car_table(args, trained: dict, images: ImageSet) -> None:
    rows, spread_rows = [], []
    for depth in args.depths:
        name = f"cifar10_resnet{depth}"
        if name not in trained:
            rows.append({"model": f"ResNet-{depth}", "filters": "not trained yet "
                         f"(python sample_models/train_cifar.py --depth {depth})"})
            continue
        model = CifarResNet(depth, 10)
        model.load_state_dict(torch.load(ROOT / "sample_models" / trained[name]["weights"], weights_only=True))
        spec = InputSpec(height=32, width=32, mean=tuple(trained[name]["mean"]), std=tuple(trained[name]["std"]))
        rows.append({"model": f"ResNet-{depth} ({trained[name]['held_out_accuracy'] * 100:.2f} %)",
                     **car_exact_vs_fast(model.eval(), spec, images, args.exact_fraction)})
        exact = rows[-1].pop("exact")
        print(table(rows[-1:], list(rows[-1])), flush=True)
        spread_rows += [{"model": f"ResNet-{depth}", **r}
                        for r in screen_spreads(model, spec, images, exact, args.exact_fraction, args.screen_spreads)]
    print()
    print(f"CAR of every filter of the original, exact vs fast (screen + exact CAR for the lowest-screened "
          f"{args.exact_fraction:.0%} of filters):")
    cols = ["model", "filters", "exact CAR s", "fast CAR s", "ratio", "exact in fast", "Spearman rho",
            "recall low 10%"]
    print(table(rows, cols))
    if spread_rows:
        print()
        print(f"The screen's spread (assumed error of a first-order margin change, x the change), same exact CAR, "
              f"exact for the lowest-screened {args.exact_fraction:.0%}:")
        print(table(spread_rows, ["model", "screen spread", "Spearman rho", "recall low 10%"]))


def prune_table(args, trained: dict) -> None:
    all_images, labels, classes, _ = train_cifar.cached_arrays(train_cifar.DATA_ZIP)
    roles = prune_roles(labels, args.train_images, args.selection_images)
    held = roles["test"]
    held_out = ImageSet(torch.from_numpy(all_images[held]).permute(0, 3, 1, 2).contiguous(),
                        torch.from_numpy(labels[held]), classes)
    rows = []
    work = ROOT / "workspace" / "bench_real_cifar"  # run folders and logs stay for inspection
    work.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="prunescope-bench-") as tmp:
        folder = write_imagefolder(Path(tmp) / "cifar", all_images, labels, classes, roles)
        print(f"prune data: {len(roles['train'])} fine-tuning, {len(roles['val'])} selection and {len(held)} test "
              "images (both held out: never trained on)", flush=True)
        for depth in args.depths:
            name = f"cifar10_resnet{depth}"
            if name not in trained:
                rows.append({"model": f"ResNet-{depth}", "flow": "not trained yet"})
                continue
            for flow in args.flows:
                out = work / (f"run-{depth}-{flow}" + (f"-mac{args.mac_target:g}" if args.mac_target else ""))
                shutil.rmtree(out, ignore_errors=True)
                row = {"model": f"ResNet-{depth}", **prune_flow(depth, trained[name], folder, held_out, flow, args, out)}
                rows.append(row)
                print(table([row], list(row)), flush=True)
    print()
    options = f"--max-drop {args.max_drop:g} --cluster 8" + (f" --mac-target {args.mac_target:g}" if args.mac_target else "") \
        + (f" --max-steps {args.max_steps}" if args.max_steps else "") \
        + (f" --recover-epochs {args.recover_epochs}" if args.recover_epochs else "") \
        + (f" --device {args.device}" if args.device != "cpu" else "") \
        + (f", stopped after {args.max_minutes:g} min" if args.max_minutes else "")
    print(f"Prune flow (python -m core prune ... {options}), end to end; drops in points, held out = "
          f"{len(held)} test images:")
    print(table(rows, ["model", "flow", "wall min", "steps", "MAC ratio", "selection drop", "held-out drop",
                       "held-out acc", "latency ratio", "recovered held-out drop", "recovery min",
                       "original trained alike acc", "recovered drop vs it", "stop"]))


if __name__ == "__main__":
    sys.exit(main())
