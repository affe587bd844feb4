"""Pascal VOC loading: round trips, every validation problem in the report, splits, refusal of unsafe zips."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from core.data import Limits
from core.tasks.detection.data import annotation_xml, voc_zip_bytes
from core.sources import load_voc_dataset
from core.tasks.detection.sample import load_sample_detection, make_sample_scenes
from core.errors import DataError
from tests.helpers import zip_bytes

SIZE = (32, 48)  # (H, W): not square, so that x and y mix-ups show


def _img(w=40, h=30, colour=(200, 30, 30)) -> np.ndarray:
    a = np.zeros((h, w, 3), dtype=np.uint8)
    a[...] = colour
    return a


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _entries(n=4, prefix="", w=40, h=30, objects=None) -> dict[str, bytes]:
    """A valid VOC tree of ``n`` images; ``objects`` (name, VOC pixel box, difficult) for each image."""
    objects = objects or [("cat", (5, 6, 20, 25), False), ("dog", (21, 1, 40, 30), False)]
    out = {}
    for i in range(n):
        out[f"{prefix}JPEGImages/im{i}.png"] = _png(_img(w, h))
        out[f"{prefix}Annotations/im{i}.xml"] = annotation_xml(f"im{i}.png", w, h, objects).encode()
    return out


# ----------------------------------------------------------------------------- round trips


def test_voc_zip_round_trip_keeps_boxes_labels_difficult_and_split():
    rng = np.random.default_rng(0)
    sizes = [(64, 48), (100, 80), (50, 50), (31, 77)]  # (W, H) of the originals, all different
    images, boxes, labels, difficult = [], [], [], []
    for w, h in sizes:
        images.append(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
        px = np.array([[2, 3, 20, 30], [10, 0, w, h]], dtype=np.float64)  # integer pixel edges, one touching the border
        boxes.append((px / [w, h, w, h]).astype(np.float32))
        labels.append(np.array([2, 1]))
        difficult.append(np.array([False, True]))
    ids = ["a", "b", "c", "d"]
    data = voc_zip_bytes(images, boxes, labels, ["cat", "dog"], difficult, ids=ids,
                         splits={"train": ["a", "c", "d"], "val": ["b"]}, image_format="png")
    ds = load_voc_dataset(data, SIZE)
    assert ds.class_names == ["cat", "dog"] and ds.num_classes == 3
    assert ds.report.presplit and ds.train.ids == ["a", "c", "d"] and ds.val.ids == ["b"]
    assert ds.train.images.shape == (3, 3, 32, 48) and ds.train.images.dtype == torch.uint8
    for part in (ds.train, ds.val):
        for ident, b, lab, d in zip(part.ids, part.boxes, part.labels, part.difficult):
            k = ids.index(ident)
            np.testing.assert_allclose(b, boxes[k], atol=1e-6)
            assert lab.tolist() == [2, 1] and d.tolist() == [False, True]
            assert b.dtype == np.float32 and lab.dtype == np.int64
    assert ds.report.clipped_boxes == [] and ds.report.rejected_boxes == []
    assert ds.report.class_counts == {"cat": 4, "dog": 4} and ds.report.difficult_objects == 4


def test_images_are_resized_without_keeping_the_aspect_ratio():
    left_red = np.zeros((20, 80, 3), dtype=np.uint8)
    left_red[:, :40] = (255, 0, 0)
    entries = _entries(n=2)
    entries["JPEGImages/im0.png"] = _png(left_red)
    entries["Annotations/im0.xml"] = annotation_xml("im0.png", 80, 20, [("cat", (1, 1, 40, 20), False)]).encode()
    ds = load_voc_dataset(zip_bytes(entries), (16, 16), val_fraction=0.5)
    part = ds.train if "im0" in ds.train.ids else ds.val
    i = part.ids.index("im0")
    img = part.images[i].numpy()
    assert img[0, :, :7].min() > 200 and img[0, :, 9:].max() < 50, "left half red, squashed, not cropped"
    np.testing.assert_allclose(part.boxes[i], [[0, 0, 0.5, 1]], atol=1e-6)


def test_sample_scenes_survive_a_voc_zip_round_trip():
    images, boxes, labels = make_sample_scenes("counting", "val", n=12)
    data = voc_zip_bytes(images, boxes, labels, ["head", "square", "triangle"], image_format="png")
    ds = load_voc_dataset(data, 128, val_fraction=0.25)
    assert len(ds.train) + len(ds.val) == 12
    for part in (ds.train, ds.val):
        for ident, img, b, lab in zip(part.ids, part.images, part.boxes, part.labels):
            k = int(ident)
            assert np.array_equal(img.numpy().transpose(1, 2, 0), images[k])
            np.testing.assert_allclose(b, boxes[k], atol=0.5 / 128 + 1e-6)  # VOC stores whole pixels
            assert lab.tolist() == labels[k].tolist()


def test_random_split_is_seeded_and_sized():
    data = zip_bytes(_entries(n=20))
    a, b = load_voc_dataset(data, SIZE, seed=3), load_voc_dataset(data, SIZE, seed=3)
    c = load_voc_dataset(data, SIZE, seed=4)
    assert a.val.ids == b.val.ids and len(a.val) == 4 and len(a.train) == 16
    assert a.val.ids != c.val.ids
    assert set(a.train.ids).isdisjoint(a.val.ids)
    assert "random" in a.report.split and not a.report.presplit


def test_nested_vocdevkit_folder_is_found(tmp_path):
    for name, data in _entries(n=3, prefix="VOCdevkit/VOC2007/").items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(data)
    ds = load_voc_dataset(tmp_path, SIZE)
    assert len(ds.train) + len(ds.val) == 3


def test_given_class_list_fixes_label_order_and_drops_unknown_classes():
    objects = [("cat", (5, 6, 20, 25), False), ("dog", (21, 1, 40, 30), False), ("zebra", (1, 1, 9, 9), False)]
    ds = load_voc_dataset(zip_bytes(_entries(n=4, objects=objects)), SIZE, class_names=["dog", "cat"])
    assert ds.class_names == ["dog", "cat"]
    assert ds.train.labels[0].tolist() == [2, 1], "cat is label 2 in the given order"
    assert ds.report.unknown_classes == {"zebra": 4}


def test_subset_picks_the_same_images_boxes_and_ids():
    ds = load_voc_dataset(zip_bytes(_entries(n=10)), SIZE)
    sub = ds.train.subset([2, 0])
    assert sub.ids == [ds.train.ids[2], ds.train.ids[0]]
    assert np.array_equal(sub.images[1].numpy(), ds.train.images[0].numpy())
    assert sub.boxes[0] is ds.train.boxes[2] and len(sub) == 2


# ----------------------------------------------------------------------------- validation report


def test_every_file_problem_is_listed_by_file_and_the_rest_loads():
    entries = _entries(n=4)
    entries["JPEGImages/lonely.png"] = _png(_img())  # image without annotation
    entries["Annotations/orphan.xml"] = annotation_xml("orphan.png", 40, 30, [("cat", (1, 1, 5, 5), False)]).encode()
    entries["JPEGImages/broken.png"] = _png(_img())
    entries["Annotations/broken.xml"] = b"<annotation><object><name>cat</name>"  # truncated
    entries["JPEGImages/bomb.png"] = _png(_img())
    entries["Annotations/bomb.xml"] = (b'<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol">]>'
                                       b"<annotation>&lol;</annotation>")
    entries["JPEGImages/wrongroot.png"] = _png(_img())
    entries["Annotations/wrongroot.xml"] = b"<html></html>"
    entries["JPEGImages/corrupt.jpg"] = b"\xff\xd8\xff\xe0 not really a jpeg"
    entries["Annotations/corrupt.xml"] = annotation_xml("corrupt.jpg", 40, 30, [("cat", (1, 1, 5, 5), False)]).encode()
    entries["JPEGImages/readme.txt"] = b"hello"
    entries["__MACOSX/JPEGImages/._im0.png"] = b"junk"
    ds = load_voc_dataset(zip_bytes(entries), SIZE)
    r = ds.report
    assert r.missing_annotation == ["JPEGImages/lonely.png"]
    assert r.missing_image == ["Annotations/orphan.xml"]
    assert len(r.malformed_xml) == 3
    assert any("broken.xml" in m and "well-formed" in m for m in r.malformed_xml)
    assert any("bomb.xml" in m and "DTD" in m for m in r.malformed_xml)
    assert any("wrongroot.xml" in m and "<html>" in m for m in r.malformed_xml)
    assert len(r.corrupt_images) == 1 and r.corrupt_images[0].startswith("JPEGImages/corrupt.jpg (")
    assert any("readme.txt" in s for s in r.skipped_files)
    assert len(ds.train) + len(ds.val) == 4 and r.num_images == 4


def test_boxes_are_clipped_rejected_and_counted():
    w, h = 40, 30
    objects = [
        ("cat", (5, 6, 20, 25), False),     # fine
        ("cat", (-9, 10, 20, 25), False),   # partly outside on the left: clipped
        ("dog", (30, 20, 55, 45), False),   # partly outside right and bottom: clipped
        ("dog", (0, 1, 40, 30), False),     # 0-based xmin: within the 1 px tolerance, clipped silently
        ("cat", (50, 5, 60, 9), False),     # entirely outside: rejected
        ("cat", (10, 10, 10, 20), False),   # xmin == xmax is one pixel wide in VOC's inclusive pixels: kept
        ("dog", (12, 12, 11, 20), False),   # xmax < xmin: zero area, rejected
        ("dog", (5, 20, 9, 10), False),     # negative height: rejected
    ]
    entries = {"JPEGImages/a.png": _png(_img(w, h)), "JPEGImages/b.png": _png(_img(w, h)),
               "Annotations/a.xml": annotation_xml("a.png", w, h, objects).encode(),
               "Annotations/b.xml": annotation_xml("b.png", w, h, objects[:1]).encode()}
    ds = load_voc_dataset(zip_bytes(entries), SIZE, val_fraction=0.5)
    part = ds.train if "a" in ds.train.ids else ds.val
    boxes = part.boxes[part.ids.index("a")]
    r = ds.report
    assert len(r.clipped_boxes) == 2 and all("a.xml" in c for c in r.clipped_boxes)
    assert len(r.rejected_boxes) == 3
    assert sum("entirely outside" in x for x in r.rejected_boxes) == 1
    assert sum("zero or negative area" in x for x in r.rejected_boxes) == 2
    # kept: the fine box, two clipped ones, the 0-based one and the 1-pixel-wide (10,10,10,20) box
    assert len(boxes) == 5
    np.testing.assert_allclose(boxes[1], [0, 9 / h, 20 / w, 25 / h], atol=1e-6)
    np.testing.assert_allclose(boxes[2], [29 / w, 19 / h, 1, 1], atol=1e-6)
    assert boxes.min() >= 0 and boxes.max() <= 1


def test_objects_without_name_or_coordinates_are_rejected_and_empty_images_listed():
    xml = (b"<annotation><size><width>40</width><height>30</height></size>"
           b"<object><name></name><bndbox><xmin>1</xmin><ymin>1</ymin><xmax>9</xmax><ymax>9</ymax></bndbox></object>"
           b"<object><name>cat</name><bndbox><xmin>one</xmin><ymin>1</ymin><xmax>9</xmax><ymax>9</ymax></bndbox></object>"
           b"<object><name>cat</name></object></annotation>")
    entries = _entries(n=3)
    entries["JPEGImages/empty.png"] = _png(_img())
    entries["Annotations/empty.xml"] = xml
    ds = load_voc_dataset(zip_bytes(entries), SIZE)
    r = ds.report
    assert len(r.rejected_boxes) == 3
    assert any("no class name" in x for x in r.rejected_boxes)
    assert sum("non-numeric" in x for x in r.rejected_boxes) == 2
    assert r.images_without_objects == ["JPEGImages/empty.png"]


def test_size_mismatch_between_xml_and_image_is_warned_and_the_image_wins():
    entries = _entries(n=2)
    entries["Annotations/im0.xml"] = annotation_xml("im0.png", 400, 300, [("cat", (1, 1, 40, 30), False)]).encode()
    ds = load_voc_dataset(zip_bytes(entries), SIZE, val_fraction=0.5)
    part = ds.train if "im0" in ds.train.ids else ds.val
    np.testing.assert_allclose(part.boxes[part.ids.index("im0")], [[0, 0, 1, 1]], atol=1e-6)
    assert any("400x300" in w and "40x30" in w for w in ds.report.warnings)


def test_split_files_with_unknown_and_unlisted_ids_are_reported():
    entries = _entries(n=4)
    entries["ImageSets/Main/train.txt"] = b"im0\nim1\nghost\n"
    entries["ImageSets/Main/val.txt"] = b"im2\n"
    ds = load_voc_dataset(zip_bytes(entries), SIZE)
    assert ds.train.ids == ["im0", "im1"] and ds.val.ids == ["im2"]
    assert any("ghost" in w for w in ds.report.warnings)
    assert any("1 usable image(s) are in neither" in w for w in ds.report.warnings)


# ----------------------------------------------------------------------------- refusals


def test_no_class_at_all_is_a_data_error():
    with pytest.raises(DataError, match="No object class found"):
        load_voc_dataset(zip_bytes(_entries(n=3, objects=[("", (1, 1, 5, 5), False)])), SIZE)


def test_an_empty_given_class_list_is_a_data_error():
    with pytest.raises(DataError, match="class list is empty"):
        load_voc_dataset(zip_bytes(_entries(n=3)), SIZE, class_names=[])


def test_no_usable_image_is_a_data_error():
    entries = {"JPEGImages/a.jpg": b"garbage", "Annotations/a.xml": _entries(n=1)["Annotations/im0.xml"]}
    with pytest.raises(DataError, match=r"No usable image.*corrupt images: 1 \(JPEGImages/a\.jpg"):
        load_voc_dataset(zip_bytes(entries), SIZE)


def test_a_single_usable_image_cannot_be_split():
    with pytest.raises(DataError, match="validation split is empty.*1 usable image"):
        load_voc_dataset(zip_bytes(_entries(n=1)), SIZE)


def test_not_a_voc_layout_names_what_it_found():
    with pytest.raises(DataError, match="Not a Pascal VOC data set.*cats"):
        load_voc_dataset(zip_bytes({"cats/a.png": _png(_img()), "dogs/b.png": _png(_img())}), SIZE)


def test_zip_slip_is_refused_before_anything_is_written(tmp_path):
    entries = _entries(n=3)
    entries["../../evil.xml"] = b"<annotation/>"
    with pytest.raises(DataError, match="Unsafe path"):
        load_voc_dataset(zip_bytes(entries), SIZE)
    assert not (tmp_path / "evil.xml").exists()


def test_zip_limits_apply(tmp_path):
    with pytest.raises(DataError, match="entries"):
        load_voc_dataset(zip_bytes(_entries(n=10)), SIZE, limits=Limits(max_files=5))
    with pytest.raises(DataError, match="annotated images; the limit is 3"):
        load_voc_dataset(zip_bytes(_entries(n=10)), SIZE, limits=Limits(max_images=3))


def test_a_file_that_is_not_a_zip_is_refused(tmp_path):
    bogus = tmp_path / "data.zip"
    bogus.write_bytes(b"not a zip")
    with pytest.raises(DataError, match="neither a zip archive nor a folder"):
        load_voc_dataset(bogus, SIZE)


# ----------------------------------------------------------------------------- the generated sample


def test_sample_counting_set_is_deterministic_and_well_formed():
    a = load_sample_detection("counting")
    b = load_voc_dataset("sample:counting", 128)
    assert a.class_names == ["head", "square", "triangle"] and len(a.train) == 2000 and len(a.val) == 300
    assert np.array_equal(a.val.images.numpy(), b.val.images.numpy())
    fresh, boxes, labels = make_sample_scenes("counting", "val", n=5)
    assert np.array_equal(fresh.transpose(0, 3, 1, 2), a.val.images[:5].numpy())
    counts = [len(x) for x in a.val.boxes]
    assert min(counts) >= 1 and max(counts) <= 6
    allb = np.concatenate(a.val.boxes)
    sides = np.concatenate([allb[:, 2] - allb[:, 0], allb[:, 3] - allb[:, 1]])
    assert allb.min() >= 0 and allb.max() <= 1 and 0.08 < sides.min() and sides.max() < 0.36
    assert set(np.concatenate(a.val.labels).tolist()) == {1, 2, 3}
    assert sum(a.report.class_counts.values()) == a.report.num_objects


@pytest.mark.parametrize("label", [1, 2, 3])
def test_sample_boxes_are_tight_around_what_is_drawn(label):
    from core.tasks.detection import sample

    rng = np.random.default_rng(label)
    for _ in range(20):
        r, rot = rng.uniform(7, 22), rng.uniform(0, 2 * np.pi)
        cx, cy = rng.uniform(30, 98, 2)
        canvas = np.full((128, 128, 3), -1.0)  # no colour is negative: every painted pixel shows
        painted = sample._draw_object(canvas, label, cx, cy, r, rot, rng)
        ys, xs = np.nonzero((painted != -1).any(axis=2))
        drawn = np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])  # pixel edges of the painted area
        box = sample._extent(label, r, rot) + [cx, cy, cx, cy]
        assert np.abs(drawn - box).max() < 1.0, (label, drawn, box)


def test_sample_voc_zip_loads_back_to_the_same_split_and_boxes(tmp_path, monkeypatch):
    from dataclasses import replace

    from core.tasks.detection import sample

    small = replace(sample.SAMPLE_DETECTION_SETS["counting"], n_train=8, n_val=4)
    monkeypatch.setitem(sample.SAMPLE_DETECTION_SETS, "counting", small)
    path = sample.write_sample_voc_zip("counting", tmp_path / "counting.zip", image_format="png")
    direct = load_sample_detection("counting")
    loaded = load_voc_dataset(path, 128)
    assert loaded.report.presplit and len(loaded.train) == 8 and len(loaded.val) == 4
    assert loaded.class_names == direct.class_names
    for a, b in ((direct.train, loaded.train), (direct.val, loaded.val)):
        assert np.array_equal(a.images.numpy(), b.images.numpy())
        for ba, bb, la, lb in zip(a.boxes, b.boxes, a.labels, b.labels):
            np.testing.assert_allclose(bb, ba, atol=0.5 / 128 + 1e-6)
            assert la.tolist() == lb.tolist()
