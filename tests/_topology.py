"""Shared checks for the per-topology tests: emulation matches surgery, and one pruning run works."""
from __future__ import annotations

import copy

import torch

from core.ablation import zeroed_inputs
from core.car import filter_ablation
from core.groups import PruningGraph
from core.prune import run_pruning
from core.runs import Run, removals
from tests.helpers import loaded, quick_config, random_dataset


def assert_emulation_matches_surgery(model: torch.nn.Module, size: int, max_groups: int = 6, groups_filter=None) -> None:
    """For a filter of several groups: logits with the filter's consumer inputs zeroed equal the logits
    of a copy in which Torch-Pruning really removed that filter."""
    model = model.eval()
    x = torch.randn(4, 3, size, size)
    graph = PruningGraph(model, (1, 3, size, size))
    groups = [g for g in graph.groups() if groups_filter is None or groups_filter(g)]
    assert groups
    step = max(1, len(groups) // max_groups)
    for g in groups[::step]:
        f = g.width // 2
        with torch.no_grad(), zeroed_inputs(model, filter_ablation(g, [f])):
            emulated = model(x)
        real = PruningGraph(copy.deepcopy(model), (1, 3, size, size))
        real.prune(g.root, [f])
        with torch.no_grad():
            removed = real.model(x)
        assert torch.allclose(emulated, removed, atol=1e-4, rtol=1e-3), f"group {g.label}"


def assert_prunes_in_clusters(model, arch: str, num_classes: int, size: int, tmp_path, cluster: int = 8, steps: int = 2,
                              lm=None, clusters_per_step: int = 1):
    """A short run removes real channels in multiples of the cluster size and every step rebuilds.

    ``lm`` overrides the LoadedModel (for custom architectures, whose spec must name their code);
    ``clusters_per_step`` > 1: each step removes that many clusters together (asserted)."""
    data = random_dataset(num_classes, size=size)
    lm = lm or loaded(model, arch, num_classes, size)
    before = PruningGraph(copy.deepcopy(model), (1, 3, size, size)).widths()
    summary = run_pruning(lm, data, quick_config(cluster=cluster, max_steps=steps, clusters_per_step=clusters_per_step),
                          tmp_path / "run")
    assert summary["steps"] >= 1
    assert summary["final_macs"] < summary["baseline_macs"]
    run = Run(tmp_path / "run")
    for record in run.history[1:]:
        assert len(removals(record)) == clusters_per_step, "max-drop 100: a group move is never undone"
        for removed in removals(record):
            assert removed["width_after"] % cluster == 0 and removed["width_after"] >= cluster
            assert record["widths"][removed["producers"][0]] == removed["width_after"]
    last = run.history[-1]
    rebuilt = run.rebuild_step(last["step"])
    widths = {n: (m.out_channels if isinstance(m, torch.nn.Conv2d) else m.out_features)
              for n, m in rebuilt.named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))}
    assert widths == last["widths"]
    assert sum(widths.values()) < sum(before.values()), "channels were really removed"
    with torch.no_grad():
        out = rebuilt(torch.randn(2, 3, size, size))
    assert out.shape == (2, num_classes)
    return run
