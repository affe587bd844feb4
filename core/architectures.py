"""Architectures of the bundled sample models.

They live in the product (not only in sample_models/) because a state dict can only be loaded into a
named architecture: the tool must be able to rebuild the samples, and every pruned step of them,
without unpickling anything.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
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


class ZeroPadShortcut(nn.Module):
    """Option-A shortcut of He et al. (arXiv 1512.03385, sec. 4.2): subsample by 2, zero-pad channels.

    ``[N, C, H, W] -> [N, C + 2 * pad, ceil(H / 2), ceil(W / 2)]``; no parameters. A named module (not
    a lambda) so that ``core.shortcuts`` finds it and swaps in its exact 1x1-conv embedding for pruning.
    """

    def __init__(self, pad: int):
        super().__init__()
        self.pad = pad

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad), "constant", 0.0)


class CifarBlock(nn.Module):
    """Basic block of the CIFAR ResNet with an option-A (zero-padding) shortcut where the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut: nn.Module = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = ZeroPadShortcut(cout // 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """The CIFAR-10 ResNet of He et al. (6n+2 layers: 3 stages of 16/32/64 filters, option-A shortcuts).

    Parameter names follow the most copied public implementation (akamaster/pytorch_resnet_cifar10:
    ``conv1``, ``bn1``, ``layer1..3.k.conv1/bn1/conv2/bn2``, ``linear``), so its checkpoints and the
    many forks of it load into this class unchanged. Input ``[N, 3, 32, 32]``, output logits ``[N, classes]``.
    """

    def __init__(self, depth: int = 20, num_classes: int = 10):
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2 (20, 32, 44, 56, 110), not {depth}.")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.layer1 = self._stage(16, 16, n, 1)
        self.layer2 = self._stage(16, 32, n, 2)
        self.layer3 = self._stage(32, 64, n, 2)
        self.linear = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    @staticmethod
    def _stage(cin: int, cout: int, blocks: int, stride: int) -> nn.Sequential:
        return nn.Sequential(CifarBlock(cin, cout, stride), *[CifarBlock(cout, cout) for _ in range(blocks - 1)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = F.adaptive_avg_pool2d(out, 1)
        return self.linear(torch.flatten(out, 1))


def cifar_resnet20(num_classes: int = 10) -> CifarResNet:
    return CifarResNet(20, num_classes)


def cifar_resnet56(num_classes: int = 10) -> CifarResNet:
    return CifarResNet(56, num_classes)


SAMPLE_ARCHITECTURES = {"sample_vgg": SampleVGG, "sample_resnet": SampleResNet,
                        "cifar_resnet20": cifar_resnet20, "cifar_resnet56": cifar_resnet56}
