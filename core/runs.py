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
replaced or foreign file is refused before it runs.
"""
from __future__ import annotations

import hashlib
import os
import time
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from .detection.models import output_layer_names, rebuild_detector
from .errors import TRUST_CONTROL, ModelLoadError, PruneScopeError, SettingsError, UntrustedRunError, one_line
from .groups import rebuild_pruned
from .models import LoadedModel, ModelSpec, load_model, rebuild_from_spec
from .workspace import (append_jsonl, atomic_torch_save, atomic_write_bytes, atomic_write_json, read_json, read_jsonl,
                        runs_dir, upload_name, workspace_root)

ACTIVE_RUNS: set[str] = set()  # run folders being written by this process
CODE_COPY = "model_code.py"
PICKLE_COPY = "original_pickle.pt"
TRUST_RECORD = "trusted_files.json"
_COPY_KIND = {PICKLE_COPY: "pickled model", CODE_COPY: "model code"}


# ----------------------------------------------------------------------------- trust record


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _trust_record_path() -> Path:
    return workspace_root() / TRUST_RECORD


def trusted_hashes() -> dict[str, dict]:
    """sha256 -> what the user trusted (kind, name, when); an unreadable record trusts nothing."""
    try:
        record = read_json(_trust_record_path(), {})
    except (ValueError, OSError):
        return {}
    return record if isinstance(record, dict) else {}


def record_trust(data: bytes, kind: str, name: str = "") -> str:
    """Remember that the user trusted this content (a pickle or model code they chose to run); its sha256."""
    digest = sha256_bytes(data)
    record = trusted_hashes()
    if digest not in record:
        record[digest] = {"kind": kind, "name": name, "trusted_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        atomic_write_json(_trust_record_path(), record)
    return digest


def remember_trusted_model(loaded: LoadedModel, model_bytes: bytes | None) -> None:
    """The user loaded ``loaded`` with trust given: runs holding the same pickle or code may then run it."""
    if loaded.spec.pickled and model_bytes is not None:
        record_trust(model_bytes, "pickle", loaded.spec.source)
    for code in (loaded.spec.code_file, loaded.spec.pickle_code):
        if code is not None and Path(code).is_file():
            record_trust(Path(code).read_bytes(), "code", Path(code).name)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except (OSError, ValueError):
        return False
    return True


class RunWriter:
    def __init__(self, run_dir: Path):
        self.dir = Path(run_dir)
        (self.dir / "steps").mkdir(parents=True, exist_ok=True)

    def start(self, config: dict, loaded: LoadedModel, original_bytes: bytes | None = None) -> None:
        """Write the run's config and originals; trusted copies (pickle, code) first, with their trust recorded."""
        trusted: dict[str, str] = {}
        spec = self._keep_code(loaded.spec, trusted)
        if loaded.spec.pickled and original_bytes is not None:
            atomic_write_bytes(self.dir / PICKLE_COPY, original_bytes)
            trusted[PICKLE_COPY] = record_trust(original_bytes, "pickle", loaded.spec.source)
        ACTIVE_RUNS.add(str(self.dir.resolve()))
        trust = {"files": trusted, "decision": "trusted by the user when the run started"} if trusted else None
        names = upload_names(loaded.spec, config.get("data_source"))
        atomic_write_json(self.dir / "config.json", {**config, "model_spec": spec.to_dict(),
                                                     **({"upload_names": names} if names else {}),
                                                     **({"trust": trust} if trust else {})})
        atomic_torch_save(self.dir / "original.pt", loaded.model.state_dict())
        self.status("running", "started")

    def _keep_code(self, spec: ModelSpec, trusted: dict[str, str]) -> ModelSpec:
        """Copy the model's Python file (a custom architecture's, or the one a pickled model's classes came from)
        into the run, so the run rebuilds its models even after the user's file has moved or changed; the stored
        spec names the copy. The code ran when the model was loaded, which needed trust: that trust is recorded
        for the copy."""
        field_name = "code_file" if spec.custom else "pickle_code" if spec.pickled and spec.pickle_code else None
        if field_name is None:
            return spec
        source = Path(getattr(spec, field_name))
        if not source.is_file():
            raise ModelLoadError(f"The model's Python file {source} is gone since the model was loaded; load the "
                                 "model again.")
        code = source.read_bytes()
        atomic_write_bytes(self.dir / CODE_COPY, code)
        trusted[CODE_COPY] = record_trust(code, "code", source.name)
        return replace(spec, **{field_name: CODE_COPY})

    def status(self, state: str, message: str = "", **extra) -> None:
        atomic_write_json(self.dir / "status.json", {"state": state, "message": message, "pid": os.getpid(),
                                                     "updated": time.time(), **extra})
        if state != "running":
            ACTIVE_RUNS.discard(str(self.dir.resolve()))

    def write_json(self, name: str, obj) -> None:
        atomic_write_json(self.dir / name, obj)

    def add_step(self, record: dict, model: nn.Module | None, pruning_history: list) -> None:
        """Weights first, then the history line: a record is never visible without its weights."""
        if model is not None:
            atomic_torch_save(self.dir / "steps" / f"{record['step']:04d}.pt",
                              {"state_dict": model.state_dict(), "pruning_history": pruning_history})
        append_jsonl(self.dir / "history.jsonl", record)


class Run:
    """Read side of a run folder."""

    def __init__(self, run_dir: Path | str):
        self.dir = Path(run_dir)
        if not (self.dir / "config.json").exists():
            raise PruneScopeError(f"{self.dir} is not a PruneScope run folder (no config.json).")
        try:
            self.config = read_json(self.dir / "config.json")
            self.spec = ModelSpec.from_dict(self.config["model_spec"])
        except (ValueError, KeyError, TypeError, AttributeError) as exc:  # run folders are data: edited or damaged
            raise PruneScopeError(f"{self.dir.name}/config.json is damaged ({one_line(exc)}); the run cannot be "
                                  "opened.") from None

    @property
    def name(self) -> str:
        return self.dir.name

    @property
    def task(self) -> str:
        """``classification`` (runs before detection existed say nothing) or ``detection``."""
        return self.config.get("task", "classification")

    def output_layers(self) -> list[str] | None:
        """Layers never pruned, by name: a detector's head output convs; None for a classifier (its last layer)."""
        if self.task != "detection":
            return None
        return output_layer_names(self.fresh_model())

    @property
    def metric_name(self) -> str:
        """What the records' ``metric`` measures (``accuracy``, ``mAP@0.5``); runs from before the name was
        recorded: detection ones said ``metric``, classification ones nothing."""
        return self.config.get("metric_name") or self.config.get("metric") or "accuracy"

    @property
    def history(self) -> list[dict]:
        try:
            return [normalise_record(r) for r in read_jsonl(self.dir / "history.jsonl")]
        except ValueError as exc:  # every line is written atomically: a bad one was edited in
            raise PruneScopeError(f"{self.name}/history.jsonl is damaged ({one_line(exc)}).") from None

    @property
    def baseline(self) -> dict | None:
        base = read_json(self.dir / "baseline.json")
        return normalise_record(base) if isinstance(base, dict) else base

    @property
    def car(self) -> dict | None:
        return read_json(self.dir / "car.json")

    @property
    def status(self) -> dict:
        status = read_json(self.dir / "status.json", {"state": "unknown"})
        if status.get("state") == "running":
            mine = status.get("pid") == os.getpid()
            alive = str(self.dir.resolve()) in ACTIVE_RUNS if mine else _pid_alive(int(status.get("pid", -1)))
            if not alive:
                status = {**status, "state": "interrupted",
                          "message": "The process running this job stopped; the completed steps are kept."}
        return status

    def steps(self) -> list[int]:
        return [r["step"] for r in self.history]

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
        trusts this run. A detector is rebuilt from its recorded config.

        Raises :class:`UntrustedRunError` (nothing was run) when the copy is not trusted.
        """
        if self.task == "detection":
            return rebuild_detector(self.config["detector_config"])
        if self.spec.pickled:
            code_path = None
            if self.spec.pickle_code:  # the classes the pickle names come from the run's copy of the user's file
                code_path = self.dir / Path(self.spec.pickle_code).name
                self.trusted_copy(code_path.name, trusted)
            pickle_bytes = self.trusted_copy(PICKLE_COPY, trusted)
            try:
                return load_model(pickle_bytes, trusted=True, code_path=code_path).model
            except ModelLoadError as exc:
                if code_path is not None:
                    raise
                raise ModelLoadError(f"Run {self.name} cannot rebuild its pickled model: {exc} The run holds no copy "
                                     "of that code (it was made without it, or before runs kept it): prune again from "
                                     "the pickle with --trusted --model-code FILE.") from None
        if self.spec.custom:
            code_path = self.dir / Path(self.spec.code_file).name
            self.trusted_copy(code_path.name, trusted)
            return rebuild_from_spec(self.spec, code_path=code_path, trusted=True)
        return rebuild_from_spec(self.spec)

    def trusted_copy(self, name: str, trusted: bool = False) -> bytes:
        """The bytes of the run's copy ``name`` (a pickle or model code), refused unless they may run."""
        path = self.dir / name
        if not path.is_file():
            raise PruneScopeError(f"Run {self.name} is incomplete: its {_COPY_KIND.get(name, 'file')} ({name}) is "
                                  "missing, so its models cannot be rebuilt.")
        data = path.read_bytes()
        if trusted:
            return data
        digest = sha256_bytes(data)
        if digest in trusted_hashes():
            return data
        recorded = ((self.config.get("trust") or {}).get("files") or {}).get(name)
        if recorded and recorded != digest:
            why = (f"the file changed since the run was made (sha256 {digest[:12]}…, recorded {recorded[:12]}…); "
                   "do not trust it unless you changed it yourself")
        else:
            why = "this workspace has no record of trusting that file (the run may come from elsewhere)"
        raise UntrustedRunError(
            f"Run {self.name}: opening its models would run code from its {_COPY_KIND.get(name, 'file')} ({name}), "
            f"and {why}; nothing was run. If you trust this run, {TRUST_CONTROL}.")

    def original(self, trusted: bool = False) -> LoadedModel:
        sd = self._weights(self.dir / "original.pt")
        model = self.fresh_model(trusted)
        model.load_state_dict(sd)
        return LoadedModel(model.eval(), self.spec)

    def control_record(self) -> dict | None:
        """``control.json`` (the control's figures, per-image correctness and the training it received), or
        None for a run without one or with a damaged one."""
        path = self.dir / "control.json"
        try:
            return read_json(path) if path.exists() else None
        except ValueError:
            return None

    def control(self, trusted: bool = False) -> nn.Module | None:
        """The control of the run (the original given the training of its last step: ``control.pt``), or None
        for a run without one; ``trusted`` as for :meth:`fresh_model`."""
        path = self.dir / "control.pt"
        if not path.exists():
            return None
        model = self.fresh_model(trusted)
        model.load_state_dict(self._weights(path))
        return model.eval()

    def rebuild_step(self, step: int, trusted: bool = False) -> nn.Module:
        """The model of ``step``, rebuilt from the architecture + pruning history + weights (no pickle);
        ``trusted`` as for :meth:`fresh_model`."""
        if step == 0:
            return self.original(trusted).model
        self.record(step)
        path = self.dir / "steps" / f"{step:04d}.pt"
        if not path.exists():
            raise PruneScopeError(f"The weights of step {step} are missing from {self.dir}.")
        saved = self._weights(path)
        return rebuild_pruned(self.fresh_model(trusted), self.spec.input.shape(1), saved["pruning_history"],
                              saved["state_dict"], output_layers=self.output_layers())

    def _weights(self, path: Path):
        """A weights file of the run, read without running code; a damaged or replaced file is one clear error."""
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise PruneScopeError(f"Run {self.name} is incomplete: {path.name} is missing.") from None
        except Exception as exc:  # the weights-only reader runs no code: any failure means a damaged file
            raise PruneScopeError(f"Run {self.name}: {path.relative_to(self.dir)} is damaged or not plain weights "
                                  f"({one_line(exc)}); it was not loaded.") from None

    def select_step(self, max_drop: float) -> int:
        """The step with the fewest MACs whose metric drop (points) is within ``max_drop``."""
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
    """The step with the fewest MACs whose metric drop from step 0 (points) is within ``max_drop`` on the
    selection images and, where the run measured test images, on those too (the final acceptance).

    The selection figure of a step the loop kept is biased by the decisions taken on it (the winner's
    curse); the test images took no decision, so a step whose test drop exceeds ``max_drop`` is passed
    over for the next larger one. One acceptance per step, in MAC order: a handful of looks at the test
    images, where the loop took dozens at the selection images (``core.claim``)."""
    base = history[0]
    ok = [r for r in history if (base["metric"] - r["metric"]) * 100 <= max_drop + 1e-9]
    for record in sorted(ok, key=lambda r: (r["macs"], -r["metric"])):
        if _test_within(base, record, max_drop):
            return record["step"]
    return 0


def _test_within(base: dict, record: dict, max_drop: float) -> bool:
    """Whether ``record``'s test drop from ``base`` is within ``max_drop`` points (True without test figures)."""
    if base.get("test_metric") is None or record.get("test_metric") is None:
        return True
    return (base["test_metric"] - record["test_metric"]) * 100 <= max_drop + 1e-9


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


def list_runs() -> list[Run]:
    """Every run in the workspace, newest first; folders that are not runs are skipped."""
    out = []
    for d in sorted(runs_dir().iterdir(), reverse=True):
        if (d / "config.json").exists():
            try:
                out.append(Run(d))
            except Exception:  # a damaged run must not hide the others
                continue
    return out
