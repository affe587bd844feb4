#!/usr/bin/env python3
"""Run a PruneScope export bundle: the pruned model, or the original when the pruned one cannot be trusted.

    python deploy.py                       # load on CPU, run the self-test, say which model is used and why
    python deploy.py --device MYRIAD       # Intel NCS2 (needs OpenVINO 2022.3 LTS, the last with MYRIAD);
                                           # imports model.blob, compiled by PruneScope with the MYRIAD compiler
    python deploy.py --device MYRIAD --format ir   # compile the IR on the host instead of importing the blob
    python deploy.py --image cat.jpg       # also classify an image (reading images needs Pillow)

A detection bundle (manifest "task": "detection") uses the same checks; --image then prints the
detected boxes: the raw output is decoded with anchors.npy and NMS runs on the host, in numpy
(postprocess.py, next to this file).

The pruned model (model/) is used unless one of its files is missing or altered (sha256 against
manifest.json), it fails to compile on the device, or it fails the built-in self-test (the stored
inputs in selftest.npz must give the stored outputs within a tolerance). A missing, altered or
non-finite self-test counts as a failure. Then the original model (fallback/) goes through the same
checks and is used instead (without a usable self-test, on its intact files alone, which the reason
says). The bundle's own modules (postprocess.py) run only when their sha256 matches, imported by path.

From Python:

    import deploy
    compiled, which, reason = deploy.load(".", "CPU")
    logits = deploy.predict(images)        # uint8 images, HWC/NHWC/CHW/NCHW, already at the input size

Needs only openvino and numpy (Python 3.7+, OpenVINO 2022.3 or newer). Written by PruneScope; it does
not import PruneScope or torch.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
# (name, folder, key of its expected outputs in selftest.npz)
CANDIDATES = (("pruned", "model", "expected_model"), ("fallback", "fallback", "expected_fallback"))
_STATE = {}


def _core():
    try:
        from openvino import Core  # OpenVINO 2023.0 and newer
    except ImportError:
        from openvino.runtime import Core  # OpenVINO 2022.x (MYRIAD)
    return Core()


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_manifest(bundle_dir=None):
    path = os.path.join(bundle_dir or HERE, "manifest.json")
    with open(path, "r", encoding="utf-8") as f:
        return json.load(f)


def _entry(manifest, name):
    return manifest["models"]["pruned" if name == "pruned" else "original"]


def check_files(bundle_dir, manifest, name):
    """None when every file of the model is present and unaltered, else what is wrong."""
    entry = _entry(manifest, name)
    files = dict(entry.get("files") or {})
    for required in (entry["xml"], entry["bin"]):
        if required not in files:
            return "manifest.json lists no sha256 for %s" % required
    for rel, digest in sorted(files.items()):
        parts = rel.split("/")
        if rel.startswith("/") or ".." in parts or "\\" in rel or ":" in rel:
            return "manifest.json names %s, a path outside the bundle" % rel
        path = os.path.join(bundle_dir, *parts)
        if not os.path.isfile(path) or os.path.islink(path):
            return "file %s is missing" % rel
        if sha256_file(path) != digest:
            return "file %s was altered (sha256 differs from manifest.json)" % rel
    return None


SELFTEST_KEYS = ("input", "expected_model", "expected_fallback")


def _load_selftest(bundle_dir, manifest):
    """(arrays, None) for an intact, finite self-test, else (None, what is wrong). A missing, altered or
    unreadable self-test, or one whose values are not finite (NaN passes any tolerance), is no self-test:
    the pruned model is then not used."""
    path = os.path.join(bundle_dir, "selftest.npz")
    digest = (manifest.get("files") or {}).get("selftest.npz")
    if not os.path.isfile(path) or os.path.islink(path):
        return None, "selftest.npz is missing"
    if not digest:
        return None, "manifest.json lists no sha256 for selftest.npz"
    if sha256_file(path) != digest:
        return None, "selftest.npz was altered (sha256 differs from manifest.json)"
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except Exception as exc:
        return None, "selftest.npz cannot be read (%s)" % _short(exc)
    for key in SELFTEST_KEYS:
        if key not in arrays:
            return None, "selftest.npz has no %s" % key
        if arrays[key].dtype.kind != "f" or not np.all(np.isfinite(arrays[key])):
            return None, "selftest.npz holds values that are not finite numbers (%s)" % key
    if len(arrays["input"]) == 0:
        return None, "selftest.npz holds no input"
    for key, top in (("tolerance_fraction", 1.0), ("tolerance_floor", 1.0)):  # NaN or a huge one passes anything
        if key in arrays and not (np.all(np.isfinite(arrays[key])) and 0 <= float(arrays[key]) <= top):
            return None, "selftest.npz's %s is not a number from 0 to %g" % (key, top)
    return arrays, None


def check_input_spec(manifest, compiled):
    """None when the manifest's input spec is usable and agrees with the compiled model's input, else what is
    wrong (an edited input_shape, mean or std must not reach preprocess() as a traceback)."""
    spec = manifest.get("input")
    if not isinstance(spec, dict):
        return "manifest.json has no input spec"
    shape = spec.get("input_shape")
    if not (isinstance(shape, list) and len(shape) == 4 and all(isinstance(v, int) and not isinstance(v, bool)
                                                                 and 0 < v <= 65536 for v in shape) and shape[0] == 1):
        return "manifest.json's input_shape %r is not [1, C, H, W]" % (shape,)
    for key in ("mean", "std"):
        values = spec.get(key)
        if not (isinstance(values, list) and len(values) == shape[1] and all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v) for v in values)):
            return "manifest.json's %s %r is not %d finite numbers" % (key, values, shape[1])
    if not all(v > 0 for v in spec["std"]):
        return "manifest.json's std %r is not positive" % (spec["std"],)
    try:
        model_shape = [int(d) for d in compiled.input(0).get_partial_shape().to_shape()]
    except Exception:
        return None  # a dynamic input: the model decides at inference
    if model_shape != shape:
        return "manifest.json's input_shape %s differs from the model's input %s" % (shape, model_shape)
    return None


def _infer(compiled, x):
    return np.asarray(compiled([x])[compiled.output(0)], dtype=np.float32)


def is_detection(manifest):
    return manifest.get("task") == "detection"


def self_test(compiled, selftest, key, check_class=True):
    """(passed, detail): the stored inputs must give the stored outputs within the tolerance (and, for a
    classifier, the same top-1 class; a detector's raw output has no single class to compare)."""
    frac = float(selftest.get("tolerance_fraction", 0.1))
    floor = float(selftest.get("tolerance_floor", 1e-3))
    inputs, expected = selftest["input"], selftest[key]
    worst = 0.0
    for i in range(len(inputs)):
        got = _infer(compiled, inputs[i:i + 1]).reshape(-1)
        want = expected[i].reshape(-1)
        if got.shape != want.shape:
            return False, "output has %d values, expected %d" % (got.size, want.size)
        if not np.all(np.isfinite(got)):
            return False, "output of self-test input %d is not finite" % i
        diff = float(np.max(np.abs(got - want)))
        tol = frac * float(want.max() - want.min()) + floor
        worst = max(worst, diff / tol)
        if check_class and int(got.argmax()) != int(want.argmax()):
            return False, "self-test input %d gives class %d, expected %d" % (i, int(got.argmax()), int(want.argmax()))
        if diff > tol:
            return False, "self-test input %d differs by %.4g (tolerance %.4g)" % (i, diff, tol)
    return True, "%d self-test inputs within tolerance (worst %.0f%% of it)" % (len(inputs), 100 * worst)


FORMATS = ("auto", "blob", "ir")


def compile_entry(core, bundle_dir, entry, device, fmt="auto"):
    """(compiled model, how): the model's NCS2 blob imported (``Core.import_model``) when ``fmt`` is "blob", or
    "auto" on a MYRIAD device and the bundle has one; else its IR read and compiled on ``device``."""
    blob = entry.get("blob")
    if fmt == "blob" or (fmt == "auto" and blob and device.upper().startswith("MYRIAD")):
        if not blob:
            raise RuntimeError("this bundle has no NCS2 blob for this model (export it with --target ncs2)")
        with open(os.path.join(bundle_dir, *blob.split("/")), "rb") as f:
            data = f.read()
        return core.import_model(data, device), "imported %s" % blob  # bytes: OpenVINO 2022.3 and newer
    model = core.read_model(os.path.join(bundle_dir, *entry["xml"].split("/")))
    return core.compile_model(model, device), "compiled %s" % entry["xml"]


def load(bundle_dir=None, device="CPU", fmt="auto"):
    """(compiled_model, which, reason): the pruned model if it is intact, compiles and passes the self-test,
    else the fallback (original) model under the same checks. Raises RuntimeError when neither works.
    ``fmt``: "auto" (the NCS2 blob on MYRIAD when the bundle has one, else the IR), "blob" or "ir"."""
    if fmt not in FORMATS:
        raise RuntimeError("unknown format %r; choose one of %s" % (fmt, ", ".join(FORMATS)))
    bundle_dir = os.path.abspath(bundle_dir or HERE)
    try:
        manifest = read_manifest(bundle_dir)
    except (OSError, ValueError) as exc:
        raise RuntimeError("manifest.json in %s is missing or unreadable (%s); without it no model can be "
                           "checked" % (bundle_dir, _short(exc)))
    if not isinstance(manifest, dict):
        raise RuntimeError("manifest.json in %s is not a bundle manifest; no model can be checked" % bundle_dir)
    selftest, selftest_problem = _load_selftest(bundle_dir, manifest)
    core = _core()
    failures = []
    for name, folder, key in CANDIDATES:
        try:
            bad = check_files(bundle_dir, manifest, name)
        except Exception as exc:  # an edited manifest: no model it describes is used
            bad = "manifest.json does not describe it (%s)" % _short(exc)
        if bad:
            failures.append("%s model: %s" % (name, bad))
            continue
        entry = _entry(manifest, name)
        try:
            compiled, how = compile_entry(core, bundle_dir, entry, device, fmt)
        except Exception as exc:  # any loader/compiler error means "do not use this model"
            failures.append("%s model failed to load/compile on %s: %s" % (name, device, _short(exc)))
            continue
        bad_spec = check_input_spec(manifest, compiled)
        if bad_spec:
            failures.append("%s model: %s" % (name, bad_spec))
            continue
        if selftest is None:
            if name == "pruned":  # no self-test, no proof the pruned model computes what was exported
                failures.append("pruned model not self-tested: %s" % selftest_problem)
                continue
            detail = "its files match manifest.json (self-test unavailable: %s)" % selftest_problem
        else:
            try:
                ok, detail = self_test(compiled, selftest, key, check_class=not is_detection(manifest))
            except Exception as exc:
                ok, detail = False, "self-test could not run: %s" % _short(exc)
            if not ok:
                failures.append("%s model failed the self-test on %s: %s" % (name, device, detail))
                continue
        if name == "pruned":
            reason = "files match manifest.json, %s for %s, %s" % (how, device, detail)
        else:
            reason = "; ".join(failures) + ". The fallback (original) model is intact and %s" % detail
        _STATE.update(compiled=compiled, which=name, reason=reason, manifest=manifest, bundle_dir=bundle_dir,
                      device=device)
        return compiled, name, reason
    raise RuntimeError("No usable model in %s: %s" % (bundle_dir, "; ".join(failures)))


def _short(exc):
    text = str(exc).strip().splitlines()
    return (type(exc).__name__ + ": " + (text[0] if text else ""))[:300]


# ----------------------------------------------------------------------------- inference helpers


def preprocess(images, manifest):
    """uint8 images (HWC, NHWC, CHW or NCHW, at the model's input size) -> normalised float32 NCHW."""
    spec = manifest["input"]
    _, c, h, w = spec["input_shape"]
    x = np.asarray(images)
    if x.ndim == 3:
        x = x[None]
    if x.ndim != 4:
        raise ValueError("expected image arrays of 3 or 4 dimensions, got shape %s" % (x.shape,))
    if x.shape[1] != c and x.shape[-1] == c:
        x = x.transpose(0, 3, 1, 2)  # NHWC -> NCHW
    if tuple(x.shape[1:]) != (c, h, w):
        raise ValueError("images must be %dx%dx%d (channels x height x width); got %s. Use load_image() to resize."
                         % (c, h, w, x.shape[1:]))
    x = x.astype(np.float32) / 255.0 if x.dtype == np.uint8 else x.astype(np.float32)
    mean = np.asarray(spec["mean"], np.float32).reshape(1, -1, 1, 1)
    std = np.asarray(spec["std"], np.float32).reshape(1, -1, 1, 1)
    return (x - mean) / std


def predict(images, compiled=None, bundle_dir=None, device="CPU"):
    """Logits (N, classes) for uint8 images; loads the bundle next to this file on first use."""
    if compiled is None:
        if "compiled" not in _STATE or (bundle_dir and os.path.abspath(bundle_dir) != _STATE.get("bundle_dir")):
            load(bundle_dir, device)
        compiled = _STATE["compiled"]
    manifest = _STATE.get("manifest") or read_manifest(bundle_dir)
    x = preprocess(images, manifest)
    return np.concatenate([_infer(compiled, x[i:i + 1]) for i in range(len(x))], axis=0)


HIGH_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")


def _high_bit_to_8bit(img, Image):
    """16-bit and 32-bit grey images scaled to 8 bits by their real range, as PruneScope scaled its own
    images (core/preprocess.py, kept equal by a test); Pillow's convert() would clip them at 255."""
    if img.mode not in HIGH_BIT_MODES:
        return img
    arr = np.asarray(img, dtype=np.float64)
    hi = float(arr.max()) if arr.size else 0.0
    if img.mode == "F":
        top = 1.0 if hi <= 1.0 else 65535.0 if hi <= 65535.0 else hi
    elif img.mode == "I":
        top = 255.0 if hi <= 255 else 65535.0 if hi <= 65535.0 else hi
    else:
        top = 65535.0
    return Image.fromarray(np.clip(np.rint(arr * (255.0 / top)), 0, 255).astype(np.uint8), mode="L")


def load_image(path, manifest):
    """An image file as uint8 CHW at the model's input size (resize shorter side, centre crop), in the
    manifest's colour order. .npy files are taken as they are (uint8 HWC or CHW)."""
    _, c, h, w = manifest["input"]["input_shape"]
    if path.lower().endswith(".npy"):
        arr = np.load(path, allow_pickle=False)
        if arr.dtype != np.uint8 or arr.ndim != 3 or (tuple(arr.shape) != (c, h, w) and tuple(arr.shape) != (h, w, c)):
            raise ValueError("%s holds a %s array of shape %s; expected uint8 %dx%dx%d (CHW) or %dx%dx%d (HWC)"
                             % (path, arr.dtype, tuple(arr.shape), c, h, w, h, w, c))
        return arr if arr.shape[0] == c and tuple(arr.shape) == (c, h, w) else arr.transpose(2, 0, 1).copy()
    try:
        from PIL import Image
    except ImportError:
        raise SystemExit("Reading %s needs Pillow (pip install pillow), or pass a .npy array." % path)
    with Image.open(path) as img:
        img = _high_bit_to_8bit(img, Image).convert("L" if c == 1 else "RGB")
        iw, ih = img.size
        if manifest["input"].get("resize") == "stretch":  # detectors: the whole image, aspect not kept
            img = img.resize((w, h), Image.BILINEAR)
            iw, ih = w, h
        scale = max(float(w) / iw, float(h) / ih)
        nw, nh = max(w, int(round(iw * scale))), max(h, int(round(ih * scale)))
        if (nw, nh) != (iw, ih):
            img = img.resize((nw, nh), Image.BILINEAR)
        left, top = (nw - w) // 2, (nh - h) // 2
        arr = np.asarray(img.crop((left, top, left + w, top + h)), dtype=np.uint8)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if manifest["input"].get("colour_order", "RGB").upper() == "BGR" and arr.shape[-1] == 3:
        arr = arr[:, :, ::-1]
    return arr.transpose(2, 0, 1).copy()


def _softmax(z):
    e = np.exp(z - z.max())
    return e / e.sum()


def _bundle_module(name, manifest):
    """The bundle's own module ``name``.py, imported by path after its sha256 is checked against manifest.json:
    an edited file never runs, and an application's own module of the same name never shadows it."""
    import importlib.util

    bundle_dir = _STATE.get("bundle_dir") or HERE
    path = os.path.join(bundle_dir, name + ".py")
    digest = (manifest.get("files") or {}).get(name + ".py")
    if not digest:
        raise RuntimeError("manifest.json lists no sha256 for %s.py, so it was not run" % name)
    if not os.path.isfile(path) or os.path.islink(path):
        raise RuntimeError("%s.py is missing from the bundle" % name)
    with open(path, "rb") as f:
        source = f.read()
    if hashlib.sha256(source).hexdigest() != digest:
        raise RuntimeError("%s.py was altered (sha256 differs from manifest.json), so it was not run" % name)
    spec = importlib.util.spec_from_loader("_prunescope_bundle_" + name, loader=None, origin=path)
    module = importlib.util.module_from_spec(spec)
    module.__file__ = path
    exec(compile(source, path, "exec"), module.__dict__)  # exactly the bytes checked above
    return module


def detect(image_path, compiled, manifest, score_thresh):
    """Detections of one image file: boxes in the image's pixels (x1, y1, x2, y2), class, score."""
    postprocess = _bundle_module("postprocess", manifest)  # the bundle's own numpy-only decoder + NMS

    anchors = _anchors(manifest)
    raw = predict(load_image(image_path, manifest)[None], compiled)
    raw = raw.reshape(1, len(anchors), -1)
    post = manifest["postprocess"]
    det = postprocess.postprocess(raw, anchors, score_thresh, post["nms_iou"], post["max_det"],
                                  post["box_coder_weights"])[0]
    width, height = _image_size(image_path, manifest)
    names = manifest.get("class_names") or []
    scale = np.asarray([width, height, width, height], np.float32)
    return [{"class": names[lab - 1] if 0 < lab <= len(names) else str(lab), "label": int(lab),
             "score": float(sc), "box": [round(float(v), 1) for v in box * scale],
             "box_normalised": [float(v) for v in box]} for box, sc, lab in zip(det.boxes, det.scores, det.labels)]


def _anchors(manifest):
    path = os.path.join(_STATE.get("bundle_dir") or HERE, "anchors.npy")
    digest = (manifest.get("files") or {}).get("anchors.npy")
    if not digest:
        raise RuntimeError("manifest.json lists no sha256 for anchors.npy")
    if not os.path.isfile(path) or sha256_file(path) != digest:
        raise RuntimeError("anchors.npy is missing or was altered (sha256 differs from manifest.json)")
    return np.load(path, allow_pickle=False)


def _image_size(path, manifest):
    """(width, height) the normalised boxes map to: the file's own size (the input size for .npy arrays)."""
    _, _, h, w = manifest["input"]["input_shape"]
    if path.lower().endswith(".npy"):
        return w, h
    from PIL import Image

    with Image.open(path) as img:
        return img.size


def main(argv=None):
    parser = argparse.ArgumentParser(description="Run the PruneScope bundle (pruned model with fallback).")
    parser.add_argument("--device", default="CPU", help="OpenVINO device: CPU (default), MYRIAD (NCS2, OpenVINO 2022.3), ...")
    parser.add_argument("--image", action="append", default=[], help="image file to classify (repeatable)")
    parser.add_argument("--format", choices=FORMATS, default="auto",
                        help="auto (default): the NCS2 blob on MYRIAD when the bundle has one, else the IR; blob; ir")
    parser.add_argument("--bundle", default=HERE, help="bundle folder (default: the folder of this script)")
    parser.add_argument("--top", type=int, default=5, help="classes to print per image")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    parser.add_argument("--score", type=float, default=0.3, help="detection bundles: lowest score printed")
    args = parser.parse_args(argv)
    try:
        compiled, which, reason = load(args.bundle, args.device, args.format)
    except RuntimeError as exc:
        if args.json:
            print(json.dumps({"which": None, "reason": str(exc)}))
        else:
            print("ERROR: %s" % exc, file=sys.stderr)
        return 2
    manifest = _STATE["manifest"]
    names = manifest.get("class_names") or []
    results = []
    for path in args.image:
        try:
            image = load_image(path, manifest)
            if is_detection(manifest):
                results.append({"image": path, "detections": detect(path, compiled, manifest, args.score)})
                continue
            logits = predict(image[None], compiled)[0]
        except Exception as exc:  # any image or array the model cannot take: one line, never a traceback
            print("ERROR: cannot use image %s: %s" % (path, _short(exc)), file=sys.stderr)
            return 2
        probs = _softmax(logits)
        top = np.argsort(-probs)[:args.top]
        results.append({"image": path, "top": [{"class": names[i] if i < len(names) else str(i),
                                                "index": int(i), "probability": float(probs[i])} for i in top]})
    if args.json:
        print(json.dumps({"which": which, "reason": reason, "device": args.device, "results": results}))
        return 0
    folder = "model/" if which == "pruned" else "fallback/"
    label = "pruned model" if which == "pruned" else "FALLBACK (original) model"
    print("Using the %s (%s) on %s: %s" % (label, folder, args.device, reason))
    for r in results:
        if "detections" in r:
            print("%s: %d detection(s)" % (r["image"], len(r["detections"])))
            for d in r["detections"]:
                print("  %-12s %.2f  box %s" % (d["class"], d["score"], d["box"]))
            continue
        print("%s: %s" % (r["image"], ", ".join("%s %.1f%%" % (t["class"], 100 * t["probability"]) for t in r["top"])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
