"""The pictures stages draw: confusion matrix, reliability diagram, image grids and training curves, as PNG files.

Each function draws on its own ``matplotlib.figure.Figure`` with an Agg canvas and never touches pyplot, so nothing
here changes matplotlib's global backend or state, opens a window, or keeps figures alive after it returns.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import PowerNorm
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from matplotlib.ticker import MaxNLocator

DPI = 110
_ANNOTATE_UP_TO = 20  # classes (or bins) up to which every cell (or bar) gets its number written on it


def _figure(width_in: float, height_in: float, layout: str | None = "constrained") -> Figure:
    fig = Figure(figsize=(width_in, height_in), dpi=DPI, layout=layout)
    FigureCanvasAgg(fig)
    return fig


def confusion_matrix_png(matrix: np.ndarray, class_ids: Sequence[int | str], path: Path, title: str) -> None:
    """Draw a confusion matrix of counts (rows: true class, columns: predicted), each row normalized to shares.

    The colour scale is a square root, so the few-percent confusions that matter stay visible next to a bright
    diagonal. Cells carry their share as text up to 20 classes; beyond that the colour bar reads them.
    """
    counts = np.asarray(matrix, dtype=np.float64)
    n = len(class_ids)
    if counts.shape != (n, n):
        raise ValueError(f"confusion matrix of shape {counts.shape} does not fit {n} class ids")
    support = counts.sum(axis=1, keepdims=True)
    share = np.divide(counts, support, out=np.zeros_like(counts), where=support > 0)

    side = min(11.0, max(4.5, 1.5 + 0.22 * n))  # inches: about 24 px per cell for GTSRB's 43 classes
    fig = _figure(side + 1.3, side)
    ax = fig.add_subplot()
    image = ax.imshow(share, cmap="Blues", norm=PowerNorm(0.5, vmin=0.0, vmax=1.0), interpolation="nearest")
    labels = [str(c) for c in class_ids]
    tick_font = 10 if n <= _ANNOTATE_UP_TO else 7
    ax.set_xticks(range(n), labels, fontsize=tick_font)
    ax.set_yticks(range(n), labels, fontsize=tick_font)
    ax.set_xlabel("predicted class", fontsize=11)
    ax.set_ylabel("true class", fontsize=11)
    ax.set_title(title, fontsize=12)
    if n <= _ANNOTATE_UP_TO:
        for (row, col), value in np.ndenumerate(share):
            if counts[row, col] > 0:
                colour = "white" if value > 0.5 else "black"
                ax.text(col, row, f"{value:.2f}", ha="center", va="center", fontsize=8, color=colour)
    fig.colorbar(image, ax=ax, shrink=0.8).set_label("share of the true class", fontsize=10)
    fig.savefig(path, dpi=DPI)


def reliability_png(bins: Sequence[Mapping[str, Any]], ece: float, path: Path) -> None:
    """Draw a reliability diagram: accuracy per confidence bin against the diagonal, and the images per bin.

    ``bins`` are the rows of the calibration table: ``lower``, ``upper``, ``confidence``, ``accuracy`` (None for an
    empty bin) and ``count``.
    """
    lower = np.array([b["lower"] for b in bins], dtype=np.float64)
    width = np.array([b["upper"] for b in bins], dtype=np.float64) - lower
    accuracy = np.array([b["accuracy"] if b["count"] else 0.0 for b in bins], dtype=np.float64)
    confidence = np.array([b["confidence"] if b["count"] else np.nan for b in bins], dtype=np.float64)
    counts = np.array([b["count"] for b in bins], dtype=np.int64)

    fig = _figure(6.4, 6.4)
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=[3, 1.2])
    top.bar(lower, accuracy, width=width, align="edge", color="#4c72b0", edgecolor="white", label="accuracy")
    top.plot(lower + width / 2, confidence, "o", color="#dd8452", markersize=4, label="mean confidence")
    top.plot([0, 1], [0, 1], "--", color="grey", linewidth=1, label="perfect calibration")
    top.set(xlim=(0, 1), ylim=(0, 1))
    top.set_ylabel("accuracy", fontsize=11)
    top.set_title(f"Reliability diagram — ECE {ece:.3f}", fontsize=12)
    top.legend(loc="upper left", fontsize=9)
    top.grid(alpha=0.3)

    bottom.bar(lower, counts, width=width, align="edge", color="#8c8c8c", edgecolor="white")
    if counts.max(initial=0) > 0:
        bottom.set_yscale("log")  # a good model puts most images in the top bin; a linear axis hides the rest
        bottom.set_ylim(0.8, counts.max() * 4)
    if len(bins) <= _ANNOTATE_UP_TO:
        for x, w, c in zip(lower, width, counts, strict=True):
            if c:
                bottom.text(x + w / 2, c, str(c), ha="center", va="bottom", fontsize=7)
    bottom.set_xlabel("confidence (top-1 probability)", fontsize=11)
    bottom.set_ylabel("images", fontsize=11)
    fig.savefig(path, dpi=DPI)


def image_grid_png(
    images: np.ndarray, captions: Sequence[str], path: Path, columns: int = 8, empty_message: str = "no images"
) -> None:
    """Draw uint8 images ``[N, 3, H, W]`` in a grid, enlarged with nearest-neighbour, each with its caption above.

    The images are pasted into one sheet and drawn as one picture at a whole number of screen pixels per image
    pixel, so they stay crisp and 48 of them draw as fast as one. With no images it writes a small placeholder
    saying ``empty_message``, so a report that links the file always finds one (no mistakes is not an error).
    """
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[1] != 3 or images.dtype != np.uint8:
        raise ValueError(f"image_grid_png expects uint8 images [N, 3, H, W], got {images.dtype} {images.shape}")
    if len(captions) != len(images):
        raise ValueError(f"{len(images)} images but {len(captions)} captions")
    if columns < 1:
        raise ValueError(f"columns must be at least 1, got {columns}")
    if len(images) == 0:
        fig = _figure(4.0, 1.2)
        fig.text(0.5, 0.5, empty_message, ha="center", va="center", fontsize=12)
        fig.savefig(path, dpi=DPI)
        return

    n, _, height, width = images.shape
    cols, rows = min(columns, n), math.ceil(n / min(columns, n))
    scale = max(1, round(1.5 * DPI / max(height, width)))  # screen pixels per image pixel: tiles of about 1.5 in
    inch = DPI / scale  # image pixels per inch on the page
    lines = max(caption.count("\n") + 1 for caption in captions)
    band = math.ceil(0.16 * lines * inch)  # rows of image pixels for the caption above each tile
    gap = max(1, round(0.2 * inch))
    cell_h, cell_w = band + height + gap, width + gap
    sheet = np.full((rows * cell_h, cols * cell_w, 3), 255, dtype=np.uint8)

    fig = _figure(cols * cell_w / inch, rows * cell_h / inch, layout=None)
    ax = fig.add_axes((0.0, 0.0, 1.0, 1.0))
    ax.set_axis_off()
    for i, (image, caption) in enumerate(zip(images, captions, strict=True)):
        top, left = (i // cols) * cell_h + band, (i % cols) * cell_w + gap // 2
        sheet[top : top + height, left : left + width] = image.transpose(1, 2, 0)
        ax.text(left + width / 2, top - 0.5, caption, ha="center", va="bottom", fontsize=8, linespacing=1.1)
    ax.imshow(sheet, interpolation="nearest")
    fig.savefig(path, dpi=DPI)


def training_curves_png(history: Sequence[Mapping[str, Any]], path: Path) -> None:
    """Draw loss, accuracy and learning rate per epoch from the train stage's history.

    Each entry of ``history`` is one epoch: ``epoch``, ``train_loss``, ``train_acc``, ``val_loss``, ``val_acc``,
    ``lr``. A value that is missing or None (an epoch without validation) leaves a gap in its line.
    """
    if not history:
        raise ValueError("training_curves_png needs at least one epoch of history")
    epochs = [h["epoch"] for h in history]

    def series(key: str) -> list[float]:
        return [math.nan if h.get(key) is None else float(h[key]) for h in history]

    fig = _figure(13.0, 3.8)
    loss_ax, acc_ax, lr_ax = fig.subplots(1, 3)
    for ax, metric, name in ((loss_ax, "loss", "loss"), (acc_ax, "acc", "accuracy")):
        for split, marker in (("train", "o"), ("val", "s")):
            ax.plot(epochs, series(f"{split}_{metric}"), marker=marker, markersize=3, label=split)
        ax.set_title(name, fontsize=12)
        ax.legend(fontsize=9)
    lr_ax.plot(epochs, series("lr"), marker="o", markersize=3, color="#55a868")
    lr_ax.set_title("learning rate", fontsize=12)
    for ax in (loss_ax, acc_ax, lr_ax):
        ax.set_xlabel("epoch", fontsize=11)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    fig.savefig(path, dpi=DPI)


_RUNTIME_COLOURS = {"eager": "#8c8c8c", "compile": "#4c72b0", "aoti": "#55a868", "onnxruntime": "#dd8452"}


def bench_chart_png(rows: Sequence[Mapping[str, Any]], batch: int, path: Path) -> None:
    """Images/s of every measured cell: one horizontal bar per variant/runtime/math at ``batch`` (left) and the
    best cell of each variant across batch sizes (right); bars of variants over the accuracy budget are hatched."""
    measured = [r for r in rows if r["status"] != "failed" and r["batch"] is not None]
    at_batch = sorted((r for r in measured if r["batch"] == batch), key=lambda r: r["images_per_s"])
    fig = _figure(12.0, max(3.5, 1.2 + 0.28 * len(at_batch)))
    left, right = fig.subplots(1, 2, width_ratios=[1.5, 1])
    labels = [f"{r['variant']} · {r['runtime']} · {r['math']} · {r['threads']}t" for r in at_batch]
    bars = left.barh(range(len(at_batch)), [r["images_per_s"] for r in at_batch],
                     color=[_RUNTIME_COLOURS.get(r["runtime"], "#999999") for r in at_batch])
    for bar, r in zip(bars, at_batch, strict=True):
        if r["status"] == "rejected":
            bar.set_hatch("//")
        left.text(bar.get_width(), bar.get_y() + bar.get_height() / 2, f" {r['images_per_s']:,.0f}", va="center",
                  fontsize=8)
    left.set_yticks(range(len(at_batch)), labels, fontsize=8)
    left.set_xlabel("images/s (higher is better)")
    left.set_title(f"throughput at batch {batch}" + ("" if at_batch else " (nothing measured)"), fontsize=11)
    left.margins(x=0.18)
    runtimes = [rt for rt in _RUNTIME_COLOURS if any(r["runtime"] == rt for r in at_batch)]
    if runtimes:
        left.legend(handles=[Patch(color=_RUNTIME_COLOURS[rt], label=rt) for rt in runtimes]
                    + ([Patch(facecolor="white", edgecolor="black", hatch="//", label="over the accuracy budget")]
                       if any(r["status"] == "rejected" for r in at_batch) else []), fontsize=8, loc="lower right")
    for variant in sorted({r["variant"] for r in measured}):
        points = {}
        for r in measured:
            if r["variant"] == variant:
                points[r["batch"]] = max(points.get(r["batch"], 0.0), r["images_per_s"])
        xs = sorted(points)
        right.plot(xs, [points[x] for x in xs], "o-", label=variant)
    right.set_xscale("log", base=2)
    right.set_yscale("log")
    right.set_xlabel("batch size")
    right.set_ylabel("images/s, best runtime and math setting")
    right.set_title("best cell per variant by batch size", fontsize=11)
    if measured:
        right.legend(fontsize=8)
    right.grid(True, which="both", alpha=0.3)
    fig.savefig(path, dpi=DPI)


def drift_png(panels: Sequence[Mapping[str, Any]], path: Path, title: str) -> None:
    """Reference against current distributions, one small panel each.

    A panel: ``name``, ``edges`` (bin edges, or None for categories), ``reference`` and ``current`` (counts, drawn
    as shares so windows of any size compare), ``drifted`` (the panel's title turns red).
    """
    cols = min(4, max(1, len(panels)))
    rows = math.ceil(len(panels) / cols)
    fig = _figure(3.2 * cols, 2.3 * rows + 0.4)
    fig.suptitle(title)
    for i, panel in enumerate(panels):
        ax = fig.add_subplot(rows, cols, i + 1)
        ref = np.asarray(panel["reference"], dtype=np.float64)
        cur = np.asarray(panel["current"], dtype=np.float64)
        ref, cur = ref / max(ref.sum(), 1), cur / max(cur.sum(), 1)
        if panel.get("edges") is not None:
            edges = np.asarray(panel["edges"], dtype=np.float64)
            ax.stairs(ref, edges, fill=True, alpha=0.45, color="#4c72b0", label="reference")
            ax.stairs(cur, edges, linewidth=1.6, color="#dd8452", label="current")
        else:
            x = np.arange(len(ref))
            ax.bar(x - 0.2, ref, width=0.4, color="#4c72b0", alpha=0.7, label="reference")
            ax.bar(x + 0.2, cur, width=0.4, color="#dd8452", label="current")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True, nbins=8))
        ax.set_title(f"{panel['name']}{' — drift' if panel.get('drifted') else ''}", fontsize=9,
                     color="#c44e52" if panel.get("drifted") else "black")
        ax.tick_params(labelsize=7)
        ax.set_yticks([])
        if i == 0:
            ax.legend(fontsize=7, frameon=False)
    fig.savefig(path)
