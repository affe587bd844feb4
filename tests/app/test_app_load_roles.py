"""Load page (issue 14): the three image roles with their counts and how they were split."""
from __future__ import annotations

from tests.app.apptest_tools import (texts, with_sample)
from ui.state import get_state  # noqa: F401


def test_load_shows_the_three_role_counts_and_the_split():
    from core.models import load_model
    from core.sources import load_dataset

    loaded = load_model("sample:vgg_digits")
    data = load_dataset("sample:vgg_digits", loaded.spec.input, expected_classes=loaded.spec.num_classes)
    at = with_sample("load")
    page = texts(at)
    assert (f"**{len(data.train):,}** train · **{len(data.val):,}** selection · **{len(data.test):,}** test images"
            in page)
    assert f"selection images {data.split['val_fraction'] * 100:.0f} % of all images" in page
    assert f"seed {data.split['seed']}" in page
    from core.glossary import sentence  # issue 27: the roles in the glossary's words

    assert all(sentence(t) in page for t in ("train images", "selection images", "test images"))
