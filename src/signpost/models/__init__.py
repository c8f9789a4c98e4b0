"""Model architectures, by name. Input: normalized float images [B, 3, H, W]; output: class logits [B, C]."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


class TrafficSignNet(nn.Module):
    """The reference tutorial's network, exactly: two 3x3 convolutions with max-pooling, two linear layers.

    It is fixed to 32x32 inputs (its first linear layer takes 64 x 6 x 6 = 2304 features). 8.4 MFLOP per image.
    """

    def __init__(self, num_classes: int = 43) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 32, kernel_size=3)
        self.conv2 = nn.Conv2d(32, 64, kernel_size=3)
        self.pool = nn.MaxPool2d(2)
        self.fc1 = nn.Linear(64 * 6 * 6, 128)
        self.fc2 = nn.Linear(128, num_classes)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.relu(self.conv1(x)))
        x = self.pool(self.relu(self.conv2(x)))
        x = torch.flatten(x, 1)
        return self.fc2(self.relu(self.fc1(x)))


def _conv_bn(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class SignNet(nn.Module):
    """Signpost's default: conv-BN-ReLU blocks halving the resolution, then global average pooling.

    Batch norm makes it train fast at high learning rates; global pooling makes it work at any input size.
    About 25 MFLOP per 32x32 image (3x the reference network) for much higher accuracy.
    """

    def __init__(self, num_classes: int = 43, width: int = 32, dropout: float = 0.1) -> None:
        super().__init__()
        w = width
        self.features = nn.Sequential(
            _conv_bn(3, w),
            nn.MaxPool2d(2),
            _conv_bn(w, 2 * w),
            nn.MaxPool2d(2),
            _conv_bn(2 * w, 4 * w),
            nn.MaxPool2d(2),
            _conv_bn(4 * w, 4 * w),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(dropout), nn.Linear(4 * w, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(self.features(x)))


def _traffic_sign_net(num_classes: int, image_size: int) -> nn.Module:
    if image_size != 32:
        raise ValueError(
            f"traffic_sign_net takes 32x32 images only (its first linear layer is 2304 wide), not {image_size}: "
            "set data.image_size=32 or train.model=signnet"
        )
    return TrafficSignNet(num_classes)


def _signnet(num_classes: int, image_size: int) -> nn.Module:
    if image_size < 8:
        raise ValueError(f"signnet needs images of at least 8x8 pixels, not {image_size}")
    return SignNet(num_classes)


MODELS: dict[str, Callable[[int, int], nn.Module]] = {
    "signnet": _signnet,
    "traffic_sign_net": _traffic_sign_net,
}


def build_model(name: str, num_classes: int, image_size: int) -> nn.Module:
    """A freshly initialised model ``name`` for ``num_classes`` classes and ``image_size``² inputs."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of: {', '.join(MODELS)}")
    return MODELS[name](num_classes, image_size)
