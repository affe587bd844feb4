"""Depthwise-separable networks: a depthwise conv and its neighbours form one group."""
import torchvision

from tests._topology import assert_emulation_matches_surgery, assert_prunes_in_clusters
from tests.helpers import randomize_bn


def _mobilenet():
    return randomize_bn(torchvision.models.mobilenet_v2(num_classes=4))


def test_depthwise_emulation_matches_surgery():
    assert_emulation_matches_surgery(_mobilenet(), 32)


def test_depthwise_prunes_in_clusters(tmp_path):
    run = assert_prunes_in_clusters(_mobilenet(), "mobilenet_v2", 4, 32, tmp_path)
    widths = run.history[-1]["widths"]
    # Every depthwise conv still matches the width of the expansion conv that feeds it.
    for name, w in widths.items():
        if name.endswith("conv.1.0"):
            assert w == widths[name.replace("conv.1.0", "conv.0.0")]


def test_depthwise_prunes_several_clusters_per_step(tmp_path):
    assert_prunes_in_clusters(_mobilenet(), "mobilenet_v2", 4, 32, tmp_path, steps=1, clusters_per_step=3)
