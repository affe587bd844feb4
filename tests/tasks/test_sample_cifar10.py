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
