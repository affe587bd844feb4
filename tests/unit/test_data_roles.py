"""The three image roles (issue 14): train, selection (``val``) and test are disjoint, drawn reproducibly,
recorded so that every figure can be reproduced, and old runs' data options load their old selection."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from core.data import held_out_split, load_dataset, split_options, three_way_split
from core.errors import SettingsError
from core.models import InputSpec
from core.sources import load_dataset as load_any, load_run_dataset

SPEC = InputSpec(height=8, width=8, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))


def _unique_png(k: int) -> bytes:
    """An 8x8 image whose pixels encode ``k``: every file of a data set decodes to different pixels."""
    arr = np.zeros((8, 8, 3), dtype=np.uint8)
    arr[0, 0], arr[0, 1], arr[0, 2] = k % 251, (k // 251) % 251, 7
    buf = io.BytesIO()
    Image.fromarray(arr, "RGB").save(buf, format="PNG")
    return buf.getvalue()


def _write(root, layout: dict[str, int], classes=("a", "b", "c")) -> None:
    """``layout``: folder prefix ('' for unsplit, 'train/' ...) -> images per class."""
    k = 0
    for prefix, per_class in layout.items():
        for c in classes:
            folder = root / prefix / c
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                k += 1
                (folder / f"{i:03d}.png").write_bytes(_unique_png(k))


def _pixels(images: torch.Tensor) -> set[bytes]:
    return {bytes(x.numpy().tobytes()) for x in images}


def test_unsplit_roles_are_disjoint_and_the_selection_is_the_old_val_split(tmp_path):
    _write(tmp_path, {"": 20})
    ds = load_dataset(tmp_path, SPEC)
    counts = ds.split_record()["counts"]
    assert counts == {"train": 36, "selection": 12, "test": 12}, "60 images: 20 % selection, 20 % test, the rest train"
    roles = [_pixels(s.images) for s in (ds.train, ds.selection, ds.test)]
    assert not (roles[0] & roles[1]) and not (roles[0] & roles[2]) and not (roles[1] & roles[2])
    assert set(ds.test.labels.tolist()) == {0, 1, 2}, "the test draw is stratified"
    legacy = load_dataset(tmp_path, SPEC, test_fraction=0)
    assert len(legacy.test) == 0 and ds.selection.ids == legacy.val.ids
    assert torch.equal(ds.val.images, legacy.val.images), "the selection images do not depend on the test split"
    again = load_dataset(tmp_path, SPEC)
    assert again.split_record() == ds.split_record()
    other_seed = load_dataset(tmp_path, SPEC, seed=1)
    assert other_seed.split_record()["sha256"]["test"] != ds.split_record()["sha256"]["test"]


def test_split_record_names_the_settings_counts_and_files(tmp_path):
    _write(tmp_path, {"": 10})
    ds = load_dataset(tmp_path, SPEC, val_fraction=0.3, seed=4, test_fraction=0.2)
    rec = ds.split_record(files=True)
    assert (rec["seed"], rec["val_fraction"], rec["test_fraction"], rec["layout"]) == (4, 0.3, 0.2, "unsplit")
    assert rec["counts"] == {r: len(f) for r, f in rec["files"].items()} == {"train": 15, "selection": 9, "test": 6}
    files = [set(f) for f in rec["files"].values()]
    assert sum(len(f) for f in files) == len(set().union(*files)) == 30
    assert all(name.endswith(".png") and "/" in name for name in rec["files"]["test"])


def test_presplit_val_folder_is_split_into_selection_and_test(tmp_path):
    _write(tmp_path, {"train": 6, "val": 5})
    ds = load_dataset(tmp_path, SPEC)
    assert (len(ds.train), len(ds.val), len(ds.test)) == (18, 9, 6), "floor(5/2)=2 test per class, 3 selection"
    assert all(i.startswith("val/") for i in ds.val.ids + ds.test.ids) and not set(ds.val.ids) & set(ds.test.ids)
    rec = ds.split_record()
    assert rec["layout"] == "train/val" and rec["test_from"] == "val/ folder" and rec["test_fraction"] == 0.5


def test_a_test_folder_is_the_test_role_when_the_upload_has_one(tmp_path):
    _write(tmp_path, {"train": 4, "val": 3, "test": 2})
    ds = load_dataset(tmp_path, SPEC)
    assert all(i.startswith("val/") for i in ds.val.ids) and len(ds.val) == 9
    assert all(i.startswith("test/") for i in ds.test.ids) and len(ds.test) == 6
    assert ds.split_record()["test_from"] == "test/ folder"
    legacy = load_dataset(tmp_path, SPEC, test_fraction=0)
    assert legacy.val.ids == ds.val.ids and len(legacy.test) == 0, "before the test split, test/ was ignored"


def test_a_lone_test_folder_beside_train_is_the_held_out_folder(tmp_path):
    _write(tmp_path, {"train": 4, "test": 4})
    ds = load_dataset(tmp_path, SPEC)
    assert (len(ds.val), len(ds.test)) == (6, 6)
    assert all(i.startswith("test/") for i in ds.val.ids + ds.test.ids)


def test_old_data_options_load_their_old_selection_images(tmp_path):
    _write(tmp_path, {"train": 3, "val": 4})
    assert split_options({"val_fraction": 0.25, "seed": 3}) == {"val_fraction": 0.25, "seed": 3, "test_fraction": 0.0}
    assert split_options(None) == {"val_fraction": 0.2, "seed": 0, "test_fraction": 0.0}
    old = load_run_dataset({"data_source": str(tmp_path), "data_options": {"val_fraction": 0.2, "seed": 0}}, SPEC)
    assert len(old.val) == 12 and len(old.test) == 0, "a run from before the test split scored all of val/"
    new = load_dataset(tmp_path, SPEC)
    recorded = {"val_fraction": 0.2, "seed": 0, "test_fraction": new.split_record()["test_fraction"]}
    again = load_run_dataset({"data_source": str(tmp_path), "data_options": recorded}, SPEC)
    assert again.split_record()["sha256"] == new.split_record()["sha256"]


def test_a_run_reloads_its_data_in_the_class_order_it_recorded(tmp_path):
    """A folder set relabelled to the model's output order (``--class-order``) reloads with that order for
    recovery and export, not the sorted folder names; a run without ``class_order`` keeps the sorted one."""
    _write(tmp_path, {"": 10})
    order = ["c", "a", "b"]
    relabelled = load_dataset(tmp_path, SPEC, class_order=order)
    config = {"data_source": str(tmp_path), "data_options": {"val_fraction": 0.2, "seed": 0, "test_fraction": 0.2},
              "class_order": order}
    again = load_run_dataset(config, SPEC)
    assert again.class_names == order
    for role in ("train", "val", "test"):
        assert torch.equal(getattr(again, role).labels, getattr(relabelled, role).labels), role
        assert torch.equal(getattr(again, role).images, getattr(relabelled, role).images), role
    assert load_run_dataset({**config, "class_order": []}, SPEC).class_names == ["a", "b", "c"]
    sample = load_run_dataset({"data_source": "sample:shapes", "class_order": ["x"]}, InputSpec(height=32, width=32))
    assert sample.class_names and sample.class_names != ["x"], "a sample keeps its own order"


def test_bad_test_fractions_are_refused_before_anything_is_read(tmp_path):
    for bad in (-0.1, 1.0, float("nan")):
        with pytest.raises(SettingsError, match="test fraction"):
            load_dataset(tmp_path / "missing", SPEC, test_fraction=bad)
    with pytest.raises(SettingsError, match="no training images"):
        load_dataset(tmp_path / "missing", SPEC, val_fraction=0.5, test_fraction=0.5)


def test_split_helpers_keep_every_class_measurable_and_trainable():
    labels = np.array([0] * 7 + [1] * 2 + [2] * 1)
    sel, test = held_out_split(labels, 0.5, seed=0)
    assert set(labels[sel]) == {0, 1, 2} and sorted(np.concatenate([sel, test]).tolist()) == list(range(10))
    train, sel, test = three_way_split(np.repeat(np.arange(3), [10, 3, 2]), 0.2, 0.2, seed=0)
    assert len(set(train) | set(sel) | set(test)) == 15 and not set(train) & set(test)
    assert set(np.repeat(np.arange(3), [10, 3, 2])[train]) == {0, 1, 2}, "test never takes a class's last training image"


def test_bundled_samples_keep_their_selection_images_and_get_unseen_test_images():
    spec = InputSpec(height=32, width=32)
    shapes = load_any("sample:shapes", spec)
    legacy = load_any("sample:shapes", spec, test_fraction=0)
    assert torch.equal(shapes.val.images, legacy.val.images) and torch.equal(shapes.train.images, legacy.train.images)
    assert len(shapes.test) == 960 and not _pixels(shapes.test.images) & _pixels(legacy.train.images)
    assert shapes.split_record()["test_from"].startswith("newly generated")
    digits = load_any("sample:digits", spec)
    assert len(digits.test) == 0 and len(digits.val) == 359, "every other digits image trained vgg_digits"
    split_digits = load_any("sample:digits", spec, test_fraction=0.5)
    assert len(split_digits.val) + len(split_digits.test) == 359 and set(split_digits.test.ids) <= set(digits.val.ids)
