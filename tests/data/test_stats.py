"""Per-image statistics respond to what they claim to measure."""

import torch
import torch.nn.functional as F

from signpost.data.stats import STAT_NAMES, image_stats, reference_summary


def _col(name: str) -> int:
    return STAT_NAMES.index(name)


def test_brightness_contrast_colour() -> None:
    dark = torch.full((1, 3, 8, 8), 20, dtype=torch.uint8)
    bright = torch.full((1, 3, 8, 8), 220, dtype=torch.uint8)
    red = torch.zeros(1, 3, 8, 8, dtype=torch.uint8)
    red[:, 0] = 255
    stats = image_stats(torch.cat([dark, bright, red]))
    assert stats[0, _col("brightness")] < stats[1, _col("brightness")]
    assert torch.allclose(stats[:2, _col("contrast")], torch.zeros(2), atol=1e-6)
    assert stats[2, _col("red")] == 1.0 and stats[2, _col("green")] == 0.0
    assert stats[2, _col("saturation")] == 1.0 and stats[1, _col("saturation")] == 0.0


def test_blur_lowers_sharpness() -> None:
    checker = ((torch.arange(16).view(1, -1) + torch.arange(16).view(-1, 1)) % 2 * 255).to(torch.uint8)
    sharp = checker.expand(1, 3, 16, 16).contiguous()
    kernel = torch.full((3, 1, 3, 3), 1 / 9)
    blurred = F.conv2d(sharp.float(), kernel, padding=1, groups=3).round().to(torch.uint8)
    stats = image_stats(torch.cat([sharp, blurred]))
    assert stats[0, _col("sharpness")] > 10 * stats[1, _col("sharpness")]


def test_reference_summary_shape() -> None:
    values = torch.rand(500, 2)
    summary = reference_summary(values, ("a", "b"), bins=10)
    assert set(summary) == {"a", "b"}
    assert sum(summary["a"]["histogram"]["counts"]) == 500
    assert len(summary["a"]["histogram"]["edges"]) == 11
    q = summary["b"]["quantiles"]
    assert q["p1"] <= q["p50"] <= q["p99"]
