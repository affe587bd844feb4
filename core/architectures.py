"""Architectures of the bundled sample models.

They live in the product (not only in sample_models/) because a state dict can only be loaded into a
named architecture: the tool must be able to rebuild the samples, and every pruned step of them,
without unpickling anything.
"""
from __future__ import annotations

import torch
from torch import nn


def _conv_bn_relu(cin: int, cout: int, stride: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class SampleVGG(nn.Module):
    """Plain VGG-style CNN: six conv-BN-ReLU layers in three pooled stages, global pool, linear head.

    A plain chain is the easy case for pruning (every conv is its own group), and the reference the
    residual sample is compared against.
    """

    def __init__(self, num_classes: int = 10, widths: tuple[int, ...] = (16, 16, 32, 32, 64, 64)):
        super().__init__()
        layers: list[nn.Module] = []
        cin = 3
        for i, w in enumerate(widths):
            layers += _conv_bn_relu(cin, w)
            cin = w
            if i % 2 == 1 and i < len(widths) - 1:
                layers.append(nn.MaxPool2d(2))
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.features(x))
        return self.classifier(torch.flatten(x, 1))


class BasicBlock(nn.Module):
    """ResNet basic block; the shortcut is the identity unless the shape changes (then 1x1 conv + BN)."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample: nn.Module | None = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class SampleResNet(nn.Module):
    """Small CIFAR-style ResNet (stem + 3 stages of basic blocks with identity shortcuts).

    The identity shortcuts couple every block output of a stage into one residual stream, so
    pruning must remove the same channels from all of them at once.
    """

    def __init__(self, num_classes: int = 8, widths: tuple[int, int, int] = (16, 32, 64), blocks: int = 2):
        super().__init__()
        self.stem = nn.Sequential(*_conv_bn_relu(3, widths[0]))
        stages = []
        cin = widths[0]
        for s, w in enumerate(widths):
            stage = [BasicBlock(cin, w, stride=1 if s == 0 else 2)]
            stage += [BasicBlock(w, w) for _ in range(blocks - 1)]
            stages.append(nn.Sequential(*stage))
            cin = w
        self.layer1, self.layer2, self.layer3 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.fc(torch.flatten(self.pool(x), 1))


SAMPLE_ARCHITECTURES = {"sample_vgg": SampleVGG, "sample_resnet": SampleResNet}
