"""Synthetic traffic signs written in the exact official GTSRB file layout.

Tests and the offline demo run every code path that reads real GTSRB against this data, so the files follow
the official archives as they extract::

    root/GTSRB/Final_Training/Images/000NN/TTTTT_FFFFF.ppm  track T, frame F of class NN
    root/GTSRB/Final_Training/Images/000NN/GT-000NN.csv
    root/GTSRB/Final_Test/Images/NNNNN.ppm                  running number, classes shuffled
    root/GTSRB/Final_Test/Images/GT-final_test.test.csv     no ClassId column, as published
    root/GT-final_test.csv                                  labelled ground truth (GTSRB_Final_Test_GT.zip)

CSVs are semicolon separated; ``Roi.X1..Roi.Y2`` are inclusive pixel coordinates of the sign's bounding box.

What the images hold (``signpost.data.sign_art`` draws them):

* Each class is a sign of its GTSRB family (shape and colours from ``CLASS_CATEGORY``) with a class glyph
  inside: a few thick strokes, dots and arcs on a 3x3 grid. Glyphs depend on the class id only, not on the
  seed, so a class looks the same in every generated dataset; classes of one family differ by glyph alone.
* A track is one physical sign seen ``frames_per_track`` times as the car approaches: same sign instance and
  background style, the image growing along the track, with per-frame lighting, shift, rotation and noise, and
  blur on some frames. Image sides are skewed towards small sizes like GTSRB (most 25-70 px).
* Training tracks per class follow GTSRB's own class imbalance, rescaled to ``[min_tracks, max_tracks]``.
* The test split has ``test_tracks`` tracks per class but keeps every third frame of each track (frames 0, 3,
  6, ...), so it is smaller and less redundant than the training split.
* Image sides run from ``min_size`` to ``max_size``; the sign fills the ROI, with a margin of about 10% of the
  sign's size around it (at least 5 px once the image is 30 px or more).

Everything is drawn from ``cfg.seed``: the same config gives byte-identical files.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from signpost.config import SyntheticConfig
from signpost.data.sign_art import render_track

log = logging.getLogger(__name__)

TRAIN_HEADER = "Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId"
TEST_HEADER = "Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2"

# Training tracks per class in real GTSRB (images / 30): speed limits are common, some danger signs rare.
_GTSRB_TRACKS: tuple[int, ...] = (
    7, 74, 75, 47, 66, 62, 14, 48, 47, 49, 67, 44, 70, 72, 26, 21, 14, 37, 40, 7, 12, 11,
    13, 17, 9, 50, 20, 8, 18, 9, 15, 26, 8, 23, 14, 40, 13, 7, 69, 10, 12, 8, 8,
)  # fmt: skip

_SPLIT_TRAIN, _SPLIT_TEST, _SPLIT_ORDER = 0, 1, 2


@dataclass(frozen=True)
class SyntheticSummary:
    """What ``generate_gtsrb`` wrote."""

    root: Path
    train_images: int
    test_images: int
    class_counts: list[int]  # training images per class


def generate_gtsrb(root: Path, cfg: SyntheticConfig, *, progress: bool = False) -> SyntheticSummary:
    """Write a synthetic dataset under `root` in the official GTSRB layout.

    Refuses (ValueError) when ``root`` is a file or a folder that holds anything but an empty ``GTSRB`` folder:
    thousands of files written among someone's own would be hard to take out again. See the module docstring for
    the layout and what the images hold.
    """
    root = Path(root)
    gtsrb = root / "GTSRB"
    if root.exists() and not root.is_dir():
        raise ValueError(f"{root} is a file, not a folder; refusing to write a synthetic dataset there. "
                         "Choose a new or empty folder.")
    if root.is_dir() and any(p != gtsrb or not p.is_dir() or any(p.iterdir()) for p in root.iterdir()):
        raise ValueError(f"{root} is not empty; refusing to write a synthetic dataset into it. "
                         "Choose a new or empty folder.")
    start = time.perf_counter()
    tracks = _track_counts(cfg)
    test_frames = range(0, cfg.frames_per_track, 3)
    n_train = sum(tracks) * cfg.frames_per_track
    n_test = cfg.num_classes * cfg.test_tracks * len(test_frames)
    seed = cfg.seed % (1 << 64)  # SeedSequence wants non-negative entropy; distinct seeds stay distinct
    # Written beside `root` and renamed into place at the end: an interrupted run leaves `root` as it was, not a
    # half-written folder that the check above would refuse on the next run. (A link to a folder: beside its target.)
    target = root.resolve()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".tmp-{target.name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    bar = tqdm(total=n_train + n_test, desc="synthetic GTSRB", unit="img", disable=not progress, file=sys.stderr)
    try:
        with bar:
            _write_train(tmp / "GTSRB" / "Final_Training" / "Images", cfg, seed, tracks, bar)
            _write_test(tmp, tmp / "GTSRB" / "Final_Test" / "Images", cfg, seed, test_frames, bar)
        _rename_into_place(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already when the rename succeeded
    log.info(
        "synthetic GTSRB: %d training and %d test images of %d classes in %s (%.1f s)",
        n_train, n_test, cfg.num_classes, root, time.perf_counter() - start,
    )  # fmt: skip
    counts = [t * cfg.frames_per_track for t in tracks]
    return SyntheticSummary(root=root, train_images=n_train, test_images=n_test, class_counts=counts)


def _rename_into_place(tmp: Path, root: Path) -> None:
    """Rename the finished ``tmp`` to ``root``, which is absent, empty or holds only an empty ``GTSRB`` folder."""
    try:
        # rmdir removes only empty folders: whatever was put into `root` since the check stays, and we stop.
        for folder in (root / "GTSRB", root):
            if folder.is_dir():
                folder.rmdir()
        os.rename(tmp, root)
    except OSError as exc:
        raise ValueError(f"{root} could not take the generated dataset ({exc.strerror or exc}): it was filled "
                         "meanwhile, or it is a mount point. Choose a new or empty folder that is not a mount point."
                         ) from exc


def _write_train(images: Path, cfg: SyntheticConfig, seed: int, tracks: list[int], bar: tqdm) -> None:
    """One folder per class of ``TTTTT_FFFFF.ppm`` frames, with its ``GT-000NN.csv``."""
    for class_id in range(cfg.num_classes):
        folder = images / f"{class_id:05d}"
        folder.mkdir(parents=True)
        rows = [TRAIN_HEADER]
        for track in range(tracks[class_id]):
            rng = np.random.default_rng([seed, _SPLIT_TRAIN, class_id, track])
            for frame, image, roi in render_track(rng, class_id, cfg, range(cfg.frames_per_track)):
                name = f"{track:05d}_{frame:05d}.ppm"
                image.save(folder / name, format="PPM")
                rows.append(_row(name, image, roi, class_id))
                bar.update()
        _write_csv(folder / f"GT-{class_id:05d}.csv", rows)


def _write_test(root: Path, images: Path, cfg: SyntheticConfig, seed: int, frames: range, bar: tqdm) -> None:
    """Running-numbered test images, the unlabelled CSV beside them and the labelled one at `root`."""
    images.mkdir(parents=True, exist_ok=True)
    n_test = cfg.num_classes * cfg.test_tracks * len(frames)
    # Shuffled running numbers, so neighbours in the folder are unrelated, as in the official test set.
    order = iter(np.random.default_rng([seed, _SPLIT_ORDER]).permutation(n_test).tolist())
    rows: dict[int, tuple[str, int]] = {}
    for class_id in range(cfg.num_classes):
        for track in range(cfg.test_tracks):
            rng = np.random.default_rng([seed, _SPLIT_TEST, class_id, track])
            for _, image, roi in render_track(rng, class_id, cfg, frames):
                index = next(order)
                name = f"{index:05d}.ppm"
                image.save(images / name, format="PPM")
                rows[index] = (_row(name, image, roi, None), class_id)
                bar.update()
    ordered = [rows[i] for i in sorted(rows)]
    _write_csv(images / "GT-final_test.test.csv", [TEST_HEADER] + [row for row, _ in ordered])
    _write_csv(root / "GT-final_test.csv", [TRAIN_HEADER] + [f"{row};{label}" for row, label in ordered])


def _track_counts(cfg: SyntheticConfig) -> list[int]:
    """Training tracks per class: GTSRB's imbalance over the classes drawn, rescaled to the config's range."""
    real = _GTSRB_TRACKS[: cfg.num_classes]
    lo, hi = min(real), max(real)
    span = cfg.max_tracks - cfg.min_tracks
    return [cfg.min_tracks + round((t - lo) / (hi - lo) * span) if hi > lo else cfg.max_tracks for t in real]


def _row(name: str, image: Image.Image, roi: tuple[int, int, int, int], class_id: int | None) -> str:
    fields = [name, image.width, image.height, *roi] + ([] if class_id is None else [class_id])
    return ";".join(str(f) for f in fields)


def _write_csv(path: Path, rows: list[str]) -> None:
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
