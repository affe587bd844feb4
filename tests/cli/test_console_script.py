"""The `prunescope` command that `make setup` installs (pyproject.toml, issue 25): `prunescope X` is `python -m core X`."""
from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = Path(sys.executable).parent / "prunescope"  # the venv the suite runs in (.venv/bin/prunescope)

needs_script = pytest.mark.skipif(not SCRIPT.exists(),
                                  reason=f"{SCRIPT} is not installed; `make setup` installs it (pip install -e .)")


def test_the_console_script_is_the_cli_entry_of_python_m_core():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["name"] == "prunescope"
    assert project["scripts"] == {"prunescope": "core.cli:main"}
    assert "from .cli import main" in (ROOT / "core" / "__main__.py").read_text()


@needs_script
def test_prunescope_help_works_outside_the_repository(tmp_path):
    proc = subprocess.run([str(SCRIPT), "--help"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: prunescope "), proc.stdout[:200]  # the name the user typed
    for command in ("evaluate", "analyse", "prune", "export", "recover", "glossary"):
        assert command in proc.stdout


@needs_script
def test_prunescope_prints_what_python_m_core_prints(tmp_path):
    ours = subprocess.run([str(SCRIPT), "glossary"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    theirs = subprocess.run([sys.executable, "-m", "core", "glossary"], cwd=ROOT, capture_output=True, text=True,
                            timeout=300)
    assert ours.returncode == theirs.returncode == 0, ours.stderr + theirs.stderr
    assert ours.stdout == theirs.stdout
