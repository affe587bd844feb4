"""Headless command line: evaluate, analyse, prune, export, recover, glossary.

Every user error ends in one line on stderr and a non-zero exit code, never a traceback. Progress
goes to stderr so that ``--json`` output on stdout stays machine-readable.
"""
from __future__ import annotations

import argparse
import atexit
import contextlib
import os
import signal
import sys
import threading
import traceback
import warnings
from pathlib import Path

from . import cli_engine, glossary
from .cli_recover import add_recover_command, cmd_recover
from .cli_common import (EXIT_TERMINATED, EXIT_USER_ERROR, Terminated, add_data_args, add_model_args,
                         raise_terminated, sigterm_received)
from .tasks.registry import task_plugin
from .errors import PruneScopeError, one_line, user_message
from .jsonout import emit_json, json_mode


def program_name() -> str:
    """How the user called us, for usage lines: ``prunescope`` (the console command) or ``python -m core``."""
    return "prunescope" if Path(sys.argv[0]).name == "prunescope" else "python -m core"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=program_name(), description="PruneScope: CAR analysis and cluster pruning of CNNs.")
    sub = parser.add_subparsers(dest="command", required=True)

    ev = sub.add_parser("evaluate", help="accuracy, per-class accuracy, MACs, params, OpenVINO CPU latency")
    add_model_args(ev)
    add_data_args(ev)
    ev.add_argument("--no-latency", action="store_true", help="skip the OpenVINO latency measurement")
    ev.add_argument("--json", action="store_true", help="print one JSON object on stdout")

    cli_engine.add_commands(sub, add_model_args, add_data_args)
    add_recover_command(sub)
    sub.add_parser("glossary", help="the words PruneScope uses (train / selection / test images, CAR, ...), defined")
    return parser


def cmd_evaluate(args) -> int:
    """``evaluate``: the task's own figures (``--task``, ``core.tasks.registry``)."""
    return task_plugin(args.task).hook("evaluate_cli")(args)


def cmd_glossary(args) -> int:
    """The glossary the app's pages and the README use (``core.glossary``), one term a paragraph."""
    for term in glossary.TERMS:
        print(glossary.sentence(term))
    return 0


COMMANDS = {"evaluate": cmd_evaluate, "recover": cmd_recover, "glossary": cmd_glossary}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler = COMMANDS.get(args.command) or cli_engine.COMMANDS[args.command]
    as_json = bool(getattr(args, "json", False))
    with json_mode(as_json) as emitted, sigterm_cleans_up(), warnings_as_notes():
        # --json: stdout holds exactly one strict JSON object, whatever happens
        code, error = run_handler(handler, args, as_json)
        if as_json and not emitted():
            emit_json({"error": error or "the command produced no result", "exit_code": code})
    if code == EXIT_TERMINATED and argv is None:  # the process's own entry (python -m core, the prunescope script)
        exit_process(code)
    return code


def exit_process(code: int) -> None:
    """End the CLI process with ``code``. After a SIGTERM (:data:`EXIT_TERMINATED`; the command's own clean-up has
    run) the exit handlers run and the process ends at once, without waiting for threads a library left behind:
    the export drill (``tests/cli/test_integrity_drills.py``) once saw a terminated export print its last line
    and stay alive past 120 s on a loaded machine, its SIGTERM having arrived while a step was being rebuilt."""
    if code != EXIT_TERMINATED:
        sys.exit(code)
    sys.stdout.flush()
    atexit._run_exitfuncs()  # weakref finalizers (temporary folders) and other exit handlers; not thread joins
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _terminated() -> tuple[int, str]:
    print("error: terminated (SIGTERM); nothing half-written was left", file=sys.stderr)
    return EXIT_TERMINATED, "terminated"


@contextlib.contextmanager
def sigterm_cleans_up():
    """SIGTERM raises :class:`~core.cli_common.Terminated` in the main thread (instead of killing the process
    outright), so half-written bundles and unpacked uploads are removed before it exits with 143."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def warnings_as_notes():
    """Python warnings raised by libraries (PIL's palette or EXIF warnings, numpy's RuntimeWarnings) become one
    ``note:`` line each on stderr, repeated ones once, instead of raw ``file:line: Warning`` dumps."""
    seen: set[str] = set()
    previous = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None) -> None:
        text = f"note: {category.__name__}: {' '.join(str(message).split())[:300]}"
        if text not in seen:
            seen.add(text)
            print(text, file=sys.stderr, flush=True)

    warnings.showwarning = show
    try:
        yield
    finally:
        warnings.showwarning = previous


def run_handler(handler, args, as_json: bool) -> tuple[int, str | None]:
    """(exit code, error message or None); user errors are one line on stderr, never a traceback.

    A SIGTERM wins over whatever error it turned into on its way up (raised inside an import, a C extension
    reports ``ImportError: initialization failed``, which the export then wraps): the exit code is still
    :data:`EXIT_TERMINATED` and the one line says the process was terminated."""
    try:
        return handler(args), None
    except Terminated:
        return _terminated()
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130, "interrupted"
    except PruneScopeError as exc:
        if sigterm_received():
            return _terminated()
        message = user_message(exc, "cli")
        print(f"error: {message}", file=sys.stderr)
        return EXIT_USER_ERROR, message
    except OSError as exc:  # a path the user named cannot be written or read (read-only, full disk, missing)
        if sigterm_received():
            return _terminated()
        print(f"error: {one_line(exc)}", file=sys.stderr)
        return EXIT_USER_ERROR, one_line(exc)
    except Exception as exc:
        if sigterm_received():
            return _terminated()
        if not as_json:
            raise
        traceback.print_exc(file=sys.stderr)  # a bug: its traceback on stderr, the JSON contract kept
        return 1, f"internal error: {type(exc).__name__}: {exc}"
