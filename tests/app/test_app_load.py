"""Load page: the sample, uploads (state dict, trusted pickle, zip, folder) and clear errors for bad ones."""
from __future__ import annotations

import io
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

from core.models import SAMPLE_DIR, load_model, sample_entry
from core.sample_data import make_sample_images
from tests.app.apptest_tools import (assert_no_exception, click_load, goto, new_app, texts)
from ui.state import files_to_zip

ENTRY = sample_entry("vgg_digits")


def png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr, "RGB").save(buf, format="PNG")
    return buf.getvalue()


def digits_files(per_class: int = 8, classes: int = 10) -> list[tuple[str, bytes]]:
    arr, labels, names = make_sample_images("digits")
    out = []
    for c in range(classes):
        for i, idx in enumerate(np.flatnonzero(labels == c)[:per_class]):
            out.append((f"{names[c]}/{i:03d}.png", png(arr[idx])))
    return out


def make_zip(files: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in files:
            zf.writestr(name, data)
    return buf.getvalue()


def weights_bytes() -> bytes:
    return (SAMPLE_DIR / ENTRY["weights"]).read_bytes()


def upload_page(arch: str = "sample_vgg"):
    at = goto(new_app().run(), "load")
    at.radio(key="load_model_kind").set_value("Weights (state dict) + architecture").run()
    at.selectbox(key="load_arch").set_value(arch).run()
    at.text_input(key="load_mean").set_value(", ".join(str(v) for v in ENTRY["mean"]))
    at.text_input(key="load_std").set_value(", ".join(str(v) for v in ENTRY["std"]))
    return at


def test_empty_state_and_sample():
    at = goto(new_app().run(), "load")
    assert "Nothing loaded yet" in texts(at)
    at.button(key="load_sample").click().run()
    assert_no_exception(at)
    labels = [m.label for m in at.metric]
    assert labels == ["Accuracy", "MACs", "Parameters", "Latency (OpenVINO CPU)"]
    values = {m.label: m.value for m in at.metric}
    assert values["Accuracy"].endswith("%") and float(values["Accuracy"].split()[0]) > 99
    assert values["MACs"] == "9.9 M" and values["Latency (OpenVINO CPU)"].endswith("ms")
    assert len(at.get("plotly_chart")) == 3  # class counts, per-class accuracy, confusion matrix
    assert "All files were readable images" in texts(at)
    assert "Analyse" in [p.proto.label for p in at.main.get("page_link")][-2]


def test_state_dict_and_zip_upload_with_report():
    files = digits_files()
    files += [("notes.txt", b"not an image"), ("3/readme.md", b"# hi"), ("5/broken.png", b"\x89PNG\r\n\x1a\nbroken")]
    at = upload_page()
    at.file_uploader(key="load_model_file").set_value(("weights.pt", weights_bytes(), "application/octet-stream"))
    at.file_uploader(key="load_data_zip").set_value(("data.zip", make_zip(files), "application/zip"))
    click_load(at)
    assert_no_exception(at)
    assert not at.error or all("could not be decoded" in e.value for e in at.error)
    page = texts(at)
    assert "2 file(s) skipped" in page
    assert "1 image(s) could not be decoded" in page
    assert "uploaded sample_vgg" in page
    acc = float(next(m.value for m in at.metric if m.label == "Accuracy").split()[0])
    assert acc > 90, "the uploaded weights with the right normalisation classify the digits"
    assert len(at.get("plotly_chart")) == 3


def test_folder_upload_uses_only_safe_names():
    at = upload_page()
    at.radio(key="load_data_kind").set_value("Folder").run()
    files = [(f"my data/{n}", b) for n, b in digits_files(per_class=6)]
    files.append(("my data/../../escape.png", files[0][1]))  # a hostile name is reduced, never used as a path
    at.file_uploader(key="load_model_file").set_value(("weights.pt", weights_bytes(), "application/octet-stream"))
    at.file_uploader(key="load_data_dir").set_value([(n, b, "image/png") for n, b in files])
    click_load(at)
    assert_no_exception(at)
    assert not at.error, [e.value for e in at.error]
    assert "uploaded folder (61 files)" in texts(at)


def test_files_to_zip_sanitises_names():
    data = files_to_zip([("../../etc/passwd", b"x"), ("a/b/c/d.png", b"y"), ("/abs/x.png", b"z"), ("c:\\w\\y.png", b"w"),
                         ("a/b/c/d.png", b"dup")])
    names = zipfile.ZipFile(io.BytesIO(data)).namelist()
    assert all(".." not in n.split("/") and not n.startswith("/") and ":" not in n for n in names)
    assert "b/c/d.png" in names and "b/c/d~2.png" in names and "etc/passwd" in names  # a same-name file is numbered


def test_random_bytes_as_weights_are_refused_clearly():
    at = upload_page()
    at.file_uploader(key="load_model_file").set_value(("model.pt", np.random.default_rng(0).bytes(4096),
                                                         "application/octet-stream"))
    click_load(at)
    assert_no_exception(at)
    assert len(at.error) == 1
    msg = at.error[0].value
    assert "The model could not be loaded" in msg and "not a PyTorch checkpoint" in msg
    assert not at.metric


def test_zip_with_parent_path_is_refused():
    evil = make_zip(digits_files(per_class=3) + [("../evil.png", b"x")])
    at = upload_page()
    at.file_uploader(key="load_model_file").set_value(("weights.pt", weights_bytes(), "application/octet-stream"))
    at.file_uploader(key="load_data_zip").set_value(("data.zip", evil, "application/zip"))
    click_load(at)
    assert_no_exception(at)
    msg = at.error[0].value
    assert "The data set could not be used" in msg and "Unsafe path" in msg and "../evil.png" in msg


def test_class_count_mismatch_is_explained():
    three = make_zip(digits_files(per_class=4, classes=3))
    at = upload_page()
    at.file_uploader(key="load_model_file").set_value(("weights.pt", weights_bytes(), "application/octet-stream"))
    at.file_uploader(key="load_data_zip").set_value(("data.zip", three, "application/zip"))
    click_load(at)
    assert_no_exception(at)
    msg = at.error[0].value
    assert "3 classes but the model outputs 10" in msg
    # issue 27: what was found comes first, under the name the user uploaded
    assert msg.index("Found in data.zip: 12 image(s) in 3 class folder(s)") < msg.index("3 classes but")


def test_a_zip_without_images_says_no_images_found_and_lists_what_it_skipped():
    """Issue 27: a zip of folders without images was "2 classes vs 10", without the promised list of skipped files."""
    junk = make_zip([("photos/cats/readme.txt", b"x"), ("photos/dogs/list.csv", b"a,b")])
    at = upload_page()
    at.file_uploader(key="load_model_file").set_value(("weights.pt", weights_bytes(), "application/octet-stream"))
    at.file_uploader(key="load_data_zip").set_value(("holiday_photos.zip", junk, "application/zip"))
    click_load(at)
    assert_no_exception(at)
    msg = at.error[0].value
    assert "No images found in holiday_photos.zip." in msg and "data-" not in msg
    assert "cats/readme.txt (not an image: .txt)" in msg and "dogs/list.csv (not an image: .csv)" in msg
    assert "classes but the model outputs" not in msg


def test_wrong_architecture_is_explained():
    at = upload_page(arch="sample_resnet")
    at.file_uploader(key="load_model_file").set_value(("weights.pt", weights_bytes(), "application/octet-stream"))
    click_load(at)
    assert "do not fit architecture 'sample_resnet'" in at.error[0].value or "Cannot tell the number of classes" in at.error[0].value


@pytest.mark.parametrize("trusted", [False, True])
def test_pickled_model_needs_explicit_trust(trusted):
    model = load_model("sample:vgg_digits").model
    buf = io.BytesIO()
    torch.save(model, buf)
    at = goto(new_app().run(), "load")
    at.radio(key="load_model_kind").set_value("Whole pickled model (trusted files only)").run()
    at.number_input(key="load_h_None").set_value(32)
    at.number_input(key="load_w_None").set_value(32)
    at.file_uploader(key="load_model_file").set_value(("whole.pt", buf.getvalue(), "application/octet-stream"))
    if trusted:
        at.toggle(key="load_trusted").set_value(True)
    at.file_uploader(key="load_data_zip").set_value(("d.zip", make_zip(digits_files(per_class=4)), "application/zip"))
    click_load(at)
    assert_no_exception(at)
    if trusted:
        assert not at.error
        assert "uploaded pickled:SampleVGG" in texts(at)
        assert any("trusted pickle" in c.value for c in at.caption)
    else:
        assert "not loaded" in at.error[0].value and "I trust this file" in at.error[0].value
        assert not at.metric


def test_small_upload_flows_to_analyse_and_model_only_asks_for_data():
    at = upload_page()
    at.file_uploader(key="load_model_file").set_value(("weights.pt", weights_bytes(), "application/octet-stream"))
    click_load(at)
    assert "Now add a data set" in at.warning[0].value
    goto(at, "analyse")
    assert "Load a data set first" in texts(at)
    goto(at, "load")
    at.file_uploader(key="load_data_zip").set_value(("d.zip", make_zip(digits_files(per_class=4)), "application/zip"))
    click_load(at)
    assert_no_exception(at)
    goto(at, "analyse")
    assert "All **10** selection images are used" in texts(at)


def test_weights_against_the_default_architecture_point_to_the_custom_architecture_option():
    """Issue 27: a CIFAR ResNet-20's weights uploaded with the default architecture (resnet18) got "Cannot tell
    the number of classes..." and no way on; the message names the option that takes the user's own file."""
    at = goto(new_app().run(), "load")
    at.radio(key="load_model_kind").set_value("Weights (state dict) + architecture").run()
    assert at.selectbox(key="load_arch").value == "resnet18", "the default architecture"
    weights = (SAMPLE_DIR / sample_entry("cifar10")["weights"]).read_bytes()
    at.file_uploader(key="load_model_file").set_value(("resnet20-cifar.th", weights, "application/octet-stream"))
    click_load(at)
    msg = at.error[0].value
    assert "Cannot tell the number of classes" in msg
    assert "choose 'Custom architecture (Python file) + weights' under 'What the file holds'" in msg
    assert "Custom architecture (Python file) + weights" in at.radio(key="load_model_kind").options
