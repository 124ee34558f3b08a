"""The paper's classic image classifiers that transformers does not ship: AlexNet, VGG, SqueezeNet.

Written from the published architectures (Krizhevsky 2012 as in the one-GPU variant,
Simonyan & Zisserman 2014, Iandola 2016 v1.1) with ImageNet's 1000 classes, so their weights
are the sizes the paper lists (AlexNet 233 MB, VGG16 528 MB, VGG19 548 MB, SqueezeNet 5 MB).
Each takes ``pixel_values`` like the transformers vision models, so one call serves the zoo.
"""

from __future__ import annotations

import torch
from torch import nn

CLASSES = 1000


class AlexNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            _conv(3, 64, 11, stride=4, padding=2), nn.MaxPool2d(3, 2),
            _conv(64, 192, 5, padding=2), nn.MaxPool2d(3, 2),
            _conv(192, 384, 3, padding=1), _conv(384, 256, 3, padding=1), _conv(256, 256, 3, padding=1),
            nn.MaxPool2d(3, 2),
        )
        self.pool = nn.AdaptiveAvgPool2d((6, 6))
        self.classifier = _dense_head(256 * 6 * 6)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(pixel_values)), 1))


class VGG(nn.Module):
    """VGG with ``depth`` 11, 13, 16 or 19 weight layers (configurations A, B, D, E)."""

    LAYOUTS = {11: (1, 1, 2, 2, 2), 13: (2, 2, 2, 2, 2), 16: (2, 2, 3, 3, 3), 19: (2, 2, 4, 4, 4)}

    def __init__(self, depth: int = 16) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = 3
        for convs, width in zip(self.LAYOUTS[depth], (64, 128, 256, 512, 512)):
            for _ in range(convs):
                layers.append(_conv(channels, width, 3, padding=1))
                channels = width
            layers.append(nn.MaxPool2d(2, 2))
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d((7, 7))
        self.classifier = _dense_head(512 * 7 * 7)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(pixel_values)), 1))


class SqueezeNet(nn.Module):
    """SqueezeNet 1.1: fire modules (a 1x1 squeeze, then 1x1 and 3x3 expands side by side)."""

    FIRES = ((64, 16, 64), (128, 16, 64), "pool", (128, 32, 128), (256, 32, 128), "pool",
             (256, 48, 192), (384, 48, 192), (384, 64, 256), (512, 64, 256))

    def __init__(self) -> None:
        super().__init__()
        layers: list[nn.Module] = [_conv(3, 64, 3, stride=2), nn.MaxPool2d(3, 2, ceil_mode=True)]
        for fire in self.FIRES:
            layers.append(nn.MaxPool2d(3, 2, ceil_mode=True) if fire == "pool" else _Fire(*fire))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Dropout(0.5), _conv(512, CLASSES, 1), nn.AdaptiveAvgPool2d(1))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.classifier(self.features(pixel_values)), 1)


class _Fire(nn.Module):
    def __init__(self, inputs: int, squeeze: int, expand: int) -> None:
        super().__init__()
        self.squeeze = _conv(inputs, squeeze, 1)
        self.expand1x1 = _conv(squeeze, expand, 1)
        self.expand3x3 = _conv(squeeze, expand, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.squeeze(x)
        return torch.cat([self.expand1x1(x), self.expand3x3(x)], 1)


def _conv(inputs: int, outputs: int, kernel: int, **options: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(inputs, outputs, kernel, **options), nn.ReLU(inplace=True))


def _dense_head(features: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Dropout(0.5), nn.Linear(features, 4096), nn.ReLU(inplace=True),
        nn.Dropout(0.5), nn.Linear(4096, 4096), nn.ReLU(inplace=True),
        nn.Linear(4096, CLASSES),
    )
