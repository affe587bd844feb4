"""Where a data set comes from: ``sample:NAME`` or a file, resolved one floor above the loaders.

The file loaders (``core.data``, ``core.tasks.detection.data``) know nothing of the generated samples, and
the sample generators build on the loaders' types; this module is the one place that tells the two
apart, so that neither loader has to import its own sample module (which would be an import circle).
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from . import data as image_data
from .data import (DataSet, Limits, check_split_options, split_options,
                   _check_class_count as check_class_count)  # the rule every data set obeys
from .tasks.detection import data as voc_data
from .tasks.detection.data import DetectionData
from .tasks.detection.sample import load_sample_detection
from .errors import SettingsError
from .models import InputSpec, check_input_size
from .sample_data import load_sample_dataset

SAMPLE_PREFIX = "sample:"


def sample_name(source) -> str | None:
    """``NAME`` of a ``sample:NAME`` source, None for anything else (a path, a folder, zip bytes)."""
    if isinstance(source, str) and source.startswith(SAMPLE_PREFIX):
        return source[len(SAMPLE_PREFIX):]
    return None


def load_dataset(source: str | Path | bytes, spec: InputSpec, expected_classes: int | None = None,
                 val_fraction: float = 0.2, seed: int = 0, limits: Limits | None = None,
                 class_order: list[str] | None = None, test_fraction: float | None = None) -> DataSet:
    """An image-classification data set: a generated sample (``sample:NAME``) or an ImageFolder zip/folder.

    Raises ``DataError`` as ``core.data.load_dataset`` does (``SettingsError`` for bad split settings,
    before anything is read); a sample is checked against ``expected_classes`` like any other data set.
    ``class_order`` (folder names in the model's output order) applies to files; a sample has its own.
    ``test_fraction``: None for the data set's default test split, 0 for none (see ``core.data``).
    """
    name = sample_name(source)
    if name is None:
        return image_data.load_dataset(source, spec, expected_classes=expected_classes, val_fraction=val_fraction,
                                       seed=seed, limits=limits, class_order=class_order, test_fraction=test_fraction)
    check_split_options(val_fraction, seed, test_fraction)
    if class_order:
        raise SettingsError("A bundled sample data set has its own class order; a class order applies to a data set "
                            "given as a zip or folder.")
    ds = load_sample_dataset(name, spec, val_fraction=val_fraction, seed=seed, test_fraction=test_fraction)
    check_class_count(ds.num_classes, expected_classes)
    return ds


def load_run_dataset(config: dict, spec: InputSpec, expected_classes: int | None = None) -> DataSet:
    """The data set of a run, split and labelled as the run recorded it: ``config['data_options']`` gives the
    split (runs made before the test split get their selection images exactly as they were and no test
    images, :func:`core.data.split_options`), ``config['class_order']`` the model-output order of a
    relabelled folder set (the plausibility fix, ``--class-order``); without it label j would be the j-th
    sorted folder and every accuracy of a recovery or export would be measured against the wrong classes."""
    source = config["data_source"]
    class_order = config.get("class_order") if sample_name(source) is None else None
    return load_dataset(source, spec, expected_classes=expected_classes, class_order=class_order or None,
                        **split_options(config.get("data_options")))


def load_voc_dataset(source: str | Path | bytes, input_size: tuple[int, int] | int,
                     class_names: Sequence[str] | None = None, val_fraction: float = 0.2, seed: int = 0,
                     limits: Limits | None = None) -> DetectionData:
    """A detection data set: the generated sample (``sample:NAME``, its own fixed split) or a Pascal VOC zip/folder."""
    name = sample_name(source)
    if name is None:
        return voc_data.load_voc_dataset(source, input_size, class_names=class_names, val_fraction=val_fraction,
                                         seed=seed, limits=limits)
    size = (input_size, input_size) if isinstance(input_size, int) else tuple(input_size)
    check_input_size(*size)  # settings are checked before any work, for samples as for files
    check_split_options(val_fraction, seed)
    return load_sample_detection(name, size)
