"""Models whose architecture comes from the user's own Python file (a class or a factory function in it).

Executing a Python file runs whatever code it holds, so it happens only when the caller says the file
is trusted, exactly like a pickled model. Reading the file's *names* is safe without trust: it parses
the source with :mod:`ast` and runs nothing, which lets the UI offer the classes and functions of an
uploaded file before the user has decided to trust it.

Each file is imported under its own module name (derived from its path and content), so two
different ``model.py`` files never replace each other's classes, and nothing is added to ``sys.path``.
A file that imports modules lying beside it is therefore out of scope: it has to be self-contained.
"""
from __future__ import annotations

import ast
import hashlib
import importlib.util
import json
import re
import sys
import traceback
from pathlib import Path
from types import ModuleType
from typing import Any

from torch import nn

from .errors import TRUST_CONTROL, ModelLoadError, UntrustedCodeError

# Base classes that make a class a model part even when the scan cannot see their definition.
_MODULE_BASES = {"Module", "Sequential", "ModuleList", "ModuleDict"}
_MODULE_PREFIX = "_prunescope_code_"


# ----------------------------------------------------------------------------- reading without running


def list_definitions(source: str | bytes, filename: str = "the model file") -> tuple[list[str], list[str]]:
    """Top-level classes (nn.Module subclasses first) and functions of ``source``, found without running it."""
    modules, others, functions = _scan(parse_source(source, filename))
    return modules + others, functions


def model_candidates(source: str | bytes, filename: str = "the model file") -> list[str]:
    """Names that may build the model, likeliest first: public functions callable without arguments
    (factories such as ``resnet56()``), nn.Module classes, then the other public functions and classes."""
    tree = parse_source(source, filename)
    modules, others, _ = _scan(tree)
    functions = [n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
    public = [f for f in functions if not f.name.startswith("_")]
    factories = [f.name for f in public if _needs_no_arguments(f)]
    rest = [f.name for f in public if f.name not in factories]
    private = [f.name for f in functions if f.name.startswith("_")]
    return factories + modules + rest + others + private


def _needs_no_arguments(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> bool:
    a = fn.args
    positional = a.posonlyargs + a.args
    return len(a.defaults) == len(positional) and all(d is not None for d in a.kw_defaults)


def _scan(tree: ast.Module) -> tuple[list[str], list[str], list[str]]:
    """nn.Module classes, other classes and functions at the top level of ``tree``, in file order."""
    classes = [node for node in tree.body if isinstance(node, ast.ClassDef)]
    found = _module_classes(classes)
    modules = [c.name for c in classes if c.name in found]
    others = [c.name for c in classes if c.name not in found]
    functions = [node.name for node in tree.body if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))]
    return modules, others, functions


def parse_source(source: str | bytes, filename: str = "the model file") -> ast.Module:
    """The syntax tree of ``source``; a syntax error names the file, the line and the line's text."""
    try:
        return ast.parse(source, filename=filename)
    except SyntaxError as exc:
        raise ModelLoadError(_syntax_message(exc, filename)) from None
    except ValueError as exc:  # e.g. null bytes: not a text file at all
        raise ModelLoadError(f"{filename} is not a readable Python file ({exc}).") from None


def _syntax_message(exc: SyntaxError, filename: str) -> str:
    where = f"line {exc.lineno}" if exc.lineno else "an unknown line"
    text = (exc.text or "").strip()
    shown = f": `{text[:120]}`" if text else ""
    return f"{filename} has a syntax error at {where} ({exc.msg}){shown}. Fix the file and load it again."


def _module_classes(classes: list[ast.ClassDef]) -> set[str]:
    """Names of classes deriving from nn.Module, directly or through another class of the same file."""
    found: set[str] = set()
    changed = True
    while changed:
        changed = False
        for c in classes:
            if c.name not in found and any(_is_module_base(b, found) for b in c.bases):
                found.add(c.name)
                changed = True
    return found


def _is_module_base(base: ast.expr, known: set[str]) -> bool:
    if isinstance(base, ast.Name):
        return base.id in _MODULE_BASES or base.id in known
    if isinstance(base, ast.Attribute):  # nn.Module, torch.nn.Module, nn.Sequential, ...
        return base.attr in _MODULE_BASES
    return False


# ----------------------------------------------------------------------------- arguments


def parse_model_args(text: str | list | dict | None) -> list | dict | None:
    """Constructor arguments given as JSON: an object becomes keyword arguments, a list positional ones."""
    if text is None or isinstance(text, (list, dict)):
        return text
    if not str(text).strip():
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ModelLoadError(
            f"The model arguments are not valid JSON ({exc.msg} at character {exc.pos}): {str(text)[:80]!r}. "
            'Write keyword arguments as an object, e.g. {"num_classes": 10}, or positional ones as a list, e.g. [10].'
        ) from None
    if value is not None and not isinstance(value, (list, dict)):
        raise ModelLoadError(
            f"The model arguments must be a JSON object (keyword arguments) or a list (positional arguments); "
            f'got {type(value).__name__} {str(text).strip()[:40]}. Example: {{"num_classes": 10}}.'
        )
    return value


def describe_call(name: str, args: list | dict | None) -> str:
    """``name(...)`` as the user would write it, for messages and labels."""
    if isinstance(args, dict):
        inner = ", ".join(f"{k}={v!r}" for k, v in args.items())
    elif isinstance(args, list):
        inner = ", ".join(repr(v) for v in args)
    else:
        inner = ""
    return f"{name}({inner})"


# ----------------------------------------------------------------------------- running the file


def import_code_file(path: str | Path, trusted: bool = False) -> ModuleType:
    """Execute the file as a module of its own; only with ``trusted``, since this runs its code."""
    path = _existing_file(path)
    if not trusted:
        raise UntrustedCodeError(
            f"Building the model runs the code in {path.name}, so it was not run. If you wrote or have read this "
            f"file, {TRUST_CONTROL} to allow it."
        )
    source = path.read_bytes()
    code = _compile(source, path)
    name = _module_name(path, source)
    module = _new_module(name, path)
    sys.modules[name] = module  # dataclasses, typing and pickle look classes up by their module's name
    try:
        exec(code, module.__dict__)
    except ImportError as exc:
        sys.modules.pop(name, None)
        raise ModelLoadError(_import_message(exc, path)) from None
    except Exception as exc:
        sys.modules.pop(name, None)
        raise ModelLoadError(f"Running {path.name} failed{_line_of(exc, path)}: {type(exc).__name__}: {exc}") from None
    return module


def _existing_file(path: str | Path) -> Path:
    path = Path(path)
    if not path.exists():
        raise ModelLoadError(f"Model code file not found: {path}")
    if path.is_dir():
        raise ModelLoadError(f"Expected a Python file with the model's code, got a folder: {path}")
    return path.resolve()


def _compile(source: bytes, path: Path):
    parse_source(source, path.name)  # the same clear message as the scan, before anything runs
    return compile(source, str(path), "exec")


def _module_name(path: Path, source: bytes) -> str:
    """Unique per file and content, so equal file names in different folders never clash."""
    stem = re.sub(r"\W", "_", path.stem)
    digest = hashlib.sha256(str(path).encode() + b"\0" + source).hexdigest()[:12]
    return f"{_MODULE_PREFIX}{stem}_{digest}"


def _new_module(name: str, path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    module.__file__ = str(path)
    return module


def _import_message(exc: ImportError, path: Path) -> str:
    missing = getattr(exc, "name", None)
    what = f"imports '{missing}', which cannot be found" if missing else f"has an import that fails ({exc})"
    return (f"{path.name} {what}. A model file must be self-contained: modules beside it (e.g. 'from .layers "
            "import ...' or 'import utils') are not loaded with it, so copy what it needs into the one file; "
            "a missing pip package must be installed.")


def _line_of(exc: BaseException, path: Path) -> str:
    """' at line N of FILE' for the deepest frame of the user's file in ``exc``'s traceback, if any."""
    line = None
    for frame in traceback.extract_tb(exc.__traceback__):
        if Path(frame.filename) == path:
            line = frame.lineno
    return f" at line {line} of {path.name}" if line else ""


# ----------------------------------------------------------------------------- building the model


def build_from_code(path: str | Path, name: str, args: list | dict | str | None = None,
                    trusted: bool = False) -> nn.Module:
    """The model built by calling class or factory ``name`` of the file ``path`` with ``args``."""
    if not name or not str(name).strip():
        raise ModelLoadError("Name the class or factory function in the Python file that builds the model.")
    args = parse_model_args(args)
    module = import_code_file(path, trusted=trusted)
    path = Path(module.__file__)
    builder = _find(module, name.strip(), path)
    model = _call(builder, name.strip(), args, path)
    if not isinstance(model, nn.Module):
        raise ModelLoadError(
            f"{describe_call(name, args)} in {path.name} returned {type(model).__name__}, not a torch.nn.Module. "
            "Name the model's class or a function that returns the model."
        )
    return model


def _find(module: ModuleType, name: str, path: Path):
    if name not in vars(module):
        classes, functions = list_definitions(path.read_bytes(), path.name)
        raise ModelLoadError(
            f"{path.name} defines no '{name}'. Classes in the file: {', '.join(classes) or 'none'}; "
            f"functions: {', '.join(functions) or 'none'}."
        )
    builder = vars(module)[name]
    if not callable(builder):
        raise ModelLoadError(
            f"'{name}' in {path.name} is a {type(builder).__name__}, not a class or function: name the model's "
            "class or a function that returns the model."
        )
    return builder


def _call(builder, name: str, args: list | dict | None, path: Path):
    try:
        if isinstance(args, dict):
            return builder(**args)
        return builder(*(args or []))
    except Exception as exc:
        raise ModelLoadError(
            f"{describe_call(name, args)} failed{_line_of(exc, path)}: {type(exc).__name__}: {exc}. "
            "Check the model arguments."
        ) from None



# ----------------------------------------------------------------------------- uploads


def keep_uploaded_code(data: bytes, filename: str) -> Path:
    """Store an uploaded model file in the workspace, where a model spec (and later a run) can point at it.

    The folder is named by the content's hash, so two uploads called ``model.py`` never overwrite each
    other; the file keeps its (sanitised) name, so messages about it name the file the user knows.
    """
    from .workspace import atomic_write_bytes, uploads_dir

    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(filename or "").name).strip("._") or "model"
    if not name.endswith(".py"):
        name += ".py"
    path = uploads_dir() / f"code-{hashlib.sha256(data).hexdigest()[:16]}" / name
    if not path.is_file() or path.read_bytes() != data:  # a file changed on disk is not the one the user trusts
        atomic_write_bytes(path, data)
    return path
