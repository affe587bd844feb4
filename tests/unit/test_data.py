"""Data set loading: layouts, the validation report, and refusal of unsafe or unusable uploads."""
from __future__ import annotations

import io
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

from core.data import ImageSet, Limits, class_allocation, load_dataset, safe_extract_zip, stratified_indices
from core.errors import DataError
from core.models import InputSpec
from tests.helpers import zip_bytes

SPEC = InputSpec(height=16, width=16, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))


def _png(colour=(255, 0, 0), mode="RGB", size=(20, 20)) -> bytes:
    img = Image.new("RGB", size, colour).convert(mode)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _classes(n_classes=3, per_class=5, prefix="") -> dict[str, bytes]:
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)]
    return {f"{prefix}c{c}/img{i}.png": _png(colours[c % 4]) for c in range(n_classes) for i in range(per_class)}


def test_zip_imagefolder_with_wrapper_folder_and_split():
    ds = load_dataset(zip_bytes(_classes(prefix="mydata/")), SPEC, expected_classes=3)
    assert ds.class_names == ["c0", "c1", "c2"]
    assert len(ds.train) + len(ds.val) + len(ds.test) == 15
    assert set(ds.val.labels.tolist()) == {0, 1, 2}, "the split is stratified"
    assert ds.train.images.shape[1:] == (3, 16, 16)


def test_split_is_reproducible():
    data = zip_bytes(_classes(per_class=10))
    a, b = load_dataset(data, SPEC), load_dataset(data, SPEC)
    assert a.val.labels.tolist() == b.val.labels.tolist()
    assert np.array_equal(a.val.images.numpy(), b.val.images.numpy())


def test_presplit_train_val_folder(tmp_path):
    for split in ("train", "val"):
        for c in ("cat", "dog"):
            (tmp_path / split / c).mkdir(parents=True)
            for i in range(3):
                (tmp_path / split / c / f"{i}.png").write_bytes(_png())
    ds = load_dataset(tmp_path, SPEC)
    assert ds.report.presplit and len(ds.train) == 6 and len(ds.val) + len(ds.test) == 6
    assert len(ds.val) == 4 and len(ds.test) == 2, "val/ split per class: floor(3 / 2) = 1 test image, 2 selection"


def test_report_lists_non_images_and_corrupt_files_and_conversions():
    entries = _classes()
    entries["c0/notes.txt"] = b"hello"
    entries["c1/broken.jpg"] = b"\xff\xd8\xff\xe0 definitely not a jpeg"
    entries["c2/grey.png"] = _png(mode="L")
    entries["c2/alpha.png"] = _png(mode="RGBA")
    entries["__MACOSX/c0/._img0.png"] = b"junk"
    ds = load_dataset(zip_bytes(entries), SPEC)
    assert any("notes.txt" in s for s in ds.report.skipped_non_images)
    assert any("broken.jpg" in s for s in ds.report.corrupt_images)
    assert ds.report.converted.get("L") == 1 and ds.report.converted.get("RGBA") == 1
    assert len(ds.train) + len(ds.val) + len(ds.test) == 17


def test_zip_slip_refused_before_anything_is_written(tmp_path):
    entries = _classes()
    entries["../../evil.png"] = _png()
    dest = tmp_path / "out"
    with pytest.raises(DataError, match="Unsafe path"):
        safe_extract_zip(zip_bytes(entries), dest=dest)
    assert not dest.exists() and not (tmp_path / "evil.png").exists()


def test_absolute_path_refused():
    entries = _classes()
    entries["/etc/evil.png"] = _png()
    with pytest.raises(DataError, match="Unsafe path"):
        load_dataset(zip_bytes(entries), SPEC)


def test_zip_bomb_refused_before_expansion(tmp_path):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("c0/a.png", _png())
        zf.writestr("c1/bomb.png", b"\0" * (50 * 1024 * 1024))
    limits = Limits(max_uncompressed_bytes=20 * 1024 * 1024)
    dest = tmp_path / "bomb"
    with pytest.raises(DataError, match="limit|zip bomb"):
        safe_extract_zip(buf.getvalue(), dest=dest, limits=limits)
    assert not dest.exists()


def test_too_many_files_refused():
    with pytest.raises(DataError, match="entries"):
        load_dataset(zip_bytes(_classes(per_class=5)), SPEC, limits=Limits(max_files=10))


def test_not_a_zip():
    with pytest.raises(DataError, match="not a valid zip"):
        load_dataset(b"this is not a zip", SPEC)


def test_fewer_than_two_classes():
    with pytest.raises(DataError, match="at least 2"):
        load_dataset(zip_bytes(_classes(n_classes=1)), SPEC)


def test_class_count_mismatch_names_both_numbers():
    with pytest.raises(DataError, match="3 classes but the model outputs 10"):
        load_dataset(zip_bytes(_classes(n_classes=3)), SPEC, expected_classes=10)


def test_grey_model_gets_one_channel():
    spec = InputSpec(height=8, width=8, channels=1, mean=(0.5,), std=(0.5,))
    ds = load_dataset(zip_bytes(_classes()), spec)
    assert ds.train.images.shape[1] == 1


# ----------------------------------------------------------------------------- stratified subsets (issue 16)


@pytest.mark.parametrize("sizes", [[2999] * 10, [100, 7, 33], [1, 1, 50], [5] * 7, [1000, 1], [3, 4, 5, 6, 7, 8, 9]])
def test_subset_gives_exactly_n_images_in_proportion(sizes):
    """'on 299 images' with the slider at 300: per-class rounding lost (or added) images."""
    labels = np.repeat(np.arange(len(sizes)), sizes)
    images = ImageSet(torch.zeros((len(labels), 1, 1, 1), dtype=torch.uint8), torch.as_tensor(labels),
                      [f"c{i}" for i in range(len(sizes))])
    total = len(labels)
    for n in sorted({1, 2, len(sizes), len(sizes) + 1, 10, 299, 300, 301, total // 3, total - 1} & set(range(1, total))):
        idx = stratified_indices(labels, n, seed=3)
        assert len(idx) == n and len(set(idx.tolist())) == n
        assert len(images.subset(n)) == n
        counts = np.bincount(labels[idx], minlength=len(sizes))
        assert all(counts <= sizes)
        if n >= len(sizes):
            assert counts.min() >= 1  # every class is represented
        share = n * np.asarray(sizes) / total
        lifted = int(((share < 1) & (counts == 1)).sum()) if n >= len(sizes) else 0  # classes raised to one image
        assert all(counts <= np.maximum(np.ceil(share - 1e-9), 1))  # never above its share, rounded up
        assert all(counts >= np.floor(share + 1e-9) - lifted)  # below it only to give a small class its one image
        assert np.array_equal(idx, stratified_indices(labels, n, seed=3))  # reproducible


def test_class_allocation_adds_up_by_largest_remainder():
    assert class_allocation([2999] * 10, 300) == [30] * 10
    assert class_allocation([10, 10, 10], 2) == [1, 1, 0]
    assert class_allocation([1000, 1], 10) == [9, 1]  # the small class still gets its one image
    assert class_allocation([50, 30, 20], 7) == [4, 2, 1]  # 3.5, 2.1, 1.4: the largest remainder wins the 7th
    assert class_allocation([0, 4], 3) == [0, 3]


def test_a_zip_without_images_says_no_images_found_and_what_it_skipped():
    """Issue 27: a zip of two folders of non-images was reported as "2 classes vs 10"; it must say that no
    image was found, what was found instead and why it was skipped, before anything about the classes."""
    junk = zip_bytes({"photos/cats/readme.txt": b"x", "photos/dogs/list.csv": b"a,b", "photos/dogs/raw.cr2": b"\0",
                      "photos/notes.md": b"#"})
    with pytest.raises(DataError) as exc:
        load_dataset(junk, SPEC, expected_classes=10)
    msg = str(exc.value)
    assert msg.startswith("No images found in upload.zip.")
    assert "0 image(s) in 2 class folder(s) (cats: 0, dogs: 0)" in msg
    assert "4 file(s) skipped" in msg and "cats/readme.txt (not an image: .txt)" in msg
    assert "dogs/raw.cr2 (not an image: .cr2)" in msg and "notes.md (not inside a class folder)" in msg
    assert "classes but the model outputs" not in msg


def test_a_class_mismatch_on_real_jpegs_says_what_was_found_first():
    """A user-style zip of real CIFAR-10 JPEGs with 3 of the 10 classes and a stray file: the message gives the
    images per class and the skipped file first, then the mismatch with the model."""
    from tests.helpers import cifar_jpeg_entries

    entries = cifar_jpeg_entries(20, classes=("airplane", "bird", "truck"))
    entries["my_cifar10/bird/Thumbs.txt"] = b"thumbnail cache"
    with pytest.raises(DataError) as exc:
        load_dataset(zip_bytes(entries), InputSpec(height=32, width=32), expected_classes=10)
    msg = str(exc.value)
    found = "Found in upload.zip: 60 image(s) in 3 class folder(s) (airplane: 20, bird: 20, truck: 20)"
    assert msg.startswith(found), msg
    assert "1 file(s) skipped: bird/Thumbs.txt (not an image: .txt)" in msg
    assert msg.index(found) < msg.index("3 classes but the model outputs 10")
