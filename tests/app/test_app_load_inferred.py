"""Load page (issue 13): a model given as code shows the input size taken from the data, a near-chance baseline
is said with its likely causes, and the fix found is one click away; 16-bit images are said, not hidden
behind "All files were readable images" (issue 15 item 5)."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from tests.app.apptest_tools import (assert_no_exception, click_load, goto, new_app, texts)
from tests.app.test_app_load import make_zip
from tests.unit.test_plausibility import Brightness

CUSTOM = "Custom architecture (Python file) + weights"
CODE = Path(__file__).resolve().parents[1] / "unit" / "test_plausibility.py"


def brightness_zip(bits16: bool = False) -> bytes:
    rng = np.random.default_rng(0)
    files = []
    for cls, level in (("a_dark", 105), ("b_bright", 118)):
        for i in range(30):
            img = np.clip(level + rng.integers(-2, 3, (16, 16)), 0, 255)
            buf = io.BytesIO()
            if bits16:
                Image.fromarray((img * 257).astype(np.uint16)).save(buf, format="PNG")
            else:
                Image.fromarray(np.stack([img.astype(np.uint8)] * 3, -1)).save(buf, format="PNG")
            files.append((f"{cls}/{i:02d}.png", buf.getvalue()))
    return make_zip(files)


def load(at, bits16: bool = False):
    weights = io.BytesIO()
    torch.save(Brightness(bright_first=True).state_dict(), weights)
    at.radio(key="load_model_kind").set_value(CUSTOM).run()
    at.file_uploader(key="load_code_file").set_value(("bright.py", CODE.read_bytes(), "text/x-python")).run()
    at.selectbox(key="load_code_name").set_value("Brightness")
    at.text_input(key="load_code_args").set_value('{"bright_first": true}')
    at.toggle(key="load_trusted").set_value(True)
    at.file_uploader(key="load_model_file").set_value(("w.pt", weights.getvalue(), "application/octet-stream"))
    at.file_uploader(key="load_data_zip").set_value(("d.zip", brightness_zip(bits16), "application/zip"))
    click_load(at)
    assert_no_exception(at)
    assert not at.error, [e.value for e in at.error]
    return at


def test_inferred_size_and_one_click_fix_of_a_near_chance_baseline():
    at = load(goto(new_app().run(), "load"))
    page = texts(at)
    assert "3×16×16" in page and any("16×16 taken from the data" in i.value for i in at.info)
    # 0 % on two classes is far below chance (50 %): systematically wrong, the class order leads the causes
    assert any("far below chance (50.0%)" in w.value and "class order" in w.value for w in at.warning)
    assert at.metric[0].value.startswith("0.0")
    fix = at.button(key="load_apply_fix")
    assert "b_bright" in fix.label
    fix.click().run()
    assert_no_exception(at)
    assert at.metric[0].value.startswith("100")
    assert not any("below chance" in w.value for w in at.warning)


def test_16bit_images_are_said_not_called_all_readable():
    at = load(goto(new_app().run(), "load"), bits16=True)
    assert any("more than 8 bits per pixel" in i.value and "not clipped" in i.value for i in at.info)
    assert "All files were readable images" not in texts(at)
