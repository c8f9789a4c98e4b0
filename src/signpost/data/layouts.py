"""Readers for the ways people have GTSRB (and other image-classification data) on disk.

Each reader turns a folder into a ``RawDataset``: lists of ``Sample`` (file, label, track, ROI) for the training and
test splits. Nothing is decoded here; ``signpost.data.cache`` does that once, in parallel. Layouts:

- ``gtsrb``: the official release, ``GTSRB/Final_Training/Images/000NN/*.ppm`` with ``GT-000NN.csv`` per class and
  ``GTSRB/Final_Test/Images`` with ``GT-final_test.csv`` from the separate ground-truth archive;
- ``torchvision``: what ``torchvision.datasets.GTSRB`` downloads, ``gtsrb/GTSRB/Training/000NN``,
  ``gtsrb/GTSRB/Final_Test/Images`` and ``gtsrb/GT-final_test.csv``;
- ``kaggle``: the popular Kaggle re-upload, ``Train/<class>/``, ``Test/``, ``Train.csv``/``Test.csv`` with ``Path``;
- ``imagefolder``: one folder per class (optionally under ``train/`` and ``test/``), any format Pillow reads.
"""

from __future__ import annotations

import csv
import logging
import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from signpost.data.classes import GTSRB_CLASS_NAMES, NUM_GTSRB_CLASSES

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset(
    {".ppm", ".pgm", ".pbm", ".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
)
GT_TEST_CSV = "gt-final_test.csv"  # compared case-insensitively: torchvision's docs spell it GT-Final_Test.csv
GT_TEST_ARCHIVE = "GTSRB_Final_Test_GT.zip"

# GTSRB names frames TTTTT_FFFFF (track, frame); the Kaggle copy prefixes the class: CCCCC_TTTTT_FFFFF.
_TRACK_RE = re.compile(r"^(?:\d+_)?(\d+)_\d+\.[A-Za-z]+$")

Roi = tuple[int, int, int, int]  # x1, y1, x2, y2: inclusive pixel coordinates, as in GTSRB's CSV files


class LayoutError(ValueError):
    """A dataset folder that cannot be read; the message names the file or folder and what was expected."""


@dataclass(frozen=True)
class Sample:
    """One image on disk with its label, the physical sign (track) it shows, and its region of interest."""

    file: str  # the image's path; a string because building 51,839 Path objects costs ~0.3 s per prepare
    label: int
    track: str
    roi: Roi | None = None

    @property
    def path(self) -> Path:
        return Path(self.file)


@dataclass
class RawDataset:
    """A dataset as found on disk: training samples, and test samples when the layout has a labelled test split."""

    layout: str
    root: Path
    class_names: list[str]
    train: list[Sample]
    test: list[Sample] = field(default_factory=list)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def read_dataset(root: Path, layout: str = "auto") -> RawDataset:
    """Read the dataset under ``root`` in ``layout`` ("auto" tries each layout in turn)."""
    # Absolute, so that every sample's path starts with the dataset root's (pathlib drops a leading "./").
    root = Path(root).absolute()
    if not root.exists():
        raise LayoutError(f"dataset folder not found: {root}")
    if not root.is_dir():
        raise LayoutError(f"dataset path is not a folder: {root}")
    if not any(root.iterdir()):
        raise LayoutError(f"dataset folder is empty: {root}")
    if layout != "auto":
        if layout not in READERS:
            raise LayoutError(f"unknown layout {layout!r}; choose one of: auto, {', '.join(READERS)}")
        detect, reader, _ = READERS[layout]
        base = detect(root)
        if base is None:
            raise LayoutError(f"{root} is not in the {layout} layout: expected {READERS[layout][2]}")
        return reader(base)
    for name, (detect, reader, _) in READERS.items():
        base = detect(root)
        if base is not None:
            log.info("reading %s as the %s layout", base, name)
            return reader(base)
    looked_for = "\n".join(f"  - {name}: {what}" for name, (_, _, what) in READERS.items())
    raise LayoutError(f"no known dataset layout found in {root}. Looked for:\n{looked_for}")


# --- official GTSRB release -------------------------------------------------------------------------------------


def _detect_gtsrb(root: Path) -> Path | None:
    for base in (root, root / "GTSRB"):
        if (base / "Final_Training" / "Images").is_dir():
            return base
    return None


def read_gtsrb(base: Path) -> RawDataset:
    """The official release: ``base`` holds ``Final_Training/Images`` and optionally ``Final_Test/Images``."""
    train = _read_class_folders(base / "Final_Training" / "Images")
    test_dir = base / "Final_Test" / "Images"
    test = _read_gtsrb_test(test_dir, [test_dir, test_dir.parent, base, base.parent]) if test_dir.is_dir() else []
    return RawDataset("gtsrb", base, _gtsrb_names(train + test), train, test)


def _detect_torchvision(root: Path) -> Path | None:
    for base in (root, root / "gtsrb"):
        if (base / "GTSRB" / "Training").is_dir():
            return base
    return None


def read_torchvision(base: Path) -> RawDataset:
    """torchvision's copy: ``base`` holds ``GTSRB/Training``, ``GTSRB/Final_Test/Images`` and the test labels."""
    train = _read_class_folders(base / "GTSRB" / "Training")
    test_dir = base / "GTSRB" / "Final_Test" / "Images"
    test = _read_gtsrb_test(test_dir, [base, test_dir, base / "GTSRB"]) if test_dir.is_dir() else []
    return RawDataset("torchvision", base, _gtsrb_names(train + test), train, test)


def _read_class_folders(images_dir: Path) -> list[Sample]:
    """Class folders ``000NN`` with a ``GT-000NN.csv`` each (ROIs and labels), or bare images when it is absent."""
    folders = sorted(p for p in images_dir.iterdir() if p.is_dir() and p.name.isdigit())
    if not folders:
        raise LayoutError(f"{images_dir} has no class folders (expected 00000 … 00042)")
    samples: list[Sample] = []
    for folder in folders:
        label = _check_label(int(folder.name), folder)
        csv_path = _find_file(folder, f"gt-{folder.name}.csv")
        if csv_path is None:
            # torchvision's "fixed" training archive keeps CSVs, but hand-made copies often drop them.
            log.warning("%s has no GT-%s.csv: using whole images without ROIs", folder, folder.name)
            for path in _image_files(folder):
                samples.append(Sample(str(path), label, _track_of(path.name, label), None))
            continue
        for row, line in _read_csv(csv_path, required=("Filename", "Roi.X1", "Roi.Y1", "Roi.X2", "Roi.Y2")):
            if "ClassId" in row and _int(row["ClassId"], csv_path, line, "ClassId") != label:
                raise LayoutError(
                    f"{csv_path}:{line}: ClassId {row['ClassId']} does not match the folder's class {label}"
                )
            name = row["Filename"]
            samples.append(Sample(f"{folder}/{name}", label, _track_of(name, label), _roi(row, csv_path, line)))
    return samples


def _read_gtsrb_test(images_dir: Path, search: Iterable[Path]) -> list[Sample]:
    labels_csv = next((found for d in search if (found := _find_file(d, GT_TEST_CSV)) is not None), None)
    if labels_csv is None:
        places = ", ".join(str(d) for d in search)
        unlabeled = _find_file(images_dir, "gt-final_test.test.csv")
        what = (
            f"only {unlabeled.name}, which has no ClassId column, is there"
            if unlabeled is not None
            else "no labels file was found"
        )
        raise LayoutError(
            f"the GTSRB test images in {images_dir} have no labels: {what}. The labels are GT-final_test.csv from "
            f"the separate archive {GT_TEST_ARCHIVE}; extract it into one of: {places} (or run "
            "`signpost prepare --download`, which fetches it). To use training images only, remove the "
            "Final_Test folder and a test split is held out from training instead."
        )
    samples = []
    for row, line in _read_csv(labels_csv, required=("Filename", "ClassId", "Roi.X1", "Roi.Y1", "Roi.X2", "Roi.Y2")):
        label = _check_label(_int(row["ClassId"], labels_csv, line, "ClassId"), labels_csv)
        name = row["Filename"]
        samples.append(Sample(f"{images_dir}/{name}", label, f"test/{name}", _roi(row, labels_csv, line)))
    return samples


# --- Kaggle -----------------------------------------------------------------------------------------------------


def _detect_kaggle(root: Path) -> Path | None:
    for base in (root, *sorted(p for p in root.iterdir() if p.is_dir())):
        if _find_file(base, "train.csv") is not None and (base / "Train").is_dir():
            return base
    return None


def read_kaggle(base: Path) -> RawDataset:
    """The Kaggle copy: ``Train.csv``/``Test.csv`` with ``Path``, ``ClassId`` and ROI columns."""
    train = _read_kaggle_csv(base, _find_file(base, "train.csv"), test=False)
    test_csv = _find_file(base, "test.csv")
    test = _read_kaggle_csv(base, test_csv, test=True) if test_csv is not None else []
    return RawDataset("kaggle", base, _gtsrb_names(train + test), train, test)


def _read_kaggle_csv(base: Path, csv_path: Path | None, *, test: bool) -> list[Sample]:
    assert csv_path is not None
    samples = []
    for row, line in _read_csv(csv_path, required=("Path", "ClassId", "Roi.X1", "Roi.Y1", "Roi.X2", "Roi.Y2")):
        label = _check_label(_int(row["ClassId"], csv_path, line, "ClassId"), csv_path)
        rel = row["Path"].replace("\\", "/")
        if rel.startswith("/") or ".." in rel.split("/"):
            raise LayoutError(f"{csv_path}:{line}: Path {rel!r} points outside the dataset folder")
        name = rel.rsplit("/", 1)[-1]
        track = f"test/{name}" if test else _track_of(name, label)
        samples.append(Sample(f"{base}/{rel}", label, track, _roi(row, csv_path, line)))
    return samples


# --- generic ImageFolder ----------------------------------------------------------------------------------------


def _detect_imagefolder(root: Path) -> Path | None:
    split = root / "train"
    if split.is_dir() and _class_dirs(split):
        return root
    return root if _class_dirs(root) else None


def read_imagefolder(base: Path) -> RawDataset:
    """One folder per class; ``train/`` and ``test/`` subfolders are used as splits when present."""
    split_train, split_test = base / "train", base / "test"
    has_splits = split_train.is_dir() and bool(_class_dirs(split_train))
    has_test = split_test.is_dir() and bool(_class_dirs(split_test))
    train_root = split_train if has_splits else base
    # <class>/ folders beside a test/<class>/ tree: "test" is the test split, not a class.
    class_dirs = [d for d in _class_dirs(train_root) if has_splits or not (has_test and d.name == "test")]
    for name in ("val", "valid", "validation"):
        if has_splits and (base / name).is_dir():
            log.warning("ignoring %s: Signpost holds out its own validation split, by track", base / name)
    class_names = [p.name for p in class_dirs]
    # Numbered folders ("0", "1", …, "10") sort by number, not as text, so label i is folder i.
    if all(name.isdigit() for name in class_names):
        class_names.sort(key=int)
    index = {name: i for i, name in enumerate(class_names)}
    train = [
        Sample(str(path), index[d.name], f"{d.name}/{path.relative_to(d)}")
        for d in class_dirs
        for path in _image_files(d, recursive=True)
    ]
    test: list[Sample] = []
    if has_test:
        for d in _class_dirs(split_test):
            if d.name not in index:
                raise LayoutError(f"{d}: class {d.name!r} is in test/ but not in train/ ({', '.join(class_names)})")
            test.extend(
                Sample(str(p), index[d.name], f"test/{d.name}/{p.relative_to(d)}")
                for p in _image_files(d, recursive=True)
            )
    if not train:
        raise LayoutError(f"{train_root}: the class folders hold no images ({', '.join(sorted(IMAGE_EXTENSIONS))})")
    return RawDataset("imagefolder", base, class_names, train, test)


def _class_dirs(folder: Path) -> list[Path]:
    """Subfolders that hold at least one image file, sorted by name."""
    return sorted(
        p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".") and _has_images(p)
    )


def _has_images(folder: Path) -> bool:
    return any(p.suffix.lower() in IMAGE_EXTENSIONS for p in folder.rglob("*") if p.is_file())


READERS: dict[str, tuple[Callable[[Path], Path | None], Callable[[Path], RawDataset], str]] = {
    "gtsrb": (_detect_gtsrb, read_gtsrb, "GTSRB/Final_Training/Images/000NN/*.ppm with GT-000NN.csv (official)"),
    "torchvision": (_detect_torchvision, read_torchvision, "gtsrb/GTSRB/Training/000NN/ (torchvision's download)"),
    "kaggle": (_detect_kaggle, read_kaggle, "Train/<class>/, Train.csv and Test.csv with a Path column (Kaggle)"),
    "imagefolder": (_detect_imagefolder, read_imagefolder, "<class>/<image> folders, optionally under train/, test/"),
}


# --- small helpers ----------------------------------------------------------------------------------------------


def _gtsrb_names(samples: list[Sample]) -> list[str]:
    """GTSRB class names for labels 0..max label (a subset such as a small synthetic set keeps the same ids)."""
    if not samples:
        raise LayoutError("the dataset has no images")
    return list(GTSRB_CLASS_NAMES[: max(s.label for s in samples) + 1])


def _check_label(label: int, where: Path) -> int:
    if not 0 <= label < NUM_GTSRB_CLASSES:
        raise LayoutError(f"{where}: class id {label} is outside GTSRB's 0 … {NUM_GTSRB_CLASSES - 1}")
    return label


def _track_of(name: str, label: int) -> str:
    """The physical sign an image shows: GTSRB's track number, or the file itself when the name has none."""
    match = _TRACK_RE.match(name)
    return f"{label}/{match.group(1)}" if match else f"{label}/{name}"


def _find_file(folder: Path, name_lower: str) -> Path | None:
    """``folder/name`` matched case-insensitively. Compares plain names: a class folder holds ~1,000 images."""
    if not folder.is_dir():
        return None
    matches = sorted(name for name in os.listdir(folder) if name.lower() == name_lower)
    return next((folder / name for name in matches if (folder / name).is_file()), None)


def _image_files(folder: Path, recursive: bool = False) -> list[Path]:
    files = folder.rglob("*") if recursive else folder.iterdir()
    return sorted(p for p in files if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def _read_csv(path: Path, required: tuple[str, ...]) -> list[tuple[dict[str, str], int]]:
    """Rows of a GTSRB-style CSV (``;``-separated officially, ``,`` on Kaggle) with their line numbers."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise LayoutError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    header = text.split("\n", 1)[0]
    delimiter = ";" if header.count(";") >= header.count(",") else ","
    reader = csv.reader(text.splitlines(), delimiter=delimiter)
    columns = [c.strip() for c in next(reader, [])]
    missing = [c for c in required if c not in columns]
    if missing:
        raise LayoutError(f"{path}: missing column(s) {', '.join(missing)}; found {', '.join(columns) or 'none'}")
    # Only the columns a reader uses become dict entries: GTSRB has 51,839 rows, and this runs on every prepare.
    wanted = [(name, columns.index(name)) for name in dict.fromkeys((*required, "ClassId")) if name in columns]
    width = max(i for _, i in wanted) + 1
    rows = []
    for cells in reader:
        if not any(cell.strip() for cell in cells):
            continue
        if len(cells) < width:
            raise LayoutError(f"{path}:{reader.line_num}: {len(cells)} columns, expected {len(columns)}")
        rows.append(({name: cells[i].strip() for name, i in wanted}, reader.line_num))
    return rows


def _int(text: str, path: Path, line: int, column: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise LayoutError(f"{path}:{line}: {column} must be a whole number, got {text!r}") from None


def _roi(row: dict[str, str], path: Path, line: int) -> Roi:
    try:
        x1, y1, x2, y2 = int(row["Roi.X1"]), int(row["Roi.Y1"]), int(row["Roi.X2"]), int(row["Roi.Y2"])
    except ValueError:  # the slow path, only to name the bad cell
        x1, y1, x2, y2 = (_int(row[c], path, line, c) for c in ("Roi.X1", "Roi.Y1", "Roi.X2", "Roi.Y2"))
    if x2 < x1 or y2 < y1 or min(x1, y1) < 0:
        raise LayoutError(f"{path}:{line}: invalid ROI ({x1}, {y1}, {x2}, {y2})")
    return (x1, y1, x2, y2)
