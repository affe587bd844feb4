"""The bundled sample detector: its manifest (``sample_models/detection_manifest.json``) and loading.

Kept apart from ``sample_models/manifest.json`` on purpose: that manifest lists classifiers and the
classification pages and CLI read every entry of it as one. The detector is rebuilt from its
architecture name and a plain state dict (``torch.load(weights_only=True)``), never from a pickle.
"""
from __future__ import annotations

import json
from pathlib import Path

from ...errors import ModelLoadError
from ...models import SAMPLE_DIR, extract_state_dict, load_state_dict_strict, read_checkpoint
from .models import SSDDetector, build_detector

MANIFEST = SAMPLE_DIR / "detection_manifest.json"


def detection_manifest(path: Path = MANIFEST) -> dict:
    if not path.exists():
        raise ModelLoadError(f"The bundled sample detector is missing ({path.name}); "
                             "train it with: python sample_models/train_detector.py")
    return json.loads(path.read_text())


def detector_names() -> list[str]:
    return [m["name"] for m in detection_manifest()["models"]]


def detector_entry(name: str) -> dict:
    for entry in detection_manifest()["models"]:
        if entry["name"] == name:
            return entry
    raise ModelLoadError(f"No bundled sample detector named '{name}'. Available: {', '.join(detector_names())}.")


def load_sample_detector(name: str = "ssd_counting") -> tuple[SSDDetector, dict]:
    """(detector in eval mode with its trained weights, its manifest entry)."""
    entry = detector_entry(name)
    model = build_detector(entry["architecture"], len(entry["class_names"]) + 1, entry["input_size"],
                           **entry.get("options", {}))
    obj, _ = read_checkpoint((SAMPLE_DIR / entry["weights"]).read_bytes())
    state_dict, _, _ = extract_state_dict(obj)  # also widens float16 weights to float32
    load_state_dict_strict(model, state_dict, entry["architecture"])
    return model.eval(), entry
