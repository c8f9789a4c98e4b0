"""Structured channel pruning that physically removes channels: the pruned model has smaller tensors and does less work.

``torch.nn.utils.prune`` only masks weights (same shapes, same speed). Here each prunable layer keeps its most
important output channels, the next layer keeps the matching input channels, and the result is an ordinary model
of the same architecture with smaller widths, rebuilt from its model card like any other.

Importance: for a conv followed by batch norm, the channel's batch-norm scale |γ| / sqrt(var + ε) times the L1 norm
of its filter (how strongly the channel can speak after normalisation); without batch norm, the filter's L1 norm.
"""

from __future__ import annotations

import torch
from torch import nn

from signpost.models import SignNet, TrafficSignNet


def kept_width(width: int, ratio: float) -> int:
    """Channels left of ``width`` after removing ``ratio`` of them (at least one)."""
    return max(1, round(width * (1.0 - ratio)))


def prune_model(model: nn.Module, ratio: float) -> tuple[nn.Module, dict[str, list[int]]]:
    """A copy of ``model`` with ``ratio`` of the channels of every hidden layer removed, and its new widths.

    The output layer keeps every class. Raises ``ValueError`` for an architecture this does not know.
    """
    if not 0.0 < ratio < 1.0:
        raise ValueError(f"pruning ratio must be between 0 and 1 (exclusive), not {ratio}")
    if isinstance(model, SignNet):
        return _prune_signnet(model, ratio)
    if isinstance(model, TrafficSignNet):
        return _prune_traffic_sign_net(model, ratio)
    raise ValueError(f"structured pruning knows signnet and traffic_sign_net, not {type(model).__name__}")


def _top(scores: torch.Tensor, keep: int) -> torch.Tensor:
    return torch.sort(torch.topk(scores, keep).indices).values  # kept channels in their original order


@torch.no_grad()
def _prune_signnet(model: SignNet, ratio: float) -> tuple[nn.Module, dict[str, list[int]]]:
    blocks = [m for m in model.features if isinstance(m, nn.Sequential)]
    widths = [kept_width(block[0].out_channels, ratio) for block in blocks]
    pruned = SignNet(model.head[-1].out_features, tuple(widths), dropout=model.head[1].p)
    new_blocks = [m for m in pruned.features if isinstance(m, nn.Sequential)]
    previous = torch.arange(3)  # input channels kept: all three colours
    for block, new, keep in zip(blocks, new_blocks, widths, strict=True):
        conv, bn = block[0], block[1]
        scale = bn.weight.abs() / torch.sqrt(bn.running_var + bn.eps)
        kept = _top(scale * conv.weight.abs().sum(dim=(1, 2, 3)), keep)
        new[0].weight.copy_(conv.weight[kept][:, previous])
        for name in ("weight", "bias", "running_mean", "running_var"):
            getattr(new[1], name).copy_(getattr(bn, name)[kept])
        new[1].num_batches_tracked.copy_(bn.num_batches_tracked)
        previous = kept
    head, new_head = model.head[-1], pruned.head[-1]
    new_head.weight.copy_(head.weight[:, previous])
    new_head.bias.copy_(head.bias)
    return pruned, {"widths": widths}


@torch.no_grad()
def _prune_traffic_sign_net(model: TrafficSignNet, ratio: float) -> tuple[nn.Module, dict[str, list[int]]]:
    c1, c2, hidden = (kept_width(n, ratio) for n in (model.conv1.out_channels, model.conv2.out_channels,
                                                     model.fc1.out_features))
    pruned = TrafficSignNet(model.fc2.out_features, (c1, c2, hidden))
    keep1 = _top(model.conv1.weight.abs().sum(dim=(1, 2, 3)), c1)
    keep2 = _top(model.conv2.weight[:, keep1].abs().sum(dim=(1, 2, 3)), c2)
    pruned.conv1.weight.copy_(model.conv1.weight[keep1])
    pruned.conv1.bias.copy_(model.conv1.bias[keep1])
    pruned.conv2.weight.copy_(model.conv2.weight[keep2][:, keep1])
    pruned.conv2.bias.copy_(model.conv2.bias[keep2])
    # fc1 reads the flattened [C, 6, 6] map: keep the 36 columns of every kept channel.
    spatial = model.fc1.in_features // model.conv2.out_channels
    columns = (keep2[:, None] * spatial + torch.arange(spatial)).reshape(-1)
    keep_hidden = _top(model.fc1.weight[:, columns].abs().sum(dim=1), hidden)
    pruned.fc1.weight.copy_(model.fc1.weight[keep_hidden][:, columns])
    pruned.fc1.bias.copy_(model.fc1.bias[keep_hidden])
    pruned.fc2.weight.copy_(model.fc2.weight[:, keep_hidden])
    pruned.fc2.bias.copy_(model.fc2.bias)
    return pruned, {"widths": [c1, c2, hidden]}


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
