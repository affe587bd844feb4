"""One glossary for every page (issue 27 item 9): the words train / selection / test images, CAR (exact or
screened), cluster, step, ... come from ``core.glossary`` and mean the same on every page."""
from __future__ import annotations

import re

from core import glossary
from tests.app.apptest_tools import PAGES, assert_no_exception, goto, texts, with_sample


def test_every_page_has_the_glossary_and_no_page_calls_selection_images_validation_images(sample_run):
    at = with_sample("home")
    for page in PAGES:
        goto(at, page)
        assert_no_exception(at)
        sidebar = "\n".join(str(m.value) for m in at.sidebar.markdown)
        for term, definition in glossary.TERMS.items():
            assert f"**{term}**: {definition}." in sidebar, f"{page}: the glossary's '{term}' is in its sidebar"
        text = texts(at)
        assert not re.search(r"\bvalidation images\b", text, re.I), \
            f"{page} says 'validation images' for what the glossary calls selection images: " \
            + re.search(r".{0,80}validation images.{0,40}", text, re.I | re.S).group(0)
        if page in ("home", "analyse"):  # where CAR is introduced: exact or screened, never "measured exactly"
            assert "measured exactly" not in text and "screened" in text, page
