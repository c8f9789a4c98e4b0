"""Tiny datasets written exactly as the real-world layouts are on disk, independently of ``signpost``.

Nothing here imports Signpost: these writers are the second, independent generator that the readers in
``signpost.data.layouts`` are checked against. Every image is a uniform *outside* colour with its region
of interest (ROI) filled with a colour of its class, so a test can tell after decoding whether the right
label and the right crop came back. Each writer records the truth for every file it writes (label, split,
physical track, ROI, size and the colours a correct decoder returns) in a ``WrittenDataset``.

Layouts, as published:

- official GTSRB: ``GTSRB/Final_Training/Images/000NN/TTTTT_FFFFF.ppm`` + ``GT-000NN.csv`` (``;``-separated),
  ``GTSRB/Final_Test/Images/NNNNN.ppm`` + the label-less ``GT-final_test.test.csv``, and the labelled
  ``GT-final_test.csv`` next to ``GTSRB/`` (where ``GTSRB_Final_Test_GT.zip`` extracts it);
- torchvision: ``gtsrb/GTSRB/Training/000NN/`` (+ CSVs), ``gtsrb/GTSRB/Final_Test/Images/`` and
  ``gtsrb/GT-final_test.csv``;
- Kaggle: ``Train/<class>/CCCCC_TTTTT_FFFFF.png``, ``Test/NNNNN.png``, ``Meta/<class>.png`` and the
  comma-separated ``Train.csv``, ``Test.csv``, ``Meta.csv``;
- ImageFolder: ``<class>/<image>`` (optionally under ``train/`` and ``test/``) in mixed formats and modes.
"""

from __future__ import annotations

import colorsys
import io
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

Rgb = tuple[int, int, int]
Roi = tuple[int, int, int, int]

# Classes present (GTSRB ids, deliberately not 0..N-1) -> number of training tracks. Track numbers
# restart at 0 in every class, as in GTSRB, so the same track number appears in several classes.
DEFAULT_TRACKS: dict[int, int] = {0: 3, 1: 2, 5: 3, 14: 1, 42: 2}
GTSRB_CSV_HEADER = ("Filename", "Width", "Height", "Roi.X1", "Roi.Y1", "Roi.X2", "Roi.Y2", "ClassId")
KAGGLE_CSV_HEADER = ("Width", "Height", "Roi.X1", "Roi.Y1", "Roi.X2", "Roi.Y2", "ClassId", "Path")

# (suffix, PIL mode) cycled through by the ImageFolder writer; upper-case suffixes occur on real disks.
IMAGEFOLDER_FORMATS: tuple[tuple[str, str], ...] = (
    (".png", "RGB"),
    (".jpg", "RGB"),
    (".png", "L"),
    (".png", "RGBA"),
    (".png", "P"),
    (".bmp", "RGB"),
    (".gif", "P"),
    (".jpeg", "L"),
    (".tif", "RGB"),
    (".png", "LA"),
    (".webp", "RGB"),
    (".JPG", "RGB"),
    (".ppm", "RGB"),
)
LOSSY_SUFFIXES = frozenset({".jpg", ".jpeg", ".webp"})


@dataclass(frozen=True)
class Truth:
    """What a correct reader and decoder must report for one file."""

    label: int
    split: str  # "train" or "test"
    track: str  # the writer's id of the physical sign; test images and ImageFolder files are their own track
    roi: Roi | None  # inclusive pixel coordinates as written in the CSV; None where the layout has no ROI
    size: tuple[int, int]  # width, height
    inside: Rgb  # colour of the ROI (the class colour) as a correct decoder returns it
    outside: Rgb  # colour around the ROI as a correct decoder returns it
    lossy: bool = False  # JPEG/WebP: colours are only approximately right


@dataclass
class WrittenDataset:
    """A dataset written to disk and the truth about it."""

    root: Path  # the folder to hand to ``read_dataset``
    base: Path  # the folder the reader should report as ``RawDataset.root``
    layout: str
    class_names: list[str] | None  # folder names for ImageFolder; None for GTSRB ids (named by GTSRB's list)
    files: dict[Path, Truth] = field(default_factory=dict)  # keyed by resolved path

    def split(self, name: str) -> dict[Path, Truth]:
        return {p: t for p, t in self.files.items() if t.split == name}

    @property
    def num_classes(self) -> int:
        return max(t.label for t in self.files.values()) + 1

    def truth(self, path: Path) -> Truth:
        return self.files[Path(path).resolve()]

    def add(self, path: Path, truth: Truth) -> None:
        self.files[path.resolve()] = truth


# --- colours and pictures -----------------------------------------------------------------------------------


def class_colour(label: int) -> Rgb:
    """A saturated colour per class, distinct between classes (golden-ratio hues), never dark."""
    hue = (label * 0.6180339887) % 1.0
    r, g, b = colorsys.hsv_to_rgb(hue, 0.85, 0.95)
    return (round(r * 255), round(g * 255), round(b * 255))


def outside_colour(rng: random.Random) -> Rgb:
    """A dark, nearly grey background: far from every class colour, also after conversion to grayscale."""
    return (rng.randint(0, 30), rng.randint(0, 30), rng.randint(0, 30))


def random_geometry(rng: random.Random, lo: int = 20, hi: int = 120) -> tuple[tuple[int, int], Roi]:
    """A non-square image size and an ROI with a border of 12-30% of the side around it on every side."""
    width, height = rng.randint(lo, hi), rng.randint(lo, hi)
    while width == height:
        height = rng.randint(lo, hi)

    def span(side: int) -> tuple[int, int]:
        a = rng.randint(max(2, -(-side * 12 // 100)), max(3, side * 30 // 100))
        b = rng.randint(max(2, -(-side * 12 // 100)), max(3, side * 30 // 100))
        return a, side - 1 - b

    x1, x2 = span(width)
    y1, y2 = span(height)
    return (width, height), (x1, y1, x2, y2)


def draw(size: tuple[int, int], roi: Roi, inside: Rgb, outside: Rgb) -> np.ndarray:
    """uint8 [H, W, 3]: ``outside`` everywhere, ``inside`` on the inclusive rectangle ``roi``."""
    width, height = size
    x1, y1, x2, y2 = roi
    pixels = np.empty((height, width, 3), dtype=np.uint8)
    pixels[:] = outside
    pixels[y1 : y2 + 1, x1 : x2 + 1] = inside
    return pixels


def ppm_bytes(pixels: np.ndarray) -> bytes:
    """A binary PPM (P6) written by hand, header exactly as in GTSRB's files."""
    height, width, _ = pixels.shape
    return b"P6\n%d %d\n255\n" % (width, height) + np.ascontiguousarray(pixels, dtype=np.uint8).tobytes()


def through_mode(colour: Rgb, mode: str) -> Rgb:
    """What ``colour`` becomes after storing it in ``mode`` and converting back to RGB."""
    if mode in ("RGB", "RGBA", "P"):
        return colour  # RGBA is written opaque; a two-colour palette is exact
    pixel = Image.new("RGB", (1, 1), colour).convert(mode).convert("RGB").getpixel((0, 0))
    assert isinstance(pixel, tuple)
    return (int(pixel[0]), int(pixel[1]), int(pixel[2]))


def encode(pixels: np.ndarray, suffix: str, mode: str) -> bytes:
    """Encode an RGB array as ``suffix`` in colour ``mode`` with Pillow (PPM by hand)."""
    if suffix.lower() == ".ppm" and mode == "RGB":
        return ppm_bytes(pixels)
    image = Image.fromarray(pixels, "RGB")
    if mode == "P":
        image = image.convert("P", palette=Image.Palette.ADAPTIVE, colors=4)
    elif mode == "RGBA":
        image = image.convert("RGBA")  # opaque: alpha 255 everywhere
    elif mode != "RGB":
        image = image.convert(mode)
    out = io.BytesIO()
    kind = suffix.lower().lstrip(".")
    fmt = {"jpg": "JPEG", "jpeg": "JPEG", "tif": "TIFF", "tiff": "TIFF"}.get(kind, kind.upper())
    options: dict[str, object] = {}
    if fmt == "JPEG":
        options = {"quality": 95, "subsampling": 0}
    elif fmt == "WEBP":
        options = {"quality": 95}
    image.save(out, format=fmt, **options)
    return out.getvalue()


def write_csv(path: Path, header: Sequence[str], rows: Sequence[Sequence[object]], sep: str, newline: str) -> None:
    lines = [sep.join(header), *(sep.join(str(v) for v in row) for row in rows)]
    path.write_bytes((newline.join(lines) + newline).encode("utf-8"))


# --- official GTSRB and torchvision's copy ------------------------------------------------------------------


def _write_gtsrb_training(
    images_dir: Path,
    tracks_per_class: Mapping[int, int],
    frames: tuple[int, int],
    rng: random.Random,
    written: WrittenDataset,
    newline: str,
) -> None:
    for label, n_tracks in sorted(tracks_per_class.items()):
        folder = images_dir / f"{label:05d}"
        folder.mkdir(parents=True)
        rows = []
        for track in range(n_tracks):
            for frame in range(rng.randint(*frames)):
                size, roi = random_geometry(rng)
                outside = outside_colour(rng)
                name = f"{track:05d}_{frame:05d}.ppm"
                (folder / name).write_bytes(ppm_bytes(draw(size, roi, class_colour(label), outside)))
                rows.append((name, *size, *roi, label))
                written.add(
                    folder / name,
                    Truth(label, "train", f"{label}:{track}", roi, size, class_colour(label), outside),
                )
        write_csv(folder / f"GT-{label:05d}.csv", GTSRB_CSV_HEADER, rows, ";", newline)


def _write_gtsrb_test(
    images_dir: Path,
    labels_csv: Path | None,
    classes: Sequence[int],
    per_class: int,
    rng: random.Random,
    written: WrittenDataset,
    newline: str,
) -> None:
    images_dir.mkdir(parents=True)
    labels = [c for c in classes for _ in range(per_class)]
    rng.shuffle(labels)  # the official test set is not ordered by class
    rows = []
    for i, label in enumerate(labels):
        size, roi = random_geometry(rng)
        outside = outside_colour(rng)
        name = f"{i:05d}.ppm"
        (images_dir / name).write_bytes(ppm_bytes(draw(size, roi, class_colour(label), outside)))
        rows.append((name, *size, *roi, label))
        truth = Truth(label, "test", f"test:{i}", roi, size, class_colour(label), outside)
        written.add(images_dir / name, truth)
    unlabelled = [r[:-1] for r in rows]
    write_csv(images_dir / "GT-final_test.test.csv", GTSRB_CSV_HEADER[:-1], unlabelled, ";", newline)
    if labels_csv is not None:
        write_csv(labels_csv, GTSRB_CSV_HEADER, rows, ";", newline)


def write_gtsrb(
    root: Path,
    tracks_per_class: Mapping[int, int] = DEFAULT_TRACKS,
    *,
    frames: tuple[int, int] = (2, 4),
    test_per_class: int = 2,
    test: str = "labelled",
    seed: int = 0,
    newline: str = "\r\n",
) -> WrittenDataset:
    """The official release after extracting the training, test-image and test-label archives into ``root``.

    ``test``: "labelled" (all three archives), "unlabelled" (no ``GTSRB_Final_Test_GT.zip``) or "none"
    (training archive only).
    """
    rng = random.Random(seed)
    written = WrittenDataset(root, root / "GTSRB", "gtsrb", None)
    (root / "GTSRB").mkdir(parents=True)
    (root / "GTSRB" / "Readme-Images.txt").write_text("Images and annotations (GTSRB training set)\n")
    train_dir = root / "GTSRB" / "Final_Training" / "Images"
    _write_gtsrb_training(train_dir, tracks_per_class, frames, rng, written, newline)
    if test != "none":
        (root / "GTSRB" / "Readme-Images-Final-test.txt").write_text("Images (GTSRB final test set)\n")
        labels_csv = root / "GT-final_test.csv" if test == "labelled" else None
        _write_gtsrb_test(
            root / "GTSRB" / "Final_Test" / "Images",
            labels_csv,
            sorted(tracks_per_class),
            test_per_class,
            rng,
            written,
            newline,
        )
    return written


def write_torchvision(
    root: Path,
    tracks_per_class: Mapping[int, int] = DEFAULT_TRACKS,
    *,
    frames: tuple[int, int] = (2, 4),
    test_per_class: int = 2,
    labels_name: str = "GT-final_test.csv",
    seed: int = 1,
    newline: str = "\n",
) -> WrittenDataset:
    """What ``torchvision.datasets.GTSRB(root, download=True)`` leaves for both splits in ``root/gtsrb``."""
    rng = random.Random(seed)
    base = root / "gtsrb"
    written = WrittenDataset(root, base, "torchvision", None)
    _write_gtsrb_training(base / "GTSRB" / "Training", tracks_per_class, frames, rng, written, newline)
    _write_gtsrb_test(
        base / "GTSRB" / "Final_Test" / "Images",
        base / labels_name,
        sorted(tracks_per_class),
        test_per_class,
        rng,
        written,
        newline,
    )
    return written


# --- Kaggle -------------------------------------------------------------------------------------------------


def write_kaggle(
    root: Path,
    tracks_per_class: Mapping[int, int] = DEFAULT_TRACKS,
    *,
    frames: tuple[int, int] = (2, 4),
    test_per_class: int = 2,
    seed: int = 2,
    newline: str = "\n",
) -> WrittenDataset:
    """The Kaggle re-upload: PNGs, class folders without zero padding, ``Path`` relative to ``root``."""
    rng = random.Random(seed)
    written = WrittenDataset(root, root, "kaggle", None)
    train_rows = []
    for label, n_tracks in sorted(tracks_per_class.items()):
        folder = root / "Train" / str(label)
        folder.mkdir(parents=True)
        for track in range(n_tracks):
            for frame in range(rng.randint(*frames)):
                size, roi = random_geometry(rng)
                outside = outside_colour(rng)
                name = f"{label:05d}_{track:05d}_{frame:05d}.png"
                pixels = draw(size, roi, class_colour(label), outside)
                (folder / name).write_bytes(encode(pixels, ".png", "RGB"))
                train_rows.append((*size, *roi, label, f"Train/{label}/{name}"))
                written.add(
                    folder / name,
                    Truth(label, "train", f"{label}:{track}", roi, size, class_colour(label), outside),
                )
    rng.shuffle(train_rows)
    write_csv(root / "Train.csv", KAGGLE_CSV_HEADER, train_rows, ",", newline)

    (root / "Test").mkdir()
    labels = [c for c in sorted(tracks_per_class) for _ in range(test_per_class)]
    rng.shuffle(labels)
    test_rows = []
    for i, label in enumerate(labels):
        size, roi = random_geometry(rng)
        outside = outside_colour(rng)
        path = root / "Test" / f"{i:05d}.png"
        path.write_bytes(encode(draw(size, roi, class_colour(label), outside), ".png", "RGB"))
        test_rows.append((*size, *roi, label, f"Test/{i:05d}.png"))
        written.add(path, Truth(label, "test", f"test:{i}", roi, size, class_colour(label), outside))
    write_csv(root / "Test.csv", KAGGLE_CSV_HEADER, test_rows, ",", newline)

    (root / "Meta").mkdir()
    meta_rows = []
    for label in sorted(tracks_per_class):
        icon = draw((40, 40), (4, 4, 35, 35), class_colour(label), (0, 0, 0))
        (root / "Meta" / f"{label}.png").write_bytes(encode(icon, ".png", "RGBA"))
        meta_rows.append((f"Meta/{label}.png", label, label % 4, label % 3, f"{label}.{label % 2}"))
    write_csv(root / "Meta.csv", ("Path", "ClassId", "ShapeId", "ColorId", "SignId"), meta_rows, ",", newline)
    return written


# --- ImageFolder --------------------------------------------------------------------------------------------


def write_imagefolder(
    root: Path,
    class_names: Sequence[str],
    *,
    per_class: int = 4,
    split: bool = False,
    test_per_class: int = 2,
    seed: int = 3,
    formats: Sequence[tuple[str, str]] = IMAGEFOLDER_FORMATS,
) -> WrittenDataset:
    """One folder per class in mixed formats and modes; label i is ``class_names[i]``.

    With ``split``, classes live under ``train/`` and ``test/``. Each class folder also holds a nested
    subfolder with one image, and files that are not images; a hidden folder with an image is not a class.
    """
    rng = random.Random(seed)
    written = WrittenDataset(root, root, "imagefolder", list(class_names))
    counter = 0
    splits = [("train", root / "train", per_class), ("test", root / "test", test_per_class)]
    if not split:
        splits = [("train", root, per_class)]
    for split_name, split_root, n_images in splits:
        for label, name in enumerate(class_names):
            folder = split_root / name
            folder.mkdir(parents=True)
            (folder / "notes.txt").write_text("not an image\n")
            (folder / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
            for i in range(n_images):
                suffix, mode = formats[counter % len(formats)]
                counter += 1
                lossy = suffix.lower() in LOSSY_SUFFIXES
                size, roi = random_geometry(rng, lo=48 if lossy else 20)
                outside = outside_colour(rng)
                target = folder / "more" if i == n_images - 1 else folder
                target.mkdir(exist_ok=True)
                path = target / f"{name}_{i}{suffix}"
                path.write_bytes(encode(draw(size, roi, class_colour(label), outside), suffix, mode))
                written.add(
                    path,
                    Truth(
                        label,
                        split_name,
                        f"{split_name}:{name}:{i}",
                        None,
                        size,
                        through_mode(class_colour(label), mode),
                        through_mode(outside, mode),
                        lossy,
                    ),
                )
    hidden = root / ".thumbnails"
    hidden.mkdir()
    thumb = draw((20, 24), (3, 3, 16, 20), (255, 255, 255), (0, 0, 0))
    (hidden / "thumb.png").write_bytes(encode(thumb, ".png", "RGB"))
    return written


# --- corruptions and small helpers --------------------------------------------------------------------------


def truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
