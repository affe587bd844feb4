"""Small builders shared by the engine tests: synthetic data sets and a fast pruning config."""
from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import pytest
import torch

from core.data import DataReport, DataSet, ImageSet
from core.models import InputSpec, LoadedModel, ModelSpec
from core.prune import PruneConfig


def random_dataset(num_classes: int, size: int = 32, n_train: int = 64, n_val: int = 48, seed: int = 0) -> DataSet:
    g = torch.Generator().manual_seed(seed)
    names = [f"c{i}" for i in range(num_classes)]
    spec = InputSpec(height=size, width=size, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))

    def make(n):
        return ImageSet(torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g),
                        torch.arange(n) % num_classes, names)

    return DataSet(make(n_train), make(n_val), names, spec, DataReport(num_classes=num_classes), "random")


def loaded(model: torch.nn.Module, arch: str, num_classes: int, size: int = 32) -> LoadedModel:
    spec = InputSpec(height=size, width=size, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    return LoadedModel(model.eval(), ModelSpec(arch=arch, num_classes=num_classes, input=spec))


# The loop of the CAR paper, as tests written before multi-cluster steps, recoveries and the control
# exercise it: one cluster per step, stop where no cluster fits, no control.
CLASSIC_LOOP = dict(clusters_per_step=1, step_macs=None, recover_epochs=0, control=False)


def quick_config(**kw) -> PruneConfig:
    base = dict(criterion="l1", cluster=8, max_drop=100.0, finetune_steps=1, batch_size=16, score_images=16,
                max_steps=2, latency=False, analyse_car=False, patience=0, **CLASSIC_LOOP)
    base.update(kw)
    return PruneConfig(**base)


def randomize_bn(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give BatchNorm layers non-trivial statistics so that emulation errors would show."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.rand(m.num_features, generator=g) - 0.5)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.rand(m.num_features, generator=g) - 0.5)
    return model.eval()


def make_legacy_run(run_dir: Path, detection: bool = False) -> None:
    """Rewrite a run folder into the format written before records had one ``metric`` key: the metric
    under ``accuracy`` (a detection run: under both ``accuracy`` and ``map``, and ``metric`` in the
    config naming it), no ``metric_name`` / ``metric_unit`` (a classification run: no ``task`` either)."""
    run_dir = Path(run_dir)

    def old(record: dict) -> dict:
        out = {}
        for key, value in record.items():
            if key == "metric":
                out["accuracy"] = value
                if detection:
                    out["map"] = value
            else:
                out[key] = value
        return out

    history = run_dir / "history.jsonl"
    lines = [json.loads(line) for line in history.read_text().splitlines() if line.strip()]
    history.write_text("".join(json.dumps(old(r)) + "\n" for r in lines))
    (run_dir / "baseline.json").write_text(json.dumps(old(json.loads((run_dir / "baseline.json").read_text()))))
    config = json.loads((run_dir / "config.json").read_text())
    for key in ("metric_name", "metric_unit", "task"):
        config.pop(key, None)
    if detection:
        config.update(task="detection", metric="mAP@0.5")
    (run_dir / "config.json").write_text(json.dumps(config))


def zip_bytes(entries: dict[str, bytes]) -> bytes:
    """A zip archive in memory holding ``entries`` (archive name -> content), as an upload would arrive."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
    return buf.getvalue()


def require_myriad() -> None:
    """Skip, with the set-up's own one-line reason, only where the NCS2 (MYRIAD) compiler cannot be set up
    (no Python <= 3.9, no g++, no libusb, ...: ``scripts/setup-myriad.sh`` recorded why). Where it was never
    set up, fail: ``make test`` builds it first, so a missing one is a broken set-up, not a reason to skip."""
    from core.ncs2_compiler import compiler_status, venv_dir

    ready, why = compiler_status()
    if ready:
        return
    if (venv_dir() / "status.json").is_file():
        pytest.skip(f"NCS2 (MYRIAD) compiler cannot be set up on this machine: {why}")
    pytest.fail(f"NCS2 (MYRIAD) compiler is not set up ({why}); `make test` runs scripts/setup-myriad.sh first")


# Marks a test that runs Intel's MYRIAD compiler (see require_myriad; the fixture lives in tests/conftest.py).
needs_myriad = pytest.mark.usefixtures("myriad_compiler")


SHARED_CIFAR_JPEGS = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cifar10_train_jpeg.zip"


def cifar_jpeg_entries(per_class: int, classes: tuple[str, ...] | None = None, prefix: str = "my_cifar10/",
                       start: int = 0) -> dict[str, bytes]:
    """Real CIFAR-10 JPEGs as a user would zip them (``prefix/class/xxxx.jpg``), ``per_class`` of each class from
    ``start``, read from the shared copy of the CIFAR-10 training set; skips the test (with the reason) when that
    copy is absent: the product never needs it."""
    import pytest

    if not SHARED_CIFAR_JPEGS.is_file():
        pytest.skip(f"real CIFAR-10 JPEGs not available here ({SHARED_CIFAR_JPEGS} is absent)")
    out = {}
    with zipfile.ZipFile(SHARED_CIFAR_JPEGS) as zf:
        names = zf.namelist()
        found = sorted({n.split("/")[1] for n in names if n.count("/") == 2 and n.endswith(".jpg")})
        for cls in classes or found:
            for i in range(start, start + per_class):
                out[f"{prefix}{cls}/{i:04d}.jpg"] = zf.read(f"train/{cls}/{i:04d}.jpg")
    return out
