"""Export targets as plug-ins: what a bundle is built for, behind one small interface.

A target decides how the model is converted (its IR options), how it is judged (a compiler, a runtime,
a static table), which files it adds to the bundle (an NCS2 blob), what the manifest records of it and
what the deploy notes say. The bundle builder (``core.bundle``) is the same for every task and every
target; adding a target is one class here and one entry in :data:`TARGETS`.

* ``ncs2`` (the default): IR FP16 + ONNX, each model compiled into ``model.blob`` by Intel's own MYRIAD
  compiler (OpenVINO 2021.4.2, ``core.ncs2_compiler``), whose verdict decides; the static op table
  (``core.ncs2``) explains, the FP16 range check covers what no compiler checks, and the ONNX is
  cross-checked on the 2021.4 CPU plugin. Without the compiler the verdict reads "not verified by the
  NCS2 compiler (static check only)".
* ``openvino-cpu``: IR FP32 + ONNX for an x86 or ARM host, judged by the OpenVINO CPU runtime that
  compiles it (the same runtime the bundle is verified and timed on).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .errors import SettingsError, one_line


@dataclass
class ModelFiles:
    """One exported model of a bundle as a target sees it: ``root/rel_dir`` holds ``model.onnx`` and the IR."""
    key: str  # "pruned" | "original"
    root: Path
    rel_dir: str  # "model" | "fallback"
    export: dict  # what ``core.export.convert_to_ir`` returned (paths, shapes, opset)

    @property
    def dir(self) -> Path:
        return self.root / self.rel_dir


@dataclass
class TargetReport:
    """One model's result on one target.

    ``ready``: deployable on the target as far as PruneScope can tell. ``proven``: judged by the target's
    own compiler or runtime (not only a static table). ``verdict``: one line for people.
    ``files``: what the target added to the bundle (relative path -> role). ``details``: the target's
    evidence (compiler result, static report, cross-check), recorded in the manifest.
    """
    target: str
    ready: bool
    proven: bool
    verdict: str
    problems: list[str] = field(default_factory=list)
    files: dict[str, str] = field(default_factory=dict)
    details: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


class ExportTarget:
    """The interface every export target implements (see the module docstring)."""
    name = ""
    label = ""
    fp16 = True  # IR weights stored as FP16
    device = "CPU"  # the OpenVINO device deploy.py runs on for this target
    runtime = ""  # what the target host needs

    def ir_options(self) -> dict:
        """How the task's converter (``core.export.convert_to_ir``: ONNX opset 13, then OpenVINO IR) writes the IR
        for this target: its keyword arguments (FP16 or FP32 weights)."""
        return {"compress_to_fp16": self.fp16}

    def check(self, models: dict[str, ModelFiles], range_problems: dict[str, list[tuple[str, str]]],
              inputs: np.ndarray, references: dict[str, np.ndarray]) -> dict[str, TargetReport]:
        """Judge each exported model for this target; may add files next to its IR.

        ``range_problems``: per model, (layer, reason) of FP16 overflows measured on validation images.
        ``inputs`` (float32 [N, C, H, W], normalised) and ``references`` (PyTorch outputs per model) let a
        target cross-check the export on its own runtime.
        """
        raise NotImplementedError

    def deploy_notes(self) -> str:
        raise NotImplementedError

    def describe(self) -> dict:
        return {"name": self.name, "label": self.label, "ir_precision": "FP16" if self.fp16 else "FP32",
                "device": self.device, "runtime": self.runtime, "deploy": self.deploy_notes()}


# ----------------------------------------------------------------------------- ncs2


def _cross_check(outputs: np.ndarray, reference: np.ndarray, device: str) -> dict:
    """How far another runtime's outputs are from PyTorch's: max |diff|, and top-1 agreement for logits."""
    got, ref = outputs.reshape(len(outputs), -1), reference.reshape(len(reference), -1)
    if got.shape != ref.shape:
        return {"device": device, "ok": False, "n": int(len(got)),
                "message": f"{device}: output shape {got.shape[1:]} differs from PyTorch's {ref.shape[1:]}"}
    diff = float(np.max(np.abs(got - ref))) if got.size else 0.0
    scale = float(np.max(np.abs(ref))) if ref.size else 0.0
    out = {"device": device, "n": int(len(got)), "max_abs_diff": diff, "max_abs_reference": scale}
    text = f"largest difference from PyTorch {diff:.2g} (outputs up to {scale:.3g}) on {len(got)} images"
    if reference.ndim == 2 and reference.shape[1] > 1:
        agree = float(np.mean(got.argmax(1) == ref.argmax(1)))
        out["top1_agreement"] = agree
        text += f", same top-1 class on {100 * agree:.1f} %"
    out["ok"] = bool(diff <= 1e-3 * max(1.0, scale))
    out["detail"] = text
    out["message"] = f"{device}: {text}."
    return out


class Ncs2Target(ExportTarget):
    name = "ncs2"
    label = "Intel NCS2 (Myriad X): IR FP16 + ONNX + MYRIAD blob"
    fp16 = True
    device = "MYRIAD"
    runtime = "OpenVINO 2022.3 LTS (the last release with the MYRIAD plugin) on the host of the stick"

    def check(self, models, range_problems, inputs, references):
        from .ncs2 import Ncs2Issue, check_ncs2
        from .ncs2_compiler import compile_many, run_on_cpu_2021

        statics = {k: check_ncs2(m.export["xml"]) for k, m in models.items()}
        for k, report in statics.items():  # FP16 range: what no compiler checks, part of the static explanation
            for layer, reason in range_problems.get(k, []):
                report.problems.append(Ncs2Issue(layer=layer, type="FP16 range", version="", reason=reason))
                report.compatible = False
        compiled = dict(zip(models, compile_many([(m.export["onnx"], m.dir / "model.blob") for m in models.values()])))
        out = {}
        for k, m in models.items():
            static, comp = statics[k], compiled[k]
            static_dict = static.to_dict() | {"xml_path": f"{m.rel_dir}/model.xml"}
            static_only = [str(p) for p in static.problems if p.type != "FP16 range"]
            ranges = [reason for _, reason in range_problems.get(k, [])]
            details = {"static": static_dict, "compiler": comp.to_dict(), "fp16_range_problems": ranges}
            files = {}
            if comp.compiled:
                comp_dict = details["compiler"]
                comp_dict["blob"] = f"{m.rel_dir}/model.blob"
                files[f"{m.rel_dir}/model.blob"] = "blob"
            if comp.available:
                ready = comp.compiled and not ranges
                problems = ([] if comp.compiled else [comp.verdict]) + ranges
                if comp.compiled and ranges:
                    verdict = f"NOT NCS2-ready: {comp.verdict}, but {ranges[0]}"
                elif comp.compiled:
                    verdict = comp.verdict
                else:
                    verdict = f"NOT NCS2-ready: {comp.verdict}"
                if bool(static_only) == comp.compiled:  # the two judges disagree: the compiler decides
                    details["disagreement"] = (
                        f"the static check (OpenVINO 2022.3 table, of the IR) found {len(static_only)} problem(s), "
                        f"first: {static_only[0]}; the MYRIAD compiler compiled the model; the compiler decides"
                        if comp.compiled else
                        "the static check (OpenVINO 2022.3 table) found no problem, but the MYRIAD compiler refused "
                        "the model; the compiler decides")
            else:
                ready = static.compatible
                problems = [str(p) for p in static.problems]
                verdict = (f"NCS2 static check passed, {comp.verdict}" if ready else
                           f"NOT NCS2-ready by the static check ({problems[0]}); {comp.verdict}")
            try:
                got = run_on_cpu_2021(m.export["onnx"], inputs)
                details["cross_check_2021"] = _cross_check(got, references[k],
                                                           "OpenVINO 2021.4 CPU plugin (ENFORCE_BF16=NO)")
            except Exception as exc:  # unavailable or refused: said, never fatal to the export
                details["cross_check_2021"] = {"ok": None, "message": f"not run on OpenVINO 2021.4 CPU: {one_line(exc)}"}
            out[k] = TargetReport(self.name, ready, comp.available, verdict, problems, files, details)
        return out

    def deploy_notes(self) -> str:
        return ("On the NCS2 host (OpenVINO 2022.3 LTS): python deploy.py --device MYRIAD imports model.blob "
                "(Core.import_model, compiled here by the MYRIAD compiler), or --format ir compiles the IR there.")


# ----------------------------------------------------------------------------- openvino-cpu


class OpenVinoCpuTarget(ExportTarget):
    name = "openvino-cpu"
    label = "OpenVINO CPU (x86 or ARM host): IR FP32 + ONNX"
    fp16 = False
    device = "CPU"
    runtime = "OpenVINO 2022.3 or newer (CPU plugin), x86-64 or ARM"

    def check(self, models, range_problems, inputs, references):
        import openvino as ov

        from .ov_runtime import compile_cpu, read_ir

        out = {}
        for k, m in models.items():
            try:
                compiled = compile_cpu(read_ir(m.export["xml"]))
                got = np.stack([np.asarray(compiled([inputs[i:i + 1]])[compiled.output(0)], np.float32)[0]
                                for i in range(len(inputs))])
            except Exception as exc:
                words = one_line(exc)
                out[k] = TargetReport(self.name, False, True, f"NOT ready: the OpenVINO CPU runtime cannot run it: {words}",
                                      [words])
                continue
            runtime = f"OpenVINO {ov.__version__.split('-')[0]} CPU plugin (FP32 IR)"
            check = _cross_check(got, references[k], runtime)
            verdict = f"runs on the {runtime}: {check.get('detail', check['message'])}"
            ready = bool(check["ok"])
            out[k] = TargetReport(self.name, ready, True, verdict if ready else "NOT ready: " + verdict,
                                  [] if ready else [check["message"]], {}, {"cpu_run": check})
        return out

    def deploy_notes(self) -> str:
        return "On an x86-64 or ARM host with OpenVINO 2022.3 or newer: python deploy.py --device CPU."


TARGETS: dict[str, ExportTarget] = {t.name: t for t in (Ncs2Target(), OpenVinoCpuTarget())}
DEFAULT_TARGET = "ncs2"


def get_target(name: str | None) -> ExportTarget:
    """The target named ``name`` (None: the default, ``ncs2``); a wrong name raises ``SettingsError`` listing them."""
    key = (name or DEFAULT_TARGET).strip().lower()
    if key not in TARGETS:
        raise SettingsError(f"Unknown export target '{name}'; choose one of: {', '.join(TARGETS)}.")
    return TARGETS[key]
