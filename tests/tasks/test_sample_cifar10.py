"""The cifar10 sample: a real CIFAR-10 ResNet-20 (option-A shortcuts) with 2,000 real held-out images."""
from __future__ import annotations

import torch

from core.data import load_dataset as load_imagefolder
from core.evaluate import evaluate_accuracy
from core.groups import PruningGraph
from core.models import InputSpec, load_model, sample_entry
from core.sample_data import CIFAR10_ZIP, load_sample_dataset

SPEC = InputSpec(height=32, width=32, mean=(0.49, 0.48, 0.45), std=(0.25, 0.24, 0.26))


def test_bundled_zip_reads_the_same_through_the_imagefolder_loader():
    sample = load_sample_dataset("cifar10", SPEC)
    folder = load_imagefolder(CIFAR10_ZIP, SPEC)
    assert sample.class_names == folder.class_names
    assert (len(sample.train), len(sample.val), len(sample.test)) == (1200, 400, 400)
    for role in ("val", "test"):
        a, b = getattr(sample, role), getattr(folder, role)
        assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert torch.bincount(torch.cat([sample.train.labels, sample.val.labels, sample.test.labels])).tolist() == [200] * 10


def test_sample_reproduces_its_manifest_accuracy_and_prunes(one_thread):
    entry = sample_entry("cifar10")
    loaded = load_model("sample:cifar10")
    data = load_sample_dataset("cifar10", loaded.spec.input)
    acc = evaluate_accuracy(loaded.model, data.val, loaded.spec.input).accuracy
    assert acc >= 0.8, "a real CIFAR-10 ResNet-20, far above chance (10 %)"
    assert abs(acc - entry["accuracy"]) <= 0.005
    graph = PruningGraph(loaded.model, loaded.spec.input.shape(1))
    assert len(graph.notes) == 2, "both zero-padded shortcuts become prunable embeddings"
    stream = next(g for g in graph.groups() if g.width == 64 and len(g.consumers) > 2)
    graph.prune(stream.root, list(range(8)))
    assert graph.module(stream.root).weight.shape[0] == 56
    assert graph.model(torch.zeros(2, 3, 32, 32)).shape == (2, 10)


def test_an_analysis_of_the_sample_is_reused_by_a_prune_with_the_defaults(one_thread):
    """Issue 27: the Analyse page analyses a private copy, whose option-A shortcuts become convolutions when
    its PruningGraph is built; the prune's check on the model as loaded, and the run's own check on its
    converted graph, must both find that analysis to be theirs."""
    import copy

    from core.car import compute_car
    from core.engine import PruneConfig
    from core.jobs import reusable_car
    from core.tasks.classification.task import analysis_reuse, score_images_of

    loaded = load_model("sample:cifar10")
    data = load_sample_dataset("cifar10", loaded.spec.input)
    config = PruneConfig()  # the Prune page's defaults are the CLI's
    analysed = copy.deepcopy(loaded.model)
    car = compute_car(analysed, loaded.spec.input, data.val, n_images=config.score_images, method=config.car)
    assert type(analysed.layer2[0].shortcut).__name__ == "Conv2d", "the analysed copy was converted"
    assert type(loaded.model.layer2[0].shortcut).__name__ == "ZeroPadShortcut", "the loaded model was not"
    reuse, why = reusable_car(car, loaded.model, data.val, config)
    assert reuse, why
    graph = PruningGraph(copy.deepcopy(loaded.model), loaded.spec.input.shape(1))  # what the run scores on
    assert analysis_reuse(car, graph.model, score_images_of(data.val, config), config.car)[0]
    with torch.no_grad():
        graph.model.conv1.weight.mul_(1.01)
    assert analysis_reuse(car, graph.model, score_images_of(data.val, config), config.car) == (
        False, "the model changed")
