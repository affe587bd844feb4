"""The one bundle builder, for every task and every export target.

A bundle holds the pruned model (``model/``) and the original as fallback (``fallback/``), each as
ONNX + OpenVINO IR (+ what the target adds, e.g. the NCS2 ``model.blob``), ``deploy.py``, a self-test,
a README and ``manifest.json`` (sha256 of every file, figures, the target's verdict per model, the
verification). What differs per task (how a model is exported and verified, its metric, its self-test
and extra files) is a :class:`BundleTask`; what differs per target is a ``core.targets.ExportTarget``.
Classification's task is ``core.export.ClassificationBundle``, detection's is
``core.tasks.detection.export.DetectionBundle``; both build through :func:`build_into`, called inside
``core.export.build_atomically`` (a temporary folder renamed into place).
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from . import __version__
from .errors import ExportError
from .measure import compare_times, time_models
from .models import InputSpec, ModelSpec
from .ov_runtime import ONNX_OPSET, latency_stats
from .targets import ExportTarget, ModelFiles, TargetReport
from .workspace import atomic_write_json, atomic_write_text

BUNDLE_FORMAT = "prunescope-bundle/1"
TEMPLATE = Path(__file__).with_name("deploy_template.py")
DIRS = {"pruned": "model", "original": "fallback"}
CROSS_CHECK_IMAGES = 32


class BundleTask:
    """What one task contributes to a bundle. Subclasses implement every method."""
    task: str | None = None  # the manifest's "task" (classification bundles have always had none)
    metric_key = "accuracy"  # the per-model figure of the task in the manifest

    def export(self, model: nn.Module, spec: ModelSpec, out_dir: Path, target: ExportTarget) -> dict:
        """Check the model's output form, then ``target.convert`` it into ``out_dir``."""
        raise NotImplementedError

    def verify(self, key: str, model: nn.Module, export: dict, val, spec: ModelSpec, target: ExportTarget
               ) -> tuple[Any, list[tuple[str, str]], dict]:
        """(verification with ``verified``/``message``/``to_dict()``, FP16 range problems [(layer, reason)],
        extra fields for the model's manifest section)."""
        raise NotImplementedError

    def check_inputs(self, val, spec: ModelSpec, n: int) -> torch.Tensor:
        """Up to ``n`` normalised validation inputs (float32 NCHW) for the targets' cross-checks."""
        raise NotImplementedError

    def figures(self, key: str, model: nn.Module, verification, meta: dict, spec: ModelSpec, val) -> dict:
        """The model's metric, MACs, params (and latency when the caller measured it), with ``*_source`` notes."""
        raise NotImplementedError

    def write_selftest(self, root: Path, models: dict[str, nn.Module], val, spec: ModelSpec) -> dict:
        """Write ``selftest.npz``; returns the manifest's ``selftest`` section."""
        raise NotImplementedError

    def write_extras(self, root: Path, models: dict[str, nn.Module], spec: ModelSpec) -> tuple[list[str], dict]:
        """Write the task's extra top-level files; (their names, manifest additions)."""
        return [], {}

    def input_section(self, export: dict, spec: ModelSpec) -> dict:
        raise NotImplementedError

    def output_section(self, export: dict) -> dict:
        return {"name": export["output_name"], "shape": export["output_shape"]}

    def readme(self, spec: ModelSpec, target: ExportTarget, report: TargetReport, verification) -> str:
        raise NotImplementedError


@dataclass
class Built:
    """What :func:`build_into` made (paths inside the temporary folder it was given)."""
    manifest: dict
    exports: dict[str, dict]
    reports: dict[str, TargetReport]
    verifications: dict[str, Any]
    files: list[Path]


def build_into(root: Path, task: BundleTask, target: ExportTarget, pruned: nn.Module, original: nn.Module,
               spec: ModelSpec, val, meta: dict, latency_runs: int = 30) -> Built:
    """Export, verify and judge both models for ``target`` and write the whole bundle into ``root``.

    Raises ``ExportError`` when a model cannot be exported or the two models' outputs differ in shape.
    """
    models = {"pruned": pruned.eval(), "original": original.eval()}
    exports = {k: task.export(m, spec, root / DIRS[k], target) for k, m in models.items()}
    if exports["pruned"]["output_shape"] != exports["original"]["output_shape"]:
        raise ExportError(f"The pruned model outputs {exports['pruned']['output_shape']} but the original "
                          f"{exports['original']['output_shape']}; they must have the same outputs (classes).")
    checked = {k: task.verify(k, models[k], exports[k], val, spec, target) for k in models}
    verifications = {k: c[0] for k, c in checked.items()}
    inputs = task.check_inputs(val, spec, CROSS_CHECK_IMAGES)
    with torch.no_grad():
        references = {k: torch.cat([m(inputs[i:i + 16]).float() for i in range(0, len(inputs), 16)]).numpy()
                      for k, m in models.items()}
    reports = target.check({k: ModelFiles(k, root, DIRS[k], exports[k]) for k in models},
                           {k: c[1] for k, c in checked.items()}, inputs.numpy().astype(np.float32), references)

    figures = {k: task.figures(k, models[k], verifications[k], meta, spec, val) for k in models}
    latency_comparison = time_exports(exports, figures, spec.input, latency_runs)
    selftest = task.write_selftest(root, models, val, spec)
    shutil.copyfile(TEMPLATE, root / "deploy.py")
    extra_names, extra_manifest = task.write_extras(root, models, spec)
    atomic_write_text(root / "README.txt", task.readme(spec, target, reports["pruned"], verifications["pruned"]))

    models_section = {}
    for k in models:
        d, r = DIRS[k], reports[k]
        section = {
            "dir": d, "xml": f"{d}/model.xml", "bin": f"{d}/model.bin", "onnx": f"{d}/model.onnx",
            **{f"{role}": rel for rel, role in r.files.items()},
            "files": {f"{d}/{p.name}": sha256_file(p) for p in sorted((root / d).iterdir()) if p.is_file()},
            "arch": spec.arch,
            **{key: figures[k].get(key) for key in (task.metric_key, "macs", "params", "latency_ms")},
            "figures_notes": {key: v for key, v in figures[k].items() if key.endswith("_source")},
            "latency_spread": figures[k].get("latency_spread"),
            "output_shape": exports[k]["output_shape"],
            "ir_precision": exports[k]["ir_precision"],
            "target": r.to_dict(),
            "verification": verifications[k].to_dict(),
            "ir_rewrites": exports[k].get("rewrites", []),
            **checked[k][2],
        }
        if "static" in r.details:  # the NCS2 target's static report, where it always was
            section["ncs2"] = _ncs2_section(r)
        models_section[k] = section
    e = exports["pruned"]
    pr, fb = reports["pruned"], reports["original"]
    manifest: dict[str, Any] = {
        "format": BUNDLE_FORMAT,
        **({"task": task.task} if task.task else {}),
        "tool": {"name": "PruneScope", "version": __version__},
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "converter": {"openvino": e["openvino_version"], "torch": torch.__version__, "onnx_opset": e["onnx_opset"],
                      "route": f"torch -> ONNX (opset {ONNX_OPSET}, TorchScript exporter) -> ov.convert_model -> "
                               f"ov.save_model(compress_to_fp16={target.fp16})"},
        "input": task.input_section(e, spec),
        "output": task.output_section(e),
        **extra_manifest,
        "class_names": list(spec.class_names or getattr(val, "class_names", None) or []),
        "max_drop": meta.get("max_drop"),
        "step": meta.get("step"),
        "target": {**target.describe(), "ready": pr.ready, "proven": pr.proven, "verdict": pr.verdict,
                   "fallback_ready": fb.ready, "fallback_verdict": fb.verdict},
        "targets": {target.name: {k: reports[k].to_dict() for k in models}},
        "models": models_section,
        **({"ncs2": models_section["pruned"]["ncs2"]} if "ncs2" in models_section["pruned"] else {}),
        "verification": verifications["pruned"].to_dict(),
        "selftest": selftest,
        "files": {name: sha256_file(root / name) for name in ("deploy.py", "selftest.npz", "README.txt", *extra_names)},
        "meta": {k: v for k, v in meta.items() if k not in ("pruned", "original", "max_drop", "step")
                 and not k.startswith("original_") and k not in ("accuracy", "map", "macs", "params", "latency_ms")},
        "latency_comparison": latency_comparison,
    }
    atomic_write_json(root / "manifest.json", manifest)
    files = sorted(p for p in root.rglob("*") if p.is_file())
    return Built(manifest, exports, reports, verifications, files)


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks (what the manifest records and deploy.py checks)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def time_exports(exports: dict, figures: dict, ispec: InputSpec, runs: int) -> dict | None:
    """Time the exported IRs whose latency the caller did not give, in alternation (``core.measure``).

    Fills ``latency_ms`` (median) and ``latency_spread`` (median, IQR, FPS) of each; when both models were
    timed, returns the pruned-vs-original comparison (ratio, its interval, p-value, ``significant``), else None.
    """
    need = [k for k in exports if figures[k].get("latency_ms") is None]
    if not need:
        return None
    times = time_models([exports[k]["xml"] for k in need], ispec, runs=runs, warmup=5)
    for k, t in zip(need, times):
        stats = latency_stats(t)
        figures[k]["latency_ms"] = stats.median_ms
        figures[k]["latency_spread"] = stats.to_dict()
        figures[k]["latency_source"] = "OpenVINO CPU, batch 1, median of interleaved runs of the exported IR"
    if len(need) < 2:
        return None
    by_name = dict(zip(need, times))
    return compare_times(by_name["original"], by_name["pruned"]).to_dict()


def _ncs2_section(report: TargetReport) -> dict:
    """The static report as the manifest's ``ncs2`` key always held it, with the compiler's verdict beside it:
    ``compatible`` is now the decision (the compiler's where it ran), ``static_compatible`` the table's."""
    static = dict(report.details["static"])
    comp = report.details.get("compiler") or {}
    return {**static, "static_compatible": static["compatible"], "compatible": report.ready,
            "proven": report.proven, "verdict": report.verdict, "compiler": comp,
            "stages": comp.get("stages"), "blob": comp.get("blob") if comp.get("compiled") else None,
            "disagreement": report.details.get("disagreement"),
            "cross_check_2021": report.details.get("cross_check_2021")}


def summary(built: Built, target: ExportTarget) -> dict:
    """The flat per-target summary the CLI prints (and ``--json`` emits) for either task.

    ``target_ready`` decides the exit code; for the NCS2 target ``ncs_compatible`` is the same decision
    (the compiler's where it ran) and ``ncs2_problems`` the reasons.
    """
    pr, fb = built.reports["pruned"], built.reports["original"]

    def per_model(r: TargetReport) -> dict:
        comp = r.details.get("compiler") or {}
        return {"ready": r.ready, "proven": r.proven, "verdict": r.verdict, "problems": r.problems,
                "stages": comp.get("stages"), "blob_bytes": comp.get("blob_bytes") or None,
                "blob": comp.get("blob") if comp.get("compiled") else None, "layer": comp.get("layer"),
                "layer_type": comp.get("layer_type"), "compile_seconds": comp.get("seconds"),
                "cached": comp.get("cached"), "disagreement": r.details.get("disagreement"),
                "cross_check_2021": (r.details.get("cross_check_2021") or {}).get("message")}

    out = {"target": target.name, "target_label": target.label, "target_ready": pr.ready, "target_proven": pr.proven,
           "target_verdict": pr.verdict, "fallback_target_ready": fb.ready, "fallback_target_verdict": fb.verdict,
           "targets": {target.name: {"pruned": per_model(pr), "original": per_model(fb)}}}
    if target.name == "ncs2":
        static = pr.details["static"]
        out.update(ncs_compatible=pr.ready, ncs2_problems=pr.problems or
                   ([] if pr.ready else [str(p.get("reason")) for p in static["problems"]]),
                   ncs2_warnings=[f"layer '{w['layer']}' ({w['type']}, {w['version']}): {w['reason']}"
                                  for w in static["warnings"]],
                   ncs2_verdict=pr.verdict, ncs2_stages=(pr.details.get("compiler") or {}).get("stages"),
                   fallback_ncs_compatible=fb.ready)
    else:
        out.update(ncs_compatible=None, ncs2_problems=[], ncs2_warnings=[], fallback_ncs_compatible=None)
    return out
