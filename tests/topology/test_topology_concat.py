"""Concatenations (GoogLeNet/Inception, DenseNet, SqueezeNet fire modules): the channels of a concat
map to slices of the consumer's input, so one producer's filter is read at an offset."""
import torchvision

from core.groups import PruningGraph
from tests._topology import assert_emulation_matches_surgery, assert_prunes_in_clusters
from tests.helpers import randomize_bn


def test_fire_module_expand_branches_feed_the_next_squeeze_at_offsets():
    model = randomize_bn(torchvision.models.squeezenet1_1(num_classes=4))
    groups = {g.root: g for g in PruningGraph(model, (1, 3, 64, 64)).groups()}
    e1, e3 = groups["features.3.expand1x1"], groups["features.3.expand3x3"]
    # expand1x1 fills channels [0, 64) of the concat, expand3x3 channels [64, 128).
    assert e1.consumers["features.4.squeeze"][0] == [0]
    assert e3.consumers["features.4.squeeze"][0] == [e1.width]


def test_concat_emulation_matches_surgery():
    assert_emulation_matches_surgery(randomize_bn(torchvision.models.squeezenet1_1(num_classes=4)), 64)
    assert_emulation_matches_surgery(randomize_bn(torchvision.models.googlenet(num_classes=4, aux_logits=False,
                                                                               init_weights=False)), 64)
    assert_emulation_matches_surgery(randomize_bn(torchvision.models.densenet121(num_classes=4)), 32, max_groups=4)


def test_squeezenet_prunes_in_clusters(tmp_path):
    assert_prunes_in_clusters(randomize_bn(torchvision.models.squeezenet1_1(num_classes=4)), "squeezenet1_1", 4, 64,
                              tmp_path)


def test_densenet_prunes_in_clusters(tmp_path):
    run = assert_prunes_in_clusters(randomize_bn(torchvision.models.densenet121(num_classes=4)), "densenet121", 4, 32,
                                    tmp_path, steps=1)
    assert len(run.history) == 2
