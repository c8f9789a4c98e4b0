"""Per-image statistics respond to what they claim to measure."""

import numpy as np
import pytest

from signpost.data.stats import STAT_NAMES, image_stats, reference_summary


def _col(name: str) -> int:
    return STAT_NAMES.index(name)


def test_brightness_contrast_colour() -> None:
    dark = np.full((1, 3, 8, 8), 20, dtype=np.uint8)
    bright = np.full((1, 3, 8, 8), 220, dtype=np.uint8)
    red = np.zeros((1, 3, 8, 8), dtype=np.uint8)
    red[:, 0] = 255
    black = np.zeros((1, 3, 8, 8), dtype=np.uint8)
    stats = image_stats(np.concatenate([dark, bright, red, black]))
    assert stats.dtype == np.float32 and stats.shape == (4, len(STAT_NAMES))
    assert stats[0, _col("brightness")] == pytest.approx(20 / 255, abs=1e-5)
    assert stats[1, _col("brightness")] == pytest.approx(220 / 255, abs=1e-5)
    assert np.allclose(stats[:2, _col("contrast")], 0, atol=1e-6)
    assert stats[2, _col("red")] == 1.0 and stats[2, _col("green")] == 0.0
    assert stats[2, _col("saturation")] == 1.0 and stats[1, _col("saturation")] == 0.0
    assert stats[3, _col("saturation")] == 0.0  # black pixels are defined as unsaturated


def test_contrast_is_the_std_of_luma() -> None:
    half = np.zeros((1, 3, 8, 8), dtype=np.uint8)
    half[..., 4:] = 255
    assert image_stats(half)[0, _col("contrast")] == pytest.approx(0.5, abs=1e-5)


def test_blur_lowers_sharpness() -> None:
    checker = ((np.arange(16)[None, :] + np.arange(16)[:, None]) % 2 * 255).astype(np.uint8)
    sharp = np.broadcast_to(checker, (1, 3, 16, 16)).copy()
    blurred = np.full_like(sharp, 128)
    blurred[..., ::2, :] = 100
    stats = image_stats(np.concatenate([sharp, blurred]))
    assert stats[0, _col("sharpness")] > 10 * stats[1, _col("sharpness")]


def test_bad_input_is_refused() -> None:
    with pytest.raises(ValueError, match="uint8 images"):
        image_stats(np.zeros((2, 8, 8, 3), dtype=np.uint8))
    with pytest.raises(ValueError, match="uint8 images"):
        image_stats(np.zeros((2, 3, 8, 8), dtype=np.float32))


def test_reference_summary_shape() -> None:
    values = np.random.default_rng(0).random((500, 2))
    summary = reference_summary(values, ("a", "b"), bins=10)
    assert set(summary) == {"a", "b"}
    assert sum(summary["a"]["histogram"]["counts"]) == 500
    assert len(summary["a"]["histogram"]["edges"]) == 11
    q = summary["b"]["quantiles"]
    assert q["p1"] <= q["p50"] <= q["p99"]
    assert summary["a"]["mean"] == pytest.approx(values[:, 0].mean())
