"""Batched, exact emulation of filter removal: the engine under CAR.

Removing a filter is emulated by zeroing the input channels that read it (see ``groups``). To make
one CAR score per filter affordable, the model is traced with ``torch.fx`` and split per group:

* the part of the network that does not depend on the group's consumers (the *prefix*, including
  skip branches computed before them) runs once per image chunk and is cached;
* the rest (the *suffix*) is re-run per ablation with a per-sample channel mask (ablations can be
  stacked along the batch axis; on CPUs a batch of ~64 images in all is fastest, so with the default
  chunk of 64 images each suffix pass holds one ablation);
* eval-mode BatchNorm is folded into the conv before it in the traced copy;
* a consumer conv whose input comes from the prefix is not re-run at all: its ablated output is the
  cached output minus the contribution of the removed channel (a conv of that one channel).

Models that ``torch.fx`` cannot trace fall back to the naive way (hooks, one full pass per filter),
which gives the same numbers, only slower.
"""
from __future__ import annotations

import copy
import operator
import threading
from typing import Callable

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from .errors import CancelledError

Ablation = dict[str, list[int]]  # consumer layer name -> its input channels to zero
_INPLACE_FUNCS = {operator.iadd: operator.add, operator.isub: operator.sub, operator.imul: operator.mul,
                  operator.itruediv: operator.truediv, torch.relu_: torch.relu}
_BASE_BUDGET_BYTES = 384 * 1024**2
# Measured on 2 CPU cores (bench/car_speed.py): batches of ~64 images keep activations in cache and
# beat larger ones by 2-4x, for the naive path and ours alike; stacking ablations beyond that only
# adds memory traffic, so a suffix batch holds about this many images in all.
_CHUNK_IMAGES = 64
_SUFFIX_BATCH_IMAGES = 64


class AblationEngine:
    """Predictions of a model under many channel ablations, on a fixed set of normalised images."""

    def __init__(self, model: nn.Module, inputs: torch.Tensor, chunk: int | None = None):
        self.model = model.eval()
        self.inputs = inputs
        self.gm = self._trace(model)
        self.fast = self.gm is not None
        self._per_image_bytes = self._measure_node_bytes() if self.fast else 0
        self.chunk = chunk or max(8, min(_CHUNK_IMAGES, _BASE_BUDGET_BYTES // max(self._per_image_bytes, 1))) if self.fast else (chunk or _CHUNK_IMAGES)
        self._taint_cache: dict[frozenset, tuple[set, dict]] = {}

    # -- setup ---------------------------------------------------------------------------------------

    @staticmethod
    def _trace(model: nn.Module) -> torch.fx.GraphModule | None:
        try:
            gm = torch.fx.symbolic_trace(copy.deepcopy(model))
        except Exception:
            return None
        for m in gm.modules():
            if hasattr(m, "inplace"):
                m.inplace = False  # cached prefix values must never be overwritten in place
        gm.eval()
        try:  # fold eval-mode BatchNorm into the conv before it: one op less per layer, same function
            from torch.fx.experimental.optimization import fuse

            gm = fuse(gm, inplace=True)
        except Exception:
            pass
        return gm

    def _measure_node_bytes(self) -> int:
        env = self._run_base(self.inputs[:1])
        return sum(v.numel() * v.element_size() for v in env.values() if isinstance(v, torch.Tensor))

    @property
    def nodes(self) -> list[torch.fx.Node]:
        return list(self.gm.graph.nodes)

    # -- execution of fx nodes -----------------------------------------------------------------------

    def _exec(self, node: torch.fx.Node, args, kwargs):
        if node.op == "call_module":
            return self.gm.get_submodule(node.target)(*args, **kwargs)
        if node.op == "call_function":
            fn = _INPLACE_FUNCS.get(node.target, node.target)
            if kwargs.get("inplace"):
                kwargs = {**kwargs, "inplace": False}
            return fn(*args, **kwargs)
        if node.op == "call_method":
            name = node.target
            if name.endswith("_") and not name.startswith("_") and hasattr(torch.Tensor, name[:-1]):
                name = name[:-1]
            return getattr(args[0], name)(*args[1:], **kwargs)
        if node.op == "get_attr":
            obj = self.gm
            for part in node.target.split("."):
                obj = getattr(obj, part)
            return obj
        raise RuntimeError(f"unexpected fx node {node.op}")

    @torch.no_grad()
    def _run_base(self, x: torch.Tensor) -> dict:
        env: dict = {}
        for node in self.gm.graph.nodes:
            if node.op == "placeholder":
                env[node] = x
            elif node.op == "output":
                env[node] = torch.fx.node.map_arg(node.args[0], lambda n: env[n])
            else:
                args = torch.fx.node.map_arg(node.args, lambda n: env[n])
                kwargs = torch.fx.node.map_arg(node.kwargs, lambda n: env[n])
                env[node] = self._exec(node, args, kwargs)
        return env

    def _taint(self, consumers: frozenset) -> tuple[set, dict]:
        """Nodes downstream of the consumers (re-run per ablation) and, per node, its last use."""
        if consumers in self._taint_cache:
            return self._taint_cache[consumers]
        tainted: set = set()
        for node in self.gm.graph.nodes:
            if (node.op == "call_module" and node.target in consumers) or any(a in tainted for a in node.all_input_nodes):
                tainted.add(node)
        order = {n: i for i, n in enumerate(self.gm.graph.nodes)}
        last_use = {n: max((order[u] for u in n.users), default=order[n]) for n in tainted}
        self._taint_cache[consumers] = (tainted, last_use)
        return tainted, last_use

    @torch.no_grad()
    def _run_suffix(self, base: dict, ablations: list[Ablation], n: int) -> torch.Tensor:
        """Logits (K, n, classes) of the K ablations, re-running only the tainted nodes."""
        k = len(ablations)
        consumers = frozenset(c for a in ablations for c in a)
        tainted, last_use = self._taint(consumers)
        order = {nd: i for i, nd in enumerate(self.gm.graph.nodes)}
        env: dict = {}

        def value(arg: torch.fx.Node):
            if arg in tainted:
                return env[arg]
            v = base[arg]
            if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == n and _is_batched(arg):
                return v.repeat(k, *([1] * (v.dim() - 1)))
            return v

        for node in self.gm.graph.nodes:
            if node not in tainted:
                continue
            if node.op == "output":
                out = torch.fx.node.map_arg(node.args[0], value)
                break
            if node.op == "call_module" and node.target in consumers:
                env[node] = self._consumer(node, base, env, tainted, ablations, n)
            else:
                args = torch.fx.node.map_arg(node.args, value)
                kwargs = torch.fx.node.map_arg(node.kwargs, value)
                env[node] = self._exec(node, args, kwargs)
            i = order[node]
            for done in [m for m in env if last_use[m] <= i and m is not node]:
                del env[done]
        else:  # the output does not depend on these consumers: every ablation predicts the baseline
            out = base[list(self.gm.graph.nodes)[-1]]
            out = out.repeat(k, 1)
        if isinstance(out, (tuple, list)):
            out = out[0]
        return out.reshape(k, n, -1)

    def _consumer(self, node, base, env, tainted, ablations, n):
        module = self.gm.get_submodule(node.target)
        arg = node.args[0]
        k = len(ablations)
        idx_lists = [a.get(node.target, []) for a in ablations]
        if arg not in tainted:
            x = base[arg]
            delta = _delta(module, x, idx_lists)
            if delta is not None:
                y = base[node]
                return (y.unsqueeze(0) - delta).reshape(k * n, *y.shape[1:])
            x = x.repeat(k, *([1] * (x.dim() - 1)))
        else:
            x = env[arg]
        axis = channel_axis(module, x)
        mask = torch.ones((k, x.shape[axis]), dtype=x.dtype, device=x.device)
        for j, idxs in enumerate(idx_lists):
            if idxs:
                mask[j, idxs] = 0
        shape = [k] + [1] * x.dim()
        shape[1 + axis % x.dim()] = x.shape[axis]
        x = (x.reshape(k, n, *x.shape[1:]) * mask.reshape(shape)).reshape(x.shape)
        return module(x)

    # -- public API ----------------------------------------------------------------------------------

    @torch.no_grad()
    def baseline_logits(self) -> torch.Tensor:
        """Logits ``[N, classes]`` of the unablated model, on the CPU."""
        return torch.cat([self.model(self.inputs[i:i + self.chunk]).cpu()
                          for i in range(0, len(self.inputs), self.chunk)])

    def predictions(self, ablations: list[Ablation], progress: Callable[[int], None] | None = None,
                    cancel: threading.Event | None = None, fast: bool = True) -> torch.Tensor:
        """Predicted class (len(ablations), N) of every image under every ablation."""
        return self.evaluate(ablations, None, progress, cancel, fast)[0]

    def evaluate(self, ablations: list[Ablation], labels: torch.Tensor | None,
                 progress: Callable[[int], None] | None = None, cancel: threading.Event | None = None,
                 fast: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Predictions (len(ablations), N) and, given labels, the mean cross-entropy per ablation.

        The loss is a finer signal than accuracy: on a small, well-classified image set most filters
        change no prediction, and their loss increase is what still tells them apart.
        """
        preds = torch.empty((len(ablations), len(self.inputs)), dtype=torch.long)
        loss = torch.zeros(len(ablations)) if labels is not None else None
        if not ablations:
            return preds, loss

        def account(ids, start: int, logits: torch.Tensor) -> None:
            preds[ids, start:start + logits.shape[1]] = logits.argmax(-1)
            if loss is not None:
                y = labels[start:start + logits.shape[1]]
                ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y.repeat(logits.shape[0]), reduction="none")
                loss[ids] += ce.reshape(logits.shape[0], -1).sum(1)

        def reset() -> None:
            preds.zero_()
            if loss is not None:
                loss.zero_()

        self.run(ablations, account, progress, cancel, fast, reset)
        if loss is not None:
            loss /= len(self.inputs)
        return preds, loss

    def run(self, ablations: list[Ablation], account: Callable[[list[int], int, torch.Tensor], None],
            progress: Callable[[int], None] | None = None, cancel: threading.Event | None = None,
            fast: bool = True, reset: Callable[[], None] | None = None) -> None:
        """Feed the model's outputs under every ablation to ``account(ids, start, outputs)``.

        ``outputs`` is [len(ids), n, *output] for ablations ``ids`` on images ``start:start + n`` (the
        output flattened per image on the fast path). The fast path (cached prefix, batched suffix)
        falls back to one full pass per ablation when the traced graph cannot run split; ``reset()``
        is then called first, so that what ``account`` accumulated from the failed attempt is cleared.
        """
        device_account = account

        def account(ids, start, outputs):  # outputs of a GPU model are accounted for on the CPU
            device_account(ids, start, outputs.cpu())

        if fast and self.fast:
            try:
                self._evaluate_fast(ablations, account, progress, cancel)
            except (RuntimeError, ValueError, TypeError):
                # A traced graph can bake in batch sizes (MaxViT's window partition): the split
                # run fails where the model itself works. Same numbers the naive way, only slower.
                self.fast = False
                if reset:
                    reset()
        if not (fast and self.fast):
            self._evaluate_naive(ablations, account, progress, cancel)

    def _evaluate_fast(self, ablations, account, progress, cancel) -> None:
        by_signature: dict[frozenset, list[int]] = {}
        for i, a in enumerate(ablations):
            by_signature.setdefault(frozenset(a), []).append(i)
        done = 0
        for start in range(0, len(self.inputs), self.chunk):
            x = self.inputs[start:start + self.chunk]
            n = len(x)
            base = self._run_base(x)
            batch_k = max(1, _SUFFIX_BATCH_IMAGES // n)
            for members in by_signature.values():
                for b in range(0, len(members), batch_k):
                    if cancel is not None and cancel.is_set():
                        raise CancelledError("Cancelled.")
                    ids = members[b:b + batch_k]
                    account(ids, start, self._run_suffix(base, [ablations[i] for i in ids], n))
                    done += len(ids) * n
                    if progress:
                        progress(done)
            del base

    @torch.no_grad()
    def _evaluate_naive(self, ablations, account, progress, cancel) -> None:
        """One full forward pass per ablation, with hooks zeroing the consumers' inputs."""
        for i, ablation in enumerate(ablations):
            if cancel is not None and cancel.is_set():
                raise CancelledError("Cancelled.")
            with zeroed_inputs(self.model, ablation):
                for s in range(0, len(self.inputs), self.chunk):
                    account([i], s, self.model(self.inputs[s:s + self.chunk]).unsqueeze(0))
            if progress:
                progress((i + 1) * len(self.inputs))


def _is_batched(node: torch.fx.Node) -> bool:
    """Whether a node's value carries the batch axis (it depends on the input image)."""
    seen, stack = set(), [node]
    while stack:
        nd = stack.pop()
        if nd.op == "placeholder":
            return True
        if nd in seen:
            continue
        seen.add(nd)
        stack.extend(nd.all_input_nodes)
    return False


def channel_axis(module: nn.Module, x: torch.Tensor) -> int:
    """Where a consumer reads its input channels: a Linear reads the last axis (also on the
    channels-last tensors of ConvNeXt or the tokens of a ViT), a conv reads axis 1."""
    return -1 if isinstance(module, nn.Linear) else 1


def _delta(module: nn.Module, x: torch.Tensor, idx_lists: list[list[int]]) -> torch.Tensor | None:
    """Contribution (K, N, ...) of the ablated input channels to a consumer's output, or None if not
    computable this way (grouped conv, unequal channel counts, non-zero padding mode)."""
    sizes = {len(i) for i in idx_lists}
    if len(sizes) != 1 or 0 in sizes:
        return None
    k, m = len(idx_lists), sizes.pop()
    idx = torch.tensor(idx_lists, dtype=torch.long, device=x.device)  # (K, m)
    if isinstance(module, nn.Conv2d):
        if module.groups != 1 or module.padding_mode != "zeros" or isinstance(module.padding, str):
            return None
        xs = x[:, idx.reshape(-1)]  # (N, K*m, H, W)
        w = module.weight[:, idx]  # (Cout, K, m, kh, kw)
        w = w.permute(1, 0, 2, 3, 4).reshape(k * module.out_channels, m, *module.kernel_size)
        d = F.conv2d(xs, w, None, module.stride, module.padding, module.dilation, groups=k)
        n = x.shape[0]
        return d.reshape(n, k, module.out_channels, *d.shape[2:]).transpose(0, 1)
    if isinstance(module, nn.Linear) and x.dim() == 2:
        xs = x[:, idx]  # (N, K, m)
        w = module.weight[:, idx].permute(1, 0, 2)  # (K, out, m)
        return torch.einsum("nkm,kom->kno", xs, w)
    return None


class zeroed_inputs:
    """Context manager: forward pre-hooks that zero the given input channels of the given layers."""

    def __init__(self, model: nn.Module, ablation: Ablation):
        self.model, self.ablation, self.handles = model, ablation, []

    def __enter__(self):
        for name, idxs in self.ablation.items():
            if not idxs:
                continue
            module = self.model.get_submodule(name)
            index = torch.tensor(idxs, dtype=torch.long)

            def hook(mod, args, index=index):
                x = args[0].clone()
                x.index_fill_(channel_axis(mod, x) % x.dim(), index.to(x.device), 0)
                return (x, *args[1:])

            self.handles.append(module.register_forward_pre_hook(hook))
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        return False
