"""core.visualize: filter images, top-activating patches, activation maps, every plotly figure, step picking.

One small CAR result of the resnet_shapes sample (60 validation images) is shared by the module.
Torch runs on one thread here: on a shared 2-core machine two spinning OpenMP threads make these
small forward passes tens of times slower.
"""
from __future__ import annotations

import math

import numpy as np
import plotly.graph_objects as go
import pytest
import torch
from PIL import Image

from core import visualize as V
from core.car import CarResult, compute_car
from core.sources import load_dataset
from core.errors import SettingsError
from core.models import load_model
from core.runs import Run


@pytest.fixture(scope="module")
def env():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    loaded = load_model("sample:resnet_shapes")
    spec = loaded.spec.input
    data = load_dataset("sample:resnet_shapes", spec)
    car = compute_car(loaded.model, spec, data.val, n_images=60, sensitivity=True)
    yield {"model": loaded.model, "spec": spec, "data": data, "car": car}
    torch.set_num_threads(threads)


def _history(base_acc: float = 0.98) -> list[dict]:
    """A plausible run history: MACs fall each step, accuracy dips and partly recovers."""
    accs = [base_acc, 0.978, 0.975, 0.981, 0.969, 0.955]
    macs = [26_700_000, 24_000_000, 21_500_000, 19_000_000, 16_000_000, 14_000_000]
    out = []
    for i, (a, m) in enumerate(zip(accs, macs)):
        removed = None if i == 0 else {"group": f"layer{i}.conv", "producers": [f"layer{i}.conv"], "filters": [0],
                                       "filters_original": [0], "width_before": 32, "width_after": 24}
        out.append({"step": i, "metric": a, "per_class": {"a": a, "b": a - 0.01}, "macs": m, "params": 1000 - i,
                    "latency_ms": None if i == 2 else 1.0 - 0.1 * i, "widths": {"conv": 32 - i}, "removed": removed})
    return out


def _group_of(car: CarResult, root: str) -> dict:
    return next(g for g in car.groups if g["root"] == root)


# ----------------------------------------------------------------------------- formatting and selection


def test_format_helpers():
    assert V.format_macs(26_712_345) == "26.7 M"
    assert V.format_macs(1_234_000_000) == "1.23 G"
    assert V.format_macs(512_000) == "512.0 K"
    assert V.format_macs(None) == "—"
    assert V.format_pct(0.99791) == "99.79 %"
    assert V.format_pct(1.0) == "100.00 %"
    assert V.format_pct(float("nan")) == "—"


def test_pick_smallest_within_agrees_with_run_select_step(tmp_path):
    hist = _history()
    # Drops in points: 0, 0.2, 0.5, -0.1, 1.1, 2.5.
    assert V.pick_smallest_within(hist, 0.0)["step"] == 3  # step 3 is better than the original
    assert V.pick_smallest_within(hist, 0.5)["step"] == 3
    assert V.pick_smallest_within(hist, 1.1)["step"] == 4
    assert V.pick_smallest_within(hist, 5.0)["step"] == 5
    only_worse = [hist[0], {**hist[4], "step": 1}]
    assert V.pick_smallest_within(only_worse, 0.5)["step"] == 0
    # Same answer as the run folder's own selection, for every threshold.
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    from core.models import ModelSpec
    from core.workspace import append_jsonl, atomic_write_json

    atomic_write_json(run_dir / "config.json", {"model_spec": ModelSpec("sample_resnet", 8).to_dict()})

    for r in hist:
        append_jsonl(run_dir / "history.jsonl", r)
    run = Run(run_dir)
    for t in (0.0, 0.1, 0.3, 0.5, 1.0, 1.2, 3.0):
        assert V.pick_smallest_within(hist, t)["step"] == run.select_step(t)


# ----------------------------------------------------------------------------- filter images


def test_weight_images_first_and_deep_conv(env):
    model, spec = env["model"], env["spec"]
    first = V.filter_weight_image(model, "stem.0", 0)
    assert first.size == (48, 48) and first.mode == "RGB"
    with_spec = V.filter_weight_image(model, "stem.0", 5, size=30, spec=spec)
    assert with_spec.size == (30, 30)
    deep = V.filter_weight_image(model, "layer3.1.conv1", 63, size=40)
    assert deep.size == (40, 40) and deep.mode == "RGB"
    one_by_one = V.filter_weight_image(model, "layer2.0.downsample.0", 1)
    assert one_by_one.size == (48, 48)
    with pytest.raises(SettingsError):
        V.filter_weight_image(model, "stem.0", 16)
    with pytest.raises(SettingsError):
        V.filter_weight_image(model, "fc", 0)
    with pytest.raises(SettingsError):
        V.filter_weight_image(model, "no.such.layer", 0)


def test_colour_story_first_conv(env):
    """resnet_shapes tells circles apart by colour only; its first conv has coloured filters.

    No strong claim: the scores exist, lie in [0, 1], and the most colour-selective filter's image
    is visibly coloured (its channels differ) while the measure is None for deeper convs."""
    model, spec = env["model"], env["spec"]
    scores = V.colour_selectivity(model, "stem.0", spec)
    assert len(scores) == 16 and all(0.0 <= s <= 1.0 for s in scores)
    assert V.colour_selectivity(model, "layer1.0.conv1") is None
    best = int(np.argmax(scores))
    arr = np.asarray(V.filter_weight_image(model, "stem.0", best, spec=spec)).astype(float)
    assert arr.std(axis=2).mean() > 5  # R, G, B differ: not a grey image


def test_receptive_field_and_activation_source(env):
    model, spec = env["model"], env["spec"]
    assert V.receptive_field(model, "stem.0", spec) == 3
    assert V.receptive_field(model, "layer1.0.conv1", spec) == 5
    assert V.receptive_field(model, "layer3.1.conv1", spec) == 32  # clamped to the image
    assert V.activation_source(model, "stem.0", spec) == "stem.1"
    assert V.activation_source(model, "layer2.0.downsample.0", spec) == "layer2.0.downsample.1"


def test_top_activating_patches(env):
    model, spec, data = env["model"], env["spec"], env["data"]
    images = data.val.images[:64]
    patches = V.top_activating_patches(model, "stem.0", images, spec, indices=[0, 3], k=3, size=None)
    assert set(patches) == {0, 3}
    assert all(len(p) == 3 and all(im.size == (3, 3) for im in p) for p in patches.values())
    big = V.top_activating_patches(model, "layer2.0.conv1", data.val, spec, indices=[1], k=2, patch=12, size=36)
    assert [im.size for im in big[1]] == [(36, 36), (36, 36)]
    assert V.top_activating_patches(model, "stem.0", images, spec, indices=[], k=2) == {}
    with pytest.raises(SettingsError):
        V.top_activating_patches(model, "stem.0", images, spec, indices=[99])


def test_patches_are_the_highest_activations(env):
    """The first patch of a filter comes from the image with the highest maximum activation."""
    model, spec = env["model"], env["spec"]
    images = env["data"].val.images[:40]
    vals, _, _ = V._channel_maxima(model, "layer1.0.conv1", images, spec, [2])
    best = int(vals[:, 0].argmax())
    crop = V.top_activating_patches(model, "layer1.0.conv1", images[best:best + 1], spec, indices=[2], k=1, size=None)
    top = V.top_activating_patches(model, "layer1.0.conv1", images, spec, indices=[2], k=1, size=None)
    assert np.array_equal(np.asarray(crop[2][0]), np.asarray(top[2][0]))


def test_activation_map_has_image_size(env):
    model, spec, data = env["model"], env["spec"], env["data"]
    img = data.val.images[0]
    for layer in ("stem.0", "layer3.1.conv1"):
        m = V.activation_map(model, layer, img, spec, 2)
        assert m.size == (spec.width, spec.height) and m.mode == "RGB"
    assert V.activation_map(model, "layer2.0.conv2", img, spec, 0, size=96).size == (96, 96)


def test_gallery_first_and_deep_conv(env):
    model, spec, data, car = env["model"], env["spec"], env["data"], env["car"]
    stem = _group_of(car, "stem.0")
    cards = V.gallery(model, spec, data.val, "stem.0", car.car[stem["gid"]], sort="car")
    assert len(cards) == 16
    assert [c["car"] for c in cards] == sorted(c["car"] for c in cards)
    assert all(c["weight"].size == (48, 48) and len(c["patches"]) == 4 for c in cards)
    assert all(p.size == (48, 48) for c in cards for p in c["patches"])
    assert all(c["colour"] is not None for c in cards)
    assert math.isclose(cards[0]["car_points"], cards[0]["car"] * 100)

    deep = _group_of(car, "layer3.1.conv1")
    scores = car.car[deep["gid"]]
    cards = V.gallery(model, spec, data.val.images[:48], "layer3.1.conv1", scores, sort="car", limit=5,
                      descending=True, k=2, size=32)
    assert len(cards) == 5 and cards[0]["car"] == max(scores)
    assert all(c["weight"].size == (32, 32) and [p.size for p in c["patches"]] == [(32, 32)] * 2 for c in cards)
    assert all(c["colour"] is None for c in cards)
    by_index = V.gallery(model, spec, data.val.images[:16], "layer1.0.conv1", None, sort="index", limit=3, k=1)
    assert [c["index"] for c in by_index] == [0, 1, 2] and by_index[0]["car"] is None
    with pytest.raises(SettingsError):
        V.gallery(model, spec, data.val, "stem.0", [0.0] * 3)


def test_gallery_cards_name_and_explain_the_colour_share(env):
    """Issue 16: the first layer's cards said 'colour 0.75' with no word on what it is."""
    model, spec, data, car = env["model"], env["spec"], env["data"], env["car"]
    stem = V.gallery(model, spec, data.val.images[:16], "stem.0", car.car[_group_of(car, "stem.0")["gid"]], limit=3,
                     k=1)
    for card in stem:
        title = V.filter_card_title(card)
        assert f"**Filter {card['index']}**" in title and f"CAR {card['car_points']:+.2f} points" in title
        assert f"colour share {card['colour'] * 100:.0f} %" in title
    caption = V.gallery_caption(stem)
    assert "Colour share:" in caption and "brightness" in caption and "colour differences" in caption
    assert "the 4 patches of selection images" in caption
    deep = V.gallery(model, spec, data.val.images[:16], "layer1.0.conv1", None, sort="index", limit=2, k=1)
    assert "colour" not in V.filter_card_title(deep[0]) and "CAR —" in V.filter_card_title(deep[0])
    assert "olour share" not in V.gallery_caption(deep)


# ----------------------------------------------------------------------------- CAR figures


def _titles(fig: go.Figure) -> tuple[str, str]:
    return fig.layout.xaxis.title.text or "", fig.layout.yaxis.title.text or ""


def test_fig_car_per_filter(env):
    car = env["car"]
    gid = _group_of(car, "layer2.0.conv1")["gid"]
    fig = V.fig_car_per_filter(car, gid)
    assert isinstance(fig, go.Figure) and len(fig.data) == 1 and fig.data[0].type == "bar"
    assert len(fig.data[0].x) == 32
    assert list(fig.data[0].y) == sorted(fig.data[0].y)
    x, y = _titles(fig)
    assert "Filter" in x and "points" in y
    unsorted = V.fig_car_per_filter(car.to_dict(), gid, sort=False)  # car.json form works too
    assert list(unsorted.data[0].x) == [str(i) for i in range(32)]
    assert np.allclose(unsorted.data[0].y, np.asarray(car.car[gid]) * 100)
    with pytest.raises(SettingsError):
        V.fig_car_per_filter(car, 999)


def test_fig_car_heatmap(env):
    car = env["car"]
    fig = V.fig_car_heatmap(car)
    hm = fig.data[0]
    assert hm.type == "heatmap"
    z = np.asarray(hm.z, dtype=float)
    assert z.shape == (len(car.groups), 64)
    row = [i for i, label in enumerate(hm.y) if label.startswith("stem.0")][0]
    assert np.isnan(z[row, 16:]).all() and np.isfinite(z[row, :16]).all()
    assert all(np.all(np.diff(r[np.isfinite(r)]) >= 0) for r in z)  # rank order
    x, y = _titles(fig)
    assert "rank" in x and "Layer" in y
    by_index = V.fig_car_heatmap(car.to_dict(), by="index")
    assert "channel" in by_index.layout.xaxis.title.text


def test_fig_sensitivity(env):
    car = env["car"]
    fig = V.fig_sensitivity(car)
    assert len(fig.data) == len(car.groups)
    assert all(t.type == "scatter" for t in fig.data)
    first = fig.data[0]
    assert first.x[0] == 0 and math.isclose(first.y[0], car.baseline_accuracy * 100)
    assert max(first.x) <= 90
    x, y = _titles(fig)
    assert "%" in x and y == "Accuracy (%)"
    some = V.fig_sensitivity(car, gids=[0, 2])
    assert len(some.data) == 2
    assert len(some.layout.shapes) == 1  # baseline line


def test_fig_per_class_car(env):
    car = env["car"]
    fig = V.fig_per_class_car(car, 2, 0)
    assert [t.type for t in fig.data] == ["bar", "scatter"]
    assert len(fig.data[0].x) == 16
    assert car.class_names[0] in fig.layout.title.text
    x, y = _titles(fig)
    assert "Filter" in x and "points" in y
    with pytest.raises(SettingsError):
        V.fig_per_class_car(car, 2, len(car.class_names))


# ----------------------------------------------------------------------------- run figures


def test_fig_tradeoff_macs_and_latency():
    hist = _history()
    other = [{**r, "metric": r["metric"] - 0.01} for r in hist]
    fig = V.fig_tradeoff({"run A": hist, "run B": other}, x="macs", threshold_points=1.0, baseline_metric=0.98,
                         selected_step=3)
    names = [t.name for t in fig.data]
    assert names[:2] == ["run A", "selected: step 3"] and "run B" in names
    assert np.allclose(fig.data[0].x, [m["macs"] / 1e6 for m in hist])
    assert np.allclose(fig.data[0].y, [r["metric"] * 100 for r in hist])
    assert fig.data[1].x[0] == pytest.approx(19.0)
    assert fig.layout.xaxis.title.text == "MACs (M)" and fig.layout.yaxis.title.text == "Accuracy (%)"
    assert len(fig.layout.shapes) == 1 and fig.layout.shapes[0].y0 == pytest.approx(97.0)
    # issue 27: the legend sits below the plot in rows, the threshold's label above its line (clear of the x
    # ticks), and the test images' figures are markers, not a line zig-zagging across MACs
    assert fig.layout.legend.orientation == "h" and fig.layout.legend.y < 0
    assert fig.layout.annotations[0].yanchor == "bottom" and fig.layout.annotations[0].xanchor == "left"
    tested = V.fig_tradeoff({"run A": [{**r, "test_metric": r["metric"] - 0.02} for r in hist]})
    assert [t.mode for t in tested.data] == ["lines+markers", "markers"]

    lat = V.fig_tradeoff({"run A": hist}, x="latency_ms", threshold_points=None, baseline_metric=None,
                         selected_step=("run A", 2))
    assert len(lat.data) == 1 and len(lat.data[0].x) == 5  # step 2 has no latency; nothing to highlight
    assert lat.layout.xaxis.title.text == "Latency (ms)" and not lat.layout.shapes
    with pytest.raises(SettingsError):
        V.fig_tradeoff({"run A": hist}, x="params", threshold_points=None, baseline_metric=None)


def test_fig_widths_and_per_class_change():
    fig = V.fig_widths({"conv1": 16, "conv2": 32, "fc": 8}, {"conv1": 8, "conv2": 24, "fc": 8})
    assert [t.name for t in fig.data] == ["before", "after"] and fig.layout.barmode == "group"
    # one row per layer (issue 27: the layer names overlapped on a ResNet-20), first layer at the top
    assert all(t.orientation == "h" for t in fig.data)
    assert list(fig.data[1].x) == [8, 24, 8] and list(fig.data[0].y) == ["conv1", "conv2", "fc"]
    assert fig.layout.xaxis.title.text == "Output channels" and fig.layout.yaxis.autorange == "reversed"
    deep = V.fig_widths({f"layer{i}.conv": 16 for i in range(40)}, {})
    assert deep.layout.height >= 24 * 40, "the figure grows with the layers instead of squeezing their names"

    change = V.fig_per_class_change({"a": 0.9, "b": 1.0, "c": float("nan")}, {"a": 0.95, "b": 0.97, "c": 0.5})
    bar = change.data[0]
    assert bar.type == "bar" and list(bar.x) == ["a", "b", "c"]
    assert bar.y[0] == pytest.approx(5.0) and bar.y[1] == pytest.approx(-3.0) and bar.y[2] is None
    assert "points" in change.layout.yaxis.title.text


def test_fig_staircase():
    channels = list(range(8, 129, 4))
    latency = [0.1 * math.ceil(c / 16) + 0.001 * (c % 3) for c in channels]
    fig = V.fig_staircase(channels, latency, 16)
    names = [t.name for t in fig.data]
    assert "median latency" in names and "plateaus of 16 channels" in names
    assert len(fig.layout.shapes) == 8  # 16, 32, ..., 128
    assert fig.layout.xaxis.title.text == "Output channels" and fig.layout.yaxis.title.text == "Latency (ms)"
    band = V.fig_staircase(channels, latency, 16, p25=[v - 0.01 for v in latency], p75=[v + 0.01 for v in latency])
    assert len(band.data) == 3


def test_fig_progress():
    hist = _history()
    fig = V.fig_progress(hist[:3])
    assert [t.name for t in fig.data] == ["accuracy", "MACs"]
    assert list(fig.data[0].x) == [0, 1, 2] and fig.data[1].y[0] == pytest.approx(26.7)
    assert fig.layout.yaxis.title.text == "Accuracy (%)" and fig.layout.yaxis2.title.text == "MACs (M)"
    assert fig.layout.xaxis2.title.text == "Step"
    assert len(V.fig_progress(hist[:1]).data[0].x) == 1


def test_run_figures_take_the_metric_name():
    """A detection run's charts are labelled with its metric, not relabelled from 'Accuracy' afterwards."""
    hist = _history()
    trade = V.fig_tradeoff({"run A": hist}, x="macs", threshold_points=1.0, selected_step=2, metric="mAP@0.5")
    assert trade.layout.yaxis.title.text == "mAP@0.5 (%)" and trade.layout.title.text.startswith("mAP@0.5 vs")
    assert all("accuracy" not in (t.hovertemplate or "").lower() for t in trade.data)
    assert "mAP@0.5" in trade.data[0].hovertemplate
    prog = V.fig_progress(hist[:3], "mAP@0.5")
    assert [t.name for t in prog.data] == ["mAP@0.5", "MACs"] and prog.layout.yaxis.title.text == "mAP@0.5 (%)"


def test_figures_serialise(env):
    """Every figure turns into JSON, which is what st.plotly_chart sends to the browser."""
    car = env["car"]
    figs = [V.fig_car_per_filter(car, 0), V.fig_car_heatmap(car), V.fig_sensitivity(car), V.fig_per_class_car(car, 0, 1),
            V.fig_tradeoff({"r": _history()}, "macs", 1.0, None, 1), V.fig_widths({"a": 2}, {"a": 1}),
            V.fig_per_class_change({"a": 0.5}, {"a": 0.6}), V.fig_staircase(list(range(8, 40, 4)), [1.0] * 8, 8),
            V.fig_progress(_history())]
    for f in figs:
        assert isinstance(f.to_json(), str)
    assert isinstance(V.filter_weight_image(env["model"], "stem.0", 0), Image.Image)
