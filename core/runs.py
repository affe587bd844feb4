"""Run folders: everything a pruning run produced, readable after a crash or an app restart.

Layout of a run folder::

    config.json        settings, model spec, data source
    original.pt        the original weights (state dict), never modified
    original_pickle.pt the trusted pickled module, when the model was loaded as one
    model_code.py      the Python file of a custom architecture, or the file whose classes a pickled model
                       needs (config.json's spec names this copy)
    baseline.json      metric, per-class metric, MACs, params, latency of the original
    car.json           CAR scores of the original model (when computed)
    history.jsonl      one record per completed step (step 0 = the original)
    steps/NNNN.pt      per step: state dict + Torch-Pruning history (rebuild without pickle)
    status.json        running / done / cancelled / failed (+ pid, so a dead run reads 'interrupted')

All writes are atomic, so an interruption at any moment leaves every completed step intact.

Every record (``history.jsonl`` line, ``baseline.json``) holds the task's metric under ``metric``
(a fraction 0..1); ``config.json`` names it (``metric_name``: ``accuracy``, ``mAP@0.5``). Runs
written before that stored it as ``accuracy`` (detection: also ``map``); :class:`Run` reads them as
``metric``, so no reader ever sees the old keys.

Run folders are data: they can be copied, shared or edited, so nothing read from one runs code on
the strength of the folder alone. A run made from a trusted pickle or trusted model code records
that decision and each file's sha256 in ``config.json`` and in the workspace's trust record
(``trusted_files.json`` in the workspace root, outside every run); a run's copy is run only when its
current sha256 is in that record (or the user trusts the run explicitly, ``trusted=True``), so a
replaced or foreign file is refused before it runs. Trust is bound to the exact bytes that ran when the
model was loaded (:attr:`LoadedModel.code_bytes`, ``pickle_bytes``: never the file re-read by name) and,
for model code, to the call: the class or factory and its arguments (``code_name`` / ``code_args``) must
be one the user trusted, so an edited ``config.json`` cannot call another function of a trusted file.

Every binary file a run writes is listed with its sha256 in the record that refers to it: ``config.json``
``files`` (``original.pt``, the code and pickle copies), each history record's ``weights_sha256`` (its
``steps/NNNN.pt``), ``control.json``'s ``weights_sha256`` (``control.pt``); each is checked before use.
Every file is read with a size bound and only as a regular file (``core.integrity``); a run folder that
is or holds a symbolic link is refused. A damaged run (a file unreadable, of the wrong type, or not what
its record says) is listed as damaged with the reason (:func:`scan_runs`), never fatal to the others.
See ``docs/threat-model.md``.
"""
from __future__ import annotations

import io
import json
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from .tasks.registry import run_task_name, task_plugin
from .claim import training_received
from .custom_code import describe_call
from .errors import TRUST_CONTROL, ModelLoadError, PruneScopeError, SettingsError, UntrustedRunError, one_line
from .groups import rebuild_pruned
from .integrity import (MAX_CODE_BYTES, MAX_HISTORY_BYTES, MAX_JSON_BYTES, MAX_WEIGHTS_BYTES, IntegrityError,
                        finite_number, read_bounded, read_json_bounded, read_jsonl_bounded, refuse_links, sha256_bytes,
                        verify_bytes)
from .models import MAX_INPUT_SIDE, LoadedModel, ModelSpec, load_model, rebuild_from_spec
from .workspace import (append_jsonl, atomic_write_bytes, atomic_write_json, runs_dir, upload_name,
                        workspace_root)

ACTIVE_RUNS: set[str] = set()  # run folders being written by this process
CODE_COPY = "model_code.py"
PICKLE_COPY = "original_pickle.pt"
TRUST_RECORD = "trusted_files.json"
_COPY_KIND = {PICKLE_COPY: "pickled model", CODE_COPY: "model code"}


# ----------------------------------------------------------------------------- trust record


def _trust_record_path() -> Path:
    return workspace_root() / TRUST_RECORD


def trusted_hashes() -> dict[str, dict]:
    """sha256 -> what the user trusted (``kind`` 'pickle' or 'code', ``name``, when, and for code the
    ``calls`` trusted: ``[{"name": ..., "args": ...}]``); an unreadable, oversized or ill-typed record
    trusts nothing (entries that are not objects are dropped)."""
    try:
        record = read_json_bounded(_trust_record_path(), MAX_JSON_BYTES, {})
    except (ValueError, OSError, IntegrityError):
        return {}
    if not isinstance(record, dict):
        return {}
    return {k: v for k, v in record.items() if isinstance(k, str) and isinstance(v, dict)}


def _call_key(name: str | None, args) -> str:
    """One canonical text per call (class or factory name + JSON arguments), equal after a JSON round trip."""
    return json.dumps({"name": name, "args": args}, sort_keys=True)


def record_trust(data: bytes, kind: str, name: str = "", call: tuple[str, object] | None = None) -> str:
    """Remember that the user trusted this content (a pickle or model code they chose to run) and, for model
    code, the call ``(name, args)`` they made with it; returns its sha256."""
    digest = sha256_bytes(data)
    record = trusted_hashes()
    entry = record.get(digest) or {"kind": kind, "name": name, "trusted_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    changed = digest not in record
    if call is not None:
        calls = [c for c in entry.get("calls") or [] if isinstance(c, dict)]
        if _call_key(*call) not in {_call_key(c.get("name"), c.get("args")) for c in calls}:
            entry["calls"] = calls + [{"name": call[0], "args": call[1]}]
            changed = True
    if changed:
        record[digest] = entry
        atomic_write_json(_trust_record_path(), record)
    return digest


def remember_trusted_model(loaded: LoadedModel, model_bytes: bytes | None) -> None:
    """The user loaded ``loaded`` with trust given: runs holding the same pickle, or the same code called the
    same way, may then run it. Records the bytes that ran (``loaded.code_bytes`` / ``pickle_bytes``), never
    the file read again by name."""
    pickle_bytes = loaded.pickle_bytes if loaded.pickle_bytes is not None else model_bytes
    if loaded.spec.pickled and pickle_bytes is not None:
        record_trust(pickle_bytes, "pickle", loaded.spec.source)
    if loaded.code_bytes is not None:
        call = (loaded.spec.code_name, loaded.spec.code_args) if loaded.spec.custom else None
        record_trust(loaded.code_bytes, "code", Path(loaded.spec.code_file or loaded.spec.pickle_code or "").name,
                     call=call)


# ----------------------------------------------------------------------------- liveness


def process_start_time(pid: int) -> float | None:
    """When process ``pid`` started (seconds since the epoch), from ``/proc``; None where that cannot be read
    (no such process, not Linux). With the pid it names one process: a pid alone is reused by strangers."""
    try:
        fields = Path(f"/proc/{int(pid)}/stat").read_text().rsplit(")", 1)[1].split()
        ticks = int(fields[19])  # field 22 of stat: start time in clock ticks after boot
        boot = next(float(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime "))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration, TypeError):
        return None


def _pid_alive(pid: int, started: float | None = None, updated: float | None = None) -> bool:
    """Whether the process that wrote a status still runs: ``pid`` exists and is that process. With the
    recorded start time ``started`` the start times must agree (within 2 s: clock ticks, boot-time
    rounding); without it (runs before it was recorded), a process that started after the status was last
    ``updated`` cannot have written it. Where start times cannot be read, the pid alone decides."""
    try:
        os.kill(int(pid), 0)
    except (OSError, ValueError, TypeError, OverflowError):
        return False
    now_started = process_start_time(int(pid))
    if now_started is None:
        return True
    if finite_number(started):
        return abs(now_started - float(started)) <= 2.0
    if finite_number(updated):
        return now_started <= float(updated) + 2.0
    return True


# ----------------------------------------------------------------------------- writing a run


def _torch_bytes(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


class RunWriter:
    """Write side of a run folder: every write atomic, every binary file's sha256 in the record naming it."""

    def __init__(self, run_dir: Path):
        self.dir = Path(run_dir)
        if self.dir.exists():
            refuse_links(self.dir)  # a linked steps/ would carry the writes out of the run folder
        (self.dir / "steps").mkdir(parents=True, exist_ok=True)

    def start(self, config: dict, loaded: LoadedModel, original_bytes: bytes | None = None) -> None:
        """Write the run's originals (the trusted copies first, with their trust recorded, then ``original.pt``),
        then ``config.json`` listing each file's sha256, then the status. The copies are the bytes that ran
        when the model was loaded (``loaded.code_bytes`` / ``pickle_bytes``), never the file read again."""
        trusted: dict[str, str] = {}
        spec = self._keep_code(loaded, trusted)
        pickle_bytes = loaded.pickle_bytes if loaded.pickle_bytes is not None else original_bytes
        if loaded.spec.pickled and pickle_bytes is not None:
            atomic_write_bytes(self.dir / PICKLE_COPY, pickle_bytes)
            trusted[PICKLE_COPY] = record_trust(pickle_bytes, "pickle", loaded.spec.source)
        ACTIVE_RUNS.add(str(self.dir.resolve()))
        weights = _torch_bytes(loaded.model.state_dict())
        atomic_write_bytes(self.dir / "original.pt", weights)
        trust = {"files": trusted, "decision": "trusted by the user when the run started"} if trusted else None
        if trust and spec.custom:
            trust["call"] = {"name": spec.code_name, "args": spec.code_args}
        names = upload_names(loaded.spec, config.get("data_source"))
        atomic_write_json(self.dir / "config.json", {**config, "model_spec": spec.to_dict(),
                                                     "files": {"original.pt": sha256_bytes(weights), **trusted},
                                                     **({"upload_names": names} if names else {}),
                                                     **({"trust": trust} if trust else {})})
        self.status("running", "started")

    def _keep_code(self, loaded: LoadedModel, trusted: dict[str, str]) -> ModelSpec:
        """Copy the model's Python file (a custom architecture's, or the one a pickled model's classes came from)
        into the run as the bytes that ran at load (``loaded.code_bytes``), so the run rebuilds its models from
        exactly that code even after the user's file moved or changed; the stored spec names the copy. The code
        ran when the model was loaded, which needed trust: that trust (and the call) is recorded for the copy."""
        spec = loaded.spec
        field_name = "code_file" if spec.custom else "pickle_code" if spec.pickled and spec.pickle_code else None
        if field_name is None:
            return spec
        code = loaded.code_bytes
        if code is None:
            raise ModelLoadError("The model's Python code that ran at load is not known (the model was not loaded "
                                 "with core.models.load_model); load the model again.")
        atomic_write_bytes(self.dir / CODE_COPY, code)
        call = (spec.code_name, spec.code_args) if spec.custom else None
        trusted[CODE_COPY] = record_trust(code, "code", Path(getattr(spec, field_name)).name, call=call)
        return replace(spec, **{field_name: CODE_COPY})

    def status(self, state: str, message: str = "", **extra) -> None:
        """``status.json``: the state, with the pid and that process's start time (liveness: :attr:`Run.status`)."""
        atomic_write_json(self.dir / "status.json", {"state": state, "message": message, "pid": os.getpid(),
                                                     "pid_start": process_start_time(os.getpid()),
                                                     "updated": time.time(), **extra})
        if state != "running":
            ACTIVE_RUNS.discard(str(self.dir.resolve()))

    def write_json(self, name: str, obj) -> None:
        atomic_write_json(self.dir / name, obj)

    def write_weights(self, name: str, state_dict: dict) -> str:
        """Save a state dict as ``name`` (inside the run folder); returns its sha256 for the record naming it."""
        data = _torch_bytes(state_dict)
        atomic_write_bytes(self.dir / name, data)
        return sha256_bytes(data)

    def add_step(self, record: dict, model: nn.Module | None, pruning_history: list) -> None:
        """Weights first, then the history line (holding their sha256 as ``weights_sha256``, also set in
        ``record``): a record is never visible without its weights."""
        if model is not None:
            digest = self.write_weights(f"steps/{record['step']:04d}.pt",
                                        {"state_dict": model.state_dict(), "pruning_history": pruning_history})
            record["weights_sha256"] = digest  # the caller's record is the line written, hash included
        append_jsonl(self.dir / "history.jsonl", record)


# ----------------------------------------------------------------------------- reading a run

MAX_CLASSES = 100_000  # ImageNet-21k has 21,841; a record beyond this is edited, not a model


def check_spec(spec: ModelSpec, label: str) -> None:
    """Refuse (:class:`PruneScopeError`) a run's model spec that no run of this tool writes: types, a class count
    out of range, an input size outside 1..MAX_INPUT_SIDE, a bad normalisation, a code copy under another name."""
    problems = []
    if not isinstance(spec.arch, str) or not spec.arch:
        problems.append("arch is not a name")
    if not isinstance(spec.num_classes, int) or isinstance(spec.num_classes, bool) or \
            not 1 <= spec.num_classes <= MAX_CLASSES:
        problems.append(f"num_classes {spec.num_classes!r} is not a whole number from 1 to {MAX_CLASSES}")
    i = spec.input
    if not all(isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= MAX_INPUT_SIDE for v in (i.height, i.width)):
        problems.append(f"input size {i.height!r}×{i.width!r} is not two whole numbers from 1 to {MAX_INPUT_SIDE}")
    elif i.channels not in (1, 3):
        problems.append(f"input channels {i.channels!r} is not 1 or 3")
    else:
        try:
            if not all(finite_number(v) for v in (*i.mean, *i.std)):
                raise SettingsError("mean and std must be numbers")
            i.validate()
        except (SettingsError, TypeError) as exc:
            problems.append(one_line(exc).split(": ", 1)[-1])
    for field_name in ("code_file", "pickle_code"):
        value = getattr(spec, field_name)
        if value is not None and (not isinstance(value, str) or Path(value).name != CODE_COPY):
            problems.append(f"{field_name} names {value!r}, not the run's copy {CODE_COPY}")
    if spec.code_name is not None and not isinstance(spec.code_name, str):
        problems.append("code_name is not a name")
    if spec.class_names is not None and (not isinstance(spec.class_names, list)
                                         or not all(isinstance(n, str) for n in spec.class_names)):
        problems.append("class_names is not a list of names")
    if problems:
        raise PruneScopeError(f"{label}/config.json is damaged (model_spec: {'; '.join(problems)}); the run cannot "
                              "be opened.")


def check_record(record, line: int, label: str) -> dict:
    """A history record as runs write it, metric under ``metric`` (:func:`normalise_record`), else
    :class:`PruneScopeError` naming the line: an object with a whole ``step`` >= 0, a finite ``metric`` in
    0..1, finite ``macs`` (and ``params``, ``test_metric``, ``latency_ms`` numbers or null when present)."""
    def bad(why: str) -> PruneScopeError:
        return PruneScopeError(f"{label}/history.jsonl is damaged (line {line}: {why}).")

    if not isinstance(record, dict):
        raise bad(f"a {type(record).__name__}, not a step record")
    record = normalise_record(record)
    step = record.get("step")
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise bad(f"step {step!r} is not a whole number >= 0" if "step" in record else "no step")
    for key in ("metric", "macs"):
        if key not in record:
            raise bad(f"step {step} has no {key}")
    if not finite_number(record["metric"]) or not 0 <= record["metric"] <= 1:
        raise bad(f"step {step}'s metric {record['metric']!r} is not a number from 0 to 1")
    if not finite_number(record["macs"]) or record["macs"] < 0:
        raise bad(f"step {step}'s macs {record['macs']!r} is not a number >= 0")
    for key in ("params", "test_metric", "latency_ms"):
        value = record.get(key)
        if value is not None and not finite_number(value):
            raise bad(f"step {step}'s {key} {value!r} is not a number")
    if record.get("test_metric") is not None and not 0 <= record["test_metric"] <= 1:
        raise bad(f"step {step}'s test_metric {record['test_metric']!r} is not from 0 to 1")
    digest = record.get("weights_sha256")
    if digest is not None and (not isinstance(digest, str) or len(digest) != 64):
        raise bad(f"step {step}'s weights_sha256 is not a sha256")
    removed = record.get("removed")
    if removed is not None and not isinstance(removed, (dict, list)):
        raise bad(f"step {step}'s removed is a {type(removed).__name__}")
    return record


class Run:
    """Read side of a run folder. Opening checks ``config.json`` (a regular file within its size bound, an
    object, a model spec of the right types and ranges) and that the folder holds no symbolic link; every
    other file is checked where it is read. Raises :class:`PruneScopeError` (one line) for a damaged run."""

    def __init__(self, run_dir: Path | str):
        self.dir = Path(run_dir)
        if not self.dir.is_symlink() and not (self.dir / "config.json").exists() \
                and not (self.dir / "config.json").is_symlink():
            raise PruneScopeError(f"{self.dir} is not a PruneScope run folder (no config.json).")
        refuse_links(self.dir)
        try:
            self.config = read_json_bounded(self.dir / "config.json", MAX_JSON_BYTES, what=f"{self.dir.name}/config.json")
            if not isinstance(self.config, dict):
                raise ValueError(f"a {type(self.config).__name__}, not an object")
            self.spec = ModelSpec.from_dict(self.config["model_spec"])
        except IntegrityError:
            raise
        except (ValueError, KeyError, TypeError, AttributeError) as exc:  # run folders are data: edited or damaged
            raise PruneScopeError(f"{self.dir.name}/config.json is damaged ({one_line(exc)}); the run cannot be "
                                  "opened.") from None
        check_spec(self.spec, self.dir.name)
        files = self.config.get("files")
        if files is not None and (not isinstance(files, dict) or not all(isinstance(v, str) for v in files.values())):
            raise PruneScopeError(f"{self.dir.name}/config.json is damaged (files is not a list of sha256 by name); "
                                  "the run cannot be opened.")

    @property
    def name(self) -> str:
        return self.dir.name

    @property
    def task(self) -> str:
        """The registered task the run records (``classification`` for runs from before tasks were recorded);
        PruneScopeError for a task this tool does not know (``core.tasks.registry.run_task_name``)."""
        return run_task_name(self.config, self.name)

    def output_layers(self) -> list[str] | None:
        """Layers never pruned, by name: a detector's head output convs; None for a classifier (its last layer)."""
        return task_plugin(self.task).run_output_layers(self)

    @property
    def metric_name(self) -> str:
        """What the records' ``metric`` measures (``accuracy``, ``mAP@0.5``); runs from before the name was
        recorded: detection ones said ``metric``, classification ones nothing."""
        name = self.config.get("metric_name") or self.config.get("metric") or "accuracy"
        return name if isinstance(name, str) else "accuracy"

    @property
    def history(self) -> list[dict]:
        """Every step record, checked (:func:`check_record`): step 0 first, steps distinct. A damaged history
        (a line no JSON, a record of the wrong type) raises :class:`PruneScopeError` naming the line."""
        try:
            lines = read_jsonl_bounded(self.dir / "history.jsonl", MAX_HISTORY_BYTES,
                                       what=f"{self.name}/history.jsonl")
        except ValueError as exc:  # every line is written atomically: a bad one was edited in
            raise PruneScopeError(f"{self.name}/history.jsonl is damaged ({one_line(exc).split(': ', 1)[-1]}).") \
                from None
        records = [check_record(r, n, self.name) for n, r in enumerate(lines, start=1)]
        steps = [r["step"] for r in records]
        if records and steps[0] != 0:
            raise PruneScopeError(f"{self.name}/history.jsonl is damaged (its first record is step {steps[0]}, "
                                  "not the original, step 0).")
        if len(set(steps)) != len(steps):
            raise PruneScopeError(f"{self.name}/history.jsonl is damaged (a step is recorded twice).")
        return records

    def _json(self, name: str, default=None):
        """A JSON file of the run, bounded and parsed; a damaged one raises :class:`PruneScopeError`."""
        try:
            return read_json_bounded(self.dir / name, MAX_JSON_BYTES, default, what=f"{self.name}/{name}")
        except ValueError as exc:
            raise PruneScopeError(f"{self.name}/{name} is damaged ({one_line(exc)}).") from None

    @property
    def baseline(self) -> dict | None:
        base = self._json("baseline.json")
        if base is not None and not isinstance(base, dict):
            raise PruneScopeError(f"{self.name}/baseline.json is damaged (a {type(base).__name__}, not an object).")
        return normalise_record(base) if isinstance(base, dict) else base

    @property
    def car(self) -> dict | None:
        """``car.json`` (CAR of the original's filters: ``car`` {group: [float per filter]} and more), checked for
        those types; None when the run has none."""
        car = self._json("car.json")
        if car is None:
            return None
        scores = car.get("car") if isinstance(car, dict) else None
        if not isinstance(scores, dict) or not all(isinstance(k, str) and isinstance(v, list)
                                                   and all(finite_number(x) or x is None for x in v)
                                                   for k, v in scores.items()):
            raise PruneScopeError(f"{self.name}/car.json is damaged (no 'car' scores per group).")
        return car

    @property
    def status(self) -> dict:
        """``status.json`` (state, message, ...): a running state whose process is gone, or whose pid now
        belongs to another process (:func:`_pid_alive`), reads ``interrupted``; a damaged status reads
        ``damaged`` with the reason (the steps may still be fine)."""
        try:
            status = self._json("status.json", {"state": "unknown"})
            if not isinstance(status, dict) or not isinstance(status.get("state", ""), str):
                raise PruneScopeError(f"{self.name}/status.json is damaged (not a status object).")
        except PruneScopeError as exc:
            return {"state": "damaged", "message": str(exc)}
        if status.get("state") == "running":
            mine = status.get("pid") == os.getpid()
            alive = (str(self.dir.resolve()) in ACTIVE_RUNS if mine
                     else _pid_alive(status.get("pid", -1), status.get("pid_start"), status.get("updated")))
            if not alive:
                status = {**status, "state": "interrupted",
                          "message": "The process running this job stopped; the completed steps are kept."}
        return status

    def steps(self) -> list[int]:
        return [r["step"] for r in self.history]

    def check(self) -> None:
        """Everything a listing needs, checked: history, baseline, status (:class:`PruneScopeError` if damaged)."""
        self.task
        self.history
        self.baseline
        status = self.status
        if status.get("state") == "damaged":
            raise PruneScopeError(status["message"])

    def unverified(self) -> str | None:
        """What in this run carries no sha256 to check (runs written before files were hashed), for an
        'unverified' note; None when every weights file the run refers to has one."""
        missing = []
        files = self.config.get("files") or {}
        if "original.pt" not in files:
            missing.append("original.pt")
        try:
            unhashed = [r["step"] for r in self.history if r["step"] > 0 and "weights_sha256" not in r]
        except PruneScopeError:
            return None
        if unhashed:
            missing.append(f"the weights of step{'s' if len(unhashed) > 1 else ''} "
                           + ", ".join(map(str, unhashed[:5])) + (" …" if len(unhashed) > 5 else ""))
        if not missing:
            return None
        return (f"Unverified: {' and '.join(missing)} of this run carry no sha256 (written before runs recorded "
                "them), so they cannot be checked against damage or replacement; export re-measures the step.")

    # -- names for people (issue 16: not the workspace's internal upload paths) -----------------------------

    @property
    def model_label(self) -> str:
        """``'resnet20.th · custom:resnet20'``: the file the user uploaded (when the run recorded it; for a model
        loaded from a path, the path's file name) and the architecture; a sample is its name."""
        spec = self.spec
        name = (self.config.get("upload_names") or {}).get("model") or spec.upload_name
        if not name and spec.source and spec.source != "upload" and not spec.source.startswith("sample:"):
            name = Path(spec.source).name
        return f"{name} · {spec.arch}" if name else (spec.source if spec.source.startswith("sample:") else spec.arch)

    @property
    def data_label(self) -> str:
        """The data set as the user knows it: the uploaded zip's or folder's name when the run recorded it, a
        sample's ``sample:NAME``, else (runs from before names were recorded) the stored path's file name."""
        source = str(self.config.get("data_source") or "")
        name = (self.config.get("upload_names") or {}).get("data")
        if name:
            return name
        return source if source.startswith("sample:") or not source else Path(source).name

    @property
    def display_name(self) -> str:
        """``'<run folder> — <model> on <data>'``, the run as lists and headings name it."""
        return f"{self.name} — {self.model_label} on {self.data_label}"

    @property
    def reviewable(self) -> bool:
        """Whether the run has anything to review: at least one accepted step beyond step 0 (the original).
        A run cancelled or failed before its first step has not (issue 16: it was offered for review)."""
        try:
            return reviewable(self.history)
        except PruneScopeError:  # a damaged history: nothing reliable to review
            return False

    def record(self, step: int) -> dict:
        for r in self.history:
            if r["step"] == step:
                return r
        raise SettingsError(f"Run {self.name} has no step {step} (steps: {self.steps()}).")

    def fresh_model(self, trusted: bool = False) -> nn.Module:
        """The run's architecture with fresh weights. A pickled or custom model runs code from the run's own
        copy, so only when that copy is trusted (see the module docstring) or ``trusted`` says the user
        trusts this run; custom code also only through a call (``code_name`` / ``code_args``) the user trusted
        with it. A detector is rebuilt from its recorded config.

        Raises :class:`UntrustedRunError` (nothing was run) when the copy or the call is not trusted, and
        :class:`PruneScopeError` (one line) when the recorded architecture cannot be built.
        """
        try:
            return self._fresh_model(trusted)
        except PruneScopeError:
            raise
        except Exception as exc:  # an edited arch / num_classes / detector config: data, never a traceback
            raise PruneScopeError(f"Run {self.name}: its model cannot be rebuilt from config.json "
                                  f"({one_line(exc)}); the run is damaged.") from None

    def _fresh_model(self, trusted: bool) -> nn.Module:
        return task_plugin(self.task).hook("rebuild_model")(self, trusted)

    def trusted_copy(self, name: str, trusted: bool = False, call: tuple[str, object] | None = None) -> bytes:
        """The bytes of the run's copy ``name`` (a pickle or model code), refused unless they may run: their
        sha256 is in the workspace's trust record as that kind of file and, for model code with ``call``, with
        that call; or ``trusted``. A copy that differs from the sha256 ``config.json`` lists is refused even
        then (it is not what the run was made with)."""
        path = self.dir / name
        if not path.is_file() and not path.is_symlink():
            raise PruneScopeError(f"Run {self.name} is incomplete: its {_COPY_KIND.get(name, 'file')} ({name}) is "
                                  "missing, so its models cannot be rebuilt.")
        data = read_bounded(path, MAX_WEIGHTS_BYTES if name == PICKLE_COPY else MAX_CODE_BYTES, f"{self.name}/{name}")
        digest = sha256_bytes(data)
        listed = (self.config.get("files") or {}).get(name)
        if trusted:
            verify_bytes(data, listed, f"Run {self.name}'s {name}")
            return data
        entry = trusted_hashes().get(digest)
        kind = "pickle" if name == PICKLE_COPY else "code"
        if entry is not None and entry.get("kind", kind) == kind:
            if call is None:
                return data
            calls = {_call_key(c.get("name"), c.get("args")) for c in entry.get("calls") or [] if isinstance(c, dict)}
            if _call_key(*call) in calls:
                return data
            shown = ", ".join(describe_call(c.get("name") or "?", c.get("args")) for c in entry.get("calls") or []
                              if isinstance(c, dict)) or "none recorded"
            raise UntrustedRunError(
                f"Run {self.name}: its config.json asks to build the model by calling "
                f"{describe_call(str(call[0]), call[1] if isinstance(call[1], (list, dict)) else None)} from its model "
                f"code, a call this workspace never trusted with that file (trusted: {shown}); nothing was run. If you "
                f"trust this run, {TRUST_CONTROL}.")
        recorded = ((self.config.get("trust") or {}).get("files") or {}).get(name) or listed
        if recorded and recorded != digest:
            why = (f"the file changed since the run was made (sha256 {digest[:12]}…, recorded {str(recorded)[:12]}…); "
                   "do not trust it unless you changed it yourself")
        else:
            why = "this workspace has no record of trusting that file (the run may come from elsewhere)"
        raise UntrustedRunError(
            f"Run {self.name}: opening its models would run code from its {_COPY_KIND.get(name, 'file')} ({name}), "
            f"and {why}; nothing was run. If you trust this run, {TRUST_CONTROL}.")

    def _load_into(self, model: nn.Module, state_dict, what: str) -> nn.Module:
        """``model`` with ``state_dict`` loaded; weights that do not fit (from another model) are one line."""
        try:
            model.load_state_dict(state_dict)
        except Exception as exc:
            raise PruneScopeError(f"Run {self.name}: {what} does not fit the run's model ({one_line(exc)}); "
                                  "the run is damaged.") from None
        return model

    def _check_finite(self, state_dict: dict, what: str) -> None:
        """Refuse weights holding NaN or inf, naming the tensor: the model would compute NaN, which every later
        figure would blame on something else (a failed surgery, FP16, 'near chance')."""
        for key, tensor in state_dict.items():
            if isinstance(tensor, torch.Tensor) and tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                raise PruneScopeError(f"Run {self.name}: {what} hold NaN or infinite values ({key}); the run is "
                                      "damaged, nothing was built from them.")

    def original(self, trusted: bool = False) -> LoadedModel:
        sd = self._weights(self.dir / "original.pt", (self.config.get("files") or {}).get("original.pt"))
        if isinstance(sd, dict):
            self._check_finite(sd, "original.pt's weights")
        model = self._load_into(self.fresh_model(trusted), sd, "original.pt")
        return LoadedModel(model.eval(), self.spec)

    def control_record(self) -> dict | None:
        """``control.json`` (the control's figures, per-image correctness and the training it received), or
        None for a run without one or with a damaged one."""
        try:
            record = self._json("control.json")
        except PruneScopeError:
            return None
        return record if isinstance(record, dict) else None

    def control_covers(self, step: int) -> bool:
        """Whether step ``step`` received the training the control was given (``core.claim.training_received``
        against ``control.json``'s ``received``); False without a control or without the run's fine-tuning setting."""
        control = self.control_record() or {}
        finetune_steps = (self.config.get("prune") or {}).get("finetune_steps")
        if finetune_steps is None or "received" not in control:
            return False
        return training_received(self.history, finetune_steps, upto=step) == control["received"]

    def control(self, trusted: bool = False) -> nn.Module | None:
        """The control of the run (``control.pt``: the original given the training of the step the run ships,
        ``control.json``'s ``for_step``), or None for a run without one; ``trusted`` as for :meth:`fresh_model`."""
        path = self.dir / "control.pt"
        if not path.exists():
            return None
        expected = (self.control_record() or {}).get("weights_sha256")
        model = self._load_into(self.fresh_model(trusted), self._weights(path, expected), "control.pt")
        return model.eval()

    def rebuild_step(self, step: int, trusted: bool = False) -> nn.Module:
        """The model of ``step``, rebuilt from the architecture + pruning history + weights (no pickle), the
        weights checked against the record's ``weights_sha256``; ``trusted`` as for :meth:`fresh_model`."""
        if step == 0:
            return self.original(trusted).model
        record = self.record(step)
        path = self.dir / "steps" / f"{step:04d}.pt"
        if not path.exists() and not path.is_symlink():
            raise PruneScopeError(f"The weights of step {step} are missing from {self.dir}.")
        saved = self._weights(path, record.get("weights_sha256"))
        if not isinstance(saved, dict) or not isinstance(saved.get("state_dict"), dict) \
                or not isinstance(saved.get("pruning_history"), list):
            raise PruneScopeError(f"Run {self.name}: steps/{step:04d}.pt is damaged (no state_dict and pruning "
                                  "history); it was not loaded.")
        self._check_finite(saved["state_dict"], f"step {step}'s weights")
        try:
            return rebuild_pruned(self.fresh_model(trusted), self.spec.input.shape(1), saved["pruning_history"],
                                  saved["state_dict"], output_layers=self.output_layers())
        except PruneScopeError:
            raise
        except Exception as exc:  # weights or a pruning history from another model
            raise PruneScopeError(f"Run {self.name}: step {step}'s weights do not fit the run's model "
                                  f"({one_line(exc)}); the run is damaged.") from None

    def _weights(self, path: Path, expected: str | None = None):
        """A weights file of the run, read without running code: a regular file within its size bound whose
        sha256 is ``expected`` (when recorded). A damaged or replaced file is one clear error."""
        label = f"Run {self.name}: {path.relative_to(self.dir).as_posix()}"
        try:
            data = read_bounded(path, MAX_WEIGHTS_BYTES, f"{self.name}/{path.relative_to(self.dir).as_posix()}")
        except FileNotFoundError:
            raise PruneScopeError(f"Run {self.name} is incomplete: {path.name} is missing.") from None
        verify_bytes(data, expected, label)
        try:
            return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except Exception as exc:  # the weights-only reader runs no code: any failure means a damaged file
            raise PruneScopeError(f"{label} is damaged or not plain weights ({one_line(exc)}); it was not "
                                  "loaded.") from None

    def select_step(self, max_drop: float) -> int:
        """The step that ships at ``max_drop`` points (:func:`select_step`: the fewest MACs within it on the
        selection images and on the curve of the test reads)."""
        if not self.history:
            raise PruneScopeError(f"Run {self.name} has no completed step yet.")
        return select_step(self.history, max_drop)


def reviewable(history: list[dict]) -> bool:
    """Whether ``history`` (a run's step records, e.g. a live job's) holds an accepted step beyond step 0."""
    return any(int(r.get("step", 0)) > 0 for r in history)


def run_reviewable(run_dir: str | Path | None) -> bool:
    """:attr:`Run.reviewable` of the folder ``run_dir``; False where it is none, or no run folder (any more)."""
    if not run_dir or not Path(run_dir).is_dir():
        return False
    try:
        return Run(run_dir).reviewable
    except PruneScopeError:
        return False


def upload_names(spec: ModelSpec, data_source: str | None) -> dict[str, str]:
    """The names the user uploaded the model and the data under, for a run's ``config.json`` (only those known):
    the model's from its spec, the data's from the workspace's record of the stored upload."""
    names = {"model": spec.upload_name, "data": upload_name(data_source)}
    return {k: v for k, v in names.items() if v}


def select_step(history: list[dict], max_drop: float) -> int:
    """The step with the fewest MACs whose metric drop from step 0 (points) is within ``max_drop`` on the selection
    images and, where the run measured test images, on those too (the final acceptance), read as one curve
    (:func:`accepted_test_drops`).

    The selection figure of a step the loop kept is biased by the decisions taken on it (the winner's curse);
    the test images took no decision. But one acceptance per step on the same test images is a look per step,
    and "the smallest step that passes" takes the luckiest of them: on a real ResNet-20 upload it shipped 1.82x
    on a read of exactly 1.0 points that lost 2.13 on 3,000 unseen images, after recovered steps at 1.41x and
    1.69x had read 1.3 and 1.2 (the curve pools the four from 1.41x at 1.13).
    Reading the test drops as one non-decreasing curve of the compression pools such a lucky read with its
    neighbours. A step ships only when its own read and the curve's are both within ``max_drop``; among
    equal-MAC steps the more accurate on the selection images."""
    base = history[0]
    fitted = accepted_test_drops(history)
    ok = [r for r in history if shippable(r) and _within(base, r, max_drop)
          and _within(base, r, max_drop, "test_metric") and fitted.get(r["step"], 0.0) <= max_drop + 1e-9]
    if not ok:
        return 0
    return min(ok, key=lambda r: (r["macs"], -r["metric"]))["step"]


def on_the_curve(base: dict, record: dict) -> bool:
    """Whether ``record`` is a point of the compression curve :func:`accepted_test_drops` fits: step 0, or a step with
    fewer MACs. A recovery of the original (``recover --step 0``) removed nothing: other training, not compression,
    moved its read, and pooled with the pruned steps it would lift their fitted drops (a fine-tuned original one
    test image worse stopped a digits run from shipping at threshold 0)."""
    return record["step"] == 0 or record["macs"] < base["macs"]


def accepted_test_drops(history: list[dict]) -> dict[int, float]:
    """Step -> the test drop (points from step 0) the final acceptance reads: the isotonic (non-decreasing) regression
    of the shippable steps' own test drops, from the fewest removed MACs to the most (equal MACs, which the
    compression does not order, from the best read to the worst: a recovery of a step that reads better than the
    step is not pooled with it), by the pool-adjacent-violators algorithm (Barlow et al., "Statistical Inference
    under Order Restrictions", 1972). Empty without test figures.

    Why: a pruned model loses more the more it is pruned, so a step that reads better than a less pruned one owes
    part of it to the particular test images; pooling the two reads is the least-squares estimate under that
    order. The fitted drops never fall, so the steps the curve accepts at a threshold are the least pruned ones
    up to the first it refuses (:func:`select_step` also skips a step whose own read is past the threshold): a
    lucky read after refused ones no longer ships alone. Steps that removed no MACs are not on the curve
    (:func:`on_the_curve`): :func:`select_step` reads their own test drop alone."""
    base = history[0]
    if base.get("test_metric") is None:
        return {}
    steps = sorted((r for r in history if shippable(r) and r.get("test_metric") is not None and on_the_curve(base, r)),
                   key=lambda r: (-r["macs"], base["test_metric"] - r["test_metric"], r["step"]))
    blocks: list[list[float]] = []  # [sum of drops, count, ...steps]
    for r in steps:
        blocks.append([(base["test_metric"] - r["test_metric"]) * 100, 1, r["step"]])
        while len(blocks) > 1 and blocks[-2][0] / blocks[-2][1] > blocks[-1][0] / blocks[-1][1]:
            total, count, *members = blocks.pop()
            blocks[-1][0] += total
            blocks[-1][1] += count
            blocks[-1].extend(members)
    return {step: total / count for total, count, *members in blocks for step in members}


def passed_over(history: list[dict], max_drop: float) -> list[tuple[dict, float]]:
    """The steps with fewer MACs than :func:`select_step`'s pick that are within ``max_drop`` on the selection
    images and on their own test read, but not on the curve of the test reads (:func:`accepted_test_drops`):
    ``(record, the curve's drop in points)``, fewest MACs first. What Review explains beside the pick."""
    base, fitted = history[0], accepted_test_drops(history)
    pick = next(r for r in history if r["step"] == select_step(history, max_drop))
    return sorted(((r, fitted[r["step"]]) for r in history
                   if r["macs"] < pick["macs"] and r["step"] in fitted and fitted[r["step"]] > max_drop + 1e-9
                   and _within(base, r, max_drop) and _within(base, r, max_drop, "test_metric")),
                  key=lambda item: item[0]["macs"])


def shippable(record: dict) -> bool:
    """Whether the loop meant ``record``'s model to be kept: not a pruning step of a run that recovers
    (``awaits_recovery``: only its recovered steps ship; ``core.engine.final_recovery_due``), not the removal half
    of a stretch (clusters taken past the threshold for a recovery to bring back) and not a stretch the loop
    undid (``core.engine.stretch_step``)."""
    return (not record.get("undone") and not record.get("awaits_recovery")
            and not (record.get("stretch") and record.get("recovered_from") is None))


def _within(base: dict, record: dict, max_drop: float, key: str = "metric") -> bool:
    """Whether ``record``'s drop from ``base`` in ``key`` (``metric``: the selection images, ``test_metric``: the test
    images) is within ``max_drop`` points; True where either has no such figure (a run without a test split)."""
    if base.get(key) is None or record.get(key) is None:
        return True
    return (base[key] - record[key]) * 100 <= max_drop + 1e-9


def removals(record: dict) -> list[dict]:
    """The clusters a step removed, each ``{group, display, producers, filters, filters_original,
    width_before, width_after}``: none for the original and a recovered step, one for a one-cluster step
    (``removed`` a dict, as in every run before multi-cluster steps), several for a multi-cluster step
    (``removed`` a list; ``PruneConfig.clusters_per_step``)."""
    removed = record.get("removed")
    if not removed:
        return []
    return [removed] if isinstance(removed, dict) else list(removed)


LEGACY_METRIC_KEYS = ("map", "accuracy")  # where records before ``metric`` kept it, most specific first


def normalise_record(record: dict) -> dict:
    """A run record with its metric under ``metric``: a record written before the key existed kept it as
    ``accuracy`` (a detection one as both ``accuracy`` and ``map``, each the mAP); those keys are
    replaced, in place of the first, so that readers see one key whatever the run's age."""
    if "metric" in record or not any(k in record for k in LEGACY_METRIC_KEYS):
        return record
    value = next(record[k] for k in LEGACY_METRIC_KEYS if k in record)
    out: dict = {}
    for key, item in record.items():
        if key in LEGACY_METRIC_KEYS:
            out.setdefault("metric", value)
        else:
            out[key] = item
    return out


@dataclass
class DamagedRun:
    """A folder of the runs directory that cannot be used as a run: its name, path and why (one line)."""

    name: str
    dir: Path
    reason: str


def scan_runs() -> tuple[list[Run], list[DamagedRun]]:
    """Every run in the workspace, newest first, checked (:meth:`Run.check`), and the damaged ones beside
    them with the reason: one damaged run never hides or breaks the others. Folders without a
    ``config.json`` are not runs and are skipped."""
    good, damaged = [], []
    for d in sorted(runs_dir().iterdir(), reverse=True):
        if not (d / "config.json").exists() and not (d / "config.json").is_symlink() and not d.is_symlink():
            continue
        try:
            run = Run(d)
            run.check()
        except PruneScopeError as exc:
            damaged.append(DamagedRun(d.name, d, str(exc)))
            continue
        except Exception as exc:  # a damaged run must not hide the others, whatever is wrong with it
            damaged.append(DamagedRun(d.name, d, f"{d.name} cannot be read ({one_line(exc)})."))
            continue
        good.append(run)
    return good, damaged


def list_runs() -> list[Run]:
    """Every usable run in the workspace, newest first (damaged ones: :func:`scan_runs`)."""
    return scan_runs()[0]


def damaged_runs() -> list[DamagedRun]:
    """The runs of the workspace that are damaged, with the reason each cannot be used (:func:`scan_runs`)."""
    return scan_runs()[1]


def rebuild_classifier(run: Run, trusted: bool) -> nn.Module:
    """A classification run's original model, fresh (``Run.fresh_model``): from its copy of the pickle (with its
    copy of the model code), from its custom code's recorded call, or from a built-in architecture."""
    if run.spec.pickled:
        code_path, code_source = None, None
        if run.spec.pickle_code:  # the classes the pickle names come from the run's copy of the user's file
            code_path = run.dir / CODE_COPY
            code_source = run.trusted_copy(CODE_COPY, trusted)
        pickle_bytes = run.trusted_copy(PICKLE_COPY, trusted)
        try:  # exactly the bytes checked run, never the files read again by name
            return load_model(pickle_bytes, trusted=True, code_path=code_path, code_source=code_source).model
        except ModelLoadError as exc:
            if code_path is not None:
                raise
            raise ModelLoadError(f"Run {run.name} cannot rebuild its pickled model: {exc} The run holds no copy "
                                 "of that code (it was made without it, or before runs kept it): prune again from "
                                 "the pickle with --trusted --model-code FILE.") from None
    if run.spec.custom:
        code_path = run.dir / CODE_COPY
        code_source = run.trusted_copy(CODE_COPY, trusted, call=(run.spec.code_name, run.spec.code_args))
        return rebuild_from_spec(run.spec, code_path=code_path, trusted=True, code_source=code_source)
    return rebuild_from_spec(run.spec)
