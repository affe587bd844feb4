"""An uploaded detector: architecture name + state dict bytes, the class count taken from the data set."""
from __future__ import annotations

from ...errors import ModelLoadError
from ...models import extract_state_dict, load_state_dict_strict, read_checkpoint
from .models import DETECTION_ARCHITECTURES, SSDDetector, build_detector


def load_detector_weights(arch: str, weights: bytes, num_classes: int, input_size: tuple[int, int]) -> SSDDetector:
    """``arch`` rebuilt for ``num_classes`` (objects + background) at ``input_size``, with the uploaded weights.

    Only plain state dicts are read (no code runs); a mismatch names the keys and shapes that differ.
    """
    if arch not in DETECTION_ARCHITECTURES:
        raise ModelLoadError(f"Unknown detection architecture '{arch}'. Choose one of: "
                             f"{', '.join(DETECTION_ARCHITECTURES)}.")
    if not weights:
        raise ModelLoadError("The weights file is empty.")
    model = build_detector(arch, num_classes, input_size)
    obj, _ = read_checkpoint(weights)
    state_dict, _, _ = extract_state_dict(obj)
    try:
        load_state_dict_strict(model, state_dict, arch)
    except ModelLoadError as exc:
        raise ModelLoadError(f"{exc} The data set has {num_classes - 1} object classes, so the detector was built "
                             f"with {num_classes} outputs per anchor (background included); weights trained for "
                             "another class count do not fit.") from None
    return model.eval()
