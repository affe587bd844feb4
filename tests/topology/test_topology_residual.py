"""Residual networks: identity shortcuts couple every block output of a stage into one group."""
import torchvision

from core.architectures import SampleResNet
from core.groups import PruningGraph
from tests._topology import assert_emulation_matches_surgery, assert_prunes_in_clusters
from tests.helpers import randomize_bn


def test_residual_stream_is_one_group():
    groups = PruningGraph(SampleResNet(), (1, 3, 32, 32)).groups()
    stream = [g for g in groups if "layer1.0.conv2" in g.producers][0]
    assert {"stem.0", "layer1.0.conv2", "layer1.1.conv2"} <= set(stream.producers)


def test_residual_emulation_matches_surgery():
    assert_emulation_matches_surgery(randomize_bn(SampleResNet(num_classes=6)), 32)
    assert_emulation_matches_surgery(randomize_bn(torchvision.models.resnet18(num_classes=4)), 64)


def test_residual_prunes_in_clusters(tmp_path):
    run = assert_prunes_in_clusters(randomize_bn(SampleResNet(num_classes=6)), "sample_resnet", 6, 32, tmp_path, steps=3)
    widths = run.history[-1]["widths"]
    # Coupled layers of a stream always keep the same width.
    assert widths["stem.0"] == widths["layer1.0.conv2"] == widths["layer1.1.conv2"]


def test_residual_prunes_several_clusters_per_step(tmp_path):
    """Three groups cut in one step (the residual stream among the candidates) rebuild and run."""
    assert_prunes_in_clusters(randomize_bn(SampleResNet(num_classes=6)), "sample_resnet", 6, 32, tmp_path, steps=2,
                              clusters_per_step=3)
