"""Plain chains (VGG-style): every conv is its own group."""
from core.architectures import SampleVGG
from tests._topology import assert_emulation_matches_surgery, assert_prunes_in_clusters
from tests.helpers import randomize_bn


def test_plain_emulation_matches_surgery():
    assert_emulation_matches_surgery(randomize_bn(SampleVGG(num_classes=5)), 32)


def test_plain_prunes_in_clusters(tmp_path):
    assert_prunes_in_clusters(randomize_bn(SampleVGG(num_classes=5)), "sample_vgg", 5, 32, tmp_path)
