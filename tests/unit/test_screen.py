"""Fast CAR's screen: first-order estimates that are exact where the model is linear in the gate,
agree in rank with exact CAR on a real sample, and exact decisions that equal exact CAR."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from core.car import CarResult, CarScorer, compute_car, filter_ablation
from core.data import ImageSet, normalize
from core.sources import load_dataset
from core.groups import PruningGraph
from core.models import InputSpec, load_model
from core.screen import combine, right_probability, screen_filters, screened_order_scores, shortlist


class TwoClassNet(nn.Module):
    """conv -> ReLU -> global pool -> Linear(2): with two classes the margin z0 - z1 is linear in the
    gates of the Linear's input, so the first-order screen of the last conv's filters is exact."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 12, 3, padding=1)
        self.fc = nn.Linear(12, 2)

    def forward(self, x):
        x = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return self.fc(x.mean((2, 3)))


def _exact_car(model, spec, images, groups):
    scorer = CarScorer(model, spec, images)
    out = {}
    for g in groups:
        correct = scorer.accuracies([filter_ablation(g, [f]) for f in range(g.width)])
        out[g.gid] = scorer.baseline_accuracy - correct.float().mean(1).numpy()
    return out, scorer


def test_screen_is_exact_where_the_margin_is_linear_in_the_gate(one_thread):
    torch.manual_seed(0)
    model = TwoClassNet().eval()
    with torch.no_grad():  # no bias to dominate the margin, so that single filters flip predictions
        model.fc.bias.zero_()
        model.fc.weight.mul_(10)
    spec = InputSpec(height=16, width=16, mean=(0.5,) * 3, std=(0.25,) * 3)
    g = torch.Generator().manual_seed(1)
    colour = torch.randint(0, 256, (96, 3, 1, 1), generator=g)  # one random colour per image: varied margins
    noise = torch.randint(-20, 21, (96, 3, 16, 16), generator=g)
    images = ImageSet((colour + noise).clamp(0, 255).to(torch.uint8), torch.randint(0, 2, (96,), generator=g), ["a", "b"])
    groups = PruningGraph(model, spec.shape(1)).groups()
    last = next(gr for gr in groups if gr.root == "conv2")
    x = normalize(images.images, spec)
    screen = screen_filters(model, x, images.labels, [last], relative_error=0.0)
    exact, scorer = _exact_car(model, spec, images, [last])
    assert screen.baseline_accuracy == pytest.approx(scorer.baseline_accuracy)
    np.testing.assert_allclose(screen.car[last.gid], exact[last.gid], atol=1e-6)  # one image = 0.0104
    assert np.abs(screen.car[last.gid]).sum() > 0, "the test must exercise filters that change predictions"
    # the default (an assumed error on each first-order change) only softens the count near the cut
    soft = screen_filters(model, x, images.labels, [last]).car[last.gid]
    assert np.abs(soft - exact[last.gid]).max() < 0.5 * np.abs(exact[last.gid]).max()
    assert np.corrcoef(soft, exact[last.gid])[0, 1] > 0.9


def test_right_probability_softens_the_sign_test_by_the_size_of_the_change():
    margin = torch.tensor([[1.0], [1.0], [1.0], [-1.0], [2.0]])
    change = torch.tensor([[-3.0], [-1.0], [-0.5], [0.0], [0.0]])
    hard = right_probability(margin, change, 0.0).flatten().tolist()
    assert hard == [0.0, 0.0, 1.0, 0.0, 1.0]
    soft = right_probability(margin, change, 0.25).flatten()
    assert soft[1] == pytest.approx(0.5), "a new margin of exactly 0 is a coin flip"
    assert soft[0] < 0.01 and soft[2] > 0.99, "a change three times the margin or half of it is all but certain"
    assert soft[3] == 0.0 and soft[4] == 1.0, "no change, no doubt"
    wider = right_probability(margin, change, 1.0).flatten()
    assert soft[0] < wider[0] < 0.5 < wider[2] < soft[2], "a larger assumed error softens more"


def _scaled_loss(model, x, y, group, f, factor):
    """Mean cross-entropy with filter ``f`` of ``group`` scaled by ``factor`` in every consumer's input."""
    handles = []
    for name, idxs in group.ablation([f]).items():
        module = model.get_submodule(name)

        def hook(_m, args, idxs=idxs, module=module):
            x_in = args[0].clone()
            axis = 1 if not isinstance(module, nn.Linear) else -1
            index = [slice(None)] * x_in.dim()
            index[axis] = idxs
            x_in[tuple(index)] *= factor
            return (x_in,) + tuple(args[1:])
        handles.append(module.register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            return float(torch.nn.functional.cross_entropy(model(x), y))
    finally:
        for h in handles:
            h.remove()


def test_screened_loss_is_the_derivative_of_the_loss_in_the_filter_gate(one_thread):
    """The gates' gradients are wired to every consumer of every group (residual streams read by many
    convs included): the screened loss increase equals a finite difference of the real loss."""
    loaded = load_model("sample:resnet_shapes")
    spec = loaded.spec.input
    images = load_dataset("sample:resnet_shapes", spec).val.subset(48)
    groups = PruningGraph(loaded.model, spec.shape(1)).groups()
    model = loaded.model.double().eval()  # finite differences need float64
    x = normalize(images.images, spec).double()
    assert any(len(g.consumers) > 1 for g in groups), "the sample must have a group read by several layers"
    screen = screen_filters(model, x, images.labels, groups)
    eps = 1e-4
    base = _scaled_loss(model, x, images.labels, groups[0], 0, 1.0)
    for g in groups:
        for f in (0, g.width - 1):
            finite = (_scaled_loss(model, x, images.labels, g, f, 1.0 - eps) - base) / eps
            assert screen.loss_up[g.gid][f] == pytest.approx(finite, rel=1e-2, abs=1e-6), (g.root, f)


def test_fast_scores_use_exact_car_on_the_shortlist(one_thread):
    loaded = load_model("sample:resnet_shapes")
    spec = loaded.spec.input
    images = load_dataset("sample:resnet_shapes", spec).val.subset(64)
    groups = PruningGraph(loaded.model, spec.shape(1)).groups()
    screen = screen_filters(loaded.model, normalize(images.images, spec), images.labels, groups)
    screened = screened_order_scores(screen, groups)
    exact_all, scorer = _exact_car(loaded.model, spec, images, groups)
    picks = {}
    for g in groups:
        idx = shortlist(screened[g.gid], remove=4)
        assert 4 < len(idx) <= g.width
        picks[g.gid] = (idx, exact_all[g.gid][idx], exact_all[g.gid][idx])
    fast = combine(screened, picks, screen.car, groups)
    for g in groups:
        idx = picks[g.gid][0]
        assert fast.exact[g.gid][idx].all() and fast.exact[g.gid].sum() == len(idx)
        np.testing.assert_array_equal(fast.car[g.gid][idx], exact_all[g.gid][idx])
        # every exact filter ranks before every screened one of its group
        rest = ~fast.exact[g.gid]
        if rest.any():
            assert fast.scores[g.gid][idx].max() < fast.scores[g.gid][rest].min()
        # the cluster fast CAR removes is the lowest by exact CAR among the shortlist
        chosen = np.argsort(fast.scores[g.gid], kind="stable")[:4]
        assert set(chosen) <= set(idx.tolist())
        assert sorted(exact_all[g.gid][chosen]) == sorted(np.sort(exact_all[g.gid][idx])[:4])
    assert fast.n_exact < fast.n_filters


def test_fast_car_analysis_is_exact_where_it_says_so(one_thread):
    loaded = load_model("sample:vgg_digits")
    spec = loaded.spec.input
    images = load_dataset("sample:vgg_digits", spec).val.subset(100)
    exact = compute_car(loaded.model, spec, images, n_images=100, sensitivity=False)
    fast = compute_car(loaded.model, spec, images, n_images=100, sensitivity=False, method="fast", exact_fraction=0.2)
    assert not exact.exact and exact.n_exact == sum(len(v) for v in exact.car.values())
    total = sum(len(v) for v in fast.car.values())
    assert 0 < fast.n_exact < total and fast.mode.startswith("fast")
    for gid, flags in fast.exact.items():
        for f, is_exact in enumerate(flags):
            assert fast.is_exact(gid, f) == is_exact
            if is_exact:  # a measured figure equals the exact analysis' figure, per class too
                assert fast.car[gid][f] == exact.car[gid][f]
                assert fast.per_class[gid][f] == exact.per_class[gid][f]
    again = CarResult.from_dict(fast.to_dict())
    assert again.exact == fast.exact and again.n_exact == fast.n_exact
