"""Model architectures, by name. Input: normalized float images [B, 3, H, W]; output: class logits [B, C]."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

SIGNNET_WIDTHS = (32, 48, 96, 128)  # output channels of signnet's four conv blocks
TRAFFIC_SIGN_NET_WIDTHS = (32, 64, 128)  # the reference's two conv layers and its hidden linear layer


class TrafficSignNet(nn.Module):
    """The reference tutorial's network, exactly: two 3x3 convolutions with max-pooling, two linear layers.

    It is fixed to 32x32 inputs (its first linear layer takes 64 x 6 x 6 = 2304 features). 8.4 MFLOP per image.
    """

    def __init__(self, num_classes: int = 43, widths: tuple[int, ...] = TRAFFIC_SIGN_NET_WIDTHS) -> None:
        super().__init__()
        c1, c2, hidden = widths  # the reference's are fixed; a pruned copy has fewer channels and hidden units
        self.conv1 = nn.Conv2d(3, c1, kernel_size=3)
        self.conv2 = nn.Conv2d(c1, c2, kernel_size=3)
        self.fc1 = nn.Linear(c2 * 6 * 6, hidden)
        self.fc2 = nn.Linear(hidden, num_classes)
        # One activation and pooling module per use (no parameters, so the weights are the reference's): the PT2E
        # quantizers find conv + ReLU by module type, and quantize a max-pool only when its input comes out of such
        # a pattern. With functional ReLU the x86 quantizer left both pools in fp32 and converted around each one
        # (int8 at batch 64: 27k -> 38k images/s with modules); one shared nn.ReLU would be a multi-output
        # partition, which the quantizers refuse.
        self.relu1, self.relu2, self.relu3 = nn.ReLU(), nn.ReLU(), nn.ReLU()
        self.pool1, self.pool2 = nn.MaxPool2d(2), nn.MaxPool2d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool1(self.relu1(self.conv1(x)))
        x = self.pool2(self.relu2(self.conv2(x)))
        x = torch.flatten(x, 1)
        return self.fc2(self.relu3(self.fc1(x)))


def _conv_bn(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)
    )


class SignNet(nn.Module):
    """Signpost's default: a stride-2 stem, conv-BN-ReLU blocks halving the resolution, global average pooling.

    Batch norm makes it train fast at high learning rates; global pooling makes it work at any input size. The
    stride-2 stem keeps full-resolution activations (the costliest memory traffic on a CPU) out of the network.
    About 16 MFLOP per 32x32 image (2x the reference network) for much higher accuracy.
    """

    def __init__(self, num_classes: int = 43, widths: tuple[int, ...] = SIGNNET_WIDTHS, dropout: float = 0.1) -> None:
        super().__init__()
        w1, w2, w3, w4 = widths
        self.features = nn.Sequential(
            _conv_bn(3, w1, stride=2),
            _conv_bn(w1, w2),
            nn.MaxPool2d(2),
            _conv_bn(w2, w3),
            nn.MaxPool2d(2),
            _conv_bn(w3, w4),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(dropout), nn.Linear(w4, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(self.features(x)))


def _positive_widths(name: str, widths: object, count: int) -> tuple[int, ...]:
    if not isinstance(widths, list | tuple) or len(widths) != count or not all(
        isinstance(w, int) and w >= 1 for w in widths
    ):
        raise ValueError(f"{name} widths must be {count} positive channel counts, not {widths!r}")
    return tuple(widths)


def _traffic_sign_net(
    num_classes: int, image_size: int, widths: list[int] | tuple[int, ...] = TRAFFIC_SIGN_NET_WIDTHS
) -> nn.Module:
    if image_size != 32:
        raise ValueError(
            f"traffic_sign_net takes 32x32 images only (its first linear layer is 2304 wide), not {image_size}: "
            "set data.image_size=32 or train.model=signnet"
        )
    return TrafficSignNet(num_classes, _positive_widths("traffic_sign_net", widths, 3))


def _signnet(num_classes: int, image_size: int, widths: list[int] | tuple[int, ...] = SIGNNET_WIDTHS) -> nn.Module:
    if image_size < 8:
        raise ValueError(f"signnet needs images of at least 8x8 pixels, not {image_size}")
    return SignNet(num_classes, _positive_widths("signnet", widths, 4))


MODELS: dict[str, Callable[..., nn.Module]] = {
    "signnet": _signnet,
    "traffic_sign_net": _traffic_sign_net,
}


def build_model(name: str, num_classes: int, image_size: int, **options: Any) -> nn.Module:
    """A freshly initialised model ``name`` for ``num_classes`` classes and ``image_size``² inputs.

    ``options`` shape the architecture beyond its name (signnet's ``widths``: a pruned model or a distilled student
    is a signnet with fewer channels); model cards record them so a model is rebuilt exactly.
    """
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of: {', '.join(MODELS)}")
    return MODELS[name](num_classes, image_size, **options)
