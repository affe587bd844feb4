"""Recovery fine-tuning after pruning: N epochs over the train split, optionally distilled from the original.

The 40 mini-batches between pruning steps only let a network adapt to one removal; published
structured-pruning results (e.g. Torch-Pruning's ResNet-56 on CIFAR-10) come from a longer training
after the last cut. This is that training, sized for a local machine: SGD with Nesterov momentum and a
cosine schedule (Loshchilov & Hutter, SGDR, 2017) over ``epochs`` passes of the train split, the same
label-preserving augmentation as the pruning loop's fine-tuning (random shift, plus a horizontal flip
where the caller allows it), and optionally knowledge distillation from the unpruned model (Hinton,
Vinyals & Dean, "Distilling the Knowledge in a Neural Network", 2015):
``loss = (1 - alpha) * CE(student, y) + alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T))``.

The weights kept are those of the schedule's last epoch (``RecoveryConfig.keep``), also the last finished one when
the job is cancelled part-way; that epoch is scored on the *selection* images (never the test images) for the
record, and every epoch is when the rule is "best" instead (:func:`scores_epoch`).

:func:`recover_run_step` makes the result a new step of a run folder (same structure as the step it
started from, new weights), measured on the selection and the test images, so Review and Export pick
it like any other step.
"""
from __future__ import annotations

import copy
import math
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .claim import pack_correct
from .data import DataSet, ImageSet, normalize
from .device import resolve_device
from .errors import DataError, PruneScopeError, SettingsError
from .eta import EtaTracker, PhaseProgress
from .evaluate import count_macs_params, evaluate_accuracy
from .models import InputSpec
from .runs import ACTIVE_RUNS, Run, RunWriter
from .sources import load_run_dataset
from .stats import paired_figures
from .training import augment, check_precision, resolve_precision, train_steps
from .tasks.registry import task_plugin


KEEP_RULES = ("last", "best")  # which finished epoch a recovery keeps (RecoveryConfig.keep)


def keeps_epoch(config: "RecoveryConfig", score: float, best_score: float) -> bool:
    """Whether a recovery keeps the epoch that just finished with selection ``score`` (``best_score``: the highest
    before it): always under the rule "last", only a new highest under "best". One rule for the local and the Ray
    Train recovery."""
    return config.keep == "last" or score > best_score


def scores_epoch(config: "RecoveryConfig", epoch: int) -> bool:
    """Whether a recovery scores epoch ``epoch`` on the selection images: every epoch under the rule "best" (it
    picks among them), only the schedule's last under "last" (the kept one, for the record).

    Why not every epoch: under "last" no score decides anything, and scoring took a share of every epoch; on our
    ResNet-56 upload (``bench/real_cifar.py --upload``) 1,000 selection images took 1.3-1.6 s on the original,
    beside 11-12 s of distilled training an epoch over 5,000 images, in the recoveries and the control's repeat."""
    return config.keep == "best" or epoch == config.epochs


@dataclass
class RecoveryConfig:
    """Settings of a recovery fine-tune. ``lr`` is the peak learning rate of the cosine schedule."""

    epochs: int = 3
    lr: float = 0.01
    batch_size: int = 64
    weight_decay: float = 5e-4
    shift: int = 2  # random translation, pixels
    hflip: bool = False  # only where a mirrored image keeps its class (not digits or text)
    distill: bool = False
    kd_alpha: float = 0.5
    kd_temperature: float = 4.0
    seed: int = 0
    # training arithmetic (core.training.PRECISIONS): "auto" is bf16 mixed precision where the device computes
    # bfloat16 natively, else fp32; the epochs are chosen on fp32 selection accuracy either way
    precision: str = "auto"
    # which finished epoch the model keeps (KEEP_RULES): "last", the end of the cosine schedule, or "best", the
    # epoch with the highest selection score. "last" by default: picking the best of N epochs on the selection
    # images is one more decision on them (the winner's curse) and bought nothing on unseen images. A pruned
    # ResNet-56 on our upload (bench/recovery_epochs.py, 3,000 unseen images), best vs last: 1.70 vs 1.00 points
    # lost (12 epochs, seed 1), 1.43 vs 1.60 (6 epochs, seed 0), the same epoch in four other recoveries.
    keep: str = "last"

    def validate(self) -> None:
        if self.epochs < 1:
            raise SettingsError(f"Recovery needs at least 1 epoch; got {self.epochs}.")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise SettingsError(f"The recovery learning rate must be a positive number; got {self.lr}.")
        if self.batch_size < 1:
            raise SettingsError(f"The recovery batch size must be at least 1; got {self.batch_size}.")
        if not 0 <= self.kd_alpha <= 1 or self.kd_temperature <= 0:
            raise SettingsError("Distillation needs 0 <= alpha <= 1 and a positive temperature.")
        check_precision(self.precision)
        if self.keep not in KEEP_RULES:
            raise SettingsError(f"A recovery keeps its {' or '.join(KEEP_RULES)} epoch; got {self.keep!r}.")


@dataclass
class RecoveryResult:
    """Per epoch the selection metric; which epoch was kept; whether the job stopped early."""

    # {"epoch", "selection" (None where not scored: scores_epoch), "train_loss", "seconds" (the epoch's training)}
    epochs: list[dict] = field(default_factory=list)
    best_epoch: int = 0  # the epoch kept (RecoveryConfig.keep; the name is older); 0 = none finished: the model as it came in
    start_selection: float = 0.0
    cancelled: bool = False
    precision: str = "fp32"  # what the training used (core.training.resolve_precision of the config's)

    def to_dict(self) -> dict:
        return {"epochs": self.epochs, "best_epoch": self.best_epoch, "start_selection": self.start_selection,
                "cancelled": self.cancelled, "precision": self.precision}


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor, alpha: float,
                      temperature: float) -> torch.Tensor:
    """Hinton et al.'s KD loss; ``T^2`` keeps the soft term's gradients on the scale of the hard one. Computed in
    float32 whatever the logits' precision (autocast leaves softmax in bfloat16 on the CPU)."""
    student, teacher = student.float(), teacher.float()
    hard = F.cross_entropy(student, labels)
    if alpha == 0:
        return hard
    soft = F.kl_div(F.log_softmax(student / temperature, 1), F.softmax(teacher / temperature, 1),
                    reduction="batchmean") * temperature ** 2
    return (1 - alpha) * hard + alpha * soft


def batch_loss(out: torch.Tensor, y: torch.Tensor, x: torch.Tensor, teacher: nn.Module | None,
               config: RecoveryConfig) -> torch.Tensor:
    """A recovery mini-batch's loss, the one rule of the local and the Ray Train recovery: cross-entropy on the
    labels, or with ``config.distill`` the KD loss against ``teacher``'s logits on the same input ``x``."""
    if not config.distill:
        return F.cross_entropy(out, y)
    with torch.no_grad():
        t_out = teacher(x)
    return distillation_loss(out, t_out, y, config.kd_alpha, config.kd_temperature)


def epoch_batches(train: ImageSet, spec: InputSpec, config: "RecoveryConfig", gen: torch.Generator,
                  device: torch.device):
    """One epoch's augmented mini-batches ``(x, y)`` on ``device``, in an order drawn from ``gen``
    (``core.training.augment``: the shift and mirror of ``config``)."""
    order = torch.randperm(len(train), generator=gen)
    for b in range(max(1, len(train) // config.batch_size)):
        idx = order[b * config.batch_size:(b + 1) * config.batch_size]
        x = augment(normalize(train.images[idx], spec), gen, config.shift, config.hflip).to(device)
        yield x, train.labels[idx].to(device)


def recover(model: nn.Module, train: ImageSet, spec: InputSpec, config: RecoveryConfig,
            select: Callable[[nn.Module], float], teacher: nn.Module | None = None,
            device: torch.device | None = None, cancel: threading.Event | None = None,
            progress: Callable[[int, int, str], None] | None = None) -> RecoveryResult:
    """Fine-tune ``model`` in place for ``config.epochs`` epochs; on return it holds the weights of the epoch
    ``config.keep`` names (the last finished, or the best by ``select``), even when that scores below the
    incoming model.

    The incoming model is not a candidate: a pruned step was accepted *because* it scored well on the
    selection images, so its selection figure reads high (the winner's curse), and an epoch that is
    better on unseen images can score below it there. Whether to use the recovered model is the user's
    choice (Review shows both steps with their test figures; of equal-MAC steps within the threshold
    ``select_step`` ships the more accurate on the selection images). ``select(model) -> float`` scores the model on the selection images (higher is
    better, e.g. accuracy); ``teacher`` is required when ``config.distill``. ``progress(done, total,
    message)`` counts mini-batches over all epochs. Cancelling stops at the next mini-batch and keeps the
    epoch the rule names among those finished (the incoming model, ``best_epoch`` 0, if none finished).
    """
    config.validate()
    if config.distill and teacher is None:
        raise SettingsError("Distillation needs the original model as the teacher.")
    if len(train) == 0:
        raise SettingsError("Recovery needs training images; the train split is empty.")
    device = device or torch.device("cpu")
    model.to(device)
    if teacher is not None:
        teacher = teacher.to(device).eval()
    gen = torch.Generator().manual_seed(config.seed)
    steps_per_epoch = max(1, len(train) // config.batch_size)
    total = steps_per_epoch * config.epochs
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=config.lr, momentum=0.9, nesterov=True, weight_decay=config.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total)
    result = RecoveryResult(start_selection=float(select(model.eval())),
                            precision=resolve_precision(config.precision, device))
    best_score, best_state = float("-inf"), copy.deepcopy(model.state_dict())
    done = 0
    for epoch in range(1, config.epochs + 1):
        model.train()
        batches = epoch_batches(train, spec, config, gen, device)

        def epoch_loss() -> torch.Tensor:
            x, y = next(batches)
            return batch_loss(model(x), y, x, teacher, config)

        def epoch_progress(fraction: float, _message: str, epoch=epoch, start=done) -> None:
            if progress:
                progress(start + round(fraction * steps_per_epoch), total, f"recovery epoch {epoch}/{config.epochs}")

        t_epoch = time.perf_counter()
        losses = train_steps(model, opt, steps_per_epoch, epoch_loss, cancel, epoch_progress, after_step=sched.step,
                             precision=result.precision)
        train_s = time.perf_counter() - t_epoch
        done += len(losses)
        if len(losses) < steps_per_epoch:
            result.cancelled = True
            break
        score = float(select(model.eval())) if scores_epoch(config, epoch) else None
        result.epochs.append({"epoch": epoch, "selection": score, "train_loss": float(np.mean(losses)),
                              "seconds": train_s})
        if keeps_epoch(config, score, best_score):
            best_score = best_score if score is None else max(score, best_score)
            best_state, result.best_epoch = copy.deepcopy(model.state_dict()), epoch
    model.load_state_dict(best_state)
    model.eval()
    return result


# ----------------------------------------------------------------------------- a recovery as a run step


def recover_run_step(run_dir: Path | str, step: int, config: RecoveryConfig, data: DataSet | None = None,
                     cancel: threading.Event | None = None,
                     progress: Callable[[PhaseProgress], None] | None = None,
                     trusted: bool = False, device: torch.device | None = None) -> dict:
    """Fine-tune step ``step`` of a classification run and append the result as a new step; its record.

    The model is rebuilt from the run (:meth:`Run.rebuild_step`), trained by :func:`recover` on
    ``data.train`` (``config.distill``: the run's original as teacher), chosen by its selection
    accuracy, then measured on the selection and the test images. The new step keeps the source
    step's structure (widths, Torch-Pruning history, MACs, latency) and records ``recovered_from`` and
    ``recovery`` (epochs, kd, seconds, best epoch, per-epoch figures), the test figures
    (``test_metric``, ``test_per_class``, None without a test split) and the paired drops from step 0
    per role (``paired``: :func:`core.stats.paired_figures`). Weights are written before the record
    (``RunWriter.add_step``), both atomically. The best finished epoch is appended even when its
    selection figure is below the source step's (``recovery.start_selection``; see :func:`recover`);
    only a cancel before the first epoch ended appends nothing, the record's ``step`` then None. While
    it runs the run's status reads ``running`` (so a second recovery is refused), and the previous
    status is restored after it, also on cancel.

    ``data`` None: the run's data set with the split it recorded (``core.sources.load_run_dataset``),
    refused when its images differ from the recorded split. ``device`` None: where the run pruned
    (:func:`recovery_device`); the record's ``recovery.device`` says where it trained. ``progress`` gets a
    :class:`~core.eta.PhaseProgress` (phase ``recovery`` in mini-batches, then ``measuring``).
    Raises ``PruneScopeError`` subclasses with one line (no such run or step, a running run, a detection run).
    """
    config.validate()
    run = Run(run_dir)
    _check_recoverable(run)
    source = run.record(step)
    data = data if data is not None else _run_data(run)
    spec = run.spec.input
    model = run.rebuild_step(step, trusted)
    original = run.original(trusted).model
    history = _pruning_history(run, step)
    device = recovery_device(run, device)
    tracker = EtaTracker()

    def report(phase: str, done: float, total: float, message: str) -> None:
        if progress:
            progress(tracker.update(phase, done, total, message))

    writer = RunWriter(run.dir)
    before = run.status
    ACTIVE_RUNS.add(str(run.dir.resolve()))  # readers in this process see it running, not interrupted
    writer.status("running", f"recovery fine-tune of step {step}")
    try:
        t0 = time.perf_counter()
        result = recover(model, data.train, spec, config, lambda m: evaluate_accuracy(m, data.val, spec).accuracy,
                         teacher=original if config.distill else None, device=device, cancel=cancel,
                         progress=lambda done, total, msg: report("recovery", done, total, msg))
        seconds = time.perf_counter() - t0
        report("measuring", 0, 2, "measuring the recovered model on the selection and test images")
        model.cpu()
        record = _recovered_record(run, source, model, original, data, config, result, seconds, device)
        if result.best_epoch > 0:
            writer.add_step(record, model, history)
        else:  # no epoch finished: a copy of the source step is no new step
            record["step"] = None
        report("measuring", 2, 2, "done")
    finally:
        writer.status(before.get("state", "done"), before.get("message", ""))
    return record


def recovery_device(run: Run, device: torch.device | str | None = None) -> torch.device:
    """Where a recovery of ``run`` trains: ``device`` when given, else where the run pruned (its recorded
    ``prune.device``: a run pruned on the GPU recovers there too, not silently on the CPU), or ``auto``
    when the recorded device is not on this machine (a run pruned on a GPU machine, recovered on a laptop).
    Raises ``SettingsError`` for a device name other than auto / cpu / cuda, or ``cuda`` asked for on a
    machine without a GPU."""
    if isinstance(device, torch.device):
        return device
    if device is not None:
        return resolve_device(device)
    recorded = (run.config.get("prune") or {}).get("device") or "auto"
    if recorded == "cuda" and not torch.cuda.is_available():
        recorded = "auto"
    return resolve_device(recorded)


def _check_recoverable(run: Run) -> None:
    if not task_plugin(run.task).recovers:
        raise SettingsError(f"Run {run.name} is a {run.task} run; the recovery fine-tune trains classifiers only.")
    if run.status.get("state") == "running":
        raise PruneScopeError(f"Run {run.name} is still running ({run.status.get('message') or 'a job writes to it'}); "
                              "recover a step after it has finished.")


def _run_data(run: Run) -> DataSet:
    """The run's data set, split as recorded; refused when the recorded split's images are not what loads now."""
    data = load_run_dataset(run.config, run.spec.input, run.spec.num_classes)
    recorded = ((run.config.get("data_options") or {}).get("split") or {}).get("sha256")
    if recorded and recorded != data.split_record()["sha256"]:
        changed = ", ".join(r for r in recorded if recorded[r] != data.split_record()["sha256"].get(r))
        raise DataError(f"The data set {run.config['data_source']} no longer gives the images run {run.name} was made "
                        f"with (changed: {changed}); its figures could not be compared. Load the original data.")
    return data


def _pruning_history(run: Run, step: int) -> list:
    """The Torch-Pruning history of ``step`` (empty for the original): the structure the new step keeps."""
    if step == 0:
        return []
    return run._weights(run.dir / "steps" / f"{step:04d}.pt", run.record(step).get("weights_sha256"))["pruning_history"]


def _correct(measured: dict) -> dict[str, np.ndarray]:
    """Per role, whether each image is classified right, from :func:`_accuracies`."""
    return {role: accuracy.correct.numpy() for role, accuracy in measured.items()}


def _accuracies(model: nn.Module, data: DataSet, spec: InputSpec) -> dict:
    """Per role (``selection``, ``test``), the model's :func:`evaluate_accuracy`; roles without images left out."""
    return {role: evaluate_accuracy(model, images, spec)
            for role, images in (("selection", data.val), ("test", data.test)) if len(images)}


def _recovered_record(run: Run, source: dict, model: nn.Module, original: nn.Module, data: DataSet,
                      config: RecoveryConfig, result: RecoveryResult, seconds: float, device: torch.device) -> dict:
    """The new step's record, with per-image correctness packed as the loop's steps carry it (``correct``,
    ``core.claim.pack_correct``), so that its claim against the control can be read like theirs."""
    spec = run.spec.input
    measured = _accuracies(model, data, spec)
    selection, test = measured["selection"], measured.get("test")
    correct = _correct(measured)
    macs, params = count_macs_params(model, spec)
    return {
        "step": max(run.steps()) + 1,
        # the task's metric (accuracy) on the selection images, as every step record stores it; the
        # test images' figure beside it (None without a test split)
        "metric": selection.accuracy, "per_class": selection.per_class,
        "test_metric": test.accuracy if test else None, "test_per_class": test.per_class if test else None,
        "macs": macs, "params": params,
        "latency_ms": source.get("latency_ms"),  # same structure as the source step: its latency
        "widths": source.get("widths"), "removed": None,
        "recovered_from": source["step"],
        "recovery": {"epochs": config.epochs, "kd": config.distill, "seconds": seconds,
                     "best_epoch": result.best_epoch, "cancelled": result.cancelled,
                     "start_selection": result.start_selection, "per_epoch": result.epochs, "config": asdict(config),
                     "device": str(device), "precision": result.precision},
        "paired": paired_figures(_correct(_accuracies(original, data, spec)), correct), "correct": pack_correct(correct),
        "seconds": seconds, "elapsed": (source.get("elapsed") or 0.0) + seconds,
    }
