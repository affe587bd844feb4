"""Load page, custom architecture: a .py file + weights load once trusted; the file's names are offered
before it runs; a broken or untrusted file gets one clear message."""
from __future__ import annotations

import io
from pathlib import Path

import torch

from core.custom_code import build_from_code
from core.workspace import upload_name
from tests.app.apptest_tools import (assert_no_exception, click_load, goto, new_app, texts)
from tests.app.test_app_load import digits_files, make_zip

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "cifar_resnet.py"
CUSTOM = "Custom architecture (Python file) + weights"
FACTORIES = ["resnet20", "resnet32", "resnet44", "resnet56", "resnet110", "resnet1202"]


def akamaster_checkpoint() -> bytes:
    torch.manual_seed(0)
    model = build_from_code(FIXTURE, "resnet20", trusted=True)
    buf = io.BytesIO()
    torch.save({"epoch": 200, "best_prec1": 91.2,
                "state_dict": {"module." + k: v for k, v in model.state_dict().items()}}, buf)
    return buf.getvalue()


def custom_page(code: bytes, name: str = "resnet.py"):
    at = goto(new_app().run(), "load")
    at.radio(key="load_model_kind").set_value(CUSTOM).run()
    at.file_uploader(key="load_code_file").set_value((name, code, "text/x-python")).run()
    assert_no_exception(at)
    return at


def test_custom_file_offers_its_factories_and_loads_when_trusted():
    at = custom_page(FIXTURE.read_bytes())
    box = at.selectbox(key="load_code_name")
    assert box.options == FACTORIES + ["ResNet"] and box.value == "resnet20"  # issue 16: no blocks or helpers
    at.number_input(key="load_h_None").set_value(32)
    at.number_input(key="load_w_None").set_value(32)
    at.text_input(key="load_code_args").set_value('{"num_classes": 10}')
    at.toggle(key="load_trusted").set_value(True)
    at.file_uploader(key="load_model_file").set_value(("resnet20.th", akamaster_checkpoint(), "application/octet-stream"))
    at.file_uploader(key="load_data_zip").set_value(("d.zip", make_zip(digits_files(per_class=3)), "application/zip"))
    click_load(at)
    assert_no_exception(at)
    assert not at.error, [e.value for e in at.error]
    assert at.selectbox(key="load_code_name").options == FACTORIES  # trusted: built and tried, ResNet needs args
    page = texts(at)
    assert "uploaded custom:resnet20" in page and "10 classes" in page and "3×32×32" in page
    notes = [c.value for c in at.caption]
    assert any("'state_dict' entry" in n for n in notes) and any("'module.' prefix" in n for n in notes)
    assert [m.label for m in at.metric][0] == "Accuracy"
    state = at.session_state["prunescope"]  # issue 16: runs started from here name the user's files
    assert state.model.spec.upload_name == "resnet20.th" and upload_name(state.data_source) == "d.zip"


def test_untrusted_custom_file_is_refused():
    at = custom_page(FIXTURE.read_bytes())
    at.file_uploader(key="load_model_file").set_value(("resnet20.th", akamaster_checkpoint(), "application/octet-stream"))
    click_load(at)
    assert_no_exception(at)
    message = at.error[0].value
    assert "The model could not be loaded" in message and "runs the code in resnet.py" in message
    assert "I trust this file" in message
    assert "Current model" not in texts(at)


def test_syntax_error_is_shown_on_upload_and_on_load():
    broken = b"import torch.nn as nn\n\ndef net(:\n    return nn.Linear(2, 2)\n"
    at = custom_page(broken, "mynet.py")
    assert "mynet.py has a syntax error at line 3" in at.error[0].value and "def net(:" in at.error[0].value
    at.text_input(key="load_code_name_text").set_value("net")  # no names could be read: a text box instead
    at.toggle(key="load_trusted").set_value(True)
    at.file_uploader(key="load_model_file").set_value(("w.pt", akamaster_checkpoint(), "application/octet-stream"))
    click_load(at)
    assert_no_exception(at)
    assert any("The model could not be loaded" in e.value and "line 3" in e.value for e in at.error)


def test_custom_kind_without_a_code_file_asks_for_it():
    at = goto(new_app().run(), "load")
    at.radio(key="load_model_kind").set_value(CUSTOM).run()
    at.file_uploader(key="load_model_file").set_value(("w.pt", akamaster_checkpoint(), "application/octet-stream"))
    click_load(at)
    assert_no_exception(at)
    assert "Choose the Python file (.py)" in at.error[0].value
