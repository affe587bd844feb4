"""The docs say only what is there (issue 25): README.md stays short, and every repository path, link and
``core.…`` name that README.md and docs/*.md cite exists; the examples of docs/extending.md fit the interfaces
they implement (the criterion example runs in tests/unit/test_criteria.py)."""
from __future__ import annotations

import importlib
import inspect
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
README_MAX_LINES = 200

# A token is taken for a file path when it contains "/" or ends in one of these.
FILE_ENDINGS = (".py", ".md", ".sh", ".txt", ".json", ".jsonl", ".png", ".css", ".cpp", ".ini", ".toml",
                ".cfg", ".zip", ".pt", ".pth")
# Where a backticked path is looked up: as written from the repository root or the doc's own folder, or as a
# module file of core/ (the architecture notes say `data.py`, `detection/data.py`).
CODE_BASES = (ROOT, ROOT / "core")

# What the docs name but the repository does not hold, each for a stated reason; nothing else is excused.
# 1. Files PruneScope writes into a run folder or a bundle (each is checked to occur in core/'s source).
ARTEFACTS = {"config.json", "baseline.json", "history.jsonl", "car.json", "structure.json", "control.json",
             "control.pt", "finetune.json", "manifest.json", "deploy.py", "postprocess.py", "anchors.npy",
             "model_code.py", "original.pt", "selftest.npz", "status.json", "trusted_files.json", "workers.json"}
# 2. Folders made at run time, not committed: the workspace (runs, uploads, caches), a bundle's model/ and
#    fallback/, a run's steps/, the two venvs that `make setup` builds.
RUNTIME_DIRS = {"workspace", "fallback", "model", "steps", ".venv", ".venv-myriad"}
# 3. The layout of a user's data set, and users' own files in the examples.
USER_LAYOUT = {"train/", "val/", "test/", "JPEGImages/", "class/image.png"}
USER_FILES = {"resnet.py",  # akamaster's CIFAR ResNet file, which a user uploads
              "train.py"}  # a user's training script that pickled a model as __main__
# 4. Placeholders: <...>, $VAR, globs, {a,b}, an ellipsis, NNNN, absolute paths, VAR=value, a bare extension,
#    addresses with a scheme (ray://HOST:10001), paths in the user's home (~/.ray/...).
PLACEHOLDER = re.compile(r"[<>$*{}…]|NNNN|^/|^[A-Z_]+=|^\.\w+$|^[a-z][a-z0-9+.-]*://|^~/")


def prose(text: str) -> str:
    """The text without fenced code blocks (their commands use example paths: runs/…, my_images.zip)."""
    return re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)


def code_spans(text: str) -> list[str]:
    return [m.group(2).strip() for m in re.finditer(r"(`+)(.+?)\1", prose(text), re.S)]


def links(text: str) -> list[str]:
    return re.findall(r"\]\(([^)\s]+)\)", prose(text))


def anchor(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(doc: Path) -> set[str]:
    return {anchor(h) for h in re.findall(r"^#+ (.+)$", prose(doc.read_text()), re.M)}


def clean(token: str) -> str:
    return token.strip("(),;:'\"").rstrip(".")


def looks_like_path(token: str) -> bool:
    return bool(token) and not token.startswith("-") and ("/" in token or token.lower().endswith(FILE_ENDINGS))


def excused(token: str) -> bool:
    if PLACEHOLDER.search(token) or token in ARTEFACTS | USER_LAYOUT | USER_FILES:
        return True
    first = token.removeprefix("./").split("/")[0]
    return first in RUNTIME_DIRS


def missing_paths(doc: Path) -> list[str]:
    text = doc.read_text()
    out = []
    for span in code_spans(text):
        for token in (clean(t).split("::")[0] for t in span.split()):  # a test's node id names its file
            if looks_like_path(token) and not excused(token):
                if not any((base / token).exists() for base in (*CODE_BASES, doc.parent)):
                    out.append(f"`{token}`")
    for target in links(text):
        if re.match(r"[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
            continue
        path = target.split("#")[0]
        if not (doc.parent / path).exists():
            out.append(f"({target})")
    return out


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_path_a_doc_names_exists(doc):
    assert missing_paths(doc) == []


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_link_anchor_exists(doc):
    broken = []
    for target in links(doc.read_text()):
        if re.match(r"[a-z][a-z0-9+.-]*:", target) or "#" not in target:
            continue
        path, _, frag = target.partition("#")
        dest = doc if not path else (doc.parent / path)
        if dest.suffix == ".md" and dest.exists() and frag not in anchors(dest):
            broken.append(target)
    assert broken == []


def test_the_readme_is_short():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines; move detail into docs/"


def test_the_docs_the_readme_promises_exist():
    names = {"command-line", "architecture", "how-it-works", "extending", "benchmarks", "ncs2", "threat-model"}
    assert names <= {p.stem for p in (ROOT / "docs").glob("*.md")}
    readme = (ROOT / "README.md").read_text()
    assert all(f"docs/{n}.md" in readme for n in names)


def test_the_excused_artefacts_are_files_the_tool_writes():
    """An artefact name is excused only while core/ (or the compiler set-up) still writes or reads it."""
    source = "\n".join(p.read_text() for p in [*ROOT.glob("core/**/*.py"), ROOT / "scripts" / "setup-myriad.sh"])
    assert [name for name in sorted(ARTEFACTS) if name not in source] == []


def test_the_checker_catches_a_wrong_path(tmp_path):
    doc = tmp_path / "x.md"
    doc.write_text("See `core/nonexistent.py`, [here](nothere.md) and `bench/car_speed.py`, but not "
                   "`workspace/runs/<run>`.\n\n```bash\npython -m core prune --out runs/x\n```\n")
    assert missing_paths(doc) == ["`core/nonexistent.py`", "(nothere.md)"]


def dotted_names() -> list[str]:
    names = set()
    for doc in DOCS:
        for span in code_spans(doc.read_text()):
            names.update(n.rstrip(".") for n in re.findall(r"\b(?:core|ui|tests)\.[A-Za-z_][\w.]*", span))
    return sorted(names)


def resolves(name: str) -> bool:
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for attr in parts[i:]:
            if not hasattr(obj, attr):
                return False
            obj = getattr(obj, attr)
        return True
    return False


def test_every_core_name_a_doc_cites_exists():
    names = dotted_names()
    assert len(names) > 20
    assert [n for n in names if not resolves(n)] == []


def extending_block(heading: str) -> str:
    text = (ROOT / "docs" / "extending.md").read_text()
    section = text[text.index(heading):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_task_example_implements_the_task_protocol():
    from core.tasks.base import Task

    from core.tasks.registry import unregister_task

    namespace: dict = {}
    try:
        exec(extending_block("## Adding a task"), namespace)
    finally:
        unregister_task(namespace.get("NAME", "regression"))  # the example registers itself; no other test sees it
    example = namespace["RegressionTask"]
    members = [m for m in vars(Task) if not m.startswith("_")]
    for name in members:
        if callable(getattr(Task, name)):
            want = list(inspect.signature(getattr(Task, name)).parameters)
            got = list(inspect.signature(getattr(example, name)).parameters)
            assert got == want, name
    for name in Task.__annotations__:
        if name not in ("config", "input_shape"):  # set per instance, in __init__
            assert hasattr(example, name), name


def test_the_task_example_is_the_module_the_end_to_end_test_prunes():
    """docs/extending.md's task is tests/tasks/regression_task.py as it stands (after its docstring), so the
    example the docs show is the one tests/tasks/test_add_a_task.py registers and prunes."""
    module = (ROOT / "tests" / "tasks" / "regression_task.py").read_text()
    assert extending_block("## Adding a task") == module[module.index("from __future__"):]


def test_the_target_example_becomes_a_choice_of_export():
    from core import targets
    from core.cli import build_parser

    before = dict(targets.TARGETS)
    try:
        exec(extending_block("## Adding an export target"), {})
        target = targets.get_target("cpu-small")
        assert isinstance(target, targets.OpenVinoCpuTarget) and target.fp16 is False
        export = build_parser()._subparsers._group_actions[0].choices["export"]
        assert "cpu-small" in next(a for a in export._actions if a.dest == "target").choices
    finally:
        targets.TARGETS.clear()
        targets.TARGETS.update(before)
