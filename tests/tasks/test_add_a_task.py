"""docs/extending.md's "Adding a task" is real: a third task (image regression, ``tests/tasks/regression_task.py``)
registered by that one module is pruned end to end by the one loop, offered only the criteria it can feed, listed
by the CLI, and its run folder opens and rebuilds like any other."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from core import cli, criteria
from core.architectures import SampleVGG
from core.engine import run_task
from core.errors import SettingsError
from core.groups import PruningGraph
from core.models import InputSpec, LoadedModel, ModelSpec
from core.runs import Run
from core.tasks.registry import task_names, task_plugin, unregister_task

NAME = "regression"

@pytest.fixture(autouse=True, scope="module")
def regression():
    """The third task's one module, imported here (which registers it) and unregistered after this file, so that
    no other test of this process sees a task it does not expect."""
    import importlib

    module = importlib.reload(importlib.import_module("tests.tasks.regression_task"))
    yield module
    unregister_task(NAME)


SPEC = InputSpec(height=16, width=16, channels=3, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))


def regression_data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Noise images whose target is the mean of their red top-left quadrant (scaled to unit spread)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 16, 16, generator=g)
    y = x[:, 0, :8, :8].mean(dim=(1, 2)).unsqueeze(1) * 8.0
    return x, y


@pytest.fixture(scope="module")
def trained():
    """A small VGG with one output, trained until it predicts the target well (R² ~0.9 on unseen images)."""
    torch.manual_seed(0)
    model = SampleVGG(num_classes=1, widths=(16, 16, 32, 32, 64, 64))
    train, val = regression_data(1024, 0), regression_data(256, 1)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(2)
    model.train()
    for _ in range(300):
        idx = torch.randint(0, len(train[0]), (64,), generator=g)
        loss = F.mse_loss(model(train[0][idx]), train[1][idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), train, val


def test_registering_one_module_makes_a_task_everywhere():
    assert NAME in task_names() and task_plugin(NAME).metric_name == "R2"
    # it supplies neither measured removals nor gradients: CAR and Taylor are not offered, L1 and random are
    assert criteria.names(NAME) == ("l1", "random")
    with pytest.raises(SettingsError, match="not available for regression"):
        criteria.get("car", NAME)
    parser = cli.build_parser()
    task_choices = parser._subparsers._group_actions[0].choices["prune"]._option_string_actions["--task"].choices
    assert NAME in task_choices


def test_the_cli_says_what_the_task_does_not_offer(tmp_path, capsys):
    code = cli.main(["prune", "--task", NAME, "--model", "sample:vgg_digits", "--data", "sample:digits",
                     "--out", str(tmp_path / "run")])
    assert code != 0
    err = capsys.readouterr().err
    assert "The regression task does not offer prune cli." in err and "Traceback" not in err


def test_the_one_loop_prunes_the_third_task_end_to_end(trained, regression, tmp_path):
    model, train, val = trained
    r2_score = regression.r2_score
    base_r2 = r2_score(model(val[0]).detach(), val[1])
    assert base_r2 > 0.6, base_r2  # a model worth pruning
    config = regression.RegressionPruneConfig(cluster=4, max_drop=10.0, mac_target=0.6, finetune_steps=20, finetune_lr=0.005,
                                   batch_size=64, clusters_per_step=2, step_macs=None, max_steps=8)
    loaded = LoadedModel(model, ModelSpec(arch="sample_vgg", num_classes=1, input=SPEC, source="test"))
    summary = run_task(regression.RegressionTask(SPEC, train, val, config), loaded, {"data_source": "synthetic"}, tmp_path / "run")
    assert summary["state"] == "done", summary

    run = Run(tmp_path / "run")
    assert run.task == NAME and run.metric_name == "R2"
    history = run.history
    assert len(history) >= 2, "the loop kept no step"
    first, last = history[0], history[-1]
    assert last["macs"] < first["macs"]
    assert sum(last["widths"].values()) < sum(first["widths"].values())
    assert (first["metric"] - last["metric"]) * 100 <= config.max_drop + 1e-9

    # the run rebuilds the step from its folder (through the plug-in's rebuild hook): fewer channels, same figure
    pruned = run.rebuild_step(last["step"]).eval()
    convs = [m for m in pruned.modules() if isinstance(m, torch.nn.Conv2d)]
    original_convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert sum(c.out_channels for c in convs) < sum(c.out_channels for c in original_convs)
    assert all(c.out_channels % 4 == 0 for c in convs)  # hardware-sized clusters
    with torch.no_grad():
        out = pruned(val[0])
    assert out.shape == (len(val[0]), 1)
    assert r2_score(out, val[1]) == pytest.approx(last["metric"], abs=1e-5)
    assert PruningGraph(pruned, SPEC.shape(1)).groups()  # the rebuilt model is a graph the loop could go on with
    assert np.isfinite(last["metric"])
