"""Run-time estimate before Start (core.estimate): measured on the real model, scaled by the flow's work.

No assertion compares an estimate with wall-clock time: the rates below are fixed so that the formula's
scaling is checked exactly; one test checks that calibration runs the real model."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from core.architectures import SampleVGG, cifar_resnet20
from core.errors import SettingsError
from core.estimate import Rates, estimate_prune_time, measure_rates
from core.models import InputSpec
from core.prune import PruneConfig

SPEC = InputSpec(height=32, width=32)


RATES = Rates(forward_image=(0.001, 0.002), train_step=(0.05, 0.1), ablation_image=(0.0005, 0.001),
              screen_image=(0.003, 0.006), ov_setup=(1.0, 1.0), ov_inference=(0.001, 0.002), batch_size=64)


def _est(config: PruneConfig, model: nn.Module | None = None, n_val: int = 400):
    return estimate_prune_time(model or cifar_resnet20().eval(), SPEC, n_val, config, rates=RATES)


def test_more_fine_tuning_more_images_or_a_lower_mac_target_take_longer():
    base = PruneConfig(mac_target=0.6, max_steps=100, finetune_steps=20)
    e = _est(base)
    assert 0 < e.seconds_low <= e.seconds_high and e.steps[0] <= e.steps[1]
    twice = _est(dataclasses.replace(base, finetune_steps=40))
    tuning = "steps: fine-tuning, evaluation, latency"
    # exactly the added fine-tuning: 20 more mini-batches per attempt, per step
    assert twice.breakdown[tuning][0] - e.breakdown[tuning][0] == pytest.approx(e.steps[0] * 20 * 0.05)
    assert twice.seconds_low > e.seconds_low and twice.seconds_high > e.seconds_high
    assert _est(base, n_val=800).seconds_low > e.seconds_low
    deeper = _est(dataclasses.replace(base, mac_target=0.3))
    assert deeper.steps[0] > e.steps[0] and deeper.seconds_low > e.seconds_low


def test_the_analysis_and_latency_parts_follow_the_settings():
    base = PruneConfig(mac_target=0.6, max_steps=100, car="exact")
    exact = _est(base)
    fast = _est(dataclasses.replace(base, car="fast"))  # PruneConfig's own field decides the method
    assert fast.breakdown["original: CAR analysis"][0] < exact.breakdown["original: CAR analysis"][0]
    assert "original: CAR analysis" not in _est(dataclasses.replace(base, analyse_car=False)).breakdown
    assert _est(dataclasses.replace(base, latency=False)).seconds_low < exact.seconds_low
    assert _est(dataclasses.replace(base, criterion="l1")).breakdown["steps: scoring"] == (0.0, 0.0)
    # exact CAR analysis = (filters + sensitivity points) x images x ablation rate; ResNet-20: 448 filters
    # (16 + 3 x 16 + 32 + 3 x 32 + 64 + 3 x 64) in 12 groups, 9 sensitivity points each; 400 score images
    assert exact.breakdown["original: CAR analysis"][0] == pytest.approx((448 + 12 * 9) * 400 * 0.0005)


def test_the_step_count_stops_at_the_step_limit_or_when_no_group_can_lose_a_cluster():
    assert _est(PruneConfig(mac_target=None, max_steps=3)).steps == (3, 3)
    # SampleVGG, cluster 8: widths 16,16,32,32,64,64 can lose 1+1+3+3+7+7 = 22 clusters in all
    one = PruneConfig(mac_target=None, max_steps=500, clusters_per_step=1, step_macs=None)
    assert _est(one, SampleVGG().eval()).steps == (22, 22)
    # the default step takes clusters until they save 4 % of the MACs: the same 22 removals in fewer steps
    low, high = _est(PruneConfig(mac_target=None, max_steps=500), SampleVGG().eval()).steps
    assert 22 / PruneConfig().clusters_per_step <= min(low, high) and max(low, high) < 22


def test_a_time_budget_caps_the_estimate_and_says_what_it_buys():
    base = PruneConfig(mac_target=0.5, max_steps=100, control=False, recover_epochs=0)
    free = _est(base)
    assert free.budget_buys is None, "no budget, nothing to say about one"
    roomy = _est(dataclasses.replace(base, time_budget=24 * 60.0))
    # a budget longer than the whole run buys every expected step and the MAC target
    assert roomy.budget_buys["fast"]["steps"] == free.steps[0] and roomy.budget_buys["slow"]["steps"] == free.steps[1]
    assert roomy.budget_buys["fast"]["mac_fraction"] <= 0.5 + 1e-9
    tight_minutes = free.seconds_high / 60 / 3
    tight = _est(dataclasses.replace(base, time_budget=tight_minutes))
    assert tight.seconds_high == pytest.approx(tight_minutes * 60)
    slow, fast = tight.budget_buys["slow"], tight.budget_buys["fast"]
    assert slow["steps"] < free.steps[1], "a third of the slow end's time cannot buy all of its steps"
    assert 0.5 <= slow["mac_fraction"] <= 1.0 and 0.0 < fast["mac_fraction"] <= 1.0
    assert _est(dataclasses.replace(base, time_budget=0.001)).budget_buys["slow"] == {"steps": 0, "mac_fraction": 1.0}


class _Counted(nn.Module):
    calls = 0  # a class attribute: calibration works on copies of the model, and they all count here

    def __init__(self):
        super().__init__()
        self.net = SampleVGG(widths=(8, 8, 8, 8, 8, 8))

    def forward(self, x):
        type(self).calls += 1
        return self.net(x)


def test_calibration_runs_the_real_model(one_thread):
    model = _Counted().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rates = measure_rates(model, SPEC, batch_size=8, latency=False)
    assert _Counted.calls > 5, "forward, training steps and the CAR engine all ran the model"
    assert all(v > 0 for pair in (rates.forward_image, rates.train_step, rates.ablation_image) for v in pair)
    assert rates.ov_setup == (0.0, 0.0) and rates.batch_size == 8
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()), "the model is not changed"
    e = estimate_prune_time(model, SPEC, 100, PruneConfig(mac_target=0.5, latency=False, batch_size=8), rates=rates)
    assert e.seconds_low > 0 and "measured on this machine" in e.label()


def test_a_model_without_prunable_groups_is_refused():
    with pytest.raises(SettingsError, match="no prunable"):
        measure_rates(nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 4)).eval(), SPEC, batch_size=4, latency=False)


def test_the_step_range_reads_as_one_number_when_both_ends_agree():
    """Issue 27: the estimate said "(4–4 steps)"."""
    from core.estimate import Estimate

    assert Estimate(10.0, 20.0, steps=(4, 4)).steps_text() == "4 steps"
    assert Estimate(10.0, 20.0, steps=(1, 1)).steps_text() == "1 step"
    assert Estimate(10.0, 20.0, steps=(3, 7)).steps_text() == "3–7 steps"
    assert "(4 steps)" in Estimate(10.0, 20.0, steps=(4, 4)).label()


def test_what_a_budget_buys_leaves_room_for_the_last_recovery_and_the_control():
    """A budgeted run keeps time back for its last step's recovery and the control (core.engine.time_to_finish),
    so the same budget buys fewer steps with them than without."""
    bare = PruneConfig(mac_target=0.5, max_steps=100, control=False, recover_epochs=0)
    free = estimate_prune_time(cifar_resnet20().eval(), SPEC, 400, bare, rates=RATES, n_train=5000)
    minutes = free.seconds_high / 60 / 2
    without = estimate_prune_time(cifar_resnet20().eval(), SPEC, 400, dataclasses.replace(bare, time_budget=minutes),
                                  rates=RATES, n_train=5000).budget_buys
    full = dataclasses.replace(bare, time_budget=minutes, control=True, recover_epochs=2)
    keeping = estimate_prune_time(cifar_resnet20().eval(), SPEC, 400, full, rates=RATES, n_train=5000).budget_buys
    assert keeping["slow"]["steps"] < without["slow"]["steps"]
    assert keeping["slow"]["mac_fraction"] >= without["slow"]["mac_fraction"]


def test_the_recoveries_upper_bound_counts_a_stretch_at_its_longer_recovery():
    """Any of the ``max_recoveries`` may be a stretch, recovered for ``STRETCH_EPOCHS`` times the epochs, plus the
    last step's recovery: the high end of the recoveries is (10 x 3 + 1) x 2 epochs with stretches, (10 + 1) x 2
    without, and the control repeats them."""
    from core.engine import STRETCH_EPOCHS

    config = PruneConfig(mac_target=0.5, max_steps=100, control=True, recover_epochs=2, max_recoveries=10)
    with_stretch, without = (estimate_prune_time(cifar_resnet20().eval(), SPEC, 400,
                                                 dataclasses.replace(config, stretch=s), rates=RATES, n_train=5000)
                             for s in (True, False))
    key = "recoveries when the threshold stalls the run"
    high, plain = with_stretch.breakdown[key][1], without.breakdown[key][1]
    assert with_stretch.breakdown[key][0] == 0.0, "a run may never stall"
    assert high / plain == pytest.approx((10 * STRETCH_EPOCHS + 1) / 11)
    assert with_stretch.seconds_high > without.seconds_high


@pytest.mark.parametrize("make", [cifar_resnet20, SampleVGG,
                                  lambda: __import__("torchvision").models.mobilenet_v2(num_classes=10)],
                         ids=["resnet20-zero-pad-shortcuts", "vgg", "mobilenet_v2-depthwise"])
def test_the_simulated_macs_are_the_pruned_model_s(make):
    """The step simulation's MACs (MacModel) equal what the real pruner leaves, removal after removal: the old
    per-filter sum counted a consumer's saving at its original width and, pruned far, passed the whole model."""
    import random

    from core.criteria import new_width
    from core.estimate import MacModel
    from core.evaluate import count_macs_params
    from core.groups import PruningGraph

    graph = PruningGraph(make().eval(), SPEC.shape(1))
    groups = [g for g in graph.groups() if not g.left_alone]
    macs = MacModel(graph.model, SPEC, groups)
    assert macs.total() == count_macs_params(graph.model, SPEC)[0]
    widths, pick = {g.gid: g.width for g in groups}, random.Random(0)
    for _ in range(8):
        group = pick.choice(groups)
        target = new_width(widths[group.gid], 8)
        if target is None:
            continue
        expected = macs.total(widths) - macs.saving(widths, group.gid, target)
        graph.prune(group.root, list(range(widths[group.gid] - target)))
        widths[group.gid] = target
        assert count_macs_params(graph.model, SPEC)[0] == pytest.approx(expected, rel=1e-9)
        assert macs.total(widths) == pytest.approx(expected, rel=1e-9)


def test_what_a_budget_buys_never_leaves_less_than_nothing():
    """No MAC target and a budget that buys every step: the ResNet-20 at one cluster a group keeps its stem, head
    and one cluster a group, a fraction in (0, 1); the per-filter sum read -39 % here."""
    config = PruneConfig(mac_target=None, max_steps=500, time_budget=24 * 60.0, control=False, recover_epochs=0)
    buys = _est(config).budget_buys
    assert 0.05 < buys["fast"]["mac_fraction"] < 0.5
    assert buys["slow"]["mac_fraction"] == pytest.approx(buys["fast"]["mac_fraction"]), "both ends prune all there is"


def test_the_slow_end_of_what_a_budget_buys_recovers_every_step_at_length():
    """The slow end counts each step stalled and recovered at a stretch's longest, and the control repeating it:
    stretches and the control make the same budget buy fewer steps there, while the fast end (no stall) is
    unchanged."""
    from core.estimate import _stall_seconds
    from core.engine import RETRY_STRETCH_EPOCHS, STRETCH_EPOCHS

    base = PruneConfig(mac_target=None, max_steps=100, recover_epochs=2, control=False, stretch=False,
                       time_budget=30.0)
    ends = {}
    for name, config in (("plain", base), ("stretch", dataclasses.replace(base, stretch=True)),
                         ("stretch+control", dataclasses.replace(base, stretch=True, control=True))):
        ends[name] = estimate_prune_time(cifar_resnet20().eval(), SPEC, 400, config, rates=RATES, n_train=5000)
    epoch = 79 * RATES.train_step[1]  # ceil(5000 / 64) batches
    assert _stall_seconds(base, RATES, 5000) == pytest.approx(2 * epoch)
    assert _stall_seconds(dataclasses.replace(base, stretch=True, control=True), RATES, 5000) == pytest.approx(
        2 * (2 * STRETCH_EPOCHS * RETRY_STRETCH_EPOCHS * epoch))
    slow = [ends[n].budget_buys["slow"]["steps"] for n in ("plain", "stretch", "stretch+control")]
    assert slow[0] > slow[1] > slow[2] >= 1
    fast_steps = {ends[n].budget_buys["fast"]["steps"] for n in ("plain", "stretch")}
    assert len(fast_steps) == 1, "the fast end has no stall"
