"""One glossary (issue 27 item 9): the README and the CLI say what core.glossary says (the pages: test_app_glossary)."""
from __future__ import annotations

from pathlib import Path

from core import glossary
from core.cli import main

README = Path(__file__).resolve().parents[2] / "README.md"


def test_the_readme_holds_the_glossary_verbatim():
    assert glossary.markdown() in README.read_text()


def test_the_cli_prints_the_glossary(capsys):
    assert main(["glossary"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out == [glossary.sentence(t) for t in glossary.TERMS]
    assert any(line.startswith("Selection images: the images that score filters (CAR)") for line in out)


def test_every_term_has_one_definition_of_one_sentence():
    for term, definition in glossary.TERMS.items():
        assert term == term.strip() and definition and not definition.endswith(".")
        assert glossary.define(term) == definition
