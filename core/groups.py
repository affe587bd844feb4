"""Coupled channel groups from Torch-Pruning's DependencyGraph, and safe structural surgery on them.

A *group* is a set of channels that must be removed together (a residual stream, a depthwise pair,
a concatenation); each channel index of a group is one *filter* of PruneScope. For every filter we
keep which input channels of which conv/linear layers read it: zeroing exactly those inputs
emulates removing the filter, which is how CAR is measured without surgery.

Torch-Pruning is trusted for the bookkeeping, not blindly: after every structural change the model
is run and its output shape checked, and a change that breaks it is undone and reported.
"""
from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass, field

import torch
import torch_pruning as tp
from torch import nn

from .errors import PruneScopeError, SettingsError
from .shortcuts import convert_zero_pad_shortcuts, is_shortcut_embedding, refreeze


@dataclass
class ChannelGroup:
    """One prunable group: its root layer, width, and for each filter the consumer inputs that read it."""

    gid: int
    root: str  # name of the layer whose output channels define the group
    width: int
    producers: list[str]  # layers whose output channels are removed with the group
    consumers: dict[str, list[list[int]]] = field(default_factory=dict)  # layer -> per filter, its input indices
    macs_per_filter: float = 0.0  # MACs saved per removed filter (from the traced shapes)
    left_alone: str | None = None  # why this group is never pruned (a structure surgery cannot handle)
    # the name a user knows the group by: its first convolution in model order that is not a frozen
    # shortcut embedding (core.shortcuts); empty = the root
    display: str = ""

    @property
    def label(self) -> str:
        return group_label(self)

    def ablation(self, filters: list[int]) -> dict[str, list[int]]:
        """The consumer inputs to zero to emulate removing ``filters``."""
        return {name: sorted({i for f in filters for i in per_filter[f]}) for name, per_filter in self.consumers.items()}

    def to_dict(self) -> dict:
        return {"gid": self.gid, "root": self.root, "width": self.width, "producers": self.producers,
                "consumers": sorted(self.consumers), "macs_per_filter": self.macs_per_filter,
                "left_alone": self.left_alone, "display": self.display}


def group_display_name(group: ChannelGroup | dict) -> str:
    """The layer a user knows a group by (a ``ChannelGroup`` or its ``to_dict()``).

    The dependency graph may root a residual stream at the frozen 1x1 embedding that stands in for an
    option-A shortcut (``layer3.0.shortcut``), a layer that is not in the user's model; the group is
    then named by its first real convolution (``layer3.0.conv2``). Group dicts written before this was
    recorded fall back to the root.
    """
    if isinstance(group, dict):
        return group.get("display") or group["root"]
    return group.display or group.root


def group_label(group: ChannelGroup | dict) -> str:
    """``'layer3.0.conv2'`` or ``'layer3.0.conv2 (+3 coupled)'``: the display name and how many layers share it."""
    producers = group["producers"] if isinstance(group, dict) else group.producers
    name = group_display_name(group)
    return name if len(producers) <= 1 else f"{name} (+{len(producers) - 1} coupled)"


def removal_group(removed: dict, groups: list[dict] | None = None) -> dict:
    """The group dict (root, display, producers) a step's ``removed`` record (``history.jsonl``) took filters from.

    The record names its group by the internal root; records since issue 16 also carry the display name.
    For older ones the group is looked up in ``groups`` (a CAR result's ``groups``, matched by root) when given.
    """
    for g in groups or []:
        if g.get("root") == removed.get("group"):
            return g
    return {"root": removed.get("group", "?"), "display": removed.get("display", ""),
            "producers": removed.get("producers") or [removed.get("group", "?")]}


def removal_label(removed: dict, groups: list[dict] | None = None) -> str:
    """:func:`group_label` of the group a step's ``removed`` record took filters from (see :func:`removal_group`)."""
    return group_label(removal_group(removed, groups))


class UnsupportedModelError(PruneScopeError):
    """The dependency graph cannot be built: no group of this model can be pruned safely."""


class UnsafeGroupError(PruneScopeError):
    """Torch-Pruning's surgery on this group does not do what removing the filters means."""


class PruningGraph:
    """A model with its dependency graph; the only place that changes a model's structure.

    Building one converts zero-padded shortcuts in place (see ``shortcuts``); ``notes`` says where.
    """

    def __init__(self, model: nn.Module, input_shape: tuple[int, ...], history: list | None = None,
                 output_layers: list[str] | None = None):
        """``output_layers``: layers whose outputs are the model's outputs (a detector's head convs);
        by default the last conv/linear layer executed (a classifier's)."""
        self.model = model.eval()
        self.output_layer_names = list(output_layers) if output_layers else None
        self.input_shape = tuple(input_shape)
        self.notes = convert_zero_pad_shortcuts(self.model, self.input_shape)
        self.example = torch.zeros(self.input_shape)
        # Zeros hide wrong channel bookkeeping (a zero channel moved is still zero); a fixed random
        # probe does not.
        self.probe = torch.randn((2, *self.input_shape[1:]), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            self.output_shape = tuple(self.model(self.example).shape)
        self.output_layers = self._output_layers()
        self.history: list = list(history or [])
        self._build()

    # -- graph ---------------------------------------------------------------------------------------

    def _build(self) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:  # the graph is traced through autograd, so it must work inside a caller's no_grad
                with torch.enable_grad(), _deep_shape_inference():
                    self.dg = tp.DependencyGraph().build_dependency(self.model, example_inputs=self.example,
                                                                    verbose=False)
            except Exception as exc:  # Torch-Pruning's tracer has no error types of its own
                if isinstance(exc, MemoryError) or "allocate memory" in str(exc):
                    raise PruneScopeError("Not enough memory to trace this model's channel dependencies; "
                                          "close other work or use a machine with more memory.") from exc
                raise UnsupportedModelError(
                    f"This model is not supported for pruning: Torch-Pruning cannot follow its channels "
                    f"({type(exc).__name__}: {str(exc)[:160]}). Typical cause: a reshape that mixes channels, "
                    "such as ShuffleNet's channel shuffle."
                ) from exc
        self.dg._pruning_history = [list(h) for h in self.history]
        self.names = {m: n for n, m in self.model.named_modules()}

    def _output_layers(self) -> list[nn.Module]:
        """The last conv/linear layers executed: their outputs are the classes and are never pruned."""
        if self.output_layer_names:
            return [self.model.get_submodule(n) for n in self.output_layer_names]
        order: list[nn.Module] = []
        self._forward_with_hooks(lambda mod, i, o: order.append(mod))
        if not order:
            raise PruneScopeError("The model has no Conv2d or Linear layer: nothing to prune.")
        return [order[-1]]

    def _forward_with_hooks(self, hook) -> None:
        """One forward pass of the example input with ``hook`` on every conv/linear layer."""
        handles = [m.register_forward_hook(hook) for m in self.model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
        try:
            with torch.no_grad():
                self.model(self.example)
        finally:
            for h in handles:
                h.remove()

    def groups(self) -> list[ChannelGroup]:
        """Every prunable group, with per-filter consumer indices and MACs per filter.

        Groups whose channel bookkeeping is inconsistent (see :func:`_mistracked`) are not returned:
        their emulated removal would be wrong. They, and every layer no group covers, are in
        :meth:`left_alone` with the reason.
        """
        shapes = self._conv_output_sizes()
        out = []
        self._dropped: dict[str, str] = {}
        ignored = list(self.output_layers)
        for g in self._all_groups(ignored):
            if isinstance(g, ChannelGroup):  # a root whose dependencies never settle
                g.gid = len(out)
                out.append(g)
                continue
            group = self._channel_group(g, len(out), shapes)
            problem = self._mistracked(g) if group is not None else None
            if group is not None and group.consumers and problem is None:
                out.append(group)
            else:
                self._note_dropped(g, group, problem)
        return self._in_network_order(out, shapes)

    def _in_network_order(self, groups: list[ChannelGroup], shapes: dict) -> list[ChannelGroup]:
        """``groups`` sorted by when the layer they are named by (:func:`group_display_name`) runs in the forward
        pass, and renumbered: the dependency graph yields them from the output backwards (a stream rooted at its
        last shortcut first), but every layer list, heat map and plan a user reads runs first layer first
        (issue 16)."""
        executed = {self.names.get(m): i for i, m in enumerate(shapes)}  # dict order = forward order
        ordered = sorted(groups, key=lambda g: executed.get(group_display_name(g), len(executed)))
        for gid, g in enumerate(ordered):
            g.gid = gid
        return ordered

    def _note_dropped(self, g, group: ChannelGroup | None, problem: str | None) -> None:
        """Why the producers of a Torch-Pruning group that became no ChannelGroup are left alone."""
        root = self.names.get(g[0].dep.target.module, "?")
        if problem is not None:
            why = problem
        elif group is None:
            why = (f"its channels are coupled with {root}, which has a single output channel (e.g. a broadcast gate "
                   "such as x * sigmoid(gate(x))); Torch-Pruning ties them channel for channel, so removing one "
                   "cannot be done consistently; left alone")
        else:
            why = "no conv or linear layer reads its channels, so removing one cannot be emulated; left alone"
        for item in g.items:
            module = item.dep.target.module
            name = self.names.get(module)
            if name and isinstance(module, (nn.Conv2d, nn.Linear)) and self.dg.is_out_channel_pruning_fn(item.dep.handler):
                self._dropped.setdefault(name, why)

    def _mistracked(self, g) -> str | None:
        """Why a Torch-Pruning group's index bookkeeping cannot be right, or None.

        Torch-Pruning maps the outputs of ``torch.split`` with unequal sizes to the wrong consumers
        (a split [16, 32] gives the 16-channel branch 32 indices and the other branch the wrong 16). Every index
        a consumer reads must exist in that consumer, and every filter must exist in the root.
        """
        split = _split_reason(g)
        if split is not None:
            return split
        root_module = g[0].dep.target.module
        width = _out_width(root_module) or len(g[0].idxs)
        for item in g.items:
            module, fn = item.dep.target.module, item.dep.handler
            if not (self.dg.is_in_channel_pruning_fn(fn) and _is_consumer(module)):
                continue
            n_in = module.in_channels if isinstance(module, nn.Conv2d) else module.in_features
            idxs, roots = list(item.idxs), list(item.root_idxs or [])
            if len(idxs) > n_in or any(int(i) >= n_in for i in idxs) or any(int(r) >= width for r in roots):
                name = self.names.get(module, "?")
                return (f"the dependency graph maps {len(idxs)} of its channels onto {name}, which reads only {n_in} "
                        "(an operation it mis-tracks, e.g. torch.split with unequal sizes); removing filters here "
                        "would not remove what it should, so the group is left alone")
        return None

    def left_alone(self) -> dict[str, str]:
        """Every conv/linear layer with prunable outputs (two or more output channels, not a model output)
        that pruning will not touch, with the reason: groups marked left alone, groups whose bookkeeping is
        wrong, and layers the dependency graph put in no group. Nothing disappears silently."""
        groups = self.groups()
        out = {g.root: g.left_alone for g in groups if g.left_alone}
        covered = {p for g in groups for p in g.producers}
        for name, why in self._dropped.items():
            if name not in covered and (_out_width(self.module(name)) or 0) >= 2:
                out.setdefault(name, why)
        outputs = {id(m) for m in self.output_layers}
        for name, m in self.model.named_modules():
            if (isinstance(m, (nn.Conv2d, nn.Linear)) and id(m) not in outputs and (_out_width(m) or 0) >= 2
                    and name not in covered and name not in out and m in self.dg.module2node):
                out[name] = ("the dependency graph put it in no channel group (its outputs reach the model's output "
                             "through operations it cannot follow); left alone")
        return out

    def _all_groups(self, ignored: list[nn.Module]):
        """Torch-Pruning's ``get_all_groups``, with each group's growth bounded.

        On some attention blocks (Swin's window reshapes) the index propagation never settles and
        eats all memory; such a root is yielded as a ChannelGroup marked left alone instead.
        """
        visited: set[int] = set()
        ignored_ids = {id(m) for m in ignored + list(self.dg.IGNORED_LAYERS_IN_TRACING)}
        for m in list(self.dg.module2node):
            if id(m) in ignored_ids or id(m) in visited or not isinstance(m, (nn.Conv2d, nn.Linear)):
                continue
            pruner = self.dg.get_pruner_of_module(m)
            if pruner is None or pruner.get_out_channels(m) is None:
                continue
            width = pruner.get_out_channels(m)
            try:
                with _bounded_groups():
                    g = self.dg.get_pruning_group(m, pruner.prune_out_channels, list(range(width)))
            except _GroupTooLarge:
                visited.add(id(m))
                yield ChannelGroup(gid=-1, root=self.names.get(m, "?"), width=width, producers=[self.names.get(m, "?")],
                                   left_alone="its channel dependencies do not settle (reshapes across channels, "
                                              "e.g. attention heads or windows); left alone")
                continue
            prunable = True
            for dep, _ in g:
                if self.dg.is_out_channel_pruning_fn(dep.handler):
                    visited.add(id(dep.target.module))
                    if id(dep.target.module) in ignored_ids:
                        prunable = False
            if prunable:
                yield g

    def _channel_group(self, g, gid: int, shapes: dict) -> ChannelGroup | None:
        """Our view of one Torch-Pruning group: producers, per-filter consumer inputs, MACs per filter."""
        root_module = g[0].dep.target.module
        # A group from get_pruning_group lists only the channels to remove; filters index the full width.
        width = _out_width(root_module) or len(g[0].idxs)
        if width < 2:
            return None
        group = ChannelGroup(gid=gid, root=self.names.get(root_module, "?"), width=width, producers=[])
        macs = 0.0
        for item in g.items:
            module, fn = item.dep.target.module, item.dep.handler
            name = self.names.get(module)
            if name is None:
                continue
            if self.dg.is_out_channel_pruning_fn(fn) and isinstance(module, (nn.Conv2d, nn.Linear)):
                if name not in group.producers:
                    group.producers.append(name)
                macs += _macs_per_out_channel(module, shapes.get(module))
            elif self.dg.is_in_channel_pruning_fn(fn) and _is_consumer(module):
                per_filter: list[list[int]] = [[] for _ in range(width)]
                for idx, root_idx in zip(item.idxs, item.root_idxs):
                    if int(root_idx) < width:  # out-of-range indices: a mis-tracked group, refused by _mistracked
                        per_filter[root_idx].append(int(idx))
                group.consumers[name] = per_filter
                macs += _macs_per_in_channel(module, shapes.get(module)) * (len(item.idxs) / width)
        group.macs_per_filter = macs
        group.left_alone = self._grouped_conv_reason(group)
        group.display = self._display_name(group)
        return group

    def _display_name(self, group: ChannelGroup) -> str:
        """The group's first producer in model order that is not a frozen shortcut embedding (else its root)."""
        order = {name: i for i, name in enumerate(self.names.values())}
        real = [p for p in group.producers if not is_shortcut_embedding(self.module(p))]
        return min(real, key=lambda p: order.get(p, len(order))) if real else group.root

    def _grouped_conv_reason(self, group: ChannelGroup) -> str | None:
        """Grouped (not depthwise) convolutions need every conv group to lose the same channels;
        Torch-Pruning's surgery does not keep that, so such groups are left alone."""
        for name in [*group.producers, *group.consumers]:
            m = self.module(name)
            if isinstance(m, nn.Conv2d) and 1 < m.groups and not m.groups == m.in_channels == m.out_channels:
                return (f"{name} is a grouped convolution ({m.groups} groups): removing channels must keep every "
                        "group the same size, which the surgery does not guarantee; left alone")
        return None

    def _conv_output_sizes(self) -> dict[nn.Module, int]:
        """Output positions per channel (H*W for a conv, 1 for a linear layer) of every layer."""
        sizes: dict[nn.Module, int] = {}
        self._forward_with_hooks(lambda mod, i, o: sizes.__setitem__(mod, o[0].numel() // o.shape[1] if o.dim() > 2 else 1))
        return sizes

    def module(self, name: str) -> nn.Module:
        return self.model.get_submodule(name)

    # -- surgery -------------------------------------------------------------------------------------

    def prune(self, root: str, idxs: list[int]) -> None:
        """Remove filters ``idxs`` of the group rooted at ``root``; undo and raise if the model breaks."""
        module = self.module(root)
        if isinstance(module, nn.Conv2d) and 1 < module.groups and not module.groups == module.in_channels == module.out_channels:
            raise UnsafeGroupError(f"{root} is a grouped convolution ({module.groups} groups); it is left alone.")
        pruner = self.dg.get_pruner_of_module(module)
        group = self.dg.get_pruning_group(module, pruner.prune_out_channels, sorted(int(i) for i in idxs))
        if not self.dg.check_pruning_group(group):
            raise SettingsError(f"Removing {len(idxs)} filters from {root} would leave a layer with no channels.")
        idxs = sorted(int(i) for i in idxs)
        expected = self._emulated(group, idxs)
        backup_model = copy.deepcopy(self.model)
        try:
            group.prune()
            refreeze(self.model)
            problem = self.check_runs()
        except Exception as exc:  # the surgery itself failed half-way: the model is in an unknown state
            problem = f"the surgery failed: {type(exc).__name__}: {str(exc)[:160]}"
        if problem is None and expected is not None:
            problem = self._differs_from(expected)
        if problem:
            self.model = backup_model
            self._build()
            raise UnsafeGroupError(f"Pruning {root} broke the model ({problem}); that change was undone "
                                   "and the group is left alone.")
        self.history = [list(h) for h in self.dg.pruning_history()]

    def _emulated(self, tp_group, idxs: list[int]) -> torch.Tensor | None:
        """The output the model must give once ``idxs`` are removed: the original with their reads zeroed."""
        from .ablation import zeroed_inputs

        group = self._channel_group(tp_group, -1, {})
        if group is not None and group.left_alone:
            raise UnsafeGroupError(group.left_alone)
        root = tp_group[0].dep.target.module
        width = _out_width(root) or len(tp_group[0].idxs)
        problem = self._mistracked(self.dg.get_pruning_group(root, tp_group[0].dep.handler, list(range(width))))
        if problem is not None:  # judged on all filters: a few removed ones may happen to look in range
            raise UnsafeGroupError(problem)
        if group is None or not group.consumers:
            return None
        with torch.no_grad(), zeroed_inputs(self.model, group.ablation(idxs)):
            return self.model(self.probe)

    def _differs_from(self, expected: torch.Tensor) -> str | None:
        """Why the pruned model is not the emulated removal, or None if it is (to float precision)."""
        with torch.no_grad():
            got = self.model(self.probe)
        scale = float(expected.abs().max()) + 1e-6
        err = float((got - expected).abs().max())
        if err > 1e-3 * scale:
            return (f"its output differs from the removal it should perform by {err / scale:.1%} of the output's "
                    "range: the dependency graph mis-tracks channels here (e.g. a channel shuffle, a pad or a "
                    "normalisation across channels)")
        return None

    def check_runs(self) -> str | None:
        """None if the model still runs and gives the original output shape, else what went wrong."""
        try:
            with torch.no_grad():
                out = self.model.eval()(self.example)
        except Exception as exc:  # any failure means the surgery produced an inconsistent model
            return f"forward pass fails: {type(exc).__name__}: {str(exc)[:200]}"
        if tuple(out.shape) != self.output_shape:
            return f"output shape {tuple(out.shape)} instead of {self.output_shape}"
        if not torch.isfinite(out).all():
            return "output has NaN or infinite values"
        return None

    def widths(self) -> dict[str, int]:
        """Output channels of every conv/linear layer, for the per-layer before/after view."""
        return {n: (m.out_channels if isinstance(m, nn.Conv2d) else m.out_features)
                for n, m in self.model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}


class _deep_shape_inference:
    """Torch-Pruning infers a concat's input widths by walking back up to 500 nodes and then gives
    up with None, which crashes on deep models (Swin-S/B's patch merging after 18 blocks). A deeper
    walk is cheap; both limits are restored on exit."""

    DEPTH = 5000

    def __enter__(self):
        import sys

        import torch_pruning.dependency.constants as constants

        self.constants, self.depth, self.limit = constants, constants.MAX_RECURSION_DEPTH, sys.getrecursionlimit()
        constants.MAX_RECURSION_DEPTH = max(self.depth, self.DEPTH)
        sys.setrecursionlimit(max(self.limit, 4 * self.DEPTH))
        return self

    def __exit__(self, *exc):
        import sys

        self.constants.MAX_RECURSION_DEPTH = self.depth
        sys.setrecursionlimit(self.limit)
        return False


class _GroupTooLarge(Exception):
    pass


class _bounded_groups:
    """Swap Torch-Pruning's Group for one that stops growing past a bound (restored on exit)."""

    MAX_ITEMS = 4000
    MAX_INDICES = 4_000_000

    def __enter__(self):
        import torch_pruning.dependency.graph as graph_module

        base = graph_module.Group

        class Bounded(base):
            def add_dep(inner, dep, idxs):
                inner._n_idx = getattr(inner, "_n_idx", 0) + len(idxs)
                if len(inner._group) >= self.MAX_ITEMS or inner._n_idx > self.MAX_INDICES:
                    raise _GroupTooLarge()
                super().add_dep(dep, idxs)

        self.module, self.base = graph_module, base
        graph_module.Group = Bounded
        return self

    def __exit__(self, *exc):
        self.module.Group = self.base
        return False


def _split_reason(g) -> str | None:
    """Why a group whose channels pass through torch.split / torch.chunk / unbind cannot be trusted.

    Measured with Torch-Pruning 1.x: after ``torch.split(x, [24, 24])`` the first 24 filters are mapped
    to the second branch and vice versa; with ``[16, 32]`` the 16-channel branch is given 32 indices.
    So neither the emulated removal (CAR) nor the surgery would be right; besides, the split positions
    are numbers fixed in the model's forward and would cut in the wrong place after surgery.
    """
    for item in g.items:
        op = item.dep.target.module
        if isinstance(op, (tp.ops._SplitOp, tp.ops._UnbindOp)):
            sizes = getattr(op, "split_sizes", None)
            shown = f" (sizes {list(sizes)})" if sizes else ""
            return (f"its channels pass through torch.split / torch.chunk{shown}, which the dependency graph maps to "
                    "the wrong branches, and whose split positions are fixed in the model's forward; neither its "
                    "CAR nor its removal could be right, so it is left alone")
    return None


def _out_width(module: nn.Module) -> int | None:
    if isinstance(module, nn.Conv2d):
        return module.out_channels
    if isinstance(module, nn.Linear):
        return module.out_features
    return None


def _is_consumer(module: nn.Module) -> bool:
    """Layers whose input channels we zero to emulate removal (depthwise convs are producers instead)."""
    if isinstance(module, nn.Linear):
        return True
    return isinstance(module, nn.Conv2d) and not (module.groups == module.in_channels and module.groups > 1)


def _macs_per_out_channel(module: nn.Module, spatial: int | None) -> float:
    spatial = spatial or 1
    if isinstance(module, nn.Conv2d):
        kh, kw = module.kernel_size
        return spatial * (module.in_channels // module.groups) * kh * kw
    return float(module.in_features)


def _macs_per_in_channel(module: nn.Module, spatial: int | None) -> float:
    spatial = spatial or 1
    if isinstance(module, nn.Conv2d):
        kh, kw = module.kernel_size
        return spatial * module.out_channels * kh * kw / module.groups
    return float(module.out_features)


def rebuild_pruned(fresh_model: nn.Module, input_shape: tuple[int, ...], history: list,
                   state_dict: dict | None = None, output_layers: list[str] | None = None) -> nn.Module:
    """Replay a Torch-Pruning history on a freshly built model, then load the step's weights."""
    pg = PruningGraph(fresh_model, input_shape, output_layers=output_layers)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pg.dg.load_pruning_history([list(h) for h in history])
    refreeze(pg.model)
    if state_dict is not None:
        pg.model.load_state_dict(state_dict)
    problem = pg.check_runs()
    if problem:
        raise PruneScopeError(f"The rebuilt model does not run: {problem}")
    return pg.model.eval()
