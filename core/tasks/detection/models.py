"""SSD detectors whose graph ends at the raw head output, and the registry that rebuilds them by name.

Every detector here returns ONE tensor ``[N, A, 4 + C]`` (box deltas, then class logits with the
background at index 0) and nothing else: no anchors, no decoding, no NMS in the graph. That keeps
three later steps simple and exact:

- channel pruning (Torch-Pruning's dependency graph) traces one output of fixed shape;
- ONNX / OpenVINO export is a static graph of convolutions, with no data-dependent ops that the
  NCS2 toolchain would refuse;
- decoding and NMS run on the host in numpy (``core.tasks.detection.postprocess``), identically for the
  PyTorch model, the OpenVINO IR and the deploy script.

Anchors are data, not graph: ``model.anchors()`` gives them as numpy ``[A, 4]``, normalised
``(cx, cy, w, h)``, in the order of the A rows of the output. They come from torchvision's
``DefaultBoxGenerator`` (the SSD paper's default boxes), computed once per input size from the real
feature-map sizes, so they stay right for any backbone width (pruning changes channels, never the
spatial grid).

The torchvision SSDLite wrapper keeps torchvision's module names (``backbone.*``, ``head.*``), so a
state dict of ``torchvision.models.detection.ssdlite320_mobilenet_v3_large`` loads into it as it is.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from functools import partial
from typing import Callable

import numpy as np
import torch
from torch import nn
from torchvision.models.detection.anchor_utils import DefaultBoxGenerator
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.ssd import SSDHead
from torchvision.models.detection.ssdlite import SSDLiteHead
from torchvision.models.mobilenetv2 import InvertedResidual
from torchvision.ops.misc import Conv2dNormActivation

from ...errors import ModelLoadError
from .postprocess import SSD_BOX_CODER_WEIGHTS

# torchvision's SSDLite normalisation layer: the small momentum suits detection's small batches.
_LITE_NORM = partial(nn.BatchNorm2d, eps=0.001, momentum=0.03)


class SSDDetector(nn.Module):
    """Backbone (image -> list of feature maps) + SSD head (feature maps -> deltas, logits), concatenated.

    ``num_classes`` counts the background (torchvision's convention): object labels are 1..num_classes-1.
    ``config`` holds what ``build_detector`` needs to rebuild the same architecture without pickle.
    """

    box_coder_weights = SSD_BOX_CODER_WEIGHTS

    def __init__(self, backbone: nn.Module, head: nn.Module, anchor_generator: DefaultBoxGenerator,
                 num_classes: int, input_size: tuple[int, int], config: dict):
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.anchor_generator = anchor_generator
        self.num_classes = num_classes
        self.input_size = tuple(input_size)
        self.config = dict(config)
        self._anchor_cache: dict[tuple[int, int], np.ndarray] = {}

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = self.backbone(x)
        return list(feats.values()) if isinstance(feats, dict) else list(feats)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.head(self.features(x))
        return torch.cat([out["bbox_regression"], out["cls_logits"]], dim=2)

    def output_layers(self) -> list[nn.Conv2d]:
        """The head's last convs, whose output channels *are* the [A, 4 + C] layout.

        Channel pruning must leave their outputs alone (Torch-Pruning: ``ignored_layers``); their
        inputs, and everything before them, may be pruned without changing the output shape.
        """
        layers = []
        for head in (self.head.classification_head, self.head.regression_head):
            for entry in head.module_list:
                layers.append([m for m in entry.modules() if isinstance(m, nn.Conv2d)][-1])
        return layers

    def anchors(self, input_size: tuple[int, int] | None = None) -> np.ndarray:
        """Anchors [A, 4] float32, normalised (cx, cy, w, h), row a matching output row a."""
        size = tuple(input_size or self.input_size)
        if size not in self._anchor_cache:
            self._anchor_cache[size] = default_boxes(self.anchor_generator, self.feature_grid(size), size)
        return self._anchor_cache[size].copy()

    def feature_grid(self, input_size: tuple[int, int]) -> list[tuple[int, int]]:
        """(height, width) of every feature map for this input size, measured by a forward pass."""
        was_training = self.training
        self.eval()
        try:
            with torch.no_grad():
                feats = self.features(torch.zeros(1, 3, *input_size))
        finally:
            self.train(was_training)
        return [tuple(f.shape[-2:]) for f in feats]


def default_boxes(generator: DefaultBoxGenerator, grid: list[tuple[int, int]], input_size: tuple[int, int]) -> np.ndarray:
    """torchvision's default boxes for these feature-map sizes, as normalised (cx, cy, w, h) numpy.

    Goes through the generator's public forward (pixel x1y1x2y2) rather than its private helpers, so
    a torchvision upgrade cannot silently change the layout; converting back is exact up to float32.
    """
    h, w = input_size
    images = ImageList(torch.zeros(1, 3, h, w), [(h, w)])
    feature_maps = [torch.zeros(1, 1, gh, gw) for gh, gw in grid]
    xyxy = generator(images, feature_maps)[0].double()
    xyxy = xyxy / torch.tensor([w, h, w, h], dtype=torch.float64)
    cxcy = (xyxy[:, :2] + xyxy[:, 2:]) / 2
    wh = xyxy[:, 2:] - xyxy[:, :2]
    return torch.cat([cxcy, wh], dim=1).float().numpy()


# ----------------------------------------------------------------------------- torchvision SSDLite


def ssdlite320_mobilenet_v3_large(num_classes: int, input_size: tuple[int, int] = (320, 320)) -> SSDDetector:
    """torchvision's SSDLite320-MobileNetV3-Large, untrained, with its backbone, head and anchors unchanged."""
    from torchvision.models.detection import ssdlite320_mobilenet_v3_large as tv_ssdlite

    tv = tv_ssdlite(weights=None, weights_backbone=None, num_classes=num_classes)
    return SSDDetector(tv.backbone, tv.head, tv.anchor_generator, num_classes, input_size,
                       {"arch": "ssdlite320_mobilenet_v3_large", "num_classes": num_classes, "input_size": list(input_size)})


# ----------------------------------------------------------------------------- SSD(-Lite) MobileNetV2


class MobileNetV2Features(nn.Module):
    """MobileNetV2 features cut as in the MobileNetV2 paper's SSDLite (section 6.2), plus extra layers.

    The first detection map is the expansion output of the last stride-2 block (stride 16), the
    second the backbone's last 1x1 conv (stride 32); extra blocks then halve the grid down to 1x1.
    """

    def __init__(self, width_mult: float = 1.0, extra_channels: tuple[int, ...] = (512, 256, 256, 128),
                 norm_layer: Callable[..., nn.Module] = _LITE_NORM):
        super().__init__()
        from torchvision.models import mobilenet_v2

        features = mobilenet_v2(weights=None, width_mult=width_mult, norm_layer=norm_layer).features
        c4 = max(i for i, b in enumerate(features) if isinstance(b, InvertedResidual) and b.stride == 2)
        self.body = nn.ModuleList([
            nn.Sequential(*features[:c4], features[c4].conv[0]),
            nn.Sequential(*features[c4].conv[1:], *features[c4 + 1:]),
        ])
        channels = [features[c4].conv[0].out_channels, features[-1].out_channels]
        depth = [max(16, int(c * width_mult)) for c in extra_channels]
        self.extra = nn.ModuleList()
        for cout in depth:
            self.extra.append(extra_block(channels[-1], cout, norm_layer))
            channels.append(cout)
        self.out_channels = channels

    def forward(self, x: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        out = []
        for block in [*self.body, *self.extra]:
            x = block(x)
            out.append(x)
        return OrderedDict((str(i), v) for i, v in enumerate(out))


def extra_block(cin: int, cout: int, norm_layer: Callable[..., nn.Module] = _LITE_NORM) -> nn.Sequential:
    """SSDLite extra layer: 1x1 to half width, 3x3 depthwise stride 2, 1x1 to ``cout`` (as torchvision's SSDLite)."""
    mid = max(cout // 2, 8)
    return nn.Sequential(
        Conv2dNormActivation(cin, mid, 1, norm_layer=norm_layer, activation_layer=nn.ReLU6),
        Conv2dNormActivation(mid, mid, 3, stride=2, groups=mid, norm_layer=norm_layer, activation_layer=nn.ReLU6),
        Conv2dNormActivation(mid, cout, 1, norm_layer=norm_layer, activation_layer=nn.ReLU6),
    )


def ssd_mobilenet_v2(num_classes: int, input_size: tuple[int, int] = (300, 300), width_mult: float = 1.0,
                     head: str = "ssdlite") -> SSDDetector:
    """SSD on MobileNetV2 features, six detection maps; ``head`` 'ssdlite' (depthwise + 1x1) or 'ssd' (3x3 conv)."""
    backbone = MobileNetV2Features(width_mult)
    generator = DefaultBoxGenerator([[2, 3] for _ in range(6)], min_ratio=0.2, max_ratio=0.95)
    heads = _make_head(head, backbone.out_channels, generator.num_anchors_per_location(), num_classes)
    return SSDDetector(backbone, heads, generator, num_classes, input_size,
                       {"arch": "ssd_mobilenet_v2", "num_classes": num_classes, "input_size": list(input_size),
                        "width_mult": width_mult, "head": head})


def _make_head(kind: str, channels: list[int], anchors_per_loc: list[int], num_classes: int) -> nn.Module:
    if kind == "ssdlite":
        return SSDLiteHead(channels, anchors_per_loc, num_classes, _LITE_NORM)
    if kind == "ssd":
        return SSDHead(channels, anchors_per_loc, num_classes)
    raise ModelLoadError(f"Unknown SSD head '{kind}': choose 'ssdlite' (depthwise + 1x1) or 'ssd' (3x3 conv).")


# ----------------------------------------------------------------------------- the bundled sample


SAMPLE_BLOCKS = (  # (expand ratio, out channels, stride) of each inverted residual block, MobileNetV2 style
    (1, 16, 1),
    (4, 24, 2),
    (4, 24, 1),
    (4, 32, 2),
    (4, 32, 1),   # -> detection map 1, stride 8
    (4, 64, 2),
    (4, 64, 1),   # -> detection map 2, stride 16
)
SAMPLE_TAPS = (4, 6)  # indices in SAMPLE_BLOCKS whose outputs are detection maps


class SampleBackbone(nn.Module):
    """A small MobileNetV2-style backbone (inverted residuals with shortcuts) and one extra block.

    Small enough to train on a CPU in minutes, yet built from the same parts as SSD-MobileNetV2
    (residual adds, depthwise convs, several detection maps), so pruning it exercises the same
    coupled channel groups as the real detectors.
    """

    def __init__(self, stem: int = 16, blocks=SAMPLE_BLOCKS, taps=SAMPLE_TAPS, extra: int = 64):
        super().__init__()
        self.stem = Conv2dNormActivation(3, stem, 3, stride=2, norm_layer=nn.BatchNorm2d, activation_layer=nn.ReLU6)
        stages, cin, start = [], stem, 0
        self.out_channels = []
        for tap in taps:
            layers = []
            for t, cout, s in blocks[start:tap + 1]:
                layers.append(InvertedResidual(cin, cout, s, t))
                cin = cout
            stages.append(nn.Sequential(*layers))
            self.out_channels.append(cin)
            start = tap + 1
        self.stages = nn.ModuleList(stages)
        self.extra = extra_block(cin, extra, nn.BatchNorm2d)
        self.out_channels.append(extra)

    def forward(self, x: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        x = self.stem(x)
        out = []
        for stage in self.stages:
            x = stage(x)
            out.append(x)
        out.append(self.extra(x))
        return OrderedDict((str(i), v) for i, v in enumerate(out))


SAMPLE_SCALES = [0.1, 0.2, 0.35, 0.55]
"""Anchor scales of the sample (fraction of the image side) for its three maps, plus the last one's upper
scale: objects of the sample counting set span about 0.1-0.34 of the side."""


def sample_ssd(num_classes: int, input_size: tuple[int, int] = (128, 128), head: str = "ssd") -> SSDDetector:
    """The bundled sample detector: three maps (strides 8, 16, 32), four anchors per location."""
    backbone = SampleBackbone()
    generator = DefaultBoxGenerator([[2] for _ in range(3)], scales=SAMPLE_SCALES)
    heads = _make_head(head, backbone.out_channels, generator.num_anchors_per_location(), num_classes)
    return SSDDetector(backbone, heads, generator, num_classes, input_size,
                       {"arch": "sample_ssd", "num_classes": num_classes, "input_size": list(input_size), "head": head})


# ----------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class DetectorArch:
    """A registered detector: how to build it and what input it expects by default."""

    builder: Callable[..., SSDDetector]
    input_size: tuple[int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    description: str


DETECTION_ARCHITECTURES: dict[str, DetectorArch] = {
    "ssdlite320_mobilenet_v3_large": DetectorArch(
        ssdlite320_mobilenet_v3_large, (320, 320), (0.5, 0.5, 0.5), (0.5, 0.5, 0.5),
        "torchvision SSDLite320 with a MobileNetV3-Large backbone (reduced tail), 6 detection maps."),
    "ssd_mobilenet_v2": DetectorArch(
        ssd_mobilenet_v2, (300, 300), (0.5, 0.5, 0.5), (0.5, 0.5, 0.5),
        "SSD(-Lite) on torchvision MobileNetV2 features (width_mult configurable), 6 detection maps."),
    "sample_ssd": DetectorArch(
        sample_ssd, (128, 128), (0.5, 0.5, 0.5), (0.5, 0.5, 0.5),
        "Small MobileNetV2-style SSD of the bundled sample detector, 3 detection maps, 128x128 input."),
}


def build_detector(arch: str, num_classes: int, input_size: tuple[int, int] | int | None = None,
                   **options) -> SSDDetector:
    """A freshly initialised detector; ``num_classes`` includes the background (objects + 1)."""
    if arch not in DETECTION_ARCHITECTURES:
        raise ModelLoadError(
            f"Unknown detection architecture '{arch}'. Choose one of: {', '.join(DETECTION_ARCHITECTURES)}.")
    if num_classes < 2:
        raise ModelLoadError(
            f"A detector needs at least 2 classes (background + 1 object class); got num_classes={num_classes}.")
    entry = DETECTION_ARCHITECTURES[arch]
    size = entry.input_size if input_size is None else _as_hw(input_size)
    return entry.builder(num_classes, size, **options)


def rebuild_detector(config: dict) -> SSDDetector:
    """The architecture recorded in ``model.config`` (JSON-safe), rebuilt untrained."""
    options = {k: v for k, v in config.items() if k not in ("arch", "num_classes", "input_size")}
    return build_detector(config["arch"], int(config["num_classes"]), tuple(config["input_size"]), **options)


def _as_hw(size: tuple[int, int] | list[int] | int) -> tuple[int, int]:
    if isinstance(size, int):
        return (size, size)
    size = tuple(int(s) for s in size)
    return size[-2:] if len(size) == 3 else size  # accept (C, H, W) as the manifests write it


def output_layer_names(model: nn.Module) -> list[str]:
    """Names of the head's output convs, the layers ``PruningGraph`` must never prune."""
    names = {m: n for n, m in model.named_modules()}
    return [names[m] for m in model.output_layers()]
