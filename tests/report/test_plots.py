"""The plotting helpers: each writes a PNG of about the expected size, for GTSRB's 43 classes too."""

from __future__ import annotations

import itertools
from pathlib import Path

import matplotlib
import numpy as np
import pytest
from PIL import Image

from signpost.report.plots import (
    DPI,
    confusion_matrix_png,
    image_grid_png,
    reliability_png,
    training_curves_png,
)


def _size(path: Path) -> tuple[int, int]:
    with Image.open(path) as image:
        assert image.format == "PNG"
        return image.size


def _matrix(n: int) -> np.ndarray:
    rng = np.random.default_rng(n)
    matrix = np.diag(rng.integers(20, 700, n))
    matrix += rng.integers(0, 40, (n, n)) * (rng.random((n, n)) < 0.1)
    matrix[-1] = 0  # a class without test images: its row stays blank instead of dividing by zero
    return matrix


@pytest.mark.parametrize(("classes", "least", "most"), [(6, 450, 800), (43, 1100, 1500)])
def test_confusion_matrix(tmp_path: Path, classes: int, least: int, most: int) -> None:
    path = tmp_path / "cm.png"
    confusion_matrix_png(_matrix(classes), list(range(classes)), path, "Confusion matrix — top-1 0.953")
    width, height = _size(path)
    assert least <= height <= most and height <= width <= most + 200


def test_confusion_matrix_refuses_ids_that_do_not_fit(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="does not fit 5 class ids"):
        confusion_matrix_png(_matrix(6), list(range(5)), tmp_path / "cm.png", "x")


def _bins(n: int) -> list[dict]:
    edges = np.linspace(0.0, 1.0, n + 1)
    rows = []
    for lower, upper in itertools.pairwise(edges):
        count = 0 if lower < 0.2 else int(1000 * upper**4)
        middle = (lower + upper) / 2
        rows.append(
            {
                "lower": lower,
                "upper": upper,
                "confidence": middle if count else None,
                "accuracy": middle * 0.9 if count else None,
                "count": count,
            }
        )
    return rows


@pytest.mark.parametrize("bins", [15, 100])
def test_reliability_diagram(tmp_path: Path, bins: int) -> None:
    path = tmp_path / "reliability.png"
    reliability_png(_bins(bins), 0.0412, path)
    assert _size(path) == (round(6.4 * DPI), round(6.4 * DPI))


def _images(n: int, side: int = 32) -> np.ndarray:
    return np.random.default_rng(n).integers(0, 256, (n, 3, side, side), dtype=np.uint8)


def test_image_grid_of_48(tmp_path: Path) -> None:
    path = tmp_path / "grid.png"
    captions = [f"{i % 43} → 17 (98%)\nSpeed limit (120km/h)\n→ No passing for ve…" for i in range(48)]
    image_grid_png(_images(48), captions, path)
    width, height = _size(path)
    assert 8 * 150 <= width <= 8 * 200 and 6 * 180 <= height <= 6 * 260  # 8 x 6 tiles of about 165 px


def test_image_grid_with_fewer_images_than_columns_is_as_wide_as_its_images(tmp_path: Path) -> None:
    path = tmp_path / "grid.png"
    image_grid_png(_images(3), ["a", "b", "c"], path, columns=8)
    width, height = _size(path)
    assert 3 * 150 <= width <= 3 * 200 and 150 <= height <= 260


def test_image_grid_of_no_images_writes_a_placeholder(tmp_path: Path) -> None:
    path = tmp_path / "grid.png"
    image_grid_png(_images(0), [], path, empty_message="no misclassified images")
    assert _size(path) == (round(4.0 * DPI), round(1.2 * DPI))


def test_image_grid_refuses_bad_input(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="uint8 images"):
        image_grid_png(_images(2).astype(np.float32), ["a", "b"], tmp_path / "g.png")
    with pytest.raises(ValueError, match="2 images but 1 captions"):
        image_grid_png(_images(2), ["a"], tmp_path / "g.png")
    with pytest.raises(ValueError, match="columns"):
        image_grid_png(_images(2), ["a", "b"], tmp_path / "g.png", columns=0)


def test_training_curves(tmp_path: Path) -> None:
    history = [
        {
            "epoch": epoch,
            "train_loss": 2.0 / epoch,
            "train_acc": 1 - 1 / (epoch + 1),
            "val_loss": None if epoch == 3 else 2.2 / epoch,  # an epoch without validation leaves a gap
            "val_acc": None if epoch == 3 else 1 - 1.2 / (epoch + 1),
            "lr": 3e-3 * np.cos(epoch / 12 * np.pi / 2),
        }
        for epoch in range(1, 13)
    ]
    path = tmp_path / "curves.png"
    training_curves_png(history, path)
    assert _size(path) == (round(13.0 * DPI), round(3.8 * DPI))
    with pytest.raises(ValueError, match="at least one epoch"):
        training_curves_png([], tmp_path / "none.png")


def test_plotting_leaves_matplotlib_global_state_alone(tmp_path: Path) -> None:
    before = matplotlib.rcParams.copy()  # copy() reads the backend entry without resolving it (which imports pyplot)
    confusion_matrix_png(_matrix(6), list(range(6)), tmp_path / "cm.png", "x")
    image_grid_png(_images(2), ["a", "b"], tmp_path / "g.png")
    assert matplotlib.rcParams.copy() == before
