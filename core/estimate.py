"""How long a pruning run will take, from rates measured on this machine before it starts.

No duration is promised from a table: :func:`measure_rates` times the real model here and now (a forward
pass, a few SGD steps, emulated single-filter removals through the real CAR engine, one OpenVINO
conversion and a few timed inferences; about 1-3 s on a small CNN), each a few times, and keeps the
fastest and slowest repeat. :func:`estimate_prune_time` multiplies those rates by the work the flow
will do (``core.prune``):

    original  = eval(n_val) + latency + [CAR analysis]
    CAR analysis (exact) = (F + S) x images x ablation          F: filters, S: sensitivity points (9 per group)
    CAR analysis (fast)  = images x screen + (ceil(q F) + S) x images x ablation     q: FAST_EXACT_FRACTION
    per step  = scoring + attempts x (fine-tune + eval(n_val) + latency)
      scoring (car)     = (F_step [if re-scored this step] + G_step candidates) x images x ablation
                          (fast CAR: F_step capped at the loop's exact budget, ``exact_budget``)
      scoring (other)   = gradient passes (4 SGD-step equivalents) where the criterion needs them, else 0
      fine-tune         = finetune_steps x train_step
      latency           = OpenVINO conversion + (warm-up + latency_runs) x inference
    recoveries = (0 .. max_recoveries x (3 with stretches) + 1) x recover_epochs x n_train / batch_size x train_step
    control   = the original trained alike: steps x finetune_steps + the recoveries' epochs, in train steps
    total     = original + sum over the expected steps + recoveries + control, capped at the time budget

The number of steps is simulated on the model's groups: one cluster leaves one group per removal, and a
step takes removals until they save ``step_macs`` of the original MACs (at most ``clusters_per_step``),
until the MAC target (or ``max_steps``, or no group can lose a cluster); the MACs each removal saves are the
pruned model's own (:class:`MacModel`). The low end removes the cluster that saves
the most MACs first (fewest steps), one attempt per step and the fastest repeats; the high end the
fewest MACs first, ``min(patience + 1, 2)`` attempts and the slowest repeats. The accuracy threshold can
stop a run earlier than either: that is not predictable before the run.

With a time budget, what it buys: the low end's steps with no recovery, and the high end's with each step stalled
and recovered at a stretch's longest, repeated by the control (:func:`_stall_seconds`). On our uploads of a
ResNet-20 (15 min) and a ResNet-56 (30 min) that read 64 %-12 % and 82 %-11 % of the MACs; the runs reached 58 %
and 42 %.
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import criteria
from .car import FAST_EXACT_FRACTION, SENSITIVITY_FRACTIONS, CarScorer, filter_ablation
from .criteria import new_width
from .data import ImageSet, normalize
from .engine import RETRY_STRETCH_EPOCHS, STRETCH_EPOCHS
from .errors import SettingsError
from .eta import format_duration
from .evaluate import count_macs_params, layer_macs, predict_logits
from .groups import ChannelGroup, PruningGraph
from .measure import time_models
from .models import InputSpec, ModelSpec
from .training import resolve_precision, train_steps

CALIBRATION_REPEATS = 2
CALIBRATION_IMAGES = 32
CALIBRATION_FILTERS = 4
LATENCY_WARMUP = 5  # as core.prune.measure


@dataclass
class Rates:
    """Seconds per unit of work measured on this machine, as (fastest, slowest) repeat.

    ``forward_image``: eval forward per image (batched); ``train_step``: one SGD mini-batch of
    ``batch_size`` images (forward, backward, update); ``ablation_image``: one emulated filter removal on
    one image through the CAR engine; ``screen_image``: the fast-CAR screen per image (one forward and two
    backward passes, timed as forward + 2 x backward of a training step); ``ov_setup``: ONNX export, OpenVINO
    conversion and compilation; ``ov_inference``: one batch-1 OpenVINO inference.
    """

    forward_image: tuple[float, float]
    train_step: tuple[float, float]
    ablation_image: tuple[float, float]
    screen_image: tuple[float, float]
    ov_setup: tuple[float, float]
    ov_inference: tuple[float, float]
    batch_size: int
    calibration_seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Estimate:
    """A run's expected duration in seconds, low to high, with the phases it is made of."""

    seconds_low: float
    seconds_high: float
    breakdown: dict[str, tuple[float, float]] = field(default_factory=dict)
    steps: tuple[int, int] = (0, 0)
    rates: Rates | None = None
    budget_buys: dict | None = None  # with a time budget: {"fast"|"slow": {"steps", "mac_fraction"}}

    def steps_text(self) -> str:
        """'7–12 steps', or '4 steps' when both ends agree (not '4–4 steps')."""
        low, high = self.steps
        return f"{low} step{'s' if low != 1 else ''}" if low == high else f"{low}–{high} steps"

    def label(self) -> str:
        """'about 2 min 10 s – 4 min 30 s (7–12 steps), measured on this machine'."""
        return (f"about {format_duration(self.seconds_low)} – {format_duration(self.seconds_high)} "
                f"({self.steps_text()}), from rates measured on this machine")

    def to_dict(self) -> dict:
        return {"seconds_low": self.seconds_low, "seconds_high": self.seconds_high,
                "breakdown": {k: list(v) for k, v in self.breakdown.items()}, "steps": list(self.steps),
                "rates": self.rates.to_dict() if self.rates else None, "budget_buys": self.budget_buys}


def _repeat(fn, repeats: int = CALIBRATION_REPEATS) -> tuple[float, float]:
    """(fastest, slowest) wall time of ``fn`` over ``repeats`` calls, after one untimed warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times), max(times)


def _scaled(pair: tuple[float, float], factor: float) -> tuple[float, float]:
    return pair[0] * factor, pair[1] * factor


def _random_images(spec: InputSpec, n: int, classes: int) -> ImageSet:
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, spec.channels, spec.height, spec.width), dtype=torch.uint8, generator=g)
    return ImageSet(images, torch.randint(0, classes, (n,), generator=g), [str(i) for i in range(classes)])


def measure_rates(model: nn.Module, spec: InputSpec | ModelSpec, batch_size: int = 64, latency: bool = True,
                  precision: str = "fp32") -> Rates:
    """Time the work units of a pruning run on a copy of ``model`` (its weights are not changed); a training
    step in the run's training ``precision`` (``fp32`` or ``bf16``, ``core.training.resolve_precision``).

    Random images stand in for the data set: timing does not depend on pixel values. Raises
    ``SettingsError`` if the model has no prunable group (a run could not start either).
    """
    ispec = spec.input if isinstance(spec, ModelSpec) else spec
    t_start = time.perf_counter()
    model = copy.deepcopy(model).eval()
    with torch.no_grad():
        classes = int(model(torch.zeros(ispec.shape(1))).shape[1])
    images = _random_images(ispec, CALIBRATION_IMAGES, classes)
    n = len(images)

    forward = _scaled(_repeat(lambda: predict_logits(model, images.images, ispec, batch_size=n)), 1.0 / n)
    train_batch = _random_images(ispec, batch_size, classes)
    train = _train_step_timer(model, train_batch, ispec, precision)
    train_step = _repeat(train)
    # screen: one forward and two backward passes per image; a training step is one forward and one backward
    per_image_train = _scaled(train_step, 1.0 / batch_size)
    screen = (max(2 * per_image_train[0] - forward[0], forward[0]), max(2 * per_image_train[1] - forward[1], forward[1]))

    graph = PruningGraph(copy.deepcopy(model), ispec.shape(1))
    groups = [g for g in graph.groups() if not g.left_alone]
    if not groups:
        raise SettingsError("The model has no prunable channel group: there is no run to estimate.")
    scorer = CarScorer(graph.model, ispec, images)
    picks = _calibration_ablations(groups)
    ablation = _scaled(_repeat(lambda: scorer.accuracies(picks)), 1.0 / (len(picks) * n))

    ov_setup, ov_inference = (0.0, 0.0), (0.0, 0.0)
    if latency:
        t0 = time.perf_counter()
        (times,) = time_models([model], ispec, runs=10, warmup=2)
        setup = time.perf_counter() - t0 - sum(times) / 1000.0
        ms = np.asarray(times) / 1000.0
        ov_setup = (setup, setup)
        ov_inference = (float(np.percentile(ms, 25)), float(np.percentile(ms, 75)))
    return Rates(forward, train_step, ablation, screen, ov_setup, ov_inference, batch_size,
                 time.perf_counter() - t_start)


def _train_step_timer(model: nn.Module, batch: ImageSet, spec: InputSpec, precision: str = "fp32"):
    """One SGD step as ``core.prune.finetune`` does it (``core.training.train_steps``), on a copy so the model's
    weights stay as they are."""
    net = copy.deepcopy(model).train()
    opt = torch.optim.SGD(net.parameters(), lr=1e-9, momentum=0.9)
    x = normalize(batch.images, spec)

    def step():
        net.train()
        train_steps(net, opt, 1, lambda: F.cross_entropy(net(x), batch.labels), precision=precision)

    return step


def _calibration_ablations(groups: list[ChannelGroup]) -> list:
    """Single-filter removals spread over the network (early, middle, late groups): their suffix passes
    differ in length, as the real analysis' do."""
    idx = np.linspace(0, len(groups) - 1, num=min(CALIBRATION_FILTERS, len(groups))).round().astype(int)
    return [filter_ablation(groups[i], [0]) for i in sorted(set(idx.tolist()))]


class MacModel:
    """The MACs of a model for one image at any group widths, exactly, before anything is pruned.

    A conv or linear layer's MACs are bilinear in its output and input channels: ``macs x (out / out0) x
    (in / in0)``, where a group's filters are the output channels of its producers and (per filter, as many as
    the group's consumer indices say) input channels of its consumers. Summing ``ChannelGroup.macs_per_filter``
    instead counts a consumer's saving at its original output width: on a CIFAR ResNet-20 pruned to one cluster
    per group that overcounts the saving past the model's whole MACs (a "-39 %" left). Layers no group touches
    keep their MACs; frozen shortcut embeddings have none (``core.evaluate.layer_macs``)."""

    def __init__(self, model: nn.Module, spec: InputSpec, groups: list[ChannelGroup]):
        self.macs = {name: float(m) for name, m in layer_macs(model, spec).items()}
        modules = dict(model.named_modules())
        self.out0 = {n: _out_channels(modules[n]) for n in self.macs}
        self.in0 = {n: _in_channels(modules[n]) for n in self.macs}
        self.producer: dict[str, int] = {}
        self.inputs: dict[str, dict[int, float]] = {n: {} for n in self.macs}  # layer -> group -> inputs per filter
        self.width0 = {g.gid: g.width for g in groups}
        self.produced: dict[int, list[str]] = {g.gid: [n for n in g.producers if n in self.macs] for g in groups}
        self.consumed: dict[int, list[str]] = {g.gid: [n for n in g.consumers if n in self.macs] for g in groups}
        for g in groups:
            for name in self.produced[g.gid]:
                self.producer[name] = g.gid
            for name in self.consumed[g.gid]:
                self.inputs[name][g.gid] = sum(len(i) for i in g.consumers[name]) / g.width

    def total(self, widths: dict[int, int] | None = None) -> float:
        """MACs at ``widths`` (group id -> filters; missing groups at their original width)."""
        widths = widths or {}
        return sum(m * self._out_share(n, widths) * self._in_share(n, widths) for n, m in self.macs.items())

    def saving(self, widths: dict[int, int], gid: int, new_width: int) -> float:
        """MACs saved by taking group ``gid`` from ``widths[gid]`` to ``new_width`` filters, the rest at ``widths``."""
        removed = widths[gid] - new_width
        out = sum(self.macs[n] * removed / self.out0[n] * self._in_share(n, widths) for n in self.produced[gid])
        inp = sum(self.macs[n] * self._out_share(n, widths) * removed * self.inputs[n][gid] / self.in0[n]
                  for n in self.consumed[gid])
        return out + inp

    def _out_share(self, name: str, widths: dict[int, int]) -> float:
        gid = self.producer.get(name)
        if gid is None:
            return 1.0
        return max(1.0 - (self.width0[gid] - widths.get(gid, self.width0[gid])) / self.out0[name], 0.0)

    def _in_share(self, name: str, widths: dict[int, int]) -> float:
        gone = sum((self.width0[g] - widths.get(g, self.width0[g])) * per for g, per in self.inputs[name].items())
        return max(1.0 - gone / self.in0[name], 0.0)


def _out_channels(module: nn.Module) -> int:
    return module.out_channels if isinstance(module, nn.Conv2d) else module.out_features


def _in_channels(module: nn.Module) -> int:
    return module.in_channels if isinstance(module, nn.Conv2d) else module.in_features


def _step_widths(groups: list[ChannelGroup], cluster: int, mac_budget: float, max_steps: int,
                 biggest_first: bool, per_step: int, step_macs: float | None, saved_after: list[float],
                 mac_model: MacModel) -> list[int]:
    """Total filters before each simulated step: one cluster leaves one group per removal, and a step takes
    removals until they save ``step_macs`` MACs (None: no such limit) or ``per_step`` removals, until
    ``mac_budget`` MACs are saved, ``max_steps`` steps are made or no group can lose a cluster.
    ``saved_after`` receives the MACs saved in all after each simulated step. A removal's saving is ``mac_model``'s
    at the widths reached (``saving(widths, group id, new width)``: :class:`MacModel`, exact)."""
    widths = {g.gid: g.width for g in groups}
    saved, out = 0.0, []
    in_step, step_saved = per_step, 0.0
    while saved < mac_budget:
        options = {k: mac_model.saving(widths, k, t)
                   for k, w in widths.items() if (t := new_width(w, cluster)) is not None}
        if not options:
            break
        if in_step >= per_step or (step_macs is not None and step_saved >= step_macs):
            if len(out) >= max_steps:
                break
            out.append(sum(widths.values()))
            saved_after.append(saved)
            in_step, step_saved = 0, 0.0
        k = (max if biggest_first else min)(options, key=options.get)
        saved += options[k]
        step_saved += options[k]
        in_step += 1
        widths[k] = new_width(widths[k], cluster)
    saved_after[:] = saved_after[1:] + [saved] if out else []  # entry i: saved after step i+1
    return out


def estimate_prune_time(model: nn.Module, spec: InputSpec | ModelSpec, n_val: int, config, rates: Rates | None = None,
                        total_macs: float | None = None, n_train: int | None = None) -> Estimate:
    """Expected duration of ``core.prune.run_pruning(model, data, config)`` (formula in the module docstring).

    ``n_val``: validation images (each step evaluates all of them); ``config``: a ``PruneConfig`` (any
    object with its fields); ``rates``: from :func:`measure_rates` (measured now when None);
    ``total_macs``: the model's MACs (counted when None); ``n_train``: training images, for the recoveries and
    the control (left out when None). The CAR method is ``config.car`` (``PruneConfig``), else
    ``config.car_method``, else ``exact``. With ``config.clusters_per_step`` k, a step removes k clusters for
    one fine-tuning and measurement; the steps where k clusters together break the threshold (one more
    attempt each, then k halves) are not foreseen, so the high end can be short for a tight threshold.
    """
    ispec = spec.input if isinstance(spec, ModelSpec) else spec
    if rates is None:
        precision = resolve_precision(getattr(config, "train_precision", "fp32"), "cpu")  # timed here, on the CPU
        rates = measure_rates(model, ispec, config.batch_size, config.latency, precision)
    graph = PruningGraph(copy.deepcopy(model).eval(), ispec.shape(1))
    groups = [g for g in graph.groups() if not g.left_alone]
    if total_macs is None:
        total_macs = count_macs_params(model, ispec)[0]
    images = min(config.score_images, n_val)
    n_filters = sum(g.width for g in groups)
    sens_points = sum(sum(1 for f in SENSITIVITY_FRACTIONS if 0 < round(f * g.width) < g.width) for g in groups)
    budget = (1 - config.mac_target) * total_macs if config.mac_target is not None else math.inf

    def evaluation() -> tuple[float, float]:
        return _scaled(rates.forward_image, n_val)

    def latency() -> tuple[float, float]:
        if not config.latency:
            return 0.0, 0.0
        runs = config.latency_runs + LATENCY_WARMUP
        return rates.ov_setup[0] + runs * rates.ov_inference[0], rates.ov_setup[1] + runs * rates.ov_inference[1]

    breakdown: dict[str, tuple[float, float]] = {"original: evaluation and latency": _add(evaluation(), latency())}
    if config.analyse_car:
        if getattr(config, "car", getattr(config, "car_method", "exact")) == "fast":
            exact = math.ceil(FAST_EXACT_FRACTION * n_filters)
            analysis = _add(_scaled(rates.screen_image, images), _scaled(rates.ablation_image, (exact + sens_points) * images))
        else:
            analysis = _scaled(rates.ablation_image, (n_filters + sens_points) * images)
        breakdown["original: CAR analysis"] = analysis
    per_step = getattr(config, "clusters_per_step", 1)  # k clusters a step: one fine-tuning and measurement for k
    step_macs = getattr(config, "step_macs", None)
    step_macs = None if step_macs is None else step_macs * total_macs
    saved = ([], [])
    macs = MacModel(graph.model, ispec, groups)
    low_widths, high_widths = (_step_widths(groups, config.cluster, budget, config.max_steps, biggest, per_step,
                                            step_macs, saved[end], macs) for end, biggest in ((0, True), (1, False)))
    attempts = (1, min(config.patience + 1, 2))
    per_attempt = _add(_scaled(rates.train_step, config.finetune_steps), evaluation(), latency())
    scoring, tries = [0.0, 0.0], [0.0, 0.0]
    step_seconds: tuple[list[float], list[float]] = ([], [])
    for end, widths in enumerate((low_widths, high_widths)):
        for i, width in enumerate(widths):
            cost = _step_scoring(config, rates, width, len(groups), images, i)[end]
            scoring[end] += cost
            tries[end] += attempts[end] * per_attempt[end]
            step_seconds[end].append(cost + attempts[end] * per_attempt[end])
    before_steps = tuple(sum(v[end] for v in breakdown.values()) for end in (0, 1))
    stall = _stall_seconds(config, rates, n_train)  # the slow end: every step stalls and is recovered
    breakdown["steps: scoring"] = (scoring[0], scoring[1])
    breakdown["steps: fine-tuning, evaluation, latency"] = (tries[0], tries[1])
    if n_train and getattr(config, "recover_epochs", 0):
        epoch = _scaled(rates.train_step, math.ceil(n_train / config.batch_size))
        # a stretch recovers STRETCH_EPOCHS times as long, and any of the recoveries may be one; the last step's is not
        per_recovery = STRETCH_EPOCHS if getattr(config, "stretch", False) else 1
        recoveries = config.recover_epochs * (config.max_recoveries * per_recovery + 1)
        breakdown["recoveries when the threshold stalls the run"] = (0.0, recoveries * epoch[1])
        if getattr(config, "control", False):
            batches = [len(w) * config.finetune_steps for w in (low_widths, high_widths)]
            breakdown["control: the original trained alike"] = (
                _scaled(rates.train_step, batches[0])[0],
                _scaled(rates.train_step, batches[1])[1] + recoveries * epoch[1])
    low = sum(v[0] for v in breakdown.values())
    high = sum(v[1] for v in breakdown.values())
    limit = getattr(config, "time_budget", None)
    buys = None
    if limit is not None:  # the run stops before a step would pass its budget
        low, high = min(low, limit * 60.0), min(high, limit * 60.0)
        buys = _budget_buys(limit * 60.0, before_steps, (step_seconds[0], [t + stall for t in step_seconds[1]]),
                            saved, total_macs, _budget_reserve(config, rates, n_train))
    return Estimate(low, high, breakdown, (len(low_widths), len(high_widths)), rates, buys)


def _budget_reserve(config, rates: Rates, n_train: int | None) -> tuple[tuple[float, float], tuple[float, float]]:
    """What a budgeted run keeps back after its last step (``core.engine.time_to_finish``), as (seconds in any
    case, seconds per step taken), low and high: the last step's recovery, and with the control that recovery
    again plus each step's fine-tuning mini-batches repeated."""
    fixed, per_step = (0.0, 0.0), (0.0, 0.0)
    if n_train and getattr(config, "recover_epochs", 0):
        recovery = _scaled(rates.train_step, config.recover_epochs * math.ceil(n_train / config.batch_size))
        fixed = _add(fixed, recovery, recovery) if getattr(config, "control", False) else recovery
    if getattr(config, "control", False):
        per_step = _scaled(rates.train_step, config.finetune_steps)
    return fixed, per_step


def _stall_seconds(config, rates: Rates, n_train: int | None) -> float:
    """Slowest seconds a stalled step adds: its recovery (with stretches on, a stretch's at its longest,
    ``RETRY_STRETCH_EPOCHS`` x ``STRETCH_EPOCHS`` x ``recover_epochs``, the longest a stall can repeat; only the
    run's last stretch may take longer, ``core.engine.LAST_STRETCH_EPOCHS``) and, with the control, the control's repeat of
    it. Why the slow end of what a budget buys counts one per step: on our ResNet-20 and ResNet-56 uploads
    (``bench/real_cifar.py --upload``) the default flow recovered after every second step or so, and the recoveries
    took more than half of the loop's time."""
    if not n_train or not getattr(config, "recover_epochs", 0):
        return 0.0
    epochs = config.recover_epochs * (STRETCH_EPOCHS * RETRY_STRETCH_EPOCHS if getattr(config, "stretch", False) else 1)
    seconds = epochs * math.ceil(n_train / config.batch_size) * rates.train_step[1]
    return seconds * (2 if getattr(config, "control", False) else 1)


def _budget_buys(limit_s: float, before_steps: tuple[float, float], step_seconds: tuple[list[float], list[float]],
                 saved: tuple[list[float], list[float]], total_macs: float,
                 reserve: tuple[tuple[float, float], tuple[float, float]] = ((0.0, 0.0), (0.0, 0.0))) -> dict:
    """What a time budget is expected to buy at each end of the estimate: the steps that finish within it, with
    the time the run keeps back for its last recovery and the control (``reserve``: :func:`_budget_reserve`),
    and the fraction of the original MACs left after them. ``step_seconds`` include whatever recoveries an end
    counts (the caller's choice); the threshold can stop a run sooner than either end."""
    out = {}
    fixed, per_step = reserve
    for end, name in ((0, "fast"), (1, "slow")):
        elapsed, steps = before_steps[end], 0
        for seconds in step_seconds[end]:
            if elapsed + seconds + fixed[end] + (steps + 1) * per_step[end] > limit_s:
                break
            elapsed += seconds
            steps += 1
        left = 1.0 - (saved[end][steps - 1] / total_macs if steps else 0.0)
        out[name] = {"steps": steps, "mac_fraction": left}
    return out


def _step_scoring(config, rates: Rates, n_filters: int, n_groups: int, images: int, step_index: int) -> tuple[float, float]:
    """Seconds to score one step's filters and rank its candidate clusters: the work the criterion says it
    does (``core.criteria.Criterion.scoring_work``) at the measured rate of that work."""
    kind, count = criteria.get(config.criterion, config.task).scoring_work(config, n_filters, n_groups, images,
                                                                         step_index)
    return _scaled(getattr(rates, kind), count) if kind else (0.0, 0.0)


def _add(*pairs: tuple[float, float]) -> tuple[float, float]:
    return sum(p[0] for p in pairs), sum(p[1] for p in pairs)
