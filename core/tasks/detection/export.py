"""Export of a pruned detector for the NCS2: the raw network as IR FP16, anchors and decoder beside it.

The exported graph is the raw SSD (one input, one output ``[1, A, 4 + C]``): no anchors, decoding or
NMS in it, so it stays a static stack of convolutions the NCS2 can run. The bundle carries what the
host needs to turn the raw output into boxes:

    model/, fallback/  pruned and original detector: model.xml/.bin (IR FP16) + model.onnx, and for the
                       ncs2 target model.blob compiled by the MYRIAD compiler (``core.targets``)
    anchors.npy        [A, 4] float32, normalised (cx, cy, w, h), row a = output row a
    postprocess.py     core/tasks/detection/postprocess.py as it is (numpy only: decode, softmax, NMS)
    deploy.py          the PruneScope deploy script: fallback on missing/altered files, failed compile or
                       failed self-test; ``--image`` prints the decoded detections
    selftest.npz, manifest.json (sha256 of every file, mAP, MACs, latency, target verdicts, verification)

The bundle is written by the builder every task shares (``core.bundle``); :class:`DetectionBundle` is
what detection contributes to it.

Verification is what matters for a detector: the mAP of the IR on the OpenVINO CPU runtime against
PyTorch's on the validation images, within ``MAP_TOLERANCE_POINTS``.
"""
from __future__ import annotations

import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ...bundle import build_into, summary
from ...data import ImageSet
from ...errors import PruneScopeError
from ...export import (SELFTEST_TOLERANCE_FLOOR, SELFTEST_TOLERANCE_FRACTION, ExportError, _ir_logits, _one_line,
                      _torch_logits, build_atomically, bundle_zip_path, check_bundle_target, convert_to_ir, pick_step)
from ...fp16 import measure_fp16_range
from ...models import ModelSpec
from ...ov_runtime import ONNX_OPSET, compile_cpu, read_ir
from ...sources import load_voc_dataset
from ...targets import get_target
from ...runs import Run
from ...workspace import workspace_root
from . import postprocess as _postprocess
from .data import DetectionSet
from .task import NAME
from .evaluate import EvalSettings, detect, map_of_detections, normalize_images

MAP_TOLERANCE_POINTS = 0.5
SELFTEST_INPUTS = 4
POSTPROCESS_SOURCE = Path(_postprocess.__file__)


@dataclass
class DetectionVerification:
    verified: bool
    map_torch: float
    map_openvino: float
    delta_points: float
    max_abs_raw_diff: float
    n_images: int
    message: str
    device: str = "OpenVINO CPU (FP16 weights decompressed, f32 arithmetic)"

    def to_dict(self) -> dict:
        return asdict(self)


def export_detector(model: nn.Module, spec: ModelSpec, out_dir: Path, name: str = "model",
                    compress_to_fp16: bool = True) -> dict:
    """ONNX + IR (FP16, or FP32 with ``compress_to_fp16=False``) of the raw detector; refuses a model whose
    output is not one [1, A, 4 + C] tensor."""
    out_dir.mkdir(parents=True, exist_ok=True)
    shape = spec.input.shape(1)
    model = model.eval()
    with torch.no_grad():
        out = model(torch.zeros(shape))
    if not isinstance(out, torch.Tensor) or out.ndim != 3 or out.shape[0] != 1:
        raise ExportError(f"A detector must return one [1, anchors, 4 + classes] tensor; it returned "
                          f"{tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__}.")
    return convert_to_ir(model, shape, out_dir, name, compress_to_fp16)


def raw_outputs(compiled, model: nn.Module, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Raw outputs [N, A, 4 + C] of the compiled IR and of PyTorch on the same normalised images."""
    ref = _torch_logits(model, images, batch=64)
    got = _ir_logits(compiled, images).reshape(ref.shape)
    return ref, got


def verify_detector_ir(xml_path: Path, model: nn.Module, val: DetectionSet, spec: ModelSpec,
                       settings: EvalSettings = EvalSettings()) -> DetectionVerification:
    """mAP of the IR on the OpenVINO CPU runtime vs PyTorch, on every validation image."""
    if len(val) == 0:
        raise ExportError("No validation images to verify the exported detector on.")
    try:
        compiled = compile_cpu(read_ir(xml_path))
    except Exception as exc:
        raise ExportError(f"OpenVINO could not load the exported IR {Path(xml_path).name}: {_one_line(exc)}") from None
    anchors = model.anchors()
    refs, gots = [], []
    for start in range(0, len(val), 64):
        x = normalize_images(val.images[start:start + 64], spec.input.mean, spec.input.std).contiguous()
        ref, got = raw_outputs(compiled, model, x)
        refs.append(ref)
        gots.append(got)
    ref, got = np.concatenate(refs), np.concatenate(gots)
    map_t = map_of_detections(detect(ref, anchors, settings, model.box_coder_weights), val, settings).map
    map_o = map_of_detections(detect(got, anchors, settings, model.box_coder_weights), val, settings).map
    delta = abs(map_t - map_o) * 100
    ok = delta <= MAP_TOLERANCE_POINTS + 1e-9
    message = (f"{'Verified' if ok else 'Not verified'}: mAP@0.5 on OpenVINO CPU {map_o * 100:.2f} vs PyTorch "
               f"{map_t * 100:.2f} on {len(val)} images ({delta:.2f} points apart; at most "
               f"{MAP_TOLERANCE_POINTS} allowed).")
    return DetectionVerification(ok, map_t, map_o, delta, float(np.max(np.abs(ref - got))), len(val), message)


def build_detection_bundle(pruned: nn.Module, original: nn.Module, spec: ModelSpec, val: DetectionSet,
                           out_path: str | Path, meta: dict | None = None, latency_runs: int = 30,
                           target: str | None = None) -> dict:
    """Export, judge (``target``, default ``ncs2``), verify both detectors and write the bundle folder
    ``out_path`` (and its zip), through the same builder as classification (``core.bundle``).

    Built in a temporary folder and renamed into place, as classification bundles are.
    """
    chosen = get_target(target)
    out_path = Path(out_path).resolve()
    built, _ = build_atomically(out_path, lambda tmp: build_into(tmp, DetectionBundle(), chosen, pruned, original,
                                                                 spec, val, dict(meta or {}), latency_runs),
                                with_zip=True)
    checks = built.verifications
    figures = built.manifest["models"]
    result = {**summary(built, chosen),
              "verified": checks["pruned"].verified, "verification": checks["pruned"].to_dict(),
              "verification_message": checks["pruned"].message, "fallback_verified": checks["original"].verified,
              "map_torch": checks["pruned"].map_torch, "map_openvino": checks["pruned"].map_openvino,
              "latency_ms": figures["pruned"]["latency_ms"], "original_latency_ms": figures["original"]["latency_ms"],
              "latency_comparison": built.manifest["latency_comparison"]}
    zip_path = bundle_zip_path(out_path)
    files = sorted(str(p) for p in out_path.rglob("*") if p.is_file())
    return {**result, "bundle": str(out_path), "zip": str(zip_path), "manifest": str(out_path / "manifest.json"),
            "files": files}


class DetectionBundle:
    """Detection's part of a bundle (``core.bundle.BundleTask``): the raw [1, A, 4 + C] output, verified by mAP
    on the OpenVINO CPU runtime, anchors.npy + postprocess.py beside it, mAP@0.5 as the figure."""
    task = "detection"
    metric_key = "map"

    def __init__(self, settings: EvalSettings = EvalSettings()):
        self.settings = settings

    def export(self, model: nn.Module, spec: ModelSpec, out_dir: Path, target) -> dict:
        return export_detector(model, spec, out_dir, **target.ir_options())

    def verify(self, key: str, model: nn.Module, export: dict, val: DetectionSet, spec: ModelSpec, target):
        """mAP on the OpenVINO CPU runtime; for FP16 targets also the activation range (``core.fp16``) on the
        validation images, which the NCS2 computes in: an overflow fails the verification and names the layer."""
        check = verify_detector_ir(Path(export["xml"]), model, val, spec, self.settings)
        if not target.fp16:
            return check, [], {}
        images = ImageSet(val.images, torch.zeros(len(val), dtype=torch.long), ["image"])
        fp16 = measure_fp16_range(model, images, spec.input)
        if fp16.problems():
            check.verified = False
            check.message = "Not verified in FP16: " + fp16.problems()[0][1]
        return check, fp16.problems(), {"fp16_range": fp16.to_dict()}

    def check_inputs(self, val: DetectionSet, spec: ModelSpec, n: int) -> torch.Tensor:
        return normalize_images(val.images[:n], spec.input.mean, spec.input.std).float().contiguous()

    def figures(self, key: str, model: nn.Module, verification, meta: dict, spec: ModelSpec, val) -> dict:
        given = dict(meta.get(key) or {})
        return {"map": verification.map_torch, "map_source": f"PyTorch on {verification.n_images} validation images",
                "macs": given.get("macs"), "params": given.get("params")}

    def write_selftest(self, root: Path, models: dict, val: DetectionSet, spec: ModelSpec) -> dict:
        _write_selftest(root, models, val, spec)
        return {"file": "selftest.npz", "inputs": SELFTEST_INPUTS,
                "tolerance": f"max |output - expected| <= {SELFTEST_TOLERANCE_FRACTION} x (max - min of the "
                             f"expected raw output) + {SELFTEST_TOLERANCE_FLOOR}"}

    def write_extras(self, root: Path, models: dict, spec: ModelSpec) -> tuple[list[str], dict]:
        anchors = models["pruned"].anchors().astype(np.float32)
        np.save(root / "anchors.npy", anchors)
        shutil.copyfile(POSTPROCESS_SOURCE, root / "postprocess.py")
        s = self.settings
        return ["anchors.npy", "postprocess.py"], {
            "metric": "mAP@0.5",
            "postprocess": {"file": "postprocess.py", "anchors": "anchors.npy", "anchor_format": "normalised cx cy w h",
                            "num_anchors": int(len(anchors)), "box_coder_weights": list(models["pruned"].box_coder_weights),
                            "score_thresh": s.score_thresh, "nms_iou": s.nms_iou, "max_det": s.max_det,
                            "boxes": "normalised x1 y1 x2 y2"}}

    def input_section(self, export: dict, spec: ModelSpec) -> dict:
        return {"input_name": export["input_name"], "input_shape": export["input_shape"], "layout": "NCHW",
                "element_type": "f32", "mean": list(spec.input.mean), "std": list(spec.input.std),
                "colour_order": spec.input.colour_order, "resize": "stretch",
                "preprocess": "resize to HxW (aspect ratio not kept), pixel/255, then (x - mean) / std per channel"}

    def output_section(self, export: dict) -> dict:
        return {"name": export["output_name"], "shape": export["output_shape"],
                "layout": "[1, anchors, 4 + classes]: box deltas (dx, dy, dw, dh), then class logits "
                          "(index 0 = background)"}

    def readme(self, spec: ModelSpec, target, report, verification) -> str:
        return _readme(spec, target, report.verdict, verification.message)


def _write_selftest(root: Path, models: dict, val: DetectionSet, spec: ModelSpec) -> None:
    """The first validation images with both detectors' PyTorch raw outputs, for deploy.py's self-test."""
    x = normalize_images(val.images[:SELFTEST_INPUTS], spec.input.mean, spec.input.std)
    np.savez(root / "selftest.npz", input=x.numpy().astype(np.float32),
             expected_model=_torch_logits(models["pruned"], x).astype(np.float32),
             expected_fallback=_torch_logits(models["original"], x).astype(np.float32),
             tolerance_fraction=np.float32(SELFTEST_TOLERANCE_FRACTION),
             tolerance_floor=np.float32(SELFTEST_TOLERANCE_FLOOR))


def _readme(spec: ModelSpec, target, verdict: str, verification: str) -> str:
    i = spec.input
    return f"""PruneScope detection bundle ({spec.arch}), target: {target.name} ({target.label})

model/          pruned detector: model.xml + model.bin (OpenVINO IR, {"FP16" if target.fp16 else "FP32"}, input 1x{i.channels}x{i.height}x{i.width}), model.onnx (opset {ONNX_OPSET}){", model.blob (NCS2)" if target.name == "ncs2" else ""}
fallback/       the original detector, exported the same way
anchors.npy     anchors [A, 4], normalised (cx, cy, w, h), one per output row
postprocess.py  numpy decoder + NMS (boxes normalised x1 y1 x2 y2)
deploy.py       python deploy.py [--device CPU|MYRIAD] [--format auto|blob|ir] [--image PATH] [--score 0.3] [--json]
                Loads model/, falls back to fallback/ when a file is missing or altered, fails to compile
                or fails the self-test; prints the detections of each image. Needs openvino + numpy (+ Pillow).
                {target.deploy_notes()}

Input: RGB resized to {i.height}x{i.width} (aspect ratio not kept), pixel/255 then (x - mean) / std, mean={list(i.mean)} std={list(i.std)}.
Target ({target.name}): {verdict}
Verification: {verification}
"""


def export_detection_run(run_dir: str | Path, step: int | None = None, max_drop: float | None = None,
                         out_path: str | Path | None = None, progress=None, target: str | None = None) -> dict:
    """Export one step of a detection run: ``step``, else the smallest within ``max_drop`` mAP points, else the last.

    An explicit ``step`` is never overridden; ``max_drop`` is then only recorded in the manifest. ``target``:
    the export target (``core.targets``; default ``ncs2``), checked before any work.
    """
    get_target(target)
    run = Run(run_dir)
    if run.task != NAME:
        raise PruneScopeError(f"Run {run.name} is a {run.task} run, not a detection run.")
    step, record = pick_step(run, step, max_drop, progress)
    if out_path:
        check_bundle_target(out_path)  # before any work: an export never destroys what is not a bundle
    pruned, original = run.rebuild_step(step), run.original().model
    options = run.config.get("data_options") or {}
    data = load_voc_dataset(run.config["data_source"], (run.spec.input.height, run.spec.input.width),
                            class_names=run.config.get("class_names"), val_fraction=options.get("val_fraction", 0.2),
                            seed=options.get("seed", 0))
    spec = run.spec
    if spec.class_names is None:
        spec.class_names = data.class_names
    base = run.history[0]
    meta = {"pruned": {"map": record.get("metric"), "macs": record.get("macs"), "params": record.get("params")},
            "original": {"map": base.get("metric"), "macs": base.get("macs"), "params": base.get("params")},
            "step": step, "run": run.name, "max_drop": max_drop,
            "criterion": run.config.get("prune", {}).get("criterion"),
            "cluster": run.config.get("prune", {}).get("cluster")}
    out = Path(out_path) if out_path else workspace_root() / "exports" / f"{run.name}-step{step:04d}"
    if progress:
        progress(0.2, f"exporting for {get_target(target).name}, judging and verifying mAP on OpenVINO")
    result = build_detection_bundle(pruned, original, spec, data.val, out, meta, target=target)
    return {**result, "step": step, "run": str(run.dir), "agreement": None,
            "macs": record.get("macs"), "original_macs": base.get("macs")}
