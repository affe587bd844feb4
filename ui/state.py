"""What the pages share: the session's current model / data / run, the job registry, cached loaders.

Pages only lay out widgets; everything they share lives here. The job registry is one object for
the whole process (``st.cache_resource``), so a reloaded tab finds the job it started.

State that survives a reload: a browser reload (or a new tab) is a new Streamlit session with empty
``st.session_state``. At the end of every script run the app frame stores a shallow copy of the
session's :class:`AppState` (the loaded model and data objects, baseline, CAR result) in
the registry's process-level :class:`core.jobs.WorkingSets`, under a token that the URL
carries (``?ws=...``); a new session takes the set of its token, or, without one (a new tab, or a
page whose URL lost the parameter), the newest set of the process. Objects, not file paths, are
kept: nothing is loaded or measured again, and a running or finished CAR job re-attaches because it
is keyed by the restored ``AppState.key``. An app restart forgets the sets (the runs stay on disk).
"""
from __future__ import annotations

import copy
import hashlib
import json
import secrets
import threading
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import streamlit as st

from core.data import DataSet, folder_upload_to_zip
from core.errors import DataError
from core.tasks.classification.task import measure_baseline
from core.tasks.detection.analysis import measure_detector_baseline
from core.estimate import Estimate, estimate_prune_time
from core.groups import PruningGraph, group_label
from core.sources import load_dataset, load_run_dataset, load_voc_dataset
from core.jobs import JobRegistry
from core.models import LoadedModel, load_model, sample_entry
from core.workspace import atomic_write_bytes, uploads_dir

STATE_KEY = "prunescope"
TOKEN_KEY = "prunescope_token"
TOKEN_PARAM = "ws"  # the URL query parameter carrying the session's working-set token
DEFAULT_SAMPLE = "vgg_digits"
TASKS = ("classification", "detection")


@dataclass
class AppState:
    """The session's working set, the same fields for every task. ``key`` names model + data, so jobs and
    caches can tell them apart.

    ``task`` says what ``model`` and ``data`` are: "classification": a :class:`core.models.LoadedModel`
    and a :class:`core.data.DataSet`; "detection": a ``core.tasks.detection.models.SSDDetector`` (its
    normalisation, class names and source in ``model_info``) and a ``core.tasks.detection.data.DetectionData``.
    ``baseline`` holds the task's metric under ``metric`` (accuracy or mAP@0.5, a fraction) plus MACs
    and parameters; ``car`` the finished analysis (a ``CarResult``, which carries the fingerprint of the
    model and images it was measured on, or a detection ``GroupCar``).
    """

    task: str = "classification"
    model: Any = None
    model_label: str = ""
    model_key: str = ""
    model_bytes: bytes | None = None  # only for a trusted pickle: runs store it to rebuild the model
    model_info: dict = field(default_factory=dict)  # detection: mean, std, class_names, source
    data: Any = None
    data_label: str = ""
    data_source: str = ""  # what a run records: 'sample:NAME' or the saved upload's path
    baseline: dict | None = None  # metric (+ accuracy / map), per_class, n, macs, params, ...
    car: Any = None  # the finished analysis of the current model
    run_dir: str | None = None  # the run being pruned / reviewed
    max_drop: float | None = None  # metric drop (points) chosen on Review: the export's threshold
    export_step: int | None = None  # step the threshold picked on Review (for Export)
    sample: str | None = None
    load_job: str | None = None  # the "Load and validate" job whose result this set holds (adopted once)

    @property
    def ready(self) -> bool:
        return self.model is not None and self.data is not None

    @property
    def key(self) -> str:
        return f"{self.model_key}|{self.data_source}"

    def set_model(self, model, label: str, key: str, model_bytes: bytes | None = None,
                  task: str = "classification", info: dict | None = None) -> None:
        self.task, self.model, self.model_label, self.model_key = task, model, label, key
        self.model_bytes, self.model_info = model_bytes, dict(info or {})
        self.data = None
        self.data_label = self.data_source = ""
        self.baseline = None
        self.car = None
        self.sample = None

    def set_data(self, data, label: str, source: str) -> None:
        self.data, self.data_label, self.data_source = data, label, source
        self.baseline = None
        self.car = None


# The phases of the classification "Load and validate" job (core.jobs.phased_job), whose results they name.
LOAD_MODEL, LOAD_DATA, LOAD_BASELINE, LOAD_CHECK = ("reading the model", "reading the data set",
                                                     "measuring accuracy, MACs and OpenVINO latency",
                                                     "checking the baseline's plausibility")


def adopt_finished_load(state: "AppState") -> None:
    """Take the result of this session's finished "Load and validate" job into its working set, once.

    Runs in the app frame on every page, so a load finishes into the session wherever the user is, and
    in a reloaded tab (same token). ``state.load_job`` marks the job as adopted in the working set itself:
    a later reload restores the set, CAR result included, instead of adopting the load again.
    """
    job = get_registry().latest("load", session_token())
    if job is None or job.running or state.load_job == job.id:
        return
    snap = job.snapshot()
    state.load_job = job.id
    if snap.state != "done":
        return
    result = snap.result
    if LOAD_MODEL in result:
        loaded, key, label, kept_bytes = result[LOAD_MODEL]
        state.set_model(loaded, label, key, kept_bytes)
    if LOAD_DATA in result:
        data, label, path = result[LOAD_DATA]
        state.set_data(data, label, str(path))
        state.baseline = result[LOAD_BASELINE]
        st.session_state["load_plausibility"] = (state.key, result[LOAD_CHECK])


def session_token() -> str:
    """This session's working-set token: the one in the URL (a reloaded tab), else a new one."""
    token = st.session_state.get(TOKEN_KEY)
    if token is None:
        token = st.query_params.get(TOKEN_PARAM) or secrets.token_urlsafe(9)
        st.session_state[TOKEN_KEY] = token
    return token


def get_state() -> AppState:
    """The session's state; a new session (a reload, a new tab) starts from the remembered working set."""
    if STATE_KEY not in st.session_state:
        saved = get_registry().working_sets.recall(session_token())
        st.session_state[STATE_KEY] = copy.copy(saved) if saved is not None else AppState()
    return st.session_state[STATE_KEY]


def remember_state() -> None:
    """Keep the session's working set for a reload (called by the app frame after every script run) and
    put its token in the URL, so the reloaded tab asks for its own set."""
    state = st.session_state.get(STATE_KEY)
    token = session_token()
    if state is not None and state.model is not None:
        get_registry().working_sets.remember(token, copy.copy(state))
    if st.query_params.get(TOKEN_PARAM) != token:
        st.query_params[TOKEN_PARAM] = token


@st.cache_resource
def get_registry() -> JobRegistry:
    """The one job registry of this app process (shared by every tab, survives reloads)."""
    return JobRegistry()


_MODEL_LOCKS: "weakref.WeakKeyDictionary[Any, threading.Lock]" = weakref.WeakKeyDictionary()
_MODEL_LOCKS_GUARD = threading.Lock()


def model_lock(model) -> threading.Lock:
    """A lock per model object. Filter images use forward hooks on the model; cached models are shared
    between script runs, and a fast rerun can start while the previous run is still computing, so two
    runs must not hook the same model at once."""
    with _MODEL_LOCKS_GUARD:
        lock = _MODEL_LOCKS.get(model)
        if lock is None:
            lock = _MODEL_LOCKS[model] = threading.Lock()
        return lock


def private_copy(loaded: LoadedModel) -> LoadedModel:
    """A copy of the model for a background job, taken while no script run has hooks on it."""
    with model_lock(loaded.model):
        model = copy.deepcopy(loaded.model)
    return LoadedModel(model.eval(), copy.deepcopy(loaded.spec), list(loaded.notes))


# ----------------------------------------------------------------------------- loading


@st.cache_resource(show_spinner="Loading the bundled sample...")
def _sample(name: str) -> tuple[LoadedModel, DataSet]:
    loaded = load_model(f"sample:{name}")
    data = load_dataset(f"sample:{name}", loaded.spec.input, expected_classes=loaded.spec.num_classes)
    return loaded, data


def use_sample(state: AppState, name: str) -> None:
    """Make the bundled sample (model + its data set) the current one, with its baseline measured."""
    loaded, data = _sample(name)
    entry = sample_entry(name)
    state.set_model(loaded, f"{name} (bundled sample, {entry['architecture']})", f"sample:{name}")
    state.set_data(data, f"{entry['dataset']} (bundled sample data set)", f"sample:{name}")
    state.sample = name
    state.baseline = baseline(state.key, loaded, data)


def load_sample(name: str) -> None:
    """Load the bundled sample into the session (the Home and Load pages' button); a failure is kept as
    ``sample_error`` for the page to show."""
    state = get_state()
    try:
        use_sample(state, name)
        st.session_state.pop("sample_error", None)
    except Exception as exc:  # a user-readable PruneScopeError, or a damaged installation
        st.session_state["sample_error"] = str(exc)


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def save_upload(data: bytes, prefix: str, suffix: str) -> Path:
    """Keep an upload in the workspace under a name made from its hash (never from the uploaded name)."""
    path = uploads_dir() / f"{prefix}-{digest(data)}{suffix}"
    if not path.is_file() or path.read_bytes() != data:  # issue 15: never reuse a file changed on disk
        atomic_write_bytes(path, data)
    return path


def load_uploaded_data(raw: bytes, loaded: LoadedModel, name: str = "", val_fraction: float = 0.2
                       ) -> tuple[DataSet, Path]:
    """The uploaded data zip, kept in the workspace and loaded; a refused upload leaves nothing behind.
    ``name``: the file the user uploaded, which a refusal names instead of the stored copy; ``val_fraction``:
    the share of an unsplit upload that becomes selection images."""
    path = uploads_dir() / f"data-{digest(raw)}.zip"
    created = not path.exists()
    path = save_upload(raw, "data", ".zip")
    try:
        return load_dataset(path, loaded.spec.input, expected_classes=loaded.spec.num_classes,
                            val_fraction=val_fraction), path
    except Exception as exc:
        if created:
            path.unlink(missing_ok=True)
        if name and isinstance(exc, DataError):
            raise DataError(str(exc).replace(path.name, name)) from None
        raise


def files_to_zip(files: list[tuple[str, bytes]], keep_parts: int = 3) -> bytes:
    """A zip of a folder upload; names keep their characters (see :func:`core.data.folder_upload_to_zip`)."""
    return folder_upload_to_zip(files, keep_parts)


@st.cache_resource(show_spinner="Measuring the baseline: accuracy, MACs, parameters, OpenVINO latency...", max_entries=8)
def _baseline(key: str, _loaded: LoadedModel, _data: DataSet) -> dict:
    return measure_baseline(_loaded, _data)


def baseline(key: str, loaded: LoadedModel, data: DataSet) -> dict:
    return _baseline(key, loaded, data)


@st.cache_resource(show_spinner="Loading the run's data set...", max_entries=4)
def run_data(data_source: str, input_spec: tuple, num_classes: int, data_options: str,
             class_order: tuple[str, ...] = ()) -> DataSet:
    """The data set a run was made with, split and labelled as the run recorded it (for galleries of past
    runs), cached. ``data_options``: the run's recorded ``data_options`` as JSON (hashable for the cache)."""
    from core.models import InputSpec

    spec = InputSpec.from_dict(dict(input_spec))
    return load_run_dataset({"data_source": data_source, "data_options": json.loads(data_options),
                             "class_order": list(class_order)}, spec, expected_classes=num_classes)


def data_for_run(run) -> DataSet | None:
    """The current data if it is the run's (same task, source, split and class order), else the run's data set
    reloaded with its recorded split and class order; None if it is gone."""
    state = get_state()
    opts = run.config.get("data_options") or {}
    recorded = (opts.get("split") or {}).get("sha256")
    order = list(run.config.get("class_order") or [])
    if (state.task == run.task and state.data is not None and state.data_source == run.config.get("data_source")
            and (not recorded or recorded == state.data.split_record()["sha256"])
            and (not order or order == list(state.data.class_names))):
        return state.data
    spec = run.spec.input
    frozen = tuple(sorted((k, tuple(v) if isinstance(v, (list, tuple)) else v) for k, v in spec.__dict__.items()))
    try:
        return run_data(run.config.get("data_source", ""), frozen, run.spec.num_classes,
                        json.dumps(opts, sort_keys=True, default=str), tuple(order))
    except Exception:
        return None


@st.cache_resource(max_entries=6)
def run_model(run_dir: str, step: int, mtime: float):
    """A step's model rebuilt from its run folder (cached; ``mtime`` invalidates on change)."""
    from core.runs import Run

    return Run(run_dir).rebuild_step(step)


# ----------------------------------------------------------------------------- object detection


@st.cache_resource(show_spinner="Loading the bundled sample detector and its data set...")
def sample_detection(name: str = "ssd_counting"):
    """(detector, manifest entry, DetectionData) of the bundled sample detector, cached for the process."""
    from core.tasks.detection.sample_model import load_sample_detector

    model, entry = load_sample_detector(name)
    data = load_voc_dataset(f"sample:{entry['dataset']}", tuple(model.input_size))
    return model, entry, data


@st.cache_resource(show_spinner="Measuring mAP@0.5, MACs and parameters...", max_entries=8)
def detection_baseline(key: str, _model, _data, mean: tuple, std: tuple) -> dict:
    return measure_detector_baseline(_model, _data, mean, std)


@st.cache_resource(show_spinner="Loading the run's data set...", max_entries=4)
def detection_run_data(data_source: str, size: tuple, class_names: tuple, val_fraction: float = 0.2, seed: int = 0):
    return load_voc_dataset(data_source, size, class_names=list(class_names) or None, val_fraction=val_fraction,
                            seed=seed)


def detection_data_for_run(run):
    """The detection data set a run was made with: the session's if it is the same, else reloaded (None if gone)."""
    state = get_state()
    source = run.config.get("data_source", "")
    if state.task == run.task and state.data is not None and state.data.source == source:
        return state.data
    opts = run.config.get("data_options") or {}
    try:
        return detection_run_data(source, (run.spec.input.height, run.spec.input.width),
                                  tuple(run.config.get("class_names") or ()), opts.get("val_fraction", 0.2),
                                  opts.get("seed", 0))
    except Exception:
        return None


@st.cache_resource(max_entries=8)
def detection_groups(key: str, _model) -> list[dict]:
    """The detector's prunable groups, cached: tracing it on every rerun would also race a background job's trace
    (``torch.fx`` patches module calls process-wide while it traces)."""
    from core.tasks.detection.analysis import detector_groups

    return detector_groups(_model)


@st.cache_resource(max_entries=16, show_spinner="Drawing detections...")
def detection_pictures(key: str, _model, _dset, mean: tuple, std: tuple, indices: tuple, min_score: float) -> list:
    """Validation images with ground truth and the model's detections drawn (cached per model, images, score)."""
    from core.tasks.detection.visualize import detection_images

    return detection_images(_model, _dset, mean, std, list(indices), min_score)


# ----------------------------------------------------------------------------- per-layer control, time estimate


@st.cache_resource(show_spinner="Tracing the model's channel groups...", max_entries=8)
def model_groups(key: str, _loaded: LoadedModel) -> list[dict]:
    """The prunable channel groups of the loaded model (``ChannelGroup.to_dict()`` plus ``label``), in model
    order: what a pruning plan may exclude or cap. Traced on a copy (graph building rewrites shortcuts)."""
    with model_lock(_loaded.model):
        model = copy.deepcopy(_loaded.model)
    graph = PruningGraph(model, _loaded.spec.input.shape(1))
    return [{**g.to_dict(), "label": group_label(g)} for g in graph.groups() if not g.left_alone]


@st.cache_resource(show_spinner="Timing this model's work units on this machine...", max_entries=16)
def prune_estimate(key: str, settings: str, _loaded: LoadedModel, n_val: int, _config, n_train: int | None = None) -> Estimate:
    """:func:`core.estimate.estimate_prune_time` of a run with ``_config``, cached per model (``key``) and
    settings (``settings``: the config as JSON)."""
    with model_lock(_loaded.model):
        model = copy.deepcopy(_loaded.model)
    return estimate_prune_time(model, _loaded.spec, n_val, _config, n_train=n_train)
