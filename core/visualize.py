"""Filter images, top-activating patches, activation maps and the plotly figures of every page.

Pure functions: images come back as PIL images, charts as plotly figures; nothing here imports
streamlit, so the CLI and the tests use the same code as the pages.

Conventions of the figures: accuracy in percent, CAR and accuracy drops in accuracy points (one point
= one percentage point), MACs in millions (M), latency in milliseconds. CAR results may be given as a
:class:`core.car.CarResult` or as its ``to_dict()`` form (``car.json`` of a run folder).

A *filter* is one output channel of a producer conv layer (a group's root or any of its coupled
producers: they share channel indices). Its activation is read after the BatchNorm that directly
follows the conv when there is one (what the next layer really sees, up to the ReLU), else at the
conv output.
"""
from __future__ import annotations

import math
from typing import Any, Iterable

import numpy as np
import plotly.graph_objects as go
import torch
from PIL import Image
from plotly.subplots import make_subplots
from torch import nn

from .car import CarResult
from .data import ImageSet, normalize
from .errors import SettingsError
from .groups import group_label  # every group a user reads is named by the layer they know (issue 16)
from .models import InputSpec
from .runs import removals, select_step
from .shortcuts import is_shortcut_embedding

MAX_PATCH_IMAGES = 256  # images scanned for top-activating patches
_BATCH = 64
_PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
            "#bcbd22", "#17becf")

# ----------------------------------------------------------------------------- formatting


def format_macs(n: float | int | None) -> str:
    """Multiply-accumulates as '26.7 M' / '1.23 G' / '512.0 K'."""
    if n is None or (isinstance(n, float) and math.isnan(n)):
        return "—"
    n = float(n)
    if abs(n) >= 1e9:
        return f"{n / 1e9:.2f} G"
    if abs(n) >= 1e6:
        return f"{n / 1e6:.1f} M"
    if abs(n) >= 1e3:
        return f"{n / 1e3:.1f} K"
    return f"{n:.0f}"


def format_pct(acc_fraction: float | None) -> str:
    """An accuracy given as a fraction, as '99.79 %'."""
    if acc_fraction is None or (isinstance(acc_fraction, float) and math.isnan(acc_fraction)):
        return "—"
    return f"{float(acc_fraction) * 100:.2f} %"


# ----------------------------------------------------------------------------- step selection


def pick_smallest_within(history: list[dict], max_drop_points: float) -> dict:
    """The record of the step that ships at ``max_drop_points``: the fewest MACs within it on the selection
    images and on the curve of the test reads.

    Uses :func:`core.runs.select_step`, so the review page and the CLI/export always agree on which
    step a threshold picks. Step 0 when nothing fits.
    """
    hist = list(history)
    step = select_step(hist, float(max_drop_points))
    for r in hist:
        if r["step"] == step:
            return r
    return hist[0]


# ----------------------------------------------------------------------------- layer access


class _Stop(Exception):
    """Raised inside a hook to end a forward pass once the wanted activation is captured."""


def _conv(model: nn.Module, layer: str) -> nn.Conv2d:
    try:
        module = model.get_submodule(layer)
    except AttributeError:
        raise SettingsError(f"The model has no layer named '{layer}'.") from None
    if not isinstance(module, nn.Conv2d):
        raise SettingsError(f"'{layer}' is a {type(module).__name__}, not a convolution: its filters have no images.")
    return module


def _layer_output(model: nn.Module, layer: str, x: torch.Tensor) -> tuple[torch.Tensor, str]:
    """Output of ``layer`` for input ``x`` (after the BatchNorm directly reading it, if any) and its source name.

    The forward pass is cut short right after the activation is known: the next module to run
    after the conv is either its BatchNorm (run it, then stop) or anything else (stop before it
    runs, so an in-place ReLU cannot alter the captured tensor).
    """
    conv = _conv(model, layer)
    names = {m: n for n, m in model.named_modules()}
    state: dict[str, Any] = {"conv_out": None, "act": None, "source": layer, "bn": None}

    def conv_hook(mod, inp, out):
        if state["conv_out"] is None:
            state["conv_out"] = out

    def pre_hook(mod, inp):
        if state["conv_out"] is None or mod is conv or state["act"] is not None:
            return
        if state["bn"] is None and isinstance(mod, nn.BatchNorm2d) and inp and inp[0] is state["conv_out"]:
            state["bn"] = mod
            return
        state["act"] = state["conv_out"]
        raise _Stop

    def bn_hook(mod, inp, out):
        if state["bn"] is mod and state["act"] is None:
            state["act"], state["source"] = out, names.get(mod, layer)
            raise _Stop

    leaves = [m for m in model.modules() if not any(True for _ in m.children())]
    handles = [conv.register_forward_hook(conv_hook)]
    handles += [m.register_forward_pre_hook(pre_hook) for m in leaves]
    handles += [m.register_forward_hook(bn_hook) for m in leaves if isinstance(m, nn.BatchNorm2d)]
    was_training = model.training
    model.eval()
    try:
        model(x)
    except _Stop:
        pass
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    act = state["act"] if state["act"] is not None else state["conv_out"]
    if act is None:
        raise SettingsError(f"Layer '{layer}' is not used in the model's forward pass.")
    return act, state["source"]


def activation_source(model: nn.Module, layer: str, spec: InputSpec) -> str:
    """Name of the module whose output is shown as ``layer``'s activation (its BatchNorm, or the conv)."""
    with torch.no_grad():
        return _layer_output(model, layer, torch.zeros(spec.shape(1)))[1]


def receptive_field(model: nn.Module, layer: str, spec: InputSpec) -> int:
    """Side (pixels) of the input region one activation of ``layer`` at the centre depends on.

    Measured, not derived: the gradient of the centre activations (all channels) with respect to a
    random input; its non-zero bounding box is the receptive field, clamped to the image.
    """
    g = torch.Generator().manual_seed(0)
    x = torch.randn(spec.shape(1), generator=g).requires_grad_(True)
    H, W = spec.height, spec.width
    with torch.enable_grad():
        act, _ = _layer_output(model, layer, x)
        h, w = act.shape[-2:]
        grad = torch.autograd.grad(act[0, :, h // 2, w // 2].sum(), x, allow_unused=True)[0]
    if grad is None:
        return min(H, W)
    mag = grad.abs().sum((0, 1))
    nz = (mag > mag.max() * 1e-8).nonzero() if float(mag.max()) > 0 else mag.new_zeros((0, 2))
    if len(nz) == 0:  # a dead centre: fall back to three strides
        return int(min(H, W, max(1, round(3 * H / h))))
    extent = int(max(nz[:, 0].max() - nz[:, 0].min(), nz[:, 1].max() - nz[:, 1].min())) + 1
    return int(max(1, min(extent, H, W)))


def _images_u8(images) -> torch.Tensor:
    if isinstance(images, ImageSet):
        images = images.images
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(images)
    if images.dim() == 3:
        images = images.unsqueeze(0)
    if images.dtype != torch.uint8:
        raise SettingsError("Images must be uint8 (N, C, H, W) as loaded by core.data.")
    return images


def _to_pil(chw_u8: np.ndarray) -> Image.Image:
    """(C, H, W) uint8 -> PIL image (grey for one channel)."""
    if chw_u8.shape[0] == 1:
        return Image.fromarray(np.ascontiguousarray(chw_u8[0]), "L")
    return Image.fromarray(np.ascontiguousarray(chw_u8[:3].transpose(1, 2, 0)), "RGB")


def _upscale(img: Image.Image, size: int | None) -> Image.Image:
    if not size:
        return img
    w, h = img.size
    scale = size / max(w, h)
    return img.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.NEAREST)


# ----------------------------------------------------------------------------- colour maps


def _diverging(v: np.ndarray) -> np.ndarray:
    """Values in [-1, 1] -> RGB uint8: blue (negative), white (0), red (positive)."""
    v = np.clip(v, -1.0, 1.0)
    pos, neg = np.clip(v, 0, 1), np.clip(-v, 0, 1)
    r = 1.0 - neg * 0.8
    g = 1.0 - 0.8 * np.maximum(pos, neg)
    b = 1.0 - pos * 0.8
    return (np.stack([r, g, b], -1) * 255).round().astype(np.uint8)


_HEAT = np.array([[0, 0, 0], [120, 0, 140], [230, 30, 30], [255, 160, 0], [255, 255, 140]], dtype=float)


def _heat(v: np.ndarray) -> np.ndarray:
    """Values in [0, 1] -> RGB uint8 along black-purple-red-orange-yellow."""
    v = np.clip(v, 0.0, 1.0) * (len(_HEAT) - 1)
    lo = np.floor(v).astype(int).clip(0, len(_HEAT) - 2)
    t = (v - lo)[..., None]
    return ((1 - t) * _HEAT[lo] + t * _HEAT[lo + 1]).round().astype(np.uint8)


# ----------------------------------------------------------------------------- filter images


def _effective_kernel(conv: nn.Conv2d, index: int, spec: InputSpec | None) -> np.ndarray:
    if not 0 <= index < conv.out_channels:
        raise SettingsError(f"Filter {index} does not exist: the layer has {conv.out_channels} output channels.")
    w = conv.weight.detach()[index].double().cpu().numpy()  # (Cin/groups, kh, kw)
    if spec is not None and w.shape[0] == len(spec.std) and w.shape[0] == spec.channels:
        # The model sees (x - mean) / std: per pixel value in [0, 1] the weight is w / std.
        w = w / np.asarray(spec.std, dtype=float)[:, None, None]
    return w


def filter_weight_image(model: nn.Module, layer: str, index: int, size: int = 48,
                        spec: InputSpec | None = None) -> Image.Image:
    """The kernel of filter ``index`` of conv ``layer`` as a ``size``-pixel image (nearest upscaling).

    A conv reading 3 channels (the first conv) is shown in colour: the 3 input-channel kernels as R, G,
    B, min-max normalised per filter (grey = no colour preference). Deeper convs: the mean over input
    channels on a diverging map (red positive, blue negative, white zero). With ``spec`` the first
    conv's weights are divided by the normalisation std, i.e. shown per raw pixel value.
    """
    w = _effective_kernel(_conv(model, layer), index, spec)
    if w.shape[0] == 3:
        lo, hi = w.min(), w.max()
        rgb = (w - lo) / (hi - lo) if hi > lo else np.full_like(w, 0.5)
        arr = (rgb.transpose(1, 2, 0) * 255).round().astype(np.uint8)
    else:
        m = w.mean(0)
        scale = np.abs(m).max()
        arr = _diverging(m / scale if scale > 0 else m)
    return _upscale(Image.fromarray(arr, "RGB"), size)


def colour_selectivity(model: nn.Module, layer: str, spec: InputSpec | None = None) -> list[float] | None:
    """Per filter of a 3-channel-input conv, the share of kernel energy that is colour, not brightness.

    The kernel splits into its mean over R, G, B (responds to brightness) and the rest (responds to
    colour differences); the score is ||rest||² / ||kernel||²: 0 for a filter weighing R, G, B alike
    (brightness only), 2/3 for one reading a single channel (and on average for random weights), 1 for
    a pure colour-opponent filter (e.g. red minus green). ``None`` for a conv that does not read 3 channels.
    """
    conv = _conv(model, layer)
    if conv.in_channels // conv.groups != 3:
        return None
    out = []
    for i in range(conv.out_channels):
        w = _effective_kernel(conv, i, spec)
        colour = w - w.mean(0, keepdims=True)
        total = float((w ** 2).sum())
        out.append(float((colour ** 2).sum()) / total if total > 0 else 0.0)
    return out


def _channel_maxima(model: nn.Module, layer: str, images: torch.Tensor, spec: InputSpec, indices: list[int]
                    ) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
    """Per image and filter, the maximum activation and its flat position; and the map size (h, w)."""
    vals, poss, hw = [], [], (1, 1)
    idx = torch.tensor(indices, dtype=torch.long)
    with torch.no_grad():
        for i in range(0, len(images), _BATCH):
            act, _ = _layer_output(model, layer, normalize(images[i:i + _BATCH], spec))
            hw = tuple(act.shape[-2:])
            v, p = act[:, idx].flatten(2).max(2)
            vals.append(v.float())
            poss.append(p)
    return torch.cat(vals), torch.cat(poss), hw


def top_activating_patches(model: nn.Module, layer: str, images_u8, spec: InputSpec,
                           indices: Iterable[int] | None = None, k: int = 4, patch: int | None = None,
                           size: int | None = 48, max_images: int = MAX_PATCH_IMAGES) -> dict[int, list[Image.Image]]:
    """For each filter, the ``k`` image patches where its activation is highest (one per image, best first).

    One batched pass over at most ``max_images`` images; each patch is the ``patch``-pixel square of
    the original uint8 image centred on the arg-max of the activation map (default: the layer's
    measured receptive field, see :func:`receptive_field`), shifted to stay inside the image, then
    upscaled (nearest) to ``size`` pixels (``None`` keeps the crop size).
    """
    conv = _conv(model, layer)
    images = _images_u8(images_u8)[:max_images]
    indices = list(range(conv.out_channels)) if indices is None else [int(i) for i in indices]
    for i in indices:
        if not 0 <= i < conv.out_channels:
            raise SettingsError(f"Filter {i} does not exist: '{layer}' has {conv.out_channels} output channels.")
    if not indices or len(images) == 0:
        return {i: [] for i in indices}
    H, W = images.shape[-2:]
    side = int(min(H, W, max(1, patch if patch else receptive_field(model, layer, spec))))
    vals, poss, (h, w) = _channel_maxima(model, layer, images, spec, indices)
    order = vals.argsort(0, descending=True)[: max(0, k)]  # (k, F)
    arr = images.numpy()
    out: dict[int, list[Image.Image]] = {}
    for j, f in enumerate(indices):
        crops = []
        for n in order[:, j].tolist():
            py, px = divmod(int(poss[n, j]), w)
            cy, cx = (py + 0.5) * H / h, (px + 0.5) * W / w
            top = int(min(max(round(cy - side / 2), 0), H - side))
            left = int(min(max(round(cx - side / 2), 0), W - side))
            crops.append(_upscale(_to_pil(arr[n, :, top:top + side, left:left + side]), size))
        out[f] = crops
    return out


def activation_map(model: nn.Module, layer: str, image_u8, spec: InputSpec, index: int, alpha: float = 0.6,
                   size: int | None = None) -> Image.Image:
    """Filter ``index``'s activation map on one image, upsampled to the image size and overlaid as a heat map.

    Negative activations count as zero (the ReLU removes them); the map is scaled by its maximum,
    so a filter silent on this image shows the plain image. ``size`` optionally upscales the result.
    """
    conv = _conv(model, layer)
    if not 0 <= index < conv.out_channels:
        raise SettingsError(f"Filter {index} does not exist: '{layer}' has {conv.out_channels} output channels.")
    img = _images_u8(image_u8)[:1]
    H, W = img.shape[-2:]
    with torch.no_grad():
        act, _ = _layer_output(model, layer, normalize(img, spec))
        m = act[:, index:index + 1].float().clamp(min=0)
        m = torch.nn.functional.interpolate(m, size=(H, W), mode="bilinear", align_corners=False)[0, 0].numpy()
    peak = float(m.max())
    v = m / peak if peak > 0 else np.zeros_like(m)
    base = img[0].numpy()
    base = np.repeat(base, 3, 0) if base.shape[0] == 1 else base[:3]
    base = base.transpose(1, 2, 0).astype(float)
    a = (alpha * np.clip(v, 0, 1) ** 0.5)[..., None]
    out = (1 - a) * base + a * _heat(v).astype(float)
    return _upscale(Image.fromarray(out.round().clip(0, 255).astype(np.uint8), "RGB"), size)


def gallery(model: nn.Module, spec: InputSpec, images, layer: str, car_scores: list[float] | None,
            sort: str = "car", limit: int | None = None, k: int = 4, size: int = 48, descending: bool = False,
            max_images: int = MAX_PATCH_IMAGES) -> list[dict]:
    """One entry per filter of ``layer`` for a sortable grid of filter cards.

    Each entry: ``index`` (output channel), ``car`` (fraction, as in CarResult; None without scores),
    ``car_points`` (accuracy points), ``weight`` (PIL, ``size`` px), ``patches`` (``k`` PIL images,
    ``size`` px), ``colour`` (colour selectivity for a 3-channel-input conv, else None).
    ``sort='car'`` puts the lowest CAR first (what pruning removes first; ``descending`` reverses),
    ``sort='index'`` keeps channel order. ``limit`` keeps the first entries after sorting; patches
    are computed only for those, in one pass over the images.
    """
    conv = _conv(model, layer)
    n = conv.out_channels
    if car_scores is not None and len(car_scores) != n:
        raise SettingsError(f"{len(car_scores)} CAR scores for '{layer}', which has {n} filters: "
                            "were they computed on another version of the model?")
    if sort not in ("car", "index"):
        raise SettingsError(f"Unknown gallery order '{sort}': use 'car' or 'index'.")
    order = list(range(n))
    if sort == "car" and car_scores is not None:
        order = sorted(order, key=lambda i: (float(car_scores[i]), i))
    if descending:
        order = order[::-1]
    if limit is not None:
        order = order[: max(0, int(limit))]
    patches = top_activating_patches(model, layer, images, spec, indices=order, k=k, size=size,
                                     max_images=max_images)
    colour = colour_selectivity(model, layer, spec)
    out = []
    for i in order:
        car = None if car_scores is None else float(car_scores[i])
        out.append({"index": i, "car": car, "car_points": None if car is None else car * 100,
                    "weight": filter_weight_image(model, layer, i, size=size, spec=spec),
                    "patches": patches.get(i, []), "colour": None if colour is None else colour[i]})
    return out


COLOUR_SHARE = "colour share"
COLOUR_SHARE_MEANING = (
    "colour share: how much of a first-layer filter's weight energy responds to colour differences rather than "
    "brightness (0 % = weighs R, G and B alike, sees brightness only; about 67 % = reads one channel, or random "
    "weights; 100 % = pure colour opponent such as red minus green)")


def filter_card_title(entry: dict) -> str:
    """The heading of one gallery card (an entry of :func:`gallery`): filter, CAR in points and, for a conv
    reading colour, its :func:`colour_selectivity` as a named percentage (issue 16: a bare 'colour 0.75'
    said nothing)."""
    car = "—" if entry.get("car_points") is None else f"{entry['car_points']:+.2f} points"
    colour = "" if entry.get("colour") is None else f" · {COLOUR_SHARE} {entry['colour'] * 100:.0f} %"
    return f"**Filter {entry['index']}** · CAR {car}{colour}"


def gallery_caption(entries: list[dict], k: int = 4) -> str:
    """What a gallery of ``entries`` (from :func:`gallery`, ``k`` patches per filter) shows, with the meaning of
    the colour share when its cards carry one."""
    text = (f"Per filter: its weights (first layer in colour: R, G, B kernels; deeper layers: mean kernel, red "
            f"positive / blue negative), the {k} patches of selection images that excite it most, and its activation on the "
            "chosen image (bright = strong). CAR in accuracy points lost when the filter alone is removed (exact, or screened where marked).")
    if any(e.get("colour") is not None for e in entries):
        text += " " + COLOUR_SHARE_MEANING[0].upper() + COLOUR_SHARE_MEANING[1:] + "."
    return text


# ----------------------------------------------------------------------------- CAR figures


def gallery_layers(model: nn.Module, groups: Iterable[dict]) -> list[tuple[int, str]]:
    """``(gid, layer)`` for every producer conv of ``groups`` (CarResult group dicts), in network order: the
    layers whose filters the gallery can draw. The frozen 1x1 embeddings that stand in for option-A shortcuts
    (core.shortcuts) are not layers of the user's model and have no filters to show, so they are left out."""
    position = {name: i for i, (name, _) in enumerate(model.named_modules())}
    out = []
    for g in groups:
        for name in g.get("producers", [g["root"]]):
            try:
                module = model.get_submodule(name)
            except AttributeError:
                continue
            if isinstance(module, nn.Conv2d) and not is_shortcut_embedding(module):
                out.append((int(g["gid"]), name))
    return sorted(out, key=lambda t: position.get(t[1], len(position)))


def _as_car(car_result) -> CarResult:
    return car_result if isinstance(car_result, CarResult) else CarResult.from_dict(car_result)


def _group(car: CarResult, gid: int) -> dict:
    for g in car.groups:
        if int(g["gid"]) == int(gid):
            return g
    raise SettingsError(f"The CAR result has no group {gid} (groups: {[g['gid'] for g in car.groups]}).")


def fig_car_per_filter(car_result, gid: int, sort: bool = True) -> go.Figure:
    """Bar chart of CAR (accuracy points lost when that one filter is removed) per filter of one group."""
    car = _as_car(car_result)
    g = _group(car, gid)
    scores = np.asarray(car.car[int(gid)], dtype=float) * 100
    order = np.argsort(scores, kind="stable") if sort else np.arange(len(scores))
    x = [str(i) for i in order]
    colours = ["#d62728" if s > 0 else ("#2ca02c" if s < 0 else "#7f7f7f") for s in scores[order]]
    fig = go.Figure(go.Bar(x=x, y=scores[order], marker_color=colours, name="CAR",
                           hovertemplate="filter %{x}<br>CAR %{y:.2f} points<extra></extra>"))
    fig.update_layout(title=f"CAR per filter: {group_label(g)} ({len(scores)} filters, {car.n_images} images)",
                      xaxis_title="Filter (output channel)" + (", lowest CAR first" if sort else ""),
                      yaxis_title="CAR (accuracy points lost)", bargap=0.15)
    fig.update_xaxes(type="category")
    return fig


def fig_car_heatmap(car_result, by: str = "rank") -> go.Figure:
    """Heat map of CAR over all groups: one row per group (labelled by :func:`core.groups.group_label`), one column
    per filter, first layer at the top (the groups' order, network order since issue 16).

    ``by='rank'``: each row sorted ascending (column = rank of the filter in its group);
    ``by='index'``: column = channel index. Narrower groups are padded with NaN (blank).
    """
    if by not in ("rank", "index"):
        raise SettingsError(f"Unknown heat-map column order '{by}': use 'rank' or 'index'.")
    car = _as_car(car_result)
    groups = [g for g in car.groups if int(g["gid"]) in car.car]
    width = max((len(car.car[int(g["gid"])]) for g in groups), default=0)
    z = np.full((len(groups), width), np.nan)
    filt = np.full((len(groups), width), -1)
    for r, g in enumerate(groups):
        s = np.asarray(car.car[int(g["gid"])], dtype=float) * 100
        order = np.argsort(s, kind="stable") if by == "rank" else np.arange(len(s))
        z[r, : len(s)] = s[order]
        filt[r, : len(s)] = order
    labels = [f"{group_label(g)} [{int(g['gid'])}]" for g in groups]
    zmax = float(np.nanmax(np.abs(z))) if np.isfinite(z).any() else 1.0
    fig = go.Figure(go.Heatmap(
        z=z, x=list(range(width)), y=labels, customdata=filt, colorscale="RdBu_r", zmid=0,
        zmin=-max(zmax, 1e-9), zmax=max(zmax, 1e-9), colorbar={"title": "CAR (points)"},
        hovertemplate="%{y}<br>filter %{customdata}<br>CAR %{z:.2f} points<extra></extra>"))
    fig.update_layout(title="CAR of every filter (red: removal costs accuracy; blue: removal helps)",
                      xaxis_title="Filter rank in its layer (lowest CAR first)" if by == "rank" else "Filter (output channel)",
                      yaxis_title="Layer", height=max(300, 28 * len(groups) + 140))
    fig.update_yaxes(autorange="reversed")
    return fig


def fig_sensitivity(car_result, gids: list[int] | None = None) -> go.Figure:
    """Accuracy (%) against the share of one layer's filters removed (lowest CAR first), one line per group."""
    car = _as_car(car_result)
    if not car.sensitivity:
        raise SettingsError("This CAR result has no per-layer sensitivity (it was computed without it).")
    wanted = [int(g) for g in (gids if gids is not None else sorted(car.sensitivity))]
    fig = go.Figure()
    for n, gid in enumerate(wanted):
        if gid not in car.sensitivity:
            raise SettingsError(f"The CAR result has no sensitivity for group {gid}.")
        pts = sorted(car.sensitivity[gid])
        fig.add_trace(go.Scatter(
            x=[f * 100 for f, _ in pts], y=[a * 100 for _, a in pts], mode="lines+markers",
            name=group_label(_group(car, gid)), line={"color": _PALETTE[n % len(_PALETTE)]},
            hovertemplate="%{x:.0f} % removed<br>accuracy %{y:.2f} %<extra>" + group_label(_group(car, gid)) + "</extra>"))
    fig.add_hline(y=car.baseline_accuracy * 100, line_dash="dot", line_color="#555",
                  annotation_text=f"baseline {format_pct(car.baseline_accuracy)}", annotation_position="bottom left")
    fig.update_layout(title=f"Per-layer sensitivity ({car.n_images} images, one layer pruned at a time)",
                      xaxis_title="Filters removed from the layer (%, lowest CAR first)",
                      yaxis_title="Accuracy (%)", legend_title="Layer")
    fig.update_xaxes(range=[-2, 100])
    return fig


def fig_per_class_car(car_result, gid: int, class_index: int, sort: bool = True) -> go.Figure:
    """Per filter of one group, the drop of one class's accuracy when that filter is removed (points),
    next to the overall CAR."""
    car = _as_car(car_result)
    g = _group(car, gid)
    if int(gid) not in car.per_class:
        raise SettingsError("This CAR result has no per-class CAR (it was computed without it).")
    if not 0 <= class_index < len(car.class_names):
        raise SettingsError(f"Class {class_index} does not exist: there are {len(car.class_names)} classes.")
    cls = np.asarray([row[class_index] for row in car.per_class[int(gid)]], dtype=float) * 100
    overall = np.asarray(car.car[int(gid)], dtype=float) * 100
    order = np.argsort(-cls, kind="stable") if sort else np.arange(len(cls))
    x = [str(i) for i in order]
    name = car.class_names[class_index]
    fig = go.Figure()
    fig.add_trace(go.Bar(x=x, y=cls[order], name=f"class '{name}'", marker_color="#9467bd",
                         hovertemplate="filter %{x}<br>" + name + " drops %{y:.2f} points<extra></extra>"))
    fig.add_trace(go.Scatter(x=x, y=overall[order], name="all classes (CAR)", mode="markers",
                             marker={"color": "#222", "symbol": "diamond", "size": 7},
                             hovertemplate="filter %{x}<br>CAR %{y:.2f} points<extra></extra>"))
    fig.update_layout(title=f"Per-class CAR of '{name}': {group_label(g)}",
                      xaxis_title="Filter (output channel)" + (f", largest drop for '{name}' first" if sort else ""),
                      yaxis_title=f"Accuracy drop of '{name}' (points)")
    fig.update_xaxes(type="category")
    return fig


# ----------------------------------------------------------------------------- run figures


def _metric_pct(r: dict) -> float | None:
    a = r.get("metric")
    return None if a is None else float(a) * 100


def metric_title(metric: str) -> str:
    """A metric name as a chart title word: ``accuracy`` -> ``Accuracy``; ``mAP@0.5`` stays as it is."""
    return metric[:1].upper() + metric[1:] if metric.islower() else metric


def _removed_text(r: dict) -> str:
    rems = removals(r)
    if not rems:
        text = "original" if r.get("recovered_from") is None else f"recovery of step {r['recovered_from']}"
        if r.get("stretch"):
            text += " (stretch, undone: back to the model before it)" if r.get("undone") else " (stretch, kept)"
        return text
    text = "; ".join(f"{rem.get('group')}: {rem.get('width_before')} → {rem.get('width_after')}" for rem in rems)
    if r.get("from_step") is not None:
        text += f" (from step {r['from_step']}: the test images refused the steps after it)"
    if r.get("stretch"):
        return text + " (stretch past the threshold, for a recovery to bring back)"
    return text + (" (ships once recovered)" if r.get("awaits_recovery") else "")


def fig_tradeoff(history_records_by_run: dict[str, list[dict]], x: str = "macs", threshold_points: float | None = None,
                 baseline_metric: float | None = None, selected_step=None, metric: str = "accuracy") -> go.Figure:
    """The run records' ``metric`` (%, named ``metric``) against MACs (M) or latency (ms) of every step,
    one line per run (the selection images' figure, which decides), and a dotted line of the test images'
    figure (``test_metric``) where the records have one.

    ``threshold_points`` draws a horizontal line at baseline − threshold (``baseline_metric`` is a
    fraction; default: step 0 of the first run). ``selected_step`` is highlighted: a step number (in
    the first run) or a ``(run_name, step)`` pair. Steps without a latency are left out of the latency view.
    """
    if x not in ("macs", "latency_ms"):
        raise SettingsError(f"Unknown x axis '{x}': use 'macs' or 'latency_ms'.")
    runs = {name: list(recs) for name, recs in history_records_by_run.items()}
    fig = go.Figure()
    if baseline_metric is None:
        for recs in runs.values():
            if recs:
                baseline_metric = recs[0].get("metric")
                break
    sel_run, sel_step = (None, None)
    if isinstance(selected_step, (tuple, list)):
        sel_run, sel_step = selected_step[0], selected_step[1]
    elif selected_step is not None:
        sel_run, sel_step = next(iter(runs), None), int(selected_step)

    def xval(r: dict) -> float | None:
        v = r.get(x)
        if v is None:
            return None
        return float(v) / 1e6 if x == "macs" else float(v)

    for n, (name, recs) in enumerate(runs.items()):
        pts = [r for r in recs if xval(r) is not None and r.get("metric") is not None]
        colour = _PALETTE[n % len(_PALETTE)]
        fig.add_trace(go.Scatter(
            x=[xval(r) for r in pts], y=[_metric_pct(r) for r in pts], mode="lines+markers", name=name,
            line={"color": colour}, marker={"size": 7},
            customdata=[[r["step"], _removed_text(r), format_macs(r.get("macs")),
                         "—" if r.get("latency_ms") is None else f"{r['latency_ms']:.2f} ms"] for r in pts],
            hovertemplate="step %{customdata[0]}: %{customdata[1]}<br>" + metric + " %{y:.2f} %<br>"
                          "MACs %{customdata[2]}, latency %{customdata[3]}<extra>" + str(name) + "</extra>"))
        tested = [r for r in pts if r.get("test_metric") is not None]
        if tested:  # the held-out test images' figure of the same steps (never used for a decision): markers only,
            # a line through them in step order zig-zags where a recovery moves the figure at the same MACs
            fig.add_trace(go.Scatter(
                x=[xval(r) for r in tested], y=[r["test_metric"] * 100 for r in tested], mode="markers",
                name=f"{name} · test", line={"color": colour, "dash": "dot"}, marker={"size": 6, "symbol": "diamond"},
                customdata=[[r["step"]] for r in tested],
                hovertemplate="step %{customdata[0]}: test " + metric + " %{y:.2f} %<extra>" + str(name) + "</extra>"))
        if name == sel_run:
            hit = [r for r in pts if r["step"] == sel_step]
            if hit:
                r = hit[0]
                fig.add_trace(go.Scatter(
                    x=[xval(r)], y=[_metric_pct(r)], mode="markers", name=f"selected: step {sel_step}",
                    marker={"size": 18, "symbol": "star", "color": "#ffd400", "line": {"color": "#222", "width": 1.5}},
                    hovertemplate=f"selected step {sel_step}<br>{metric} %{{y:.2f}} %<extra>{name}</extra>"))
    if threshold_points is not None and baseline_metric is not None:
        level = float(baseline_metric) * 100 - float(threshold_points)
        fig.add_hline(y=level, line_dash="dash", line_color="#d62728",  # the label above the line, clear of the ticks
                      annotation_text=f"baseline − {threshold_points:g} points = {level:.2f} %",
                      annotation_position="top left", annotation_bgcolor="rgba(255,255,255,0.85)",
                      annotation_font_color="#d62728")
    fig.update_layout(title=f"{metric_title(metric)} vs " + ("compute" if x == "macs" else "latency")
                      + " of every pruning step",
                      xaxis_title="MACs (M)" if x == "macs" else "Latency (ms)", yaxis_title=f"{metric_title(metric)} (%)",
                      # below the plot, in rows: long run names no longer squeeze the plot area
                      legend={"orientation": "h", "yanchor": "top", "y": -0.22, "xanchor": "left", "x": 0,
                              "title": {"text": "Run"}}, margin={"b": 40})
    return fig


def fig_widths(before: dict[str, int], after: dict[str, int]) -> go.Figure:
    """Output channels per layer before and after pruning, as grouped horizontal bars, first layer at the top
    (layers in ``before``'s order): one row per layer, so the layer names never overlap however many there are."""
    layers = list(before) + [n for n in after if n not in before]
    b = [before.get(n) for n in layers]
    a = [after.get(n) for n in layers]
    kept = [f"{(ai / bi * 100):.0f} % kept" if ai is not None and bi else "" for ai, bi in zip(a, b)]
    fig = go.Figure()
    fig.add_trace(go.Bar(y=layers, x=b, name="before", orientation="h", marker_color="#9fb7d1",
                         hovertemplate="%{y}<br>%{x} channels before<extra></extra>"))
    fig.add_trace(go.Bar(y=layers, x=a, name="after", orientation="h", marker_color="#1f77b4", customdata=kept,
                         hovertemplate="%{y}<br>%{x} channels after (%{customdata})<extra></extra>"))
    fig.update_layout(barmode="group", title="Output channels per layer", xaxis_title="Output channels",
                      yaxis_title="Layer", height=max(320, 40 + 24 * len(layers) + 80),
                      legend={"orientation": "h", "yanchor": "bottom", "y": 1.0, "xanchor": "right", "x": 1})
    fig.update_yaxes(type="category", autorange="reversed", automargin=True)
    return fig


def fig_per_class_change(before: dict[str, float], after: dict[str, float]) -> go.Figure:
    """Change of each class's accuracy (points, after − before); hover shows both accuracies."""
    classes = list(before) + [c for c in after if c not in before]

    def pct(d, c):
        v = d.get(c)
        return None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v) * 100

    b = [pct(before, c) for c in classes]
    a = [pct(after, c) for c in classes]
    change = [None if bi is None or ai is None else ai - bi for bi, ai in zip(b, a)]
    colours = ["#7f7f7f" if d is None or abs(d) < 1e-9 else ("#d62728" if d < 0 else "#2ca02c") for d in change]
    fig = go.Figure(go.Bar(
        x=classes, y=change, marker_color=colours, name="change",
        text=["" if d is None else f"{d:+.2f}" for d in change], textposition="outside",
        customdata=[["—" if v is None else f"{v:.2f} %" for v in (bi, ai)] for bi, ai in zip(b, a)],
        hovertemplate="%{x}: %{customdata[0]} → %{customdata[1]}<br>change %{y:+.2f} points<extra></extra>"))
    fig.add_hline(y=0, line_color="#333", line_width=1)
    fig.update_layout(title="Per-class accuracy change", xaxis_title="Class",
                      yaxis_title="Accuracy change (points, after − before)")
    fig.update_xaxes(type="category")
    return fig


def fig_staircase(channels: list[int], latency_ms: list[float], cluster: int,
                  p25: list[float] | None = None, p75: list[float] | None = None) -> go.Figure:
    """Latency (ms) against output channels, with the detected step width: dotted lines at every multiple
    of ``cluster`` and the plateau level (median) of each step."""
    c = np.asarray(channels, dtype=float)
    y = np.asarray(latency_ms, dtype=float)
    order = np.argsort(c)
    c, y = c[order], y[order]
    fig = go.Figure()
    if p25 is not None and p75 is not None:
        lo, hi = np.asarray(p25, dtype=float)[order], np.asarray(p75, dtype=float)[order]
        fig.add_trace(go.Scatter(x=np.concatenate([c, c[::-1]]), y=np.concatenate([hi, lo[::-1]]), fill="toself",
                                 fillcolor="rgba(31,119,180,0.15)", line={"width": 0}, name="25–75 % of runs",
                                 hoverinfo="skip"))
    fig.add_trace(go.Scatter(x=c, y=y, mode="lines+markers", name="median latency", line={"color": "#1f77b4"},
                             hovertemplate="%{x:.0f} channels: %{y:.3f} ms<extra></extra>"))
    if cluster and cluster > 0 and len(c):
        steps = np.ceil(c / cluster)
        xs, ys = [], []
        for s in np.unique(steps):
            members = steps == s
            level = float(np.median(y[members]))
            xs += [(s - 1) * cluster, s * cluster, None]
            ys += [level, level, None]
        fig.add_trace(go.Scatter(x=xs, y=ys, mode="lines", name=f"plateaus of {cluster} channels",
                                 line={"color": "#d62728", "width": 2}, hoverinfo="skip"))
        first = int(math.ceil(c.min() / cluster)) * cluster
        for m in range(first, int(c.max()) + 1, int(cluster)):
            fig.add_vline(x=m, line_dash="dot", line_color="rgba(214,39,40,0.35)", line_width=1)
    fig.update_layout(title=f"Latency staircase: step width {cluster} output channels",
                      xaxis_title="Output channels", yaxis_title="Latency (ms)")
    return fig


def fig_progress(history: list[dict], metric: str = "accuracy") -> go.Figure:
    """Live view while pruning: the records' ``metric`` (%, named ``metric``) and MACs (M) per completed
    step, sharing the step axis."""
    recs = sorted(history, key=lambda r: r["step"])
    steps = [r["step"] for r in recs]
    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, vertical_spacing=0.08)
    fig.add_trace(go.Scatter(x=steps, y=[_metric_pct(r) for r in recs], mode="lines+markers", name=metric,
                             line={"color": "#2ca02c"}, customdata=[_removed_text(r) for r in recs],
                             hovertemplate="step %{x}: %{customdata}<br>" + metric + " %{y:.2f} %<extra></extra>"),
                  row=1, col=1)
    fig.add_trace(go.Scatter(x=steps, y=[None if r.get("macs") is None else r["macs"] / 1e6 for r in recs],
                             mode="lines+markers", name="MACs", line={"color": "#1f77b4"},
                             hovertemplate="step %{x}<br>MACs %{y:.2f} M<extra></extra>"), row=2, col=1)
    fig.update_yaxes(title_text=f"{metric_title(metric)} (%)", row=1, col=1)
    fig.update_yaxes(title_text="MACs (M)", rangemode="tozero", row=2, col=1)
    fig.update_xaxes(title_text="Step", row=2, col=1, dtick=1 if len(steps) <= 20 else None)
    fig.update_layout(title="Pruning progress", showlegend=False, height=480)
    return fig
