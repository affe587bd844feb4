"""The generated sample data sets and the bundled sample models trained on them."""
from __future__ import annotations

import colorsys
import hashlib

import numpy as np
import pytest
import torch

from core.sources import load_dataset
from core.errors import DataError
from core.evaluate import evaluate_accuracy, predict_logits
from core.models import InputSpec, load_model, sample_entry
from core.sample_data import (
    SAMPLE_DATASETS,
    SHAPE_COLOURS,
    SHAPE_FORMS,
    _shapes,
    dataset_name,
    load_sample_dataset,
    make_sample_images,
    write_imagefolder_zip,
)

SPEC32 = InputSpec(height=32, width=32, channels=3, mean=(0.5,) * 3, std=(0.5,) * 3)
SAMPLES = ["vgg_digits", "resnet_shapes"]


def _digest(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


# ----------------------------------------------------------------------------- the data sets


def test_shapes_are_reproducible_from_the_seed():
    a, la, names = make_sample_images("shapes", seed=0, use_cache=False)
    b, lb, _ = make_sample_images("shapes", seed=0, use_cache=False)
    assert a.dtype == np.uint8 and a.shape == (4800, 32, 32, 3)
    assert la.dtype == np.int64 and np.bincount(la).tolist() == [600] * 8
    assert _digest(a) == _digest(b) and np.array_equal(la, lb)
    assert names == sorted(names) == list(SAMPLE_DATASETS["shapes"].class_names)
    other, _, _ = _shapes(1, per_class=20)
    assert _digest(other) != _digest(_shapes(0, per_class=20)[0])


def test_digits_are_the_real_sklearn_digits():
    a, labels, names = make_sample_images("digits")
    b, _, _ = make_sample_images("digits", use_cache=False)
    assert a.shape == (1797, 32, 32, 3) and _digest(a) == _digest(b)
    assert names == [str(i) for i in range(10)]
    assert np.array_equal(a[..., 0], a[..., 2])  # grey replicated to RGB
    assert np.all(np.diff(labels) >= 0)  # ordered by class, as an ImageFolder is read
    assert np.bincount(labels).sum() == 1797


def test_colour_alone_decides_the_colour_classes():
    images, labels, masks = _shapes(0, per_class=60)
    names = SAMPLE_DATASETS["shapes"].class_names
    hues: dict[str, list[float]] = {n: [] for n in names}
    for img, lab, m in zip(images, labels, masks):
        rgb = img[m > 0.95].astype(np.float64).mean(axis=0) / 255.0
        hues[names[lab]].append(colorsys.rgb_to_hsv(*rgb)[0])

    def hue_dist(a, b):
        d = np.abs(np.asarray(a) - b) % 1.0
        return np.minimum(d, 1.0 - d)

    for cls, target in SHAPE_COLOURS.items():  # every circle of a colour class has that class's hue
        assert hue_dist(hues[cls], target).max() < 0.08, cls
        for other, other_hue in SHAPE_COLOURS.items():
            if other != cls:
                assert hue_dist(hues[cls], other_hue).min() > 0.08, (cls, other)
    for form in SHAPE_FORMS:  # the shape classes come in every colour, including the circles' colours
        nearest = [min(SHAPE_COLOURS.values(), key=lambda t: hue_dist(h, t)) for h in hues[form]]
        assert len(set(nearest)) == 4, form


def test_imagefolder_zip_round_trips_through_load_dataset(tmp_path):
    path = write_imagefolder_zip("shapes", tmp_path / "shapes.zip")
    from_zip = load_dataset(path, SPEC32)
    sample = load_sample_dataset("shapes", SPEC32)
    assert from_zip.class_names == sample.class_names
    assert from_zip.report.class_counts == sample.report.class_counts == {n: 600 for n in sample.class_names}
    assert not from_zip.report.corrupt_images and not from_zip.report.skipped_non_images
    # PNG is lossless and the order is the ImageFolder order: same images, same selection split
    assert torch.equal(from_zip.val.images, sample.val.images)
    # the sample's test images are newly generated; as an upload the zip takes them from its own pool
    assert torch.equal(load_dataset(path, SPEC32, test_fraction=0).train.labels, sample.train.labels)


def test_digits_zip_is_reproducible(tmp_path):
    a = write_imagefolder_zip("digits", tmp_path / "a.zip").read_bytes()
    b = write_imagefolder_zip("digits", tmp_path / "b.zip").read_bytes()
    assert a == b
    ds = load_dataset(tmp_path / "a.zip", SPEC32)
    assert sum(ds.report.class_counts.values()) == 1797 and ds.num_classes == 10


def test_names_resize_and_errors():
    assert dataset_name("vgg_digits") == "digits" and dataset_name("resnet_shapes") == "shapes"
    by_model = load_dataset("sample:vgg_digits", SPEC32)
    by_data = load_dataset("sample:digits", SPEC32)
    assert torch.equal(by_model.val.images, by_data.val.images)
    assert by_model.report.num_classes == 10 and len(by_model.val) == 359
    small = load_sample_dataset("digits", InputSpec(height=24, width=24, channels=1, mean=(0.5,), std=(0.5,)))
    assert small.train.images.shape[1:] == (1, 24, 24) and small.train.images.dtype == torch.uint8
    assert len(small.val) == len(by_data.val)
    with pytest.raises(DataError, match="No sample data set"):
        load_dataset("sample:nope", SPEC32)
    with pytest.raises(DataError, match="outputs 7"):
        load_dataset("sample:shapes", SPEC32, expected_classes=7)


# ----------------------------------------------------------------------------- the sample models


@pytest.mark.parametrize("name", SAMPLES)
def test_sample_model_reproduces_its_manifest_accuracy(name):
    entry = sample_entry(name)
    loaded = load_model(f"sample:{name}")
    assert loaded.spec.class_names == entry["class_names"]
    data = load_dataset(f"sample:{name}", loaded.spec.input, expected_classes=loaded.spec.num_classes)
    assert data.class_names == entry["class_names"]
    assert len(data.val) == entry["num_val_images"]
    acc = evaluate_accuracy(loaded.model, data.val, loaded.spec.input).accuracy
    assert acc >= 0.95
    assert abs(acc - entry["accuracy"]) <= 0.01


def test_resnet_reads_colour_not_only_shape():
    """Swapping red and green of red circles turns them into green circles for the model."""
    loaded = load_model("sample:resnet_shapes")
    data = load_dataset("sample:resnet_shapes", loaded.spec.input)
    names = data.class_names
    red = data.val.images[data.val.labels == names.index("red_circle")]
    swapped = red[:, [1, 0, 2]]
    pred = predict_logits(loaded.model, swapped, loaded.spec.input).argmax(1)
    assert (pred == names.index("green_circle")).float().mean() >= 0.9
