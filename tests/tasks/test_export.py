"""Export: ONNX + FP16 IR that agrees with PyTorch, manifest hashes, zip, and no partial bundle on failure.

The toy classifier has random conv features and a least-squares fitted linear head on synthetic
images of 4 classes (red/green x horizontal/vertical stripes): its predictions are spread over all
classes with real margins, so top-1 agreement means something, and it needs no training loop.
``shared_bundle()`` builds one bundle per test session; test_deploy.py reuses it.
"""
from __future__ import annotations

import atexit
import copy
import functools
import json
import shutil
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from core.architectures import SampleVGG
from core.data import ImageSet, normalize
from core.errors import PruneScopeError
from core.ncs2_compiler import compiler_status
from core.export import ExportError, build_bundle, export_for_cli, export_model, sha256_file, verify_ir, zip_bundle
from core.models import InputSpec, ModelSpec

CLASSES = ["red_h", "red_v", "green_h", "green_v"]


def synthetic_images(n: int, size: int = 32, seed: int = 0) -> ImageSet:
    """4 classes: red or green stripes, horizontal or vertical, random frequency/phase/background, noise."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 4
    yy, xx = torch.meshgrid(torch.arange(size).float(), torch.arange(size).float(), indexing="ij")
    imgs = torch.empty((n, 3, size, size))
    for i in range(n):
        lab = int(labels[i])
        freq = 0.3 + 0.5 * torch.rand(1, generator=g).item()
        phase = 6.28 * torch.rand(1, generator=g).item()
        stripes = 0.5 + 0.5 * torch.sin(freq * (yy if lab % 2 == 0 else xx) + phase)
        img = (torch.rand(3, 1, 1, generator=g) * 0.3).expand(3, size, size).clone()
        img[0 if lab < 2 else 1] += 0.6 * stripes
        imgs[i] = img + 0.1 * torch.randn(3, size, size, generator=g)
    return ImageSet((imgs.clamp(0, 1) * 255).round().to(torch.uint8), labels, list(CLASSES))


def toy_spec() -> ModelSpec:
    return ModelSpec(arch="sample_vgg", num_classes=4, input=InputSpec(height=32, width=32), class_names=list(CLASSES))


@torch.no_grad()
def fit_head(model: nn.Module, n_train: int = 512, seed: int = 1) -> nn.Module:
    """Fit the linear classifier of a SampleVGG by ridge regression on its (fixed) conv features."""
    spec = toy_spec()
    train = synthetic_images(n_train, seed=seed)
    x = normalize(train.images, spec.input)
    # Random init shrinks activations layer by layer; rescale every BatchNorm so its output has unit
    # spread (data-dependent init), which keeps all weights, and the folded conv weights, FP16-friendly.
    for bn in [m for m in model.features if isinstance(m, nn.BatchNorm2d)]:
        seen = []
        handle = bn.register_forward_hook(lambda m, i, o: seen.append(o))
        model.features(x[:128])
        handle.remove()
        spread = float(seen[0].std().clamp_min(1e-8))
        bn.weight.div_(spread)
        bn.bias.div_(spread)
    f = torch.flatten(model.pool(model.features(x)), 1)
    mu = f.mean(0)
    fz = torch.cat([f - mu, torch.ones(len(f), 1)], 1)
    y = nn.functional.one_hot(train.labels, 4).float() * 2 - 1
    w = torch.linalg.solve(fz.T @ fz + 1e-1 * torch.eye(fz.shape[1]), fz.T @ y)
    model.classifier.weight.copy_(w[:-1].T)
    model.classifier.bias.copy_(w[-1] - (mu[:, None] * w[:-1]).sum(0))
    return model


def fitted_toy(seed: int = 0) -> nn.Module:
    """SampleVGG with random conv features and a ridge-regression classifier head."""
    torch.manual_seed(seed)
    return fit_head(SampleVGG(num_classes=4).eval(), seed=seed + 1)


def pruned_copy(model: nn.Module) -> nn.Module:
    """Half the channels of every conv, in clusters of 8 (Torch-Pruning), then the head refitted."""
    import torch_pruning as tp

    pruned = copy.deepcopy(model)
    pruner = tp.pruner.MagnitudePruner(pruned, torch.zeros(1, 3, 32, 32), importance=tp.importance.MagnitudeImportance(p=2),
                                       pruning_ratio=0.5, round_to=8, ignored_layers=[pruned.classifier])
    pruner.step()
    return fit_head(pruned.eval())


@functools.lru_cache(maxsize=1)
def toy_setup():
    model = fitted_toy()
    return model, pruned_copy(model), toy_spec(), synthetic_images(240, seed=99)


@functools.lru_cache(maxsize=1)
def shared_bundle() -> tuple[Path, dict]:
    """One bundle (and zip) per session, built without caller figures so they are measured."""
    model, pruned, spec, val = toy_setup()
    root = Path(tempfile.mkdtemp(prefix="prunescope-bundle-"))
    atexit.register(shutil.rmtree, root, True)
    summary = export_for_cli(pruned, model, spec, val, root / "bundle", {"max_drop": 0.02, "step": 3, "run": "test"})
    return root / "bundle", summary


# ----------------------------------------------------------------------------- tests


def test_toy_model_is_not_degenerate():
    model, pruned, spec, val = toy_setup()
    for m in (model, pruned):
        with torch.no_grad():
            pred = m(normalize(val.images, spec.input)).argmax(1)
        assert (pred == val.labels).float().mean() > 0.8
        assert len(torch.unique(pred)) == 4
    assert sum(m.out_channels for m in pruned.modules() if isinstance(m, nn.Conv2d)) < \
        sum(m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d))
    assert all(m.out_channels % 8 == 0 for m in pruned.modules() if isinstance(m, nn.Conv2d))


def test_export_model_writes_static_fp16_ir_and_onnx(tmp_path):
    import onnx
    import openvino as ov

    model, _, spec, _ = toy_setup()
    info = export_model(model, spec, tmp_path / "m")
    for key in ("onnx", "xml", "bin"):
        assert Path(info[key]).is_file()
    assert info["input_shape"] == [1, 3, 32, 32] and info["output_shape"] == [1, 4]
    assert info["input_name"] == "input" and info["class_names"] == CLASSES
    assert info["mean"] == list(spec.input.mean) and info["colour_order"] == "RGB"
    proto = onnx.load(info["onnx"])
    assert proto.opset_import[0].version == 13
    dims = [d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim]
    assert dims == [1, 3, 32, 32]
    ov_model = ov.Core().read_model(info["xml"])
    assert ov_model.inputs[0].get_partial_shape().is_static
    assert 'element_type="f16"' in Path(info["xml"]).read_text()


def test_bundle_ir_agrees_with_pytorch():
    bundle, summary = shared_bundle()
    manifest = json.loads((bundle / "manifest.json").read_text())
    for which in ("pruned", "original"):
        v = manifest["models"][which]["verification"]
        assert v["n_images"] == 240 >= 200
        assert v["agreement"] >= 0.99 and v["verified"] is True
        assert v["max_abs_logit_diff"] < 0.05
        assert v["distinct_predictions"] == 4
    assert summary["verified"] is True and summary["agreement"] >= 0.99
    assert summary["ncs_compatible"] is True and manifest["ncs2"]["compatible"] is True


def test_manifest_hashes_match_files_and_figures_are_recorded():
    bundle, summary = shared_bundle()
    manifest = json.loads((bundle / "manifest.json").read_text())
    listed = {}
    for which in ("pruned", "original"):
        entry = manifest["models"][which]
        listed.update(entry["files"])
        # the NCS2 blob is there exactly when the MYRIAD compiler is set up (it is on a machine with Python <= 3.9)
        blob = ("blob",) if compiler_status()[0] else ()
        assert set(entry["files"]) == {f"{entry['dir']}/model.{ext}" for ext in ("xml", "bin", "onnx", *blob)}
        assert entry.get("blob") == (f"{entry['dir']}/model.blob" if blob else None)
        assert 0 <= entry["accuracy"] <= 1 and entry["macs"] > 0 and entry["params"] > 0 and entry["latency_ms"] > 0
    listed.update(manifest["files"])
    on_disk = {p.relative_to(bundle).as_posix() for p in bundle.rglob("*") if p.is_file()} - {"manifest.json"}
    assert set(listed) == on_disk
    for rel, digest in listed.items():
        assert sha256_file(bundle / rel) == digest, rel
    assert manifest["models"]["pruned"]["macs"] < manifest["models"]["original"]["macs"]
    assert manifest["max_drop"] == 0.02 and manifest["step"] == 3 and manifest["meta"] == {"run": "test"}
    from core import __version__

    assert manifest["tool"]["version"] == __version__
    assert manifest["class_names"] == CLASSES
    assert manifest["input"]["input_shape"] == [1, 3, 32, 32] and manifest["input"]["std"] == list(toy_spec().input.std)
    with np.load(bundle / "selftest.npz") as st:
        assert st["input"].shape[1:] == (3, 32, 32)
        assert st["expected_model"].shape == st["expected_fallback"].shape == (len(st["input"]), 4)
    assert set(summary) >= {"ncs_compatible", "verified", "agreement", "files", "bundle", "zip"}
    assert all(Path(f).is_file() for f in summary["files"])


def test_zip_holds_every_bundle_file():
    bundle, summary = shared_bundle()
    with zipfile.ZipFile(summary["zip"]) as zf:
        names = set(zf.namelist())
    assert names == {f"bundle/{p.relative_to(bundle).as_posix()}" for p in bundle.rglob("*") if p.is_file()}


def test_verify_ir_reports_few_images_and_disagreement():
    model, pruned, spec, val = toy_setup()
    bundle, _ = shared_bundle()
    xml = bundle / "fallback" / "model.xml"  # the IR of ``model``
    few = ImageSet(val.images[:50], val.labels[:50], val.class_names)
    v = verify_ir(xml, model, few, spec, min_images=200)
    assert v.n_images == 50 and v.verified
    assert "fewer than" in v.message and any("50" in n for n in v.notes)
    bad = verify_ir(xml, pruned, val, spec)  # a different model: the IR does not match it
    assert not bad.verified and bad.agreement < 0.99 and "Not verified" in bad.message
    with pytest.raises(ExportError):
        verify_ir(xml, model, ImageSet(val.images[:0], val.labels[:0], val.class_names), spec)


class _BadOutput(nn.Module):
    """Runs, but returns a 4D tensor: the export refuses it after the pruned model was already written."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        return self.conv(x)


def test_failed_export_leaves_no_partial_bundle(tmp_path):
    model, pruned, spec, val = toy_setup()
    out = tmp_path / "exports" / "bundle"
    with pytest.raises(PruneScopeError) as err:
        build_bundle(pruned, _BadOutput(), spec, val, out, {"accuracy": 0.9, "macs": 1, "params": 1, "latency_ms": 1.0,
                                                            "original": {"accuracy": 0.9, "macs": 1, "params": 1,
                                                                         "latency_ms": 1.0}})
    assert "logits" in str(err.value)
    assert not out.exists()
    assert list((tmp_path / "exports").iterdir()) == []  # no temporary folder left behind
    # an existing bundle survives a failed rebuild untouched
    out.mkdir()
    (out / "keep.txt").write_text("old bundle")
    with pytest.raises(PruneScopeError):
        build_bundle(pruned, _BadOutput(), spec, val, out, {})
    assert (out / "keep.txt").read_text() == "old bundle"
    assert sorted(p.name for p in (tmp_path / "exports").iterdir()) == ["bundle"]


def test_zip_bundle_refuses_incomplete_folder(tmp_path):
    with pytest.raises(ExportError):
        zip_bundle(tmp_path)
