"""Recovery fine-tuning on Ray workers: Ray Train's ``TorchTrainer`` (DDP), the rules of ``core.recovery.recover``.

Same schedule, loss and choice as the local recovery: SGD with Nesterov momentum, a cosine schedule over
``epochs`` x ``len(train) // batch_size`` mini-batches, the same augmentation, optional distillation from
the teacher (Hinton et al.), and the epoch ``config.keep`` names kept (``core.recovery.keeps_epoch``: the last
finished, or the best by selection accuracy; the incoming model is not a candidate). What DDP changes, and nothing else: every worker draws
the same global mini-batch (the same seeded order and augmentation as the local recovery) and trains on its
share of it (``batch[rank::world]``); DDP averages the gradients, so a step is the local step up to float
summation order and one thing: BatchNorm in train mode normalises each worker's share with that share's
statistics (on CPUs ``SyncBatchNorm`` does not run). Its accuracy is therefore compared with the local
recovery's run-to-run spread, not value for value.

A small actor (``_Board``) made by this process carries what the workers and this process share: the cancel
flag (the workers agree on it with an all-reduce, so all stop at the same mini-batch), the progress count,
each epoch's figures and the kept epoch's weights (sent by rank 0; no shared storage is needed on a
cluster). Nothing of it outlives the call: the board is killed and a Ray cluster the call started is shut
down (``core.distributed.CarPool`` rules: one Ray connection per process).
"""
from __future__ import annotations

import copy
import shutil
import tempfile
import threading
import time
from typing import Callable

import numpy as np
import torch
from torch import nn

from .data import ImageSet, normalize
from .distributed import WorkSetting
from .errors import SettingsError
from .models import InputSpec
from .recovery import RecoveryConfig, RecoveryResult, batch_loss, keeps_epoch
from .training import augment

_CANCEL_CHECK_EVERY = 5  # mini-batches between the workers' checks of the cancel flag


class _Board:
    """Shared between this process and the training workers (a Ray actor)."""

    def __init__(self):
        self.cancelled = False
        self.done = 0
        self.epochs: list[dict] = []
        self.best: tuple[int, dict] | None = None
        self.workers: list[dict] = []

    def cancel(self) -> None:
        self.cancelled = True

    def is_cancelled(self) -> bool:
        return self.cancelled

    def progress(self, done: int) -> None:
        self.done = max(self.done, done)

    def epoch(self, record: dict, state: dict | None) -> None:
        self.epochs.append(record)
        if state is not None:
            self.best = (record["epoch"], state)

    def hello(self, info: dict) -> None:
        self.workers.append(info)

    def read(self) -> dict:
        return {"cancelled": self.cancelled, "done": self.done, "epochs": list(self.epochs),
                "best": self.best, "workers": sorted(self.workers, key=lambda w: w["rank"])}

    def poll(self) -> tuple[int, int]:
        return self.done, len(self.epochs)


def _train_loop(cfg: dict) -> None:
    """One Ray Train worker: the local recovery's loop on this worker's share of every global mini-batch."""
    import os
    import platform

    import ray
    import ray.train
    import ray.train.torch
    import torch.distributed as dist

    from .evaluate import evaluate_accuracy

    torch.set_num_threads(cfg["threads"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    board = cfg["board"]
    device = ray.train.torch.get_device()
    ray.get(board.hello.remote({"rank": rank, "host": platform.node(), "pid": os.getpid(),
                                "device": str(device) if device.type == "cuda" else
                                f"cpu, {torch.get_num_threads()} thread(s)"}))
    config: RecoveryConfig = cfg["config"]
    spec: InputSpec = cfg["spec"]
    train_images, train_labels = ray.get(cfg["train"][0])
    val: ImageSet = ray.get(cfg["val"][0])
    model = ray.get(cfg["model"][0])
    teacher = ray.get(cfg["teacher"][0]) if cfg["teacher"] is not None else None
    if teacher is not None:
        teacher = teacher.to(device).eval()
    ddp = ray.train.torch.prepare_model(model)  # DDP (gloo on CPUs), on this worker's device
    plain = ddp.module if hasattr(ddp, "module") else ddp
    gen = torch.Generator().manual_seed(config.seed)
    steps_per_epoch = max(1, len(train_labels) // config.batch_size)
    total = steps_per_epoch * config.epochs
    params = [p for p in ddp.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=config.lr, momentum=0.9, nesterov=True, weight_decay=config.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total)
    best_score, done, stop = float("-inf"), 0, False
    for epoch in range(1, config.epochs + 1):
        ddp.train()
        order = torch.randperm(len(train_labels), generator=gen)
        losses = []
        for b in range(steps_per_epoch):
            if b % _CANCEL_CHECK_EVERY == 0:  # every worker asks at the same mini-batch and they agree
                flag = torch.tensor([1.0 if ray.get(board.is_cancelled.remote()) else 0.0])
                dist.all_reduce(flag, op=dist.ReduceOp.MAX)
                if flag.item() > 0:
                    stop = True
                    break
            idx = order[b * config.batch_size:(b + 1) * config.batch_size]
            # the same global batch and augmentation as the local recovery, then this worker's share of it
            x = augment(normalize(train_images[idx], spec), gen, config.shift, config.hflip)[rank::world].to(device)
            y = train_labels[idx][rank::world].to(device)
            loss = batch_loss(ddp(x), y, x, teacher, config)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.item())
            done += 1
            if rank == 0 and (done % _CANCEL_CHECK_EVERY == 0 or done == total):
                board.progress.remote(done)
        if stop:
            break
        if rank == 0:
            score = float(evaluate_accuracy(plain.eval(), val, spec).accuracy)
            record = {"epoch": epoch, "selection": score, "train_loss": float(np.mean(losses)), "workers": world}
            state = None
            if keeps_epoch(config, score, best_score):
                best_score = max(score, best_score)
                state = {k: v.detach().cpu().clone() for k, v in plain.state_dict().items()}
            ray.get(board.epoch.remote(record, state))
        ray.train.report({"epoch": epoch})  # every worker, every epoch (a barrier)


def recover_on_ray(model: nn.Module, train: ImageSet, val: ImageSet, spec: InputSpec, config: RecoveryConfig,
                   setting: WorkSetting, teacher: nn.Module | None = None, cancel: threading.Event | None = None,
                   progress: Callable[[int, int, str], None] | None = None, use_gpu: bool = False,
                   threads_per_worker: int = 1, n_workers: int | None = None) -> tuple[RecoveryResult, dict]:
    """:func:`core.recovery.recover` on ``n_workers`` (default ``setting.workers``, else 2) Ray Train workers (DDP); ``model`` is updated in place
    to the finished epoch ``config.keep`` names (``core.recovery.keeps_epoch``; selection accuracy on ``val``). Returns the result and where it ran
    (``{"where", "address", "workers": [{rank, host, pid, device}], "seconds"}``). ``progress(done, total,
    message)`` counts global mini-batches; a cancel stops every worker at the same mini-batch and keeps that
    epoch among the finished ones (``best_epoch`` 0: none finished, the model unchanged)."""
    config.validate()
    setting.validate()
    if setting.where == "local":
        raise SettingsError("Recovery on Ray needs a Ray address or a number of local Ray workers.")
    if config.distill and teacher is None:
        raise SettingsError("Distillation needs the original model as the teacher.")
    if len(train) == 0:
        raise SettingsError("Recovery needs training images; the train split is empty.")
    from .distributed import CarPool

    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from .evaluate import evaluate_accuracy

    workers = n_workers or setting.workers or 2
    t0 = time.perf_counter()
    model = model.cpu()
    result = RecoveryResult(start_selection=float(evaluate_accuracy(model.eval(), val, spec).accuracy))
    steps_per_epoch = max(1, len(train) // config.batch_size)
    total = steps_per_epoch * config.epochs
    storage = tempfile.mkdtemp(prefix="prunescope-ray-train-")
    # the Ray connection (started or reached as CarPool does, shared with this process' other jobs); no CAR actors
    connection = CarPool(setting, connect_only=True)
    board = None
    try:
        board = ray.remote(_Board).options(num_cpus=0).remote()
        cfg = {"board": board, "config": config, "spec": spec, "threads": threads_per_worker,
               "train": [ray.put((train.images, train.labels))], "val": [ray.put(val)],
               "model": [ray.put(copy.deepcopy(model).eval())],
               "teacher": [ray.put(copy.deepcopy(teacher).cpu().eval())] if config.distill else None}
        trainer = TorchTrainer(
            _train_loop, train_loop_config=cfg,
            scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu,
                                         resources_per_worker={"CPU": threads_per_worker}),
            run_config=RunConfig(name="prunescope-recovery", storage_path=storage))
        failure: list[BaseException] = []

        def fit() -> None:
            try:
                trainer.fit()
            except BaseException as exc:  # reported below, in the caller's thread
                failure.append(exc)

        thread = threading.Thread(target=fit, name="prunescope-ray-train", daemon=True)
        thread.start()
        sent_cancel = False
        while thread.is_alive():
            thread.join(0.5)
            if cancel is not None and cancel.is_set() and not sent_cancel:
                ray.get(board.cancel.remote())
                sent_cancel = True
            if progress:
                done, n_epochs = ray.get(board.poll.remote())
                progress(done, total, f"recovery epoch {min(n_epochs + 1, config.epochs)}/{config.epochs} "
                                      f"on {workers} Ray Train worker(s)")
        state = ray.get(board.read.remote())
        if failure and not (state["cancelled"] and state["epochs"] == []):
            raise SettingsError(f"Recovery on Ray Train failed: {type(failure[0]).__name__}: "
                                f"{str(failure[0]).splitlines()[0] if str(failure[0]) else ''}") from failure[0]
    finally:
        if board is not None:
            try:
                ray.kill(board, no_restart=True)
            except Exception:
                pass
        connection.close()
        shutil.rmtree(storage, ignore_errors=True)
    result.epochs = [{k: v for k, v in e.items() if k != "workers"} for e in state["epochs"]]
    result.cancelled = bool(state["cancelled"]) and len(state["epochs"]) < config.epochs
    if state["best"] is not None:
        result.best_epoch = state["best"][0]
        model.load_state_dict(state["best"][1])
    model.eval()
    where = {**setting.to_dict(), "engine": "ray.train.torch.TorchTrainer (DDP)", "workers": state["workers"],
             "seconds": time.perf_counter() - t0}
    if cancel is not None and cancel.is_set() and result.best_epoch == 0 and not result.epochs:
        result.cancelled = True
    return result, where
