"""Squeeze-and-excitation (MobileNetV3, EfficientNet-B0): the excitation's output scales the very
channels it was computed from, so its second layer is a producer of the block's expanded group."""
import torchvision

from core.groups import PruningGraph
from tests._topology import assert_emulation_matches_surgery, assert_prunes_in_clusters
from tests.helpers import randomize_bn


def _mobilenet_v3():
    return randomize_bn(torchvision.models.mobilenet_v3_small(num_classes=4))


def test_excitation_is_coupled_with_the_channels_it_scales():
    groups = PruningGraph(_mobilenet_v3(), (1, 3, 64, 64)).groups()
    expanded = next(g for g in groups if "features.4.block.2.fc2" in g.producers)
    assert "features.4.block.0.0" in expanded.producers  # the expansion conv
    assert "features.4.block.2.fc1" in expanded.consumers  # the squeeze reads them
    assert "features.4.block.3.0" in expanded.consumers  # the projection reads them


def test_se_emulation_matches_surgery():
    assert_emulation_matches_surgery(_mobilenet_v3(), 64)
    assert_emulation_matches_surgery(randomize_bn(torchvision.models.efficientnet_b0(num_classes=4)), 64, max_groups=4)


def test_se_prunes_in_clusters(tmp_path):
    assert_prunes_in_clusters(_mobilenet_v3(), "mobilenet_v3_small", 4, 64, tmp_path)
    assert_prunes_in_clusters(randomize_bn(torchvision.models.efficientnet_b0(num_classes=4)), "efficientnet_b0", 4, 64,
                              tmp_path / "b0", steps=1)
