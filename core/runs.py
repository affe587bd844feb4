"""Run folders: everything a pruning run produced, readable after a crash or an app restart.

Layout of a run folder::

    config.json        settings, model spec, data source
    original.pt        the original weights (state dict), never modified
    original_pickle.pt the trusted pickled module, when the model was loaded as one
    model_code.py      the Python file of a custom architecture (config.json's spec names this copy)
    baseline.json      accuracy, per-class accuracy, MACs, params, latency of the original
    car.json           CAR scores of the original model (when computed)
    history.jsonl      one record per completed step (step 0 = the original)
    steps/NNNN.pt      per step: state dict + Torch-Pruning history (rebuild without pickle)
    status.json        running / done / cancelled / failed (+ pid, so a dead run reads 'interrupted')

All writes are atomic, so an interruption at any moment leaves every completed step intact.
"""
from __future__ import annotations

import os
import time
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from .detection.models import output_layer_names, rebuild_detector
from .errors import ModelLoadError, PruneScopeError, SettingsError
from .groups import rebuild_pruned
from .models import LoadedModel, ModelSpec, load_model, rebuild_from_spec
from .workspace import (append_jsonl, atomic_torch_save, atomic_write_bytes, atomic_write_json, read_json, read_jsonl,
                        runs_dir)

ACTIVE_RUNS: set[str] = set()  # run folders being written by this process
CODE_COPY = "model_code.py"


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
        spec = self._keep_code(loaded.spec)
        ACTIVE_RUNS.add(str(self.dir.resolve()))
        atomic_write_json(self.dir / "config.json", {**config, "model_spec": spec.to_dict()})
        atomic_torch_save(self.dir / "original.pt", loaded.model.state_dict())
        if loaded.spec.pickled and original_bytes is not None:
            (self.dir / "original_pickle.pt").write_bytes(original_bytes)
        self.status("running", "started")

    def _keep_code(self, spec: ModelSpec) -> ModelSpec:
        """Copy a custom architecture's Python file into the run, so the run rebuilds its models even after
        the user's file has moved or changed; the stored spec names the copy."""
        if not spec.custom:
            return spec
        source = Path(spec.code_file)
        if not source.is_file():
            raise ModelLoadError(f"The model's Python file {source} is gone since the model was loaded; load the "
                                 "model again.")
        atomic_write_bytes(self.dir / CODE_COPY, source.read_bytes())
        return replace(spec, code_file=CODE_COPY)

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
        self.config = read_json(self.dir / "config.json")
        self.spec = ModelSpec.from_dict(self.config["model_spec"])

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
    def history(self) -> list[dict]:
        return read_jsonl(self.dir / "history.jsonl")

    @property
    def baseline(self) -> dict | None:
        return read_json(self.dir / "baseline.json")

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

    def record(self, step: int) -> dict:
        for r in self.history:
            if r["step"] == step:
                return r
        raise SettingsError(f"Run {self.name} has no step {step} (steps: {self.steps()}).")

    def fresh_model(self) -> nn.Module:
        """The run's architecture with fresh weights; trusted code and pickles come from the run's own copies,
        which the user trusted when the run started. A detector is rebuilt from its recorded config."""
        if self.task == "detection":
            return rebuild_detector(self.config["detector_config"])
        if self.spec.pickled:
            data = (self.dir / "original_pickle.pt").read_bytes()
            return load_model(data, trusted=True).model
        if self.spec.custom:
            return rebuild_from_spec(self.spec, code_path=self.dir / Path(self.spec.code_file).name, trusted=True)
        return rebuild_from_spec(self.spec)

    def original(self) -> LoadedModel:
        sd = torch.load(self.dir / "original.pt", map_location="cpu", weights_only=True)
        model = self.fresh_model()
        model.load_state_dict(sd)
        return LoadedModel(model.eval(), self.spec)

    def rebuild_step(self, step: int) -> nn.Module:
        """The model of ``step``, rebuilt from the architecture + pruning history + weights (no pickle)."""
        if step == 0:
            return self.original().model
        self.record(step)
        path = self.dir / "steps" / f"{step:04d}.pt"
        if not path.exists():
            raise PruneScopeError(f"The weights of step {step} are missing from {self.dir}.")
        saved = torch.load(path, map_location="cpu", weights_only=True)
        return rebuild_pruned(self.fresh_model(), self.spec.input.shape(1), saved["pruning_history"], saved["state_dict"],
                              output_layers=self.output_layers())

    def select_step(self, max_drop: float) -> int:
        """The step with the fewest MACs whose accuracy drop (points) is within ``max_drop``."""
        if not self.history:
            raise PruneScopeError(f"Run {self.name} has no completed step yet.")
        return select_step(self.history, max_drop)


def select_step(history: list[dict], max_drop: float) -> int:
    """The step with the fewest MACs whose accuracy drop from step 0 (points) is within ``max_drop``."""
    base = history[0]["accuracy"]
    ok = [r for r in history if (base - r["accuracy"]) * 100 <= max_drop + 1e-9]
    return min(ok, key=lambda r: (r["macs"], -r["accuracy"]))["step"] if ok else 0


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
