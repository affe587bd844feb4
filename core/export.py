"""Export for the NCS2 (or another target): ONNX + OpenVINO IR, the target's verdict, verification on real
images, fallback bundle.

A bundle is one folder (and a zip of it) that an engineer copies to the edge device:

    model/        the pruned model: model.xml + model.bin (IR, FP16, static 1xCxHxW) + model.onnx (opset 13),
                  and for the ncs2 target model.blob, compiled by Intel's MYRIAD compiler (``core.targets``)
    fallback/     the original model through the same export
    deploy.py     loads model/ on the chosen device, falls back to fallback/ when the pruned files are
                  missing, altered, fail to compile or fail the self-test (needs only openvino + numpy)
    selftest.npz  stored inputs with the expected outputs of both models
    manifest.json sha256 of every file, accuracy, MACs, params, latency, input spec, class names,
                  threshold and step, tool version, the target's verdict per model, verification result
    README.txt

The IR is converted from the ONNX export (opset 13, TorchScript exporter), never from the torch
module: ``ov.convert_model(module)`` writes newer op versions (MaxPool-14) that the 2022.3 runtime,
the last with the MYRIAD plugin, cannot read. The bundle is built in a temporary folder next to its
destination and renamed into place, so a failed export leaves nothing behind. The bundle itself is
written by ``core.bundle.build_into`` (the builder every task shares); :class:`ClassificationBundle`
is what classification contributes to it.
"""
from __future__ import annotations

import os
import shutil
import uuid
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .data import ImageSet, normalize
from .bundle import BUNDLE_FORMAT, TEMPLATE, build_into, sha256_file, summary  # noqa: F401 (re-exported)
from .errors import ExportError, PruneScopeError, one_line
from .models import InputSpec, ModelSpec
from .fp16 import Fp16Range, measure_fp16_range
from .ir_rewrite import interpolate11_to_4
from .ncs2 import Ncs2Issue, Ncs2Report
from .targets import TargetReport, get_target
from .measure import measure_model
from .reproduce import reproduce_step
from .ov_runtime import ONNX_OPSET, compile_cpu, cpu_has_fp16, export_onnx_bytes, read_ir
from .shortcuts import convert_zero_pad_shortcuts
from .sources import load_run_dataset
from .workspace import atomic_write_bytes

INPUT_NAME = "input"
OUTPUT_NAME = "logits"
AGREEMENT_REQUIRED = 0.99
SELFTEST_INPUTS = 4
# Self-test tolerance: max |output - expected| <= fraction x (max - min of the expected logits) + floor.
# Wide enough for FP16 arithmetic on the NCS2, far too narrow for wrong or damaged weights.
SELFTEST_TOLERANCE_FRACTION = 0.1
SELFTEST_TOLERANCE_FLOOR = 1e-3


# ----------------------------------------------------------------------------- export


def _input_spec(spec: ModelSpec | InputSpec) -> InputSpec:
    return spec.input if isinstance(spec, ModelSpec) else spec


FALLBACK_OPSETS = (14, 17)


_one_line = one_line  # the name the export modules use


def export_model(model: nn.Module, spec: ModelSpec | InputSpec, out_dir: str | Path, name: str = "model",
                 compress_to_fp16: bool = True) -> dict:
    """Write ``name.onnx`` (static 1xCxHxW, opset 13) and ``name.xml/.bin`` (OpenVINO IR, FP16, or FP32 with
    ``compress_to_fp16=False``) into ``out_dir``.

    Returns what a deployment needs to feed the model: file paths, input name and shape, mean/std,
    colour order, class names.
    """
    ispec = _input_spec(spec)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    shape = ispec.shape(1)
    model = model.eval()
    # Zero-padded shortcuts export as Slice + Pad, which the NCS2 lacks; their exact 1x1-conv
    # equivalent exports as a Conv (see ``shortcuts``).
    convert_zero_pad_shortcuts(model, shape)
    for pname, tensor in model.state_dict().items():  # NaN weights give NaN outputs, which pass any self-test
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise ExportError(f"The model's weights hold NaN or infinite values ({pname}); it was not exported.")
    try:
        with torch.no_grad():
            out = model(torch.zeros(shape))
    except Exception as exc:
        raise ExportError(f"The model does not run on a {tuple(shape)} input ({_one_line(exc)}).") from None
    if not isinstance(out, torch.Tensor) or out.ndim != 2 or out.shape[0] != 1:
        raise ExportError(f"The model must return one (1, classes) logits tensor; it returned "
                          f"{tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__}.")
    return {**convert_to_ir(model, shape, out_dir, name, compress_to_fp16),
            **_input_description(ispec, spec.class_names if isinstance(spec, ModelSpec) else None)}


def convert_to_ir(model: nn.Module, shape: tuple[int, ...], out_dir: Path, name: str = "model",
                  compress_to_fp16: bool = True) -> dict:
    """ONNX (opset 13 first) then OpenVINO IR (FP16 weights, or FP32 with ``compress_to_fp16=False``) of a
    one-input, one-output model: what every task and target exports.

    Checked here: the converted model has one input and one output, and a static input shape.
    """
    import openvino as ov

    onnx_path = out_dir / f"{name}.onnx"
    opset = _write_onnx(model, shape, onnx_path)
    try:
        ov_model = ov.convert_model(str(onnx_path))
    except Exception as exc:
        raise ExportError(f"OpenVINO could not convert the ONNX export: {_one_line(exc)}") from None
    rewritten, not_rewritten = interpolate11_to_4(ov_model)  # the NCS2's runtime reads Interpolate-4 only
    if len(ov_model.inputs) != 1 or len(ov_model.outputs) != 1:
        raise ExportError(f"Expected one input and one output, the converted model has {len(ov_model.inputs)} "
                          f"and {len(ov_model.outputs)}.")
    if not ov_model.inputs[0].get_partial_shape().is_static:
        raise ExportError("The converted model has a dynamic input shape; the NCS2 needs a static one.")
    xml_path = out_dir / f"{name}.xml"
    try:
        ov.save_model(ov_model, str(xml_path), compress_to_fp16=compress_to_fp16)
    except Exception as exc:
        raise ExportError(f"Saving the OpenVINO IR failed: {_one_line(exc)}") from None
    out_shape = [int(d) for d in ov_model.outputs[0].get_partial_shape().to_shape()]
    return {
        "onnx": str(onnx_path),
        "xml": str(xml_path),
        "bin": str(xml_path.with_suffix(".bin")),
        "onnx_opset": opset,
        "ir_precision": "FP16" if compress_to_fp16 else "FP32",
        "openvino_version": ov.__version__,
        "input_name": ov_model.inputs[0].get_any_name() if ov_model.inputs[0].get_names() else INPUT_NAME,
        "input_shape": list(shape),
        "output_name": ov_model.outputs[0].get_any_name() if ov_model.outputs[0].get_names() else OUTPUT_NAME,
        "output_shape": out_shape,
        "rewrites": ([f"{rewritten} Interpolate-11 rewritten as the equivalent Interpolate-4"] if rewritten else [])
                    + [f"Interpolate-11 left as it is ({p})" for p in not_rewritten],
    }


def _write_onnx(model: nn.Module, shape: tuple[int, ...], onnx_path: Path) -> int:
    """Write the ONNX file; returns the opset used.

    Opset 13 is what the NCS2's OpenVINO 2022.3 reads best. Some ops (attention as
    ``scaled_dot_product_attention``) only export from a later opset: then the export uses the first
    opset that works, and the NCS2 check judges the result. Models over ONNX's 2 GB message limit
    are written with their weights in a side file (``.onnx.data``).
    """
    last = None
    for opset in (ONNX_OPSET, *FALLBACK_OPSETS):
        try:
            atomic_write_bytes(onnx_path, export_onnx_bytes(model, shape, opset))
            return opset
        except Exception as exc:
            last = exc
            if "2GB" in str(exc) or "2 GB" in str(exc) or "protobuf" in str(exc).lower():
                return _write_large_onnx(model, shape, onnx_path, opset)
            if "opset" not in str(exc).lower() and "version" not in str(exc).lower():
                break
    hint = ""
    if "adaptive_avg_pool2d" in str(last) or "adaptive_max_pool2d" in str(last):
        hint = (" Hint: an adaptive pool exports only when its input is a multiple of its output size; "
                "export at the model's native input size (e.g. 224x224 for VGG/AlexNet).")
    raise ExportError(f"ONNX export (opset {ONNX_OPSET}) failed: {_one_line(last)}.{hint}")


def _write_large_onnx(model: nn.Module, shape: tuple[int, ...], onnx_path: Path, opset: int) -> int:
    import warnings

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(model, (torch.zeros(shape),), str(onnx_path), opset_version=opset, dynamo=False,
                              input_names=[INPUT_NAME], output_names=[OUTPUT_NAME], do_constant_folding=True)
    except Exception as exc:
        raise ExportError(f"ONNX export of a model over 2 GB failed: {_one_line(exc)}") from None
    return opset


def _input_description(ispec: InputSpec, class_names: list[str] | None) -> dict:
    return {
        "layout": "NCHW",
        "element_type": "f32",
        "mean": list(ispec.mean),
        "std": list(ispec.std),
        "colour_order": ispec.colour_order,
        "preprocess": "resize shorter side to fit, centre-crop to HxW, pixel/255, then (x - mean) / std per channel",
        "class_names": list(class_names) if class_names else None,
    }


# ----------------------------------------------------------------------------- verification


@dataclass
class Verification:
    verified: bool
    agreement: float
    max_abs_logit_diff: float
    n_images: int
    min_images: int
    distinct_predictions: int
    message: str
    device: str = "OpenVINO CPU (FP16 weights decompressed, f32 arithmetic)"
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def _ir_logits(compiled, inputs: torch.Tensor) -> np.ndarray:
    """Logits of a compiled batch-1 IR, image by image."""
    request = compiled.create_infer_request()
    out = compiled.output(0)
    rows = []
    for i in range(len(inputs)):
        request.infer([inputs[i:i + 1].numpy()])
        rows.append(np.array(request.get_tensor(out).data, dtype=np.float32).reshape(-1))
    return np.stack(rows) if rows else np.zeros((0, 0), np.float32)


@torch.no_grad()
def _torch_logits(model: nn.Module, inputs: torch.Tensor, batch: int = 128) -> np.ndarray:
    model = model.eval()
    return torch.cat([model(inputs[i:i + batch]).float() for i in range(0, len(inputs), batch)]).numpy()


def verify_ir(xml_path: str | Path, model: nn.Module, images: ImageSet, spec: ModelSpec | InputSpec,
              min_images: int = 200, max_images: int = 1000, precision: str = "f32") -> Verification:
    """Run the IR on the OpenVINO CPU runtime over validation images and compare with PyTorch.

    Uses every image up to ``max_images`` (a stratified subset beyond), and at least ``min_images``
    when that many exist; with fewer it uses all and says so. ``verified`` when top-1 agreement is
    at least 99%.
    """
    if len(images) == 0:
        raise ExportError("No selection images to verify the exported model on.")
    ispec = _input_spec(spec)
    subset = images.subset(max(min_images, max_images))
    refs, gots = [], []
    try:
        compiled = compile_cpu(read_ir(xml_path), precision=precision)
    except Exception as exc:
        raise ExportError(f"OpenVINO could not load the exported IR {Path(xml_path).name}: {_one_line(exc)}") from None
    for start in range(0, len(subset), 64):  # chunks bound memory for large inputs
        inputs = normalize(subset.images[start:start + 64], ispec).contiguous()
        refs.append(_torch_logits(model, inputs))
        try:
            gots.append(_ir_logits(compiled, inputs))
        except Exception as exc:
            raise ExportError(f"Running the exported IR failed: {_one_line(exc)}") from None
    ref, got = np.concatenate(refs), np.concatenate(gots)
    if got.shape != ref.shape:
        raise ExportError(f"The IR outputs shape {got.shape[1:]} per image but PyTorch gives {ref.shape[1:]}.")
    agree = float(np.mean(ref.argmax(1) == got.argmax(1)))
    diff = float(np.max(np.abs(ref - got)))
    distinct = int(len(np.unique(ref.argmax(1))))
    n = len(subset)
    notes = ["The CPU plugin decompresses the FP16 weights and computes in f32, so this measures the FP16 "
             "rounding of the weights; the NCS2 also computes activations in FP16, so expect slightly larger "
             "logit differences on the device."]
    if n < min_images:
        notes.append(f"Only {n} selection images were available (fewer than the {min_images} asked for); all were used.")
    if distinct == 1 and n > 1:
        notes.append("PyTorch predicts the same class for every image, so top-1 agreement says little here.")
    verified = agree >= AGREEMENT_REQUIRED
    if precision != "f32":
        notes[0] = f"Run by the OpenVINO CPU plugin in {precision} arithmetic, as the NCS2 computes."
    pct = f"{100 * agree:.1f}%"
    if verified:
        message = f"Verified: the IR agrees with PyTorch on {pct} of {n} images (largest logit difference {diff:.2g})."
    else:
        message = (f"Not verified: the IR agrees with PyTorch on only {pct} of {n} images (at least "
                   f"{100 * AGREEMENT_REQUIRED:.0f}% required; largest logit difference {diff:.2g}). The FP16 "
                   "conversion changes this model's predictions; check for layers with very large or very small "
                   "weights, or ship the fallback.")
    if n < min_images:
        message += f" Only {n} images were available (fewer than {min_images})."
    device = ("OpenVINO CPU (FP16 weights decompressed, f32 arithmetic)" if precision == "f32" else
              f"OpenVINO CPU ({precision} arithmetic)")
    return Verification(verified, agree, diff, n, min_images, distinct, message, device=device, notes=notes)


def check_fp16(model: nn.Module, xml_path: str | Path, images: ImageSet, spec: ModelSpec | InputSpec,
               verification: Verification, min_images: int) -> Fp16Range:
    """FP16 is what the NCS2 computes in: measure the activation range on validation images and, where the CPU
    can, verify the IR in FP16 arithmetic too. An overflow fails the verification here, and the target's
    check (``Fp16Range.problems()`` names the layer: the NCS2 target makes the model not ready), since a
    model that runs to inf/NaN on the device is neither ready nor verified; no compiler checks value ranges."""
    ispec = _input_spec(spec)
    fp16 = measure_fp16_range(model, images, ispec)
    if fp16.problems():
        verification.verified = False
        verification.message = "Not verified in FP16: " + fp16.problems()[0][1]
    if cpu_has_fp16():
        in_f16 = verify_ir(xml_path, model, images, spec, min_images=min_images, precision="f16")
        verification.notes.append(in_f16.message)
        verification.verified = verification.verified and in_f16.verified
    else:
        finite = {True: "stays finite", False: "becomes inf/NaN", None: "could not be computed"}[fp16.fp16_finite]
        verification.notes.append(
            f"This CPU has no FP16 arithmetic, so the IR could not be run in FP16 here; FP16 was checked instead by "
            f"measuring activation ranges on {fp16.n_images} selection images (peak {max(fp16.peaks.values(), default=0):.4g}, "
            f"FP16 max 65,504) and running the model in torch float16 (its output {finite}).")
    return fp16


# ----------------------------------------------------------------------------- bundle


@dataclass
class BundleResult:
    """A classification bundle as built: where it is, the manifest, the target's verdict on both models
    (``target`` / ``target_fallback``), the verification, and for the NCS2 target the static report
    (``ncs2``, with the FP16 range problems) the verdict is explained by (None for other targets)."""
    bundle_dir: Path
    manifest: dict
    ncs2: Ncs2Report | None
    ncs2_fallback: Ncs2Report | None
    verification: Verification
    verification_fallback: Verification
    files: list[Path]
    zip_path: Path | None = None
    target: TargetReport | None = None
    target_fallback: TargetReport | None = None
    summary: dict = field(default_factory=dict)

    @property
    def ncs_compatible(self) -> bool:
        """The NCS2 decision: the MYRIAD compiler's where it ran (see ``core.targets.Ncs2Target``)."""
        return bool(self.target.ready) if self.target is not None else bool(self.ncs2 and self.ncs2.compatible)

    @property
    def verified(self) -> bool:
        return self.verification.verified

    def to_dict(self) -> dict:
        return {
            **self.summary,
            "bundle": str(self.bundle_dir),
            "zip": str(self.zip_path) if self.zip_path else None,
            "ncs_compatible": self.ncs_compatible if self.ncs2 is not None else None,
            "ncs2": self.ncs2.to_dict() if self.ncs2 else None,
            "ncs2_fallback": self.ncs2_fallback.to_dict() if self.ncs2_fallback else None,
            "verified": self.verification.verified,
            "agreement": self.verification.agreement,
            "verification": self.verification.to_dict(),
            "verification_fallback": self.verification_fallback.to_dict(),
            "files": [str(f) for f in self.files],
        }


EXIT_NOT_READY = 3  # the CLI's exit code when a bundle was written but is not the NCS2-ready, verified one asked for


def bundle_shortfall(result: dict) -> str | None:
    """Why an exported bundle is not what an export asks for (ready for its target, e.g. compiled for the
    NCS2, and verified), or None."""
    reasons = []
    ready = result.get("target_ready", result.get("ncs_compatible"))
    if not ready:
        if result.get("target", "ncs2") == "ncs2":
            problems = result.get("ncs2_problems") or []
            more = f"; {len(problems) - 1} more" if len(problems) > 1 else ""
            reasons.append("it is not NCS2-ready" + (f" ({problems[0]}{more})" if problems else ""))
        else:
            reasons.append(f"it is not ready for {result.get('target')} ({result.get('target_verdict')})")
    if not result.get("verified"):
        reasons.append("the IR does not agree with PyTorch (not verified)")
    if not reasons:
        return None
    return (f"the bundle was written to {result.get('bundle')}, but {' and '.join(reasons)}; the original model is "
            "inside as fallback.")


def _model_meta(meta: dict, which: str) -> dict:
    """The caller's figures for 'pruned' or 'original': a nested dict, or flat keys (``original_`` prefix)."""
    nested = meta.get(which)
    out = dict(nested) if isinstance(nested, dict) else {}
    prefix = "" if which == "pruned" else "original_"
    for key in ("accuracy", "macs", "params", "latency_ms"):
        if key not in out and f"{prefix}{key}" in meta and not isinstance(meta[f"{prefix}{key}"], dict):
            out[key] = meta[f"{prefix}{key}"]
    return out


def _selftest_choice(ref_a: np.ndarray, ref_b: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` inputs both models classify with the widest top-1 margin (robust to FP16)."""
    def margin(z: np.ndarray) -> np.ndarray:
        part = np.sort(z, axis=1)
        return (part[:, -1] - part[:, -2]) / (part[:, -1] - part[:, 0] + 1e-12) if z.shape[1] > 1 else np.ones(len(z))

    score = np.minimum(margin(ref_a), margin(ref_b))
    return np.sort(np.argsort(-score)[:k])


def build_bundle(pruned_model: nn.Module, original_model: nn.Module, spec: ModelSpec, val_images: ImageSet,
                 out_path: str | Path, meta: dict | None = None, min_images: int = 200,
                 latency_runs: int = 30, with_zip: bool = False, target: str | None = None) -> BundleResult:
    """Export both models for ``target`` (``core.targets``; default ``ncs2``), judge and verify them, and write
    the deployable bundle folder ``out_path`` (and, with ``with_zip``, its zip ``<out_path>.zip``).

    Built in a temporary folder next to ``out_path`` and renamed into place (an existing bundle there
    is replaced only once the new one is complete). Any failure removes the temporary folder and
    raises :class:`ExportError` saying why.
    """
    meta = dict(meta or {})
    out_path = Path(out_path).resolve()
    chosen = get_target(target)
    built, tmp = build_atomically(
        out_path, lambda tmp: build_into(tmp, ClassificationBundle(min_images), chosen, pruned_model, original_model,
                                         spec, val_images, meta, latency_runs), with_zip=with_zip)
    reports = {k: built.reports[k] for k in ("pruned", "original")}
    static = {k: _static_report(r, out_path) for k, r in reports.items()}
    return BundleResult(out_path, built.manifest, static["pruned"], static["original"], built.verifications["pruned"],
                        built.verifications["original"], [out_path / f.relative_to(tmp) for f in built.files],
                        bundle_zip_path(out_path) if with_zip else None, reports["pruned"], reports["original"],
                        summary(built, chosen))


def _static_report(report: TargetReport, bundle: Path) -> Ncs2Report | None:
    """The NCS2 target's static report (as ``core.ncs2.check_ncs2`` made it, FP16 range problems included)."""
    static = report.details.get("static")
    if static is None:
        return None
    fields = {k: v for k, v in static.items() if k in Ncs2Report.__dataclass_fields__}
    fields["problems"] = [Ncs2Issue(**p) for p in static["problems"]]
    fields["warnings"] = [Ncs2Issue(**w) for w in static["warnings"]]
    fields["xml_path"] = str(bundle / static["xml_path"])
    return Ncs2Report(**fields)


def bundle_zip_path(bundle_dir: Path) -> Path:
    return bundle_dir.parent / f"{bundle_dir.name}.zip"


def check_bundle_target(out_path: str | Path) -> Path:
    """Refuse to put a bundle where it would destroy something that is not an earlier bundle.

    An export replaces an earlier PruneScope bundle at ``out_path`` (and its zip) atomically; it never
    replaces a file, a non-empty folder of anything else (a run folder, the user's documents), or a zip
    beside it that no bundle wrote. Called before any work starts. Returns the resolved path.
    """
    out = Path(out_path)
    if out.is_symlink():
        raise ExportError(f"{out} is a symbolic link; a bundle is written into a real folder only. Nothing was "
                          "changed.")
    out = out.resolve()
    zip_path = bundle_zip_path(out)
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out} is a file, not a folder; choose a new folder for the bundle.")
    ours = out.is_dir() and _is_bundle(out)
    if out.is_dir() and any(out.iterdir()) and not ours:
        raise ExportError(f"{out} already exists and is not a PruneScope bundle; nothing was changed. Choose a new "
                          "or empty folder for the bundle.")
    if zip_path.exists() and not ours:
        raise ExportError(f"{zip_path} already exists and was not written with a bundle in {out}; nothing was "
                          "changed. Choose another bundle folder name.")
    if ours:
        extra = unlisted_files(out)
        if extra:
            shown = ", ".join(extra[:3]) + (f" and {len(extra) - 3} more" if len(extra) > 3 else "")
            raise ExportError(f"{out} is an earlier bundle holding files its manifest does not list ({shown}): "
                              "replacing it would delete them, so nothing was changed. Move them out, or choose "
                              "another bundle folder.")
    return out


def _is_bundle(folder: Path) -> bool:
    return _bundle_manifest(folder) is not None


def _bundle_manifest(folder: Path) -> dict | None:
    """The manifest of the bundle in ``folder`` (bounded read, a regular file), or None when it is none."""
    from .integrity import MAX_JSON_BYTES, IntegrityError, read_json_bounded

    try:
        manifest = read_json_bounded(folder / "manifest.json", MAX_JSON_BYTES)
    except (OSError, ValueError, IntegrityError):
        return None
    return manifest if isinstance(manifest, dict) and manifest.get("format") == BUNDLE_FORMAT else None


def bundle_listed_files(manifest: dict) -> set[str]:
    """Relative paths (``/``-separated) of every file a bundle's manifest lists, ``manifest.json`` included."""
    listed = {"manifest.json"}
    files = manifest.get("files")
    if isinstance(files, dict):
        listed |= {k for k in files if isinstance(k, str)}
    models = manifest.get("models")
    for entry in (models.values() if isinstance(models, dict) else []):
        if isinstance(entry, dict) and isinstance(entry.get("files"), dict):
            listed |= {k for k in entry["files"] if isinstance(k, str)}
    return listed


def unlisted_files(folder: Path) -> list[str]:
    """Files (and links) in the bundle folder ``folder`` that its manifest does not list: what the user put
    there. Replacing the bundle deletes only listed files, so these block a replacement (issue 28)."""
    manifest = _bundle_manifest(folder) or {}
    listed = bundle_listed_files(manifest)
    out = []
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder).as_posix()
        if (path.is_symlink() or path.is_file()) and rel not in listed:
            out.append(rel)
    return out


def build_atomically(out_path: Path, build, with_zip: bool = False):
    """``build(tmp)`` into a temporary folder next to ``out_path``, then renamed into place.

    With ``with_zip`` the zip of the bundle is written (to a temporary name) before anything is
    renamed, and the folder and its zip are published together: a full disk or any other failure
    leaves neither, never a bundle without its zip. An existing bundle at ``out_path`` is replaced
    only once the new one is complete; any failure removes the temporary files and raises
    :class:`ExportError` saying why. Returns ``(build's result, the temporary path it was built in)``
    so the caller can rebase paths it recorded.
    """
    check_bundle_target(out_path)
    tmp = out_path.parent / f".{out_path.name}.partial-{uuid.uuid4().hex[:8]}"
    try:
        out_path.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
    except OSError as exc:
        raise ExportError(f"Cannot write the bundle into {out_path.parent} ({_one_line(exc)}); choose a folder "
                          "you can write to.") from None
    tmp_zip = out_path.parent / f".{out_path.name}.zip.{uuid.uuid4().hex[:8]}.tmp"
    try:
        result = build(tmp)
        if with_zip:
            _write_zip(tmp, out_path.name, tmp_zip)
        _publish_bundle(tmp, out_path, tmp_zip if with_zip else None)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp_zip.unlink(missing_ok=True)
        if isinstance(exc, PruneScopeError):
            raise
        if not isinstance(exc, Exception):
            raise
        raise ExportError(f"Building the bundle failed ({_one_line(exc)}); nothing was written to "
                          f"{out_path}.") from exc
    return result, tmp


def _publish_bundle(tmp: Path, out_path: Path, tmp_zip: Path | None) -> None:
    """Rename the finished folder (and zip) into place; on failure the previous bundle is put back."""
    old = None
    if out_path.exists():
        old = out_path.parent / f".{out_path.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(out_path, old)
    try:
        os.replace(tmp, out_path)
        if tmp_zip is not None:
            try:
                os.replace(tmp_zip, bundle_zip_path(out_path))
            except BaseException:
                os.replace(out_path, tmp)  # the folder goes back to its temporary name, removed by the caller
                raise
    except BaseException:
        if old is not None:
            os.replace(old, out_path)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


class ClassificationBundle:
    """Classification's part of a bundle (``core.bundle.BundleTask``): logits (1, classes), verified by top-1
    agreement on the OpenVINO CPU runtime, FP16 range measured for FP16 targets, accuracy as the figure."""
    task = None
    metric_key = "accuracy"

    def __init__(self, min_images: int = 200):
        self.min_images = min_images

    def export(self, model: nn.Module, spec: ModelSpec, out_dir: Path, target) -> dict:
        return export_model(model, spec, out_dir, "model", **target.ir_options())

    def verify(self, key: str, model: nn.Module, export: dict, val: ImageSet, spec: ModelSpec, target):
        check = verify_ir(export["xml"], model, val, spec, min_images=self.min_images)
        if not target.fp16:
            return check, [], {}
        fp16 = check_fp16(model, export["xml"], val, spec, check, self.min_images)
        return check, fp16.problems(), {"fp16_range": fp16.to_dict()}

    def check_inputs(self, val: ImageSet, spec: ModelSpec, n: int) -> torch.Tensor:
        return normalize(val.subset(n).images, spec.input).float().contiguous()

    def figures(self, key: str, model: nn.Module, verification, meta: dict, spec: ModelSpec, val: ImageSet) -> dict:
        from .evaluate import evaluate_accuracy

        fig = _model_meta(meta, key)
        if fig.get("accuracy") is None:
            fig["accuracy"] = evaluate_accuracy(model, val, spec.input).accuracy
            fig["accuracy_source"] = f"measured at export on {len(val)} selection images"
        if fig.get("macs") is None or fig.get("params") is None:
            counted = measure_model(model, spec.input, latency=False)
            fig["macs"] = counted.macs if fig.get("macs") is None else fig["macs"]
            fig["params"] = counted.params if fig.get("params") is None else fig["params"]
        return fig

    def write_selftest(self, root: Path, models: dict, val: ImageSet, spec: ModelSpec) -> dict:
        """Stored inputs with the expected (PyTorch) outputs of both models, the widest-margin ones."""
        inputs = normalize(val.subset(max(self.min_images, 64)).images, spec.input)
        ref = {k: _torch_logits(models[k], inputs) for k in models}
        for k, logits in ref.items():  # a self-test expecting NaN would pass any output (issue 28)
            if not np.all(np.isfinite(logits)):
                raise ExportError(f"The {k} model's outputs on the validation images are not finite (NaN or inf); "
                                  "a bundle of it could not be self-tested, so none was written.")
        pick = _selftest_choice(ref["pruned"], ref["original"], min(SELFTEST_INPUTS, len(inputs)))
        np.savez(root / "selftest.npz", input=inputs[pick].numpy().astype(np.float32),
                 expected_model=ref["pruned"][pick].astype(np.float32),
                 expected_fallback=ref["original"][pick].astype(np.float32),
                 tolerance_fraction=np.float32(SELFTEST_TOLERANCE_FRACTION),
                 tolerance_floor=np.float32(SELFTEST_TOLERANCE_FLOOR))
        return {"file": "selftest.npz", "inputs": int(len(pick)),
                "tolerance": f"max |output - expected| <= {SELFTEST_TOLERANCE_FRACTION} x (max - min of the "
                             f"expected logits) + {SELFTEST_TOLERANCE_FLOOR}, and the same top-1 class"}

    def write_extras(self, root: Path, models: dict, spec: ModelSpec) -> tuple[list[str], dict]:
        return [], {}

    def input_section(self, export: dict, spec: ModelSpec) -> dict:
        desc = _input_description(spec.input, None)
        return {"input_name": export["input_name"], "input_shape": export["input_shape"],
                **{k: desc[k] for k in ("layout", "element_type", "mean", "std", "colour_order", "preprocess")}}

    def output_section(self, export: dict) -> dict:
        return {"name": export["output_name"], "shape": export["output_shape"]}

    def readme(self, spec: ModelSpec, target, report, verification) -> str:
        return _readme(spec, target, report, verification)


def _readme(spec: ModelSpec, target, report: TargetReport, check: Verification) -> str:
    i = spec.input
    blob = "model.blob (NCS2 blob, compiled by the MYRIAD compiler), " if "model/model.blob" in report.files else ""
    return f"""PruneScope export bundle ({spec.arch}), target: {target.name} ({target.label})

model/      pruned model: {blob}model.xml + model.bin (OpenVINO IR, {"FP16" if target.fp16 else "FP32"}, input 1x{i.channels}x{i.height}x{i.width}) and model.onnx (opset {ONNX_OPSET})
fallback/   the original model, exported the same way
deploy.py   python deploy.py [--device CPU|MYRIAD] [--format auto|blob|ir] [--image PATH]
            Loads model/ and falls back to fallback/ when a file is missing or altered (sha256 against
            manifest.json), fails to compile, or fails the self-test (selftest.npz). Needs openvino + numpy
            (Pillow to read images).
            {target.deploy_notes()}
manifest.json  hashes, accuracy, MACs, params, latency, input spec, class names, target verdicts, verification.

Input: {i.colour_order}, NCHW float32, pixel/255 then (x - mean) / std with mean={list(i.mean)} std={list(i.std)}.
Target ({target.name}): {report.verdict}
Verification: {check.message}
"""


def zip_bundle(bundle_dir: str | Path) -> Path:
    """Zip the bundle folder next to it (``<bundle>.zip``), written to a temporary name and renamed."""
    bundle_dir = Path(bundle_dir)
    if not (bundle_dir / "manifest.json").is_file():
        raise ExportError(f"{bundle_dir} is not a complete bundle (no manifest.json).")
    zip_path = bundle_zip_path(bundle_dir)
    tmp = zip_path.parent / f".{zip_path.name}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        _write_zip(bundle_dir, bundle_dir.name, tmp)
        os.replace(tmp, zip_path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return zip_path


def _write_zip(folder: Path, arc_root: str, dest: Path) -> None:
    """Every file of ``folder`` into the zip ``dest``, under ``arc_root/``."""
    with zipfile.ZipFile(dest, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for f in sorted(p for p in folder.rglob("*") if p.is_file()):
            zf.write(f, f"{arc_root}/{f.relative_to(folder).as_posix()}")


def export_for_cli(pruned_model: nn.Module, original_model: nn.Module, spec: ModelSpec, val_images: ImageSet,
                   out_path: str | Path, meta: dict | None = None, target: str | None = None) -> dict:
    """Build the bundle and its zip (published together) for ``target``; a flat summary for the CLI and the UI:
    the target's verdict per model (``core.bundle.summary``) and the verification."""
    result = build_bundle(pruned_model, original_model, spec, val_images, out_path, meta, with_zip=True,
                          target=target)
    return {
        **result.summary,
        "verified": result.verification.verified,
        "agreement": result.verification.agreement,
        "max_abs_logit_diff": result.verification.max_abs_logit_diff,
        "verification_message": result.verification.message,
        "fallback_verified": result.verification_fallback.verified,
        "files": [str(f) for f in result.files],
        "bundle": str(result.bundle_dir),
        "zip": str(result.zip_path),
        "manifest": str(result.bundle_dir / "manifest.json"),
        "latency_comparison": result.manifest.get("latency_comparison"),
    }


def pick_step(run, step: int | None, max_drop: float | None, progress=None) -> tuple[int, dict]:
    """(step, its history record): the one asked for, else the smallest within ``max_drop`` points, else the last.

    An explicit ``step`` is never overridden: ``max_drop`` then only records the threshold it was chosen with.
    """
    if max_drop is not None and not 0 <= max_drop <= 100:
        raise ExportError(f"The threshold must be between 0 and 100 points; got {max_drop}.")
    if step is None:
        step = run.select_step(max_drop) if max_drop is not None else (run.history[-1]["step"] if run.history else 0)
    record = run.record(step)
    if progress:
        progress(0.05, f"rebuilding step {step}")
    return step, record


def export_run(run_dir: str | Path, step: int | None = None, max_drop: float | None = None,
               out_path: str | Path | None = None, progress=None, trusted: bool = False,
               target: str | None = None) -> dict:
    """Export one step of a run folder: ``step``, else the smallest within ``max_drop`` points, else the last.

    ``max_drop`` (accuracy points below the original) is the threshold the step was chosen with; the
    manifest keeps it under the same name. ``trusted``: the user trusts this run's pickle or model code
    even without a trust record (see ``core.runs``). ``target``: the export target (``core.targets``; default
    ``ncs2``), checked before any work.
    """
    from .runs import Run

    get_target(target)
    from .workspace import workspace_root

    run = Run(run_dir)
    step, record = pick_step(run, step, max_drop, progress)
    if out_path:
        check_bundle_target(out_path)  # before any work: an export never destroys what is not a bundle
    pruned = run.rebuild_step(step, trusted)
    original = run.original(trusted)
    data = load_run_dataset(run.config, run.spec.input, expected_classes=run.spec.num_classes)  # its recorded split
    spec = run.spec
    if spec.class_names is None:
        spec.class_names = data.class_names
    base = run.history[0]
    if progress:
        progress(0.1, f"re-measuring step {step} and the original on the {len(data.val)} selection images")
    # what ships must be what the run recorded: its figure reproduces on the images it was measured on (issue 28)
    reproduced = {"pruned": reproduce_step(pruned, data.val, spec.input, step, record.get("metric")).to_dict(),
                  "original": reproduce_step(original.model, data.val, spec.input, 0, base.get("metric")).to_dict()}
    unverified = run.unverified()
    # Latency is not taken from the run: its steps were timed minutes apart under different load, so
    # their ratio can be noise. Both exported IRs are timed in alternation instead (_time_exports).
    meta = {  # a classification run's metric is accuracy, the bundle's name for it
        "pruned": {"accuracy": record.get("metric"), **{k: record.get(k) for k in ("macs", "params")}},
        "original": {"accuracy": base.get("metric"), **{k: base.get(k) for k in ("macs", "params")}},
        "step": step, "run": run.name, "max_drop": max_drop,
        "criterion": run.config.get("prune", {}).get("criterion"), "cluster": run.config.get("prune", {}).get("cluster"),
        "reproduced": reproduced, **({"unverified": unverified} if unverified else {}),
    }
    out = Path(out_path) if out_path else workspace_root() / "exports" / f"{run.name}-step{step:04d}"
    if progress:
        progress(0.2, f"exporting for {get_target(target).name}, judging and verifying on OpenVINO")
    result = export_for_cli(pruned, original.model, spec, data.val, out, meta, target=target)
    result["step"] = step
    result["run"] = str(run.dir)
    result["reproduced"] = reproduced
    result["unverified"] = unverified
    return result
