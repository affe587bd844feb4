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
import functools
import hashlib
import importlib.util
import json
import re
import sys
import traceback
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
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
    """Names in ``source`` that may build a whole model, likeliest first, found without running it.

    A published model file also holds its parts (blocks, layers, init and test helpers); offering them beside
    the factories invites the user to build a block as if it were the network (issue 16). Offered are the
    public classes and functions *defined* in the file (imports are not definitions), except

    - parts: a name used inside an nn.Module class of the file (``LambdaLayer`` in ``BasicBlock``, a ``conv3x3``
      helper) or passed as a value to a call (``ResNet(BasicBlock, [3, 3, 3])``);
    - functions that return nothing (``test(net)``) and classes with no base class at all (a config);

    ordered: factories callable without arguments (``resnet56()``), nn.Module classes, functions that need
    arguments, then classes whose base the scan cannot see. If that leaves nothing, every definition is
    offered, so the user can still name one. :func:`whole_models` narrows the list by building each
    candidate, once the user trusts the file.
    """
    tree = parse_source(source, filename)
    modules, others, _ = _scan(tree)
    parts = _parts(tree, set(modules))
    defs = {n.name: n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))}
    keep = {name for name, node in defs.items() if not name.startswith("_") and name not in parts
            and (_returns_value(node) if not isinstance(node, ast.ClassDef) else bool(node.bases))}
    functions = [n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.name in keep]
    factories = [f.name for f in functions if _needs_no_arguments(f)]
    rest = [f.name for f in functions if f.name not in factories]
    offered = factories + [m for m in modules if m in keep] + rest + [o for o in others if o in keep]
    if offered:
        return offered
    public, private = [n for n in defs if not n.startswith("_")], [n for n in defs if n.startswith("_")]
    return public + private


def _parts(tree: ast.Module, module_classes: set[str]) -> set[str]:
    """Names of the file's definitions that serve as parts of another definition (see :func:`model_candidates`)."""
    defined = {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))}
    parts: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name in module_classes:
            used = {n.id for stmt in node.body for n in ast.walk(stmt) if isinstance(n, ast.Name)}  # bases are no parts
            parts |= used & (defined - {node.name})
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            for call in (n for n in ast.walk(node) if isinstance(n, ast.Call)):
                values = list(call.args) + [k.value for k in call.keywords]
                parts |= {v.id for v in values if isinstance(v, ast.Name)} & (defined - {node.name})
    return parts


def _returns_value(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> bool:
    return any(isinstance(n, ast.Return) and n.value is not None
               and not (isinstance(n.value, ast.Constant) and n.value.value is None) for n in ast.walk(fn))


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


SOURCE_ATTRIBUTE = "__prunescope_source__"  # the exact bytes a module imported by import_code_file ran


def import_code_file(path: str | Path, trusted: bool = False, source: bytes | None = None) -> ModuleType:
    """Execute the file as a module of its own; only with ``trusted``, since this runs its code.

    The file is read once (at most :data:`core.integrity.MAX_CODE_BYTES`, a regular file), or ``source`` is
    run as that file when the caller already holds the bytes it checked (a run's trusted copy): what runs
    is exactly what was read, and the module keeps those bytes as ``__prunescope_source__``
    (:func:`source_of`), so whoever keeps or trusts the code keeps the bytes that ran, never the file read
    again by name (it may have been swapped in between)."""
    path = _existing_file(path)
    if not trusted:
        raise UntrustedCodeError(
            f"Building the model runs the code in {path.name}, so it was not run. If you wrote or have read this "
            f"file, {TRUST_CONTROL} to allow it."
        )
    if source is None:
        from .integrity import MAX_CODE_BYTES, IntegrityError, read_bounded

        try:
            source = read_bounded(path, MAX_CODE_BYTES, path.name)
        except IntegrityError as exc:
            raise ModelLoadError(str(exc)) from None
    code = _compile(source, path)
    name = _module_name(path, source)
    module = _new_module(name, path)
    setattr(module, SOURCE_ATTRIBUTE, bytes(source))
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


def source_of(module: ModuleType) -> bytes | None:
    """The bytes :func:`import_code_file` ran as ``module`` (None for a module not imported by it)."""
    return getattr(module, SOURCE_ATTRIBUTE, None)


def build_from_code(path: str | Path, name: str, args: list | dict | str | None = None,
                    trusted: bool = False, module: ModuleType | None = None) -> nn.Module:
    """The model built by calling class or factory ``name`` of the file ``path`` with ``args``; ``module``:
    the file already imported (:func:`import_code_file`), so the call runs the bytes that were read."""
    if not name or not str(name).strip():
        raise ModelLoadError("Name the class or factory function in the Python file that builds the model.")
    args = parse_model_args(args)
    module = module if module is not None else import_code_file(path, trusted=trusted)
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


# ----------------------------------------------------------------------------- which names build a whole model

# Image batches a whole model is tried on when the input size is not known yet: CIFAR-size, ImageNet-size and
# MNIST-size inputs cover the published classifiers; a block or layer takes none of them (wrong channel count).
PROBE_SHAPES = ((3, 32, 32), (3, 224, 224), (1, 28, 28))


def probe_shapes(height: int = 0, width: int = 0) -> tuple[tuple[int, int, int], ...]:
    """The image batches (channels, height, width) to try a candidate on: the input size the user gave
    (0 x 0: not given, left to the data) first, in colour and grey, then :data:`PROBE_SHAPES`."""
    given = ((3, int(height), int(width)), (1, int(height), int(width))) if height > 0 and width > 0 else ()
    return given + tuple(s for s in PROBE_SHAPES if s not in given)


def whole_models(path: str | Path, names: list[str], shapes: tuple[tuple[int, int, int], ...] = PROBE_SHAPES,
                 trusted: bool = False) -> list[str]:
    """Those of ``names`` (from :func:`model_candidates`) that build a whole model: called without arguments
    they return an nn.Module whose forward takes an image batch of one of ``shapes`` (channels, height,
    width), in the order given. If none does (every builder needs arguments), ``names`` is returned
    unchanged, so the user can still pick one and give its arguments.

    Runs the file's code, so only with ``trusted``; the answer is cached per file content, since the app
    asks again on every rerun and a ResNet-1202 takes seconds to build.
    """
    path = _existing_file(path)
    if not trusted:
        import_code_file(path, trusted=False)  # refuses, with the message that says how to trust the file
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    built = _whole_models(str(path), digest, tuple(names), tuple(map(tuple, shapes)))
    return list(built) or list(names)


@functools.lru_cache(maxsize=32)
def _whole_models(path: str, digest: str, names: tuple[str, ...], shapes: tuple) -> tuple[str, ...]:
    module = import_code_file(path, trusted=True)  # the caller checked trust; digest keys the cache
    return tuple(n for n in names if _builds_whole_model(vars(module).get(n), shapes))


def _builds_whole_model(builder: Any, shapes: tuple) -> bool:
    if not callable(builder):
        return False
    try:
        with torch.no_grad():
            model = builder()
            if not isinstance(model, nn.Module):
                return False
            model.eval()
            for shape in shapes:
                try:
                    model(torch.zeros((2, *shape)))
                    return True
                except Exception:  # a wrong size or channel count: try the next shape
                    continue
    except Exception:  # needs arguments, or fails to build: not a whole model by itself
        return False
    return False


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
