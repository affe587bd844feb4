"""Where the heavy work runs: this process (the default and the reference), or Ray workers.

``WorkSetting`` is the one setting: ``local`` (no Ray at all, today's behaviour), a Ray cluster the tool
starts on this machine with ``workers`` workers (``ray_workers`` given, no address), or an existing cluster
by ``address`` (``auto`` for the cluster this machine belongs to, ``ray://host:10001`` for a remote head via
Ray Client). ``CarPool`` is the part of exact CAR that goes to the workers: a CAR scorer hands it the
batch of ablations it would otherwise run itself (``core.car.CarScorer``) and gets back the same
predictions and losses, value for value.

How the values stay identical: the ablation engine (``core.ablation``) batches ablations that read the
same consumers (one *signature*, in practice one channel group) together, and a value depends only on
its own batch. The pool therefore never splits a signature: each one goes whole to one actor, which runs
the same engine on the same model state and images and returns the rows, merged back at their original
positions. (Measured here: CPU results of this engine do not depend on the thread count either.)

What each actor holds once: the score images (sent with ``ray.put`` once per image set) and the model
(sent whole when its structure changes, then only its state dict while the structure stays; every call
names both by content hash, so an actor that restarted fetches what it lacks). A lost worker's part is
retried once on another worker, then run in this process; a cancel cancels every task in flight
(``ray.cancel``; the actors check it between batches) and kills actors that do not stop; ``close``
kills every actor the pool made and shuts down a Ray cluster only if the pool started it. ``record()``
says where every part ran.
"""
from __future__ import annotations

import copy
import hashlib
import logging
import os
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from .errors import CancelledError, SettingsError

CORE_DIR = Path(__file__).resolve().parent
ROOT = CORE_DIR.parent
WHERE = ("local", "ray-local", "ray")
# Ray in this process: how many open pools use it, and whether (and as what) a pool started it
_RAY_LOCK = threading.Lock()
_RAY_STATE: dict = {"users": 0, "started": False, "setting": None}
_POLL_S = 0.2  # how often the driver looks at the cancel flag while parts run
_CANCEL_GRACE_S = 5.0  # a cancelled part that has not stopped after this long: its actor is killed


@dataclass
class WorkSetting:
    """Where CAR scoring runs. ``address`` None and ``workers`` None: this process (``local``)."""

    address: str | None = None
    workers: int | None = None

    @property
    def where(self) -> str:
        if self.address:
            return "ray"
        return "ray-local" if self.workers else "local"

    def validate(self) -> "WorkSetting":
        if self.workers is not None and (not isinstance(self.workers, int) or self.workers < 1):
            raise SettingsError(f"The number of Ray workers must be a whole number of at least 1; got {self.workers!r}.")
        if self.address is not None:
            a = str(self.address).strip()
            if not a or " " in a:
                raise SettingsError(f"A Ray address is 'auto', 'ray://host:port' or 'host:port'; got {self.address!r}.")
        return self

    def describe(self) -> str:
        if self.where == "local":
            return "this process"
        if self.where == "ray-local":
            return f"a local Ray cluster of {self.workers} worker(s), started by the tool"
        return f"the Ray cluster at {self.address}" + (f", {self.workers} worker(s)" if self.workers else "")

    def to_dict(self) -> dict:
        return {"where": self.where, "address": self.address, "workers": self.workers}


def ray_available() -> tuple[bool, str]:
    """Whether Ray imports here, and if not, why (one line)."""
    try:
        import ray  # noqa: F401
    except Exception as exc:  # ImportError, or a broken install
        return False, f"Ray is not usable here ({type(exc).__name__}: {exc}); install it with `pip install ray`"
    return True, ""


def _hash(*parts: bytes) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p)
    return h.hexdigest()[:24]


def _tensor_bytes(t: torch.Tensor) -> bytes:
    t = t.detach().cpu().contiguous()
    return str((tuple(t.shape), str(t.dtype))).encode() + (t.reshape(-1).view(torch.uint8).numpy().tobytes()
                                                          if t.numel() else b"")


def structure_key(model: nn.Module) -> str:
    """Hash of a model's structure (its module tree as printed, and its state's names and shapes)."""
    shapes = [f"{k}:{tuple(v.shape)}:{v.dtype}" for k, v in model.state_dict().items()]
    return _hash(repr(model).encode(), "\n".join(shapes).encode(), type(model).__qualname__.encode())


def state_key(state: dict[str, torch.Tensor]) -> str:
    return _hash(*[k.encode() + _tensor_bytes(v) for k, v in state.items()])


def signature_buckets(ablations: list[dict]) -> list[list[int]]:
    """Indices of ``ablations`` by consumer signature, in the engine's own order (``AblationEngine._evaluate_fast``
    batches within a signature only): the units a pool may send to different workers without changing a value."""
    by_signature: dict[frozenset, list[int]] = {}
    for i, a in enumerate(ablations):
        by_signature.setdefault(frozenset(a), []).append(i)
    return list(by_signature.values())


# ----------------------------------------------------------------------------- the worker


class _RayCancel:
    """Looks like a ``threading.Event`` to the engine; set when the driver called ``ray.cancel`` on this task."""

    def is_set(self) -> bool:
        import ray

        try:
            return bool(ray.get_runtime_context().is_canceled())
        except Exception:
            return False


class CarWorker:
    """One Ray actor: holds one model and one image set, evaluates ablations on them (``core.ablation``)."""

    def __init__(self, index: int, threads: int = 1, use_gpu: bool = False):
        torch.set_num_threads(max(1, int(threads)))
        self.index = index
        self.device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        self.model: nn.Module | None = None
        self.struct = self.state = self.images_key = None
        self.inputs = self.labels = None
        self.engine = None

    def info(self) -> dict:
        import platform

        import ray

        ctx = ray.get_runtime_context()
        device = (f"cuda ({torch.cuda.get_device_name(self.device)})" if self.device.type == "cuda"
                  else f"cpu, {torch.get_num_threads()} thread(s)")
        return {"worker": self.index, "node": ctx.get_node_id()[:12], "host": platform.node(), "pid": os.getpid(),
                "device": device, "torch": torch.__version__}

    def _load(self, images: tuple, model: tuple) -> None:
        import ray

        images_key, images_ref = images
        if self.images_key != images_key:
            inputs, labels = ray.get(images_ref[0])
            self.inputs, self.labels, self.images_key = inputs.to(self.device), labels, images_key
            self.engine = None
        struct, module_ref, state, state_ref = model
        if self.struct != struct:
            self.model = ray.get(module_ref[0]).to(self.device).eval()
            self.struct, self.state, self.engine = struct, None, None
        if self.state != state:
            if state_ref is not None:
                self.model.load_state_dict(ray.get(state_ref[0]))
            self.state, self.engine = state, None
        if self.engine is None:
            from .ablation import AblationEngine

            self.engine = AblationEngine(self.model, self.inputs)

    def evaluate(self, images: tuple, model: tuple, ablations: list[dict], fast: bool, with_loss: bool):
        """Predictions and (``with_loss``) mean cross-entropy of ``ablations``, as ``AblationEngine.evaluate``."""
        self._load(images, model)
        t0 = time.perf_counter()
        preds, loss = self.engine.evaluate(ablations, self.labels if with_loss else None, cancel=_RayCancel(), fast=fast)
        return preds, loss, {"worker": self.index, "seconds": time.perf_counter() - t0, "fast": self.engine.fast}

    def ping(self) -> int:
        return self.index


_ACTOR_CLASS = None


def _kill_actors(actors: list) -> None:
    """Kill Ray ``actors`` for good (no restart); one already gone is no error: the point is that none is left."""
    import ray

    for a in actors:
        try:
            ray.kill(a, no_restart=True)
        except Exception:
            pass


def _actor_class():
    """``CarWorker`` as a Ray actor class (made once per process)."""
    global _ACTOR_CLASS
    if _ACTOR_CLASS is None:
        import ray

        _ACTOR_CLASS = ray.remote(CarWorker)
    return _ACTOR_CLASS


# ----------------------------------------------------------------------------- the pool


@dataclass
class _Part:
    ids: list[int]
    attempts: int = 0
    ran_on: str = ""


@dataclass
class PoolRecord:
    """Where the parts of every evaluation ran: ablations per place, and what went wrong on the way."""

    setting: dict
    workers: list[dict] = field(default_factory=list)
    ablations: Counter = field(default_factory=Counter)  # "worker 0" / "local" -> ablations evaluated there
    events: list[str] = field(default_factory=list)
    calls: int = 0

    def to_dict(self) -> dict:
        return {**self.setting, "workers": self.workers, "ablations_by_place": dict(self.ablations),
                "events": list(self.events), "calls": self.calls}


class CarPool:
    """Ray actors that evaluate CAR ablations; a context manager (``close`` on exit).

    ``threads_per_worker``: torch threads of each actor, and the CPUs it asks Ray for unless ``cpus_per_worker``
    says otherwise (a fraction lets several pools share a small cluster, as the tests do);
    ``start_timeout_s``: how long to wait for the workers to answer before giving up (``SettingsError``);
    ``connect_only``: only the Ray connection (started or reached as for a pool, closed alike), no actors: what
    other Ray work of this process (``core.ray_recovery``) shares.
    """

    def __init__(self, setting: WorkSetting, threads_per_worker: int = 1, gpus_per_worker: float = 0.0,
                 start_timeout_s: float = 120.0, cpus_per_worker: float | None = None, connect_only: bool = False):
        self.setting = setting.validate()
        if setting.where == "local":
            raise SettingsError("A Ray pool needs a Ray address or a number of local Ray workers.")
        ok, why = ray_available()
        if not ok:
            raise SettingsError(why)
        self.threads = threads_per_worker
        self.cpus = threads_per_worker if cpus_per_worker is None else cpus_per_worker
        self.gpus = gpus_per_worker
        self.start_timeout_s = start_timeout_s
        self.connect_only = connect_only
        self.started_ray = False
        self.actors: list = []
        self.alive: list[bool] = []
        self.record = PoolRecord(setting.to_dict())
        self._images: tuple | None = None  # (key, [ref])
        self._model: tuple | None = None  # (struct, [module ref], state, [state ref] or None)
        self._local_only: dict[str, str] = {}  # model structure -> why the workers cannot score it
        self._lock = threading.Lock()
        self._open()

    # -- lifecycle -----------------------------------------------------------------------------------

    def _open(self) -> None:
        import ray

        with _RAY_LOCK:  # one Ray connection per process, shared by its jobs; shut down by the last one out
            if not ray.is_initialized():
                kwargs = dict(include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
                try:
                    if self.setting.where == "ray-local":
                        path = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
                        ray.init(address="local", num_cpus=self.setting.workers * self.threads,  # never someone else's
                                 runtime_env={"env_vars": {"PYTHONPATH": path}}, **kwargs)
                    else:  # the cluster's workers get this very ``core`` package, uploaded for this job
                        ray.init(address=self.setting.address, runtime_env={"py_modules": [str(CORE_DIR)]}, **kwargs)
                except Exception as exc:
                    raise SettingsError(f"Could not reach Ray ({self.setting.describe()}): {type(exc).__name__}: "
                                        f"{str(exc).splitlines()[0] if str(exc) else ''}") from exc
                _RAY_STATE.update(started=True, setting=self.setting.to_dict())
            elif _RAY_STATE["started"] and _RAY_STATE["setting"] != self.setting.to_dict():
                raise SettingsError(f"This process already uses Ray as {_RAY_STATE['setting']['where']} "
                                    f"({_RAY_STATE['setting']}) for another job; wait for it to end or choose the "
                                    "same setting.")
            _RAY_STATE["users"] += 1
            self.started_ray = _RAY_STATE["started"]
            self._counted = True
        if self.connect_only:
            return
        try:
            n = self.setting.workers or max(1, int(ray.cluster_resources().get("CPU", 1) // max(self.cpus, 1e-3)))
            for i in range(n):
                self.actors.append(self._new_actor(i))
                self.alive.append(True)
            ready, _ = ray.wait([a.info.remote() for a in self.actors], num_returns=len(self.actors),
                                timeout=self.start_timeout_s)
            if len(ready) < len(self.actors):
                raise SettingsError(f"Only {len(ready)} of {len(self.actors)} Ray workers started within "
                                    f"{self.start_timeout_s:g} s ({self.setting.describe()}); the cluster may lack "
                                    "free CPUs (another job's workers hold them?): ask for fewer workers.")
            self.record.workers = ray.get(ready)
            self.record.workers.sort(key=lambda w: w["worker"])
        except BaseException:
            self.close()
            raise

    def _new_actor(self, index: int):
        return _actor_class().options(num_cpus=self.cpus, num_gpus=self.gpus or 0, max_restarts=0).remote(
            index, self.threads, bool(self.gpus))

    def park(self) -> None:
        """Kill the actors but keep the connection: their CPUs are free for other Ray work of the job (a Ray Train
        recovery); the next :meth:`evaluate` makes them again (the model and images are sent again then)."""
        _kill_actors(self.actors)
        self.actors, self.alive = [], []
        self._parked = True
        self.record.events.append("workers released for other Ray work (a recovery); made again when CAR needs them")

    def _unpark(self) -> None:
        import ray

        n = len(self.record.workers)
        self.actors = [self._new_actor(i) for i in range(n)]
        self.alive = [True] * n
        ready, _ = ray.wait([a.info.remote() for a in self.actors], num_returns=n, timeout=self.start_timeout_s)
        if len(ready) < n:  # none is used: the parts run here (evaluate's rule when no worker is alive)
            _kill_actors(self.actors)
            self.actors, self.alive = [], []
            self.record.events.append(f"only {len(ready)} of {n} workers came back within {self.start_timeout_s:g} s; "
                                      "CAR runs in this process")
        else:
            self.record.workers = sorted(ray.get(ready), key=lambda w: w["worker"])
        self._parked = False

    def close(self) -> None:
        """Kill every actor this pool made; shut Ray down only if a pool of this process started it and no other
        pool of this process still uses it (a cluster reached by address is only disconnected from)."""
        import ray

        _kill_actors(self.actors)
        self.actors, self.alive = [], []
        self._images = self._model = None
        with _RAY_LOCK:
            if getattr(self, "_counted", False):
                self._counted = False
                _RAY_STATE["users"] -= 1
                if _RAY_STATE["users"] == 0 and _RAY_STATE["started"]:
                    if ray.is_initialized():
                        ray.shutdown()
                    _RAY_STATE.update(started=False, setting=None)
        self.started_ray = False

    def __enter__(self) -> "CarPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def describe(self) -> str:
        ws = self.record.workers
        devices = Counter(w["device"] for w in ws)
        hosts = len({w["host"] for w in ws})
        return (f"{len(ws)} Ray worker(s) on {hosts} host(s) ({self.setting.describe()}): "
                + ", ".join(f"{n} x {d}" for d, n in devices.items()))

    # -- shipping state -------------------------------------------------------------------------------

    def _ship(self, model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor) -> tuple[tuple, tuple]:
        import ray

        key = _hash(_tensor_bytes(inputs), _tensor_bytes(labels))
        if self._images is None or self._images[0] != key:
            self._images = (key, [ray.put((inputs.detach().cpu(), labels.detach().cpu()))])
        struct = structure_key(model)
        state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        skey = state_key(state)
        if self._model is None or self._model[0] != struct:
            module = copy.deepcopy(model).cpu().eval()
            self._model = (struct, [ray.put(module)], skey, None)  # the module carries its state
        elif self._model[2] != skey:
            self._model = (struct, self._model[1], skey, [ray.put(state)])
        return self._images, self._model

    # -- evaluation -----------------------------------------------------------------------------------

    def evaluate(self, model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor, ablations: list[dict],
                 with_loss: bool, fast: bool = True, progress: Callable[[int], None] | None = None,
                 cancel: threading.Event | None = None,
                 local: Callable[[list[dict]], tuple[torch.Tensor, torch.Tensor | None]] | None = None):
        """Predictions (len(ablations), N) and, ``with_loss``, mean cross-entropy per ablation, as the engine of
        this process would compute them. ``local(ablations)``: this process' own engine, for parts that no
        worker could finish. ``progress(images done)`` after each finished part."""
        import ray
        from ray.exceptions import (NodeDiedError, ObjectLostError, RayActorError, RayTaskError, TaskCancelledError,
                                    WorkerCrashedError)

        lost_errors = (RayActorError, ObjectLostError, WorkerCrashedError, NodeDiedError)

        n = len(inputs)
        preds = torch.empty((len(ablations), n), dtype=torch.long)
        loss = torch.zeros(len(ablations)) if with_loss else None
        if not ablations:
            return preds, loss
        with self._lock:
            if getattr(self, "_parked", False):
                self._unpark()
            self.record.calls += 1
            parts = sorted((_Part(ids) for ids in signature_buckets(ablations)), key=lambda p: -len(p.ids))
            queue = list(parts)
            running: dict = {}  # ref -> (part, actor index)
            done_images = 0
            struct = structure_key(model)
            images, shipped, queue, local_parts = self._ship_or_keep_local(model, inputs, labels, struct, queue)

            def put(part: _Part, out) -> None:
                nonlocal done_images
                p, lo, _ = out
                preds[part.ids] = p
                if loss is not None:
                    loss[part.ids] = lo
                self.record.ablations[part.ran_on] += len(part.ids)
                done_images += len(part.ids) * n
                if progress:
                    progress(done_images)

            def idle() -> list[int]:
                busy = {i for _, i in running.values()}
                return [i for i, ok in enumerate(self.alive) if ok and i not in busy]

            try:
                while queue or running:
                    if cancel is not None and cancel.is_set():
                        raise CancelledError("Cancelled.")
                    for i in idle():
                        if not queue:
                            break
                        part = queue.pop(0)
                        part.attempts += 1
                        part.ran_on = f"worker {i}"
                        ref = self.actors[i].evaluate.remote(images, shipped, [ablations[j] for j in part.ids],
                                                             fast, with_loss)
                        running[ref] = (part, i)
                    if not running:  # no worker left alive: the rest runs here
                        local_parts.extend((p, "no Ray worker left alive") for p in queue)
                        queue = []
                        break
                    ready, _ = ray.wait(list(running), num_returns=1, timeout=_POLL_S)
                    for ref in ready:
                        part, i = running.pop(ref)
                        try:
                            put(part, ray.get(ref))
                        except lost_errors as exc:
                            self._worker_lost(i, part, exc, queue, local_parts)
                        except RayTaskError as exc:  # the worker could not do the work (e.g. cannot rebuild the model)
                            queue = self._worker_failed(i, part, exc, queue, local_parts, struct)
            except BaseException:
                self._cancel_running(running, TaskCancelledError)
                raise
            self._run_local_parts(local_parts, ablations, local, cancel, put)
            return preds, loss

    def _ship_or_keep_local(self, model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor, struct: str,
                            queue: list) -> tuple:
        """``(images, shipped, queue, local_parts)``: the call's data and model put in the object store, or, when
        the workers cannot take this model (they failed on it before, or it cannot be pickled), every part
        moved to this process with the reason, so one unshippable model never stops a CAR run."""
        if struct in self._local_only:  # the workers could not take this model before: no second try
            return None, None, [], [(p, self._local_only[struct]) for p in queue]
        try:
            images, shipped = self._ship(model, inputs, labels)
        except Exception as exc:  # e.g. a model class that cannot be pickled
            why = f"the model cannot be sent to the Ray workers ({type(exc).__name__}: {exc})"[:300]
            self._local_only[struct] = why
            self.record.events.append(f"{why}; CAR of this model runs in this process")
            return None, None, [], [(p, why) for p in queue]
        return images, shipped, queue, []

    def _worker_lost(self, i: int, part: "_Part", exc: BaseException, queue: list, local_parts: list) -> None:
        """Worker ``i`` died under ``part``: mark it dead and retry the part once on another live worker, else
        run it in this process; the event says which, so workers.json explains where each part ran."""
        self.alive[i] = False
        why = f"{type(exc).__name__}"
        if part.attempts < 2 and any(self.alive):
            self.record.events.append(f"worker {i} lost ({why}); its part of {len(part.ids)} "
                                      "ablations is retried on another worker")
            queue.insert(0, part)
        else:
            self.record.events.append(f"worker {i} lost ({why}); its part of {len(part.ids)} "
                                      "ablations runs in this process")
            local_parts.append((part, f"worker {i} lost"))

    def _worker_failed(self, i: int, part: "_Part", exc: BaseException, queue: list, local_parts: list,
                       struct: str) -> list:
        """Worker ``i`` raised on ``part``: the same model would fail the same way on every worker, so this part,
        the parts not yet sent and later CAR of this model run in this process. Returns the (now empty) queue."""
        cause = str(exc).strip().splitlines()[-1][:300] if str(exc).strip() else type(exc).__name__
        why = f"worker {i} failed ({cause})"
        self._local_only[struct] = why
        self.record.events.append(f"{why}; this part and the {len(queue)} not yet sent run in "
                                  "this process, and so does later CAR of this model")
        local_parts.append((part, why))
        local_parts.extend((p, why) for p in queue)
        return []

    @staticmethod
    def _run_local_parts(local_parts: list, ablations: list[dict], local, cancel: threading.Event | None,
                         put: Callable) -> None:
        """The parts no worker could finish, on this process' own engine (``local``), so a CAR run gives the
        same figures whatever happened to the workers; cancellable between parts."""
        if not local_parts:
            return
        if local is None:
            raise RuntimeError("Ray workers could not finish CAR and no local engine was given.")
        for part, why in local_parts:
            if cancel is not None and cancel.is_set():
                raise CancelledError("Cancelled.")
            part.ran_on = "local"
            p, lo = local([ablations[j] for j in part.ids])
            put(part, (p, lo, None))

    def _cancel_running(self, running: dict, cancelled_error) -> None:
        """Cancel every part in flight; kill the actors whose part has not stopped within the grace time."""
        import ray

        if not running:
            return
        for ref in running:
            try:
                ray.cancel(ref)
            except Exception:
                pass
        deadline = time.monotonic() + _CANCEL_GRACE_S
        pending = list(running)
        while pending and time.monotonic() < deadline:
            _, pending = ray.wait(pending, num_returns=len(pending), timeout=_POLL_S)
        for ref in pending:
            _, i = running[ref]
            _kill_actors([self.actors[i]])
            self.alive[i] = False
            self.record.events.append(f"worker {i} did not stop within {_CANCEL_GRACE_S:g} s of the cancel; killed")
        self.record.events.append(f"cancelled: {len(running)} part(s) in flight were cancelled")


def open_pool(setting: WorkSetting | None) -> CarPool | None:
    """A pool for ``setting``; None for local work (nothing of Ray is imported then)."""
    if setting is None or setting.where == "local":
        return None
    return CarPool(setting)
