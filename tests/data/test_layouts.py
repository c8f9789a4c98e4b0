"""The dataset readers against datasets written by an independent generator in each real-world layout.

``layout_writers`` writes GTSRB (official and torchvision), Kaggle and ImageFolder datasets exactly as they
are on disk and records the truth for every file; these tests check that ``read_dataset`` finds the right
labels, counts, tracks and ROIs, that ``decode_samples`` crops the ROI (the pixels say which class an image
is), and that the prepare stage never puts a validation track into training.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import layout_writers as lw
import numpy as np
import pytest
from layout_writers import Truth, WrittenDataset
from PIL import Image

from signpost.data.cache import CachedSplit, decode_samples, load_split
from signpost.data.classes import GTSRB_CLASS_NAMES
from signpost.data.layouts import LayoutError, RawDataset, Sample, read_dataset

if TYPE_CHECKING:
    from signpost.stages.prepare import PrepareResult

SIZE = 32
LAYOUTS = ("gtsrb", "torchvision", "kaggle", "imagefolder")

VARIANTS: dict[str, Callable[[Path], WrittenDataset]] = {
    "gtsrb": lambda root: lw.write_gtsrb(root),
    "torchvision": lambda root: lw.write_torchvision(root),
    "torchvision-upper-case-labels": lambda root: lw.write_torchvision(root, labels_name="GT-Final_Test.csv"),
    "kaggle": lambda root: lw.write_kaggle(root),
    "imagefolder": lambda root: lw.write_imagefolder(root, ["cat", "dog", "fox"], per_class=5),
    "imagefolder-train-test": lambda root: lw.write_imagefolder(root, ["cat", "dog"], split=True),
    "imagefolder-numeric": lambda root: lw.write_imagefolder(root, [str(i) for i in range(12)], per_class=2),
}


@pytest.fixture(params=list(VARIANTS))
def written(request: pytest.FixtureRequest, tmp_path: Path) -> WrittenDataset:
    return VARIANTS[request.param](tmp_path / "data")


def by_path(samples: list[Sample]) -> dict[Path, Sample]:
    out = {s.path.resolve(): s for s in samples}
    assert len(out) == len(samples), "a file is listed twice"
    return out


def expected_names(written: WrittenDataset) -> list[str]:
    if written.class_names is not None:
        return written.class_names
    return list(GTSRB_CLASS_NAMES[: written.num_classes])


def assert_same_partition(reader: dict[Path, str], writer: dict[Path, str]) -> None:
    """The reader's track ids group exactly the files the writer put in one track (names may differ)."""
    assert reader.keys() == writer.keys()
    forward: dict[str, str] = {}
    backward: dict[str, str] = {}
    for path, r in reader.items():
        w = writer[path]
        assert forward.setdefault(r, w) == w, f"track {r!r} mixes the writer's tracks {forward[r]} and {w}"
        assert backward.setdefault(w, r) == r, f"the writer's track {w} is split into {backward[w]!r} and {r!r}"


def assert_close(actual: np.ndarray, colour: tuple[int, int, int], tol: float, what: str) -> None:
    diff = np.abs(actual.astype(np.int64) - np.asarray(colour, dtype=np.int64)).max()
    assert diff <= tol, f"{what}: {actual.tolist()} is not {colour} (off by {diff}, allowed {tol})"


def assert_crop(image: np.ndarray, truth: Truth, margin: float, where: object) -> None:
    """The decoded image shows the ROI in the class colour, and the outside colour only where it should."""
    assert image.shape == (SIZE, SIZE, 3) and image.dtype == np.uint8
    tol = 16 if truth.lossy else 3
    mid = slice(SIZE * 3 // 8, SIZE * 5 // 8)
    assert_close(image[mid, mid].reshape(-1, 3).min(0), truth.inside, tol, f"{where}: centre (min)")
    assert_close(image[mid, mid].reshape(-1, 3).max(0), truth.inside, tol, f"{where}: centre (max)")
    corners = image[[0, 0, -1, -1], [0, -1, 0, -1]]
    if truth.roi is None or margin > 0:
        # The whole image, or the ROI grown by half its size: the writer leaves 12-30% outside on every side.
        for corner in corners:
            assert_close(corner, truth.outside, tol, f"{where}: corner with margin {margin}")
        return
    # Margin 0: the crop is the ROI; only bilinear filtering at the edges may blend in the outside colour.
    inner = image[3:-3, 3:-3].reshape(-1, 3)
    assert_close(inner.min(0), truth.inside, tol, f"{where}: crop interior (min)")
    assert_close(inner.max(0), truth.inside, tol, f"{where}: crop interior (max)")
    spread = np.abs(np.subtract(truth.inside, truth.outside)).max()
    mean = image.reshape(-1, 3).mean(0)
    assert np.abs(mean - truth.inside).max() <= 0.08 * spread + tol, f"{where}: mean {mean} vs {truth.inside}"


# --- each layout --------------------------------------------------------------------------------------------


def test_detects_the_layout(written: WrittenDataset) -> None:
    raw = read_dataset(written.root)
    assert raw.layout == written.layout
    assert raw.root.resolve() == written.base.resolve()


def test_explicit_layout_reads_the_same(written: WrittenDataset) -> None:
    auto = read_dataset(written.root)
    explicit = read_dataset(written.root, layout=written.layout)
    assert explicit.layout == written.layout
    assert (explicit.train, explicit.test, explicit.class_names) == (auto.train, auto.test, auto.class_names)


def test_wrong_explicit_layout_is_an_error_naming_it(written: WrittenDataset) -> None:
    # Not "imagefolder": any tree of folders with images in it is a (wrong but valid) ImageFolder.
    for wrong in ("gtsrb", "torchvision", "kaggle"):
        if wrong != written.layout:
            with pytest.raises(LayoutError, match=rf"not in the {wrong} layout"):
                read_dataset(written.root, layout=wrong)


def test_counts_per_split_and_class(written: WrittenDataset) -> None:
    raw = read_dataset(written.root)
    for split, samples in (("train", raw.train), ("test", raw.test)):
        truth = written.split(split)
        assert len(samples) == len(truth), split
        assert Counter(s.label for s in samples) == Counter(t.label for t in truth.values()), split


def test_labels_rois_and_files(written: WrittenDataset) -> None:
    raw = read_dataset(written.root)
    for split, samples in (("train", raw.train), ("test", raw.test)):
        found = by_path(samples)
        assert found.keys() == written.split(split).keys(), split  # no junk, hidden or other-split files
        for path, sample in found.items():
            truth = written.truth(path)
            assert (sample.label, sample.roi) == (truth.label, truth.roi), path


def test_class_names(written: WrittenDataset) -> None:
    raw = read_dataset(written.root)
    assert raw.class_names == expected_names(written)
    assert raw.num_classes == len(expected_names(written))


def test_tracks_group_frames_of_one_sign(written: WrittenDataset) -> None:
    raw = read_dataset(written.root)
    samples = raw.train + raw.test
    assert_same_partition(
        {s.path.resolve(): s.track for s in samples}, {p: written.truth(p).track for p in by_path(samples)}
    )
    if written.layout != "imagefolder":
        # GTSRB numbers tracks per class: the writer reuses 00000 in every class, the reader must not merge.
        assert len({s.track for s in raw.train}) == sum(lw.DEFAULT_TRACKS.values())
        assert len({s.track for s in raw.test}) == len(raw.test)


@pytest.mark.parametrize("margin", [0.0, 0.5])
def test_decoded_crops_show_the_class_colour(written: WrittenDataset, margin: float) -> None:
    raw = read_dataset(written.root)
    samples = raw.train + raw.test
    decoded = decode_samples(samples, SIZE, margin, workers=1)
    assert decoded.failures == {}
    assert decoded.images.shape == decoded.crops.shape == (len(samples), 3, SIZE, SIZE)
    for i, sample in enumerate(samples):
        truth = written.truth(sample.path)
        assert tuple(decoded.sizes[i]) == truth.size, sample.path
        assert decoded.digests[i], sample.path
        assert_crop(decoded.crops[i].transpose(1, 2, 0), truth, margin, sample.path)
        # The frame is the whole image, as a client sends it: the outside colour in every corner.
        assert_crop(decoded.images[i].transpose(1, 2, 0), truth, 1.0, sample.path)


# --- where the reader is pointed, and layout details --------------------------------------------------------


def test_reads_from_the_inner_folder_too(tmp_path: Path) -> None:
    official = lw.write_gtsrb(tmp_path / "official")
    raw = read_dataset(official.root / "GTSRB")  # GT-final_test.csv is one level up: still found
    assert (raw.layout, len(raw.test)) == ("gtsrb", len(official.split("test")))
    tv = lw.write_torchvision(tmp_path / "tv")
    raw = read_dataset(tv.root / "gtsrb")
    assert (raw.layout, len(raw.test)) == ("torchvision", len(tv.split("test")))


@pytest.mark.parametrize("where", ["GTSRB", "GTSRB/Final_Test", "GTSRB/Final_Test/Images"])
def test_gtsrb_test_labels_extracted_elsewhere(tmp_path: Path, where: str) -> None:
    written = lw.write_gtsrb(tmp_path / "data")
    (written.root / "GT-final_test.csv").rename(written.root / where / "GT-final_test.csv")
    raw = read_dataset(written.root)
    assert {s.path.resolve(): s.label for s in raw.test} == {p: t.label for p, t in written.split("test").items()}


def test_kaggle_extracted_into_a_subfolder(tmp_path: Path) -> None:
    written = lw.write_kaggle(tmp_path / "data" / "archive")
    raw = read_dataset(tmp_path / "data")
    assert (raw.layout, raw.root) == ("kaggle", written.root)
    assert len(raw.train) + len(raw.test) == len(written.files)


def test_csv_with_byte_order_mark(tmp_path: Path) -> None:
    written = lw.write_kaggle(tmp_path / "data")
    csv_path = written.root / "Train.csv"
    csv_path.write_bytes(b"\xef\xbb\xbf" + csv_path.read_bytes())  # as Excel saves it
    raw = read_dataset(written.root)
    assert len(raw.train) == len(written.split("train"))


def test_gtsrb_without_final_test_has_an_empty_test_split(tmp_path: Path) -> None:
    written = lw.write_gtsrb(tmp_path / "data", test="none")
    raw = read_dataset(written.root)
    assert raw.test == []
    assert len(raw.train) == len(written.split("train"))


def test_gtsrb_class_folder_without_csv_uses_whole_images(tmp_path: Path) -> None:
    written = lw.write_gtsrb(tmp_path / "data", test="none")
    folder = written.base / "Final_Training" / "Images" / "00005"
    (folder / "GT-00005.csv").unlink()
    raw = read_dataset(written.root)
    in_folder = [s for s in raw.train if s.path.parent == folder]
    assert len(in_folder) == sum(1 for p in written.files if p.parent == folder.resolve())
    assert all(s.label == 5 and s.roi is None for s in in_folder)
    assert len({s.track for s in in_folder}) == lw.DEFAULT_TRACKS[5]  # tracks still come from the file names


def test_imagefolder_numeric_classes_sort_by_number(tmp_path: Path) -> None:
    written = lw.write_imagefolder(tmp_path / "data", [str(i) for i in range(12)], per_class=1)
    raw = read_dataset(written.root)
    assert raw.class_names == [str(i) for i in range(12)]  # not 0, 1, 10, 11, 2, …
    assert {s.path.relative_to(written.root).parts[0]: s.label for s in raw.train} == {str(i): i for i in range(12)}


def test_imagefolder_test_class_missing_from_train_is_an_error(tmp_path: Path) -> None:
    written = lw.write_imagefolder(tmp_path / "data", ["cat", "dog"], split=True)
    (written.root / "test" / "cat").rename(written.root / "test" / "cow")
    with pytest.raises(LayoutError, match="cow"):
        read_dataset(written.root)


# --- errors -------------------------------------------------------------------------------------------------


def test_missing_root(tmp_path: Path) -> None:
    with pytest.raises(LayoutError, match="not found") as err:
        read_dataset(tmp_path / "nowhere")
    assert "nowhere" in str(err.value)


def test_empty_root(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(LayoutError, match="empty") as err:
        read_dataset(tmp_path / "empty")
    assert str(tmp_path / "empty") in str(err.value)


def test_root_that_is_a_file(tmp_path: Path) -> None:
    (tmp_path / "file.zip").write_bytes(b"PK")
    with pytest.raises(LayoutError, match="not a folder"):
        read_dataset(tmp_path / "file.zip")


def unrelated(root: Path) -> Path:
    root.mkdir()
    (root / "notes.txt").write_text("hello\n")
    (root / "data.csv").write_text("a,b\n1,2\n")
    (root / "docs").mkdir()
    (root / "docs" / "readme.md").write_text("# nothing here\n")
    (root / "Train.csv").write_text("Width,Height\n")  # a Kaggle CSV without its Train/ folder
    return root


def test_unrelated_files_list_every_layout_looked_for(tmp_path: Path) -> None:
    root = unrelated(tmp_path / "data")
    with pytest.raises(LayoutError, match="no known dataset layout") as err:
        read_dataset(root)
    message = str(err.value)
    assert str(root) in message
    for name in LAYOUTS:
        assert name in message


@pytest.mark.parametrize("layout", LAYOUTS)
def test_unrelated_files_with_explicit_layout(tmp_path: Path, layout: str) -> None:
    with pytest.raises(LayoutError, match=rf"not in the {layout} layout"):
        read_dataset(unrelated(tmp_path / "data"), layout=layout)


def test_unknown_layout_name(tmp_path: Path) -> None:
    written = lw.write_kaggle(tmp_path / "data")
    with pytest.raises(LayoutError, match="unknown layout 'coco'") as err:
        read_dataset(written.root, layout="coco")
    for name in LAYOUTS:
        assert name in str(err.value)


def test_gtsrb_test_images_without_labels(tmp_path: Path) -> None:
    written = lw.write_gtsrb(tmp_path / "data", test="unlabelled")
    with pytest.raises(LayoutError) as err:
        read_dataset(written.root)
    message = str(err.value)
    for needle in ("GT-final_test.csv", "GTSRB_Final_Test_GT.zip", "GT-final_test.test.csv", "Final_Test"):
        assert needle in message


def drop_column(path: Path, column: str, sep: str) -> None:
    lines = path.read_text().splitlines()
    index = lines[0].split(sep).index(column)
    path.write_text("\n".join(sep.join(v for i, v in enumerate(ln.split(sep)) if i != index) for ln in lines))


def set_cell(path: Path, row: int, column: str, value: str, sep: str) -> int:
    """Replace one cell of data row ``row`` (0-based); returns its 1-based line number in the file."""
    lines = path.read_text().splitlines()
    index = lines[0].split(sep).index(column)
    cells = lines[row + 1].split(sep)
    cells[index] = value
    lines[row + 1] = sep.join(cells)
    path.write_text("\n".join(lines) + "\n")
    return row + 2


@pytest.mark.parametrize(
    ("writer", "csv_rel", "sep", "column"),
    [
        ("gtsrb", "GTSRB/Final_Training/Images/00001/GT-00001.csv", ";", "Roi.X2"),
        ("gtsrb", "GTSRB/Final_Training/Images/00001/GT-00001.csv", ";", "Filename"),
        ("gtsrb", "GT-final_test.csv", ";", "ClassId"),
        ("torchvision", "gtsrb/GT-final_test.csv", ";", "Roi.Y1"),
        ("kaggle", "Train.csv", ",", "Path"),
        ("kaggle", "Test.csv", ",", "ClassId"),
    ],
)
def test_missing_column_names_column_and_file(tmp_path: Path, writer: str, csv_rel: str, sep: str, column: str) -> None:
    written = VARIANTS[writer](tmp_path / "data")
    drop_column(written.root / csv_rel, column, sep)
    with pytest.raises(LayoutError, match="missing column") as err:
        read_dataset(written.root)
    assert column in str(err.value)
    assert str(written.root / csv_rel) in str(err.value)


@pytest.mark.parametrize(
    ("writer", "csv_rel", "sep", "column", "value"),
    [
        ("gtsrb", "GTSRB/Final_Training/Images/00005/GT-00005.csv", ";", "ClassId", "five"),
        ("gtsrb", "GT-final_test.csv", ";", "ClassId", "3.0"),
        ("torchvision", "gtsrb/GT-final_test.csv", ";", "ClassId", ""),
        ("kaggle", "Train.csv", ",", "ClassId", "x"),
        ("kaggle", "Test.csv", ",", "Roi.X1", "12.5"),
    ],
)
def test_non_integer_cell_names_file_and_line(
    tmp_path: Path, writer: str, csv_rel: str, sep: str, column: str, value: str
) -> None:
    written = VARIANTS[writer](tmp_path / "data")
    line = set_cell(written.root / csv_rel, 1, column, value, sep)
    with pytest.raises(LayoutError, match="whole number") as err:
        read_dataset(written.root)
    assert f"{written.root / csv_rel}:{line}:" in str(err.value)
    assert column in str(err.value)


def test_line_number_after_a_blank_line(tmp_path: Path) -> None:
    written = lw.write_kaggle(tmp_path / "data")
    csv_path = written.root / "Train.csv"
    lines = csv_path.read_text().splitlines()
    lines.insert(2, "")  # a blank line after the first data row
    row = lines[3].split(",")
    row[6] = "x"  # ClassId of the row now on line 4
    lines[3] = ",".join(row)
    csv_path.write_text("\n".join(lines) + "\n")
    with pytest.raises(LayoutError) as err:
        read_dataset(written.root)
    assert f"{csv_path}:4:" in str(err.value)


def test_class_id_that_contradicts_the_folder(tmp_path: Path) -> None:
    written = lw.write_gtsrb(tmp_path / "data")
    csv_path = written.base / "Final_Training" / "Images" / "00005" / "GT-00005.csv"
    set_cell(csv_path, 0, "ClassId", "7", ";")
    with pytest.raises(LayoutError, match="does not match") as err:
        read_dataset(written.root)
    assert f"{csv_path}:2:" in str(err.value)


def test_class_id_outside_gtsrb(tmp_path: Path) -> None:
    written = lw.write_kaggle(tmp_path / "data")
    set_cell(written.root / "Test.csv", 0, "ClassId", "43", ",")
    with pytest.raises(LayoutError, match="43"):
        read_dataset(written.root)


@pytest.mark.parametrize(
    "bad_path",
    ["Train/../../outside.png", "../Train/0/x.png", "Test/..", "/etc/passwd", "Train\\..\\..\\x.png"],
)
def test_kaggle_path_outside_the_dataset(tmp_path: Path, bad_path: str) -> None:
    written = lw.write_kaggle(tmp_path / "data")
    set_cell(written.root / "Train.csv", 2, "Path", bad_path, ",")
    with pytest.raises(LayoutError, match="outside the dataset folder"):
        read_dataset(written.root)


def test_invalid_roi(tmp_path: Path) -> None:
    written = lw.write_gtsrb(tmp_path / "data")
    csv_path = written.root / "GT-final_test.csv"
    set_cell(csv_path, 0, "Roi.X2", "0", ";")  # x2 < x1
    with pytest.raises(LayoutError, match="invalid ROI"):
        read_dataset(written.root)


# --- decoding: corrupt files --------------------------------------------------------------------------------


def decode_all(raw: RawDataset) -> tuple[list[Sample], dict[int, str], np.ndarray]:
    samples = raw.train + raw.test
    decoded = decode_samples(samples, SIZE, 0.0, workers=1)
    return samples, decoded.failures, decoded.crops.transpose(0, 2, 3, 1)  # as [N, H, W, 3], like the writers


def test_corrupt_gtsrb_files_are_reported_and_the_rest_decode(tmp_path: Path) -> None:
    written = lw.write_gtsrb(tmp_path / "data")
    images = written.base / "Final_Training" / "Images"
    truncated = images / "00000" / "00001_00000.ppm"
    missing = images / "00001" / "00000_00001.ppm"
    empty = written.base / "Final_Test" / "Images" / "00003.ppm"
    lw.truncate(truncated)
    missing.unlink()  # still listed in GT-00001.csv
    empty.write_bytes(b"")
    raw = read_dataset(written.root)
    samples, failures, decoded = decode_all(raw)
    reasons = {samples[i].path: reason for i, reason in failures.items()}
    assert reasons.keys() == {truncated, missing, empty}
    assert "truncated" in reasons[truncated] or "cannot decode" in reasons[truncated]
    assert "unreadable" in reasons[missing]
    assert reasons[empty] == "empty file"
    for i, sample in enumerate(samples):
        if i in failures:
            assert not decoded[i].any()  # rows of failed images stay zero
        else:
            assert_crop(decoded[i], written.truth(sample.path), 0.0, sample.path)


def test_corrupt_imagefolder_files_are_reported_and_the_rest_decode(tmp_path: Path) -> None:
    written = lw.write_imagefolder(tmp_path / "data", ["cat", "dog"], per_class=4)
    rng = random.Random(0)
    noise = written.root / "cat" / "noise.png"
    noise.write_bytes(bytes(rng.randrange(256) for _ in range(500)))
    empty = written.root / "dog" / "empty.jpg"
    empty.write_bytes(b"")
    cut_png = written.root / "dog" / "cut.png"
    cut_png.write_bytes(lw.encode(lw.draw((60, 50), (8, 8, 50, 40), (255, 0, 0), (0, 0, 0)), ".png", "RGB"))
    lw.truncate(cut_png, 0.6)
    header_only = written.root / "cat" / "header.ppm"
    header_only.write_bytes(b"P6\n40 30\n255\n")
    raw = read_dataset(written.root)
    samples, failures, decoded = decode_all(raw)
    reasons = {samples[i].path.name: reason for i, reason in failures.items()}
    assert reasons.keys() == {"noise.png", "empty.jpg", "cut.png", "header.ppm"}
    assert all(reasons.values())
    assert reasons["empty.jpg"] == "empty file"
    assert "Pillow" in reasons["noise.png"] or "cannot decode" in reasons["noise.png"]
    for i, sample in enumerate(samples):
        if i not in failures:
            assert_crop(decoded[i], written.truth(sample.path), 0.0, sample.path)


@pytest.mark.parametrize(("margin", "box"), [(0.0, (5, 7, 21, 23)), (0.25, (1, 3, 25, 27))])
def test_roi_is_inclusive_and_margin_is_a_fraction_of_it(tmp_path: Path, margin: float, box: tuple) -> None:
    # At scale 1 bilinear resampling copies pixels, so the crop must be exactly the ROI (x2, y2 included),
    # grown by margin x its 16 px on every side.
    noise = np.random.default_rng(0).integers(0, 256, size=(30, 40, 3), dtype=np.uint8)
    path = tmp_path / "noise.ppm"
    path.write_bytes(lw.ppm_bytes(noise))
    x1, y1, x2, y2 = box
    decoded = decode_samples([Sample(str(path), 0, "t", (5, 7, 20, 22))], x2 - x1, margin, workers=1)
    assert decoded.failures == {}
    np.testing.assert_array_equal(decoded.crops[0].transpose(1, 2, 0), noise[y1:y2, x1:x2])


# --- the prepare stage: no validation track in training -----------------------------------------------------


def run_prepare(root: Path, workdir: Path) -> tuple[PrepareResult, dict[str, CachedSplit]]:
    from signpost.config import load_config
    from signpost.stages.prepare import prepare  # here: the other tests run even where prepare cannot import

    cfg = load_config(None, [f"data.root={root}", f"workdir={workdir}", "data.source=local", "data.workers=1"])
    result = prepare(cfg, progress=False)
    splits = {name: load_split(result.path / f"{name}.safetensors") for name in ("train", "val", "test")}
    return result, splits


def track_set(split: CachedSplit) -> set[int]:
    return set(split.tracks.tolist())


def test_prepare_splits_validation_by_track(tmp_path: Path) -> None:
    tracks_per_class = {0: 4, 1: 3, 2: 5, 7: 2, 9: 1}
    written = lw.write_gtsrb(tmp_path / "data", tracks_per_class, frames=(3, 5), test_per_class=3)
    result, splits = run_prepare(written.root, tmp_path / "w")
    train, val, test = splits["train"], splits["val"], splits["test"]

    assert not track_set(train) & track_set(val), "a validation track appears in training"
    assert not track_set(test) & (track_set(train) | track_set(val))
    assert len(train) + len(val) + len(test) == len(written.files)
    assert len(test) == len(written.split("test"))
    assert len(train) + len(val) == len(written.split("train"))
    for label, n_tracks in tracks_per_class.items():
        in_val = int((val.labels == label).sum())
        assert (in_val > 0) == (n_tracks >= 2), f"class {label} with {n_tracks} tracks has {in_val} in val"
        assert int((train.labels == label).sum()) > 0, f"class {label} has no training images"
    # Labels per split agree with the writer, and every cached image is the ROI in its class colour.
    truth_counts = Counter(t.label for t in written.split("train").values())
    assert Counter(train.labels.tolist()) + Counter(val.labels.tolist()) == truth_counts
    assert Counter(test.labels.tolist()) == Counter(t.label for t in written.split("test").values())
    for name, split in splits.items():
        assert split.images.shape[1:] == (3, 32, 32)
        centres = split.images[:, :, 16, 16].numpy()
        for label, centre in zip(split.labels.tolist(), centres, strict=True):
            assert_close(centre, lw.class_colour(label), 3, f"{name} image of class {label}")
    assert result.manifest["metrics"] == {
        "train_images": len(train),
        "val_images": len(val),
        "test_images": len(test),
    }


def test_prepare_holds_out_a_test_split_for_imagefolder(tmp_path: Path) -> None:
    written = lw.write_imagefolder(tmp_path / "data", ["cat", "dog", "fox"], per_class=8)
    _, splits = run_prepare(written.root, tmp_path / "w")
    train, val, test = splits["train"], splits["val"], splits["test"]
    assert len(test) > 0 and len(val) > 0
    assert not track_set(test) & track_set(train)
    assert not track_set(test) & track_set(val)
    assert not track_set(val) & track_set(train)
    assert len(train) + len(val) + len(test) == len(written.files)
    assert set(test.labels.tolist()) == {0, 1, 2}  # about 15% of each class, whole tracks


def test_prepare_reuses_the_cache(tmp_path: Path) -> None:
    written = lw.write_kaggle(tmp_path / "data")
    first, _ = run_prepare(written.root, tmp_path / "w")
    again, splits = run_prepare(written.root, tmp_path / "w")
    assert not first.reused and again.reused and again.path == first.path
    assert not track_set(splits["train"]) & track_set(splits["val"])


def test_imagefolder_test_folder_beside_class_folders_is_the_test_split(tmp_path: Path) -> None:
    for folder in ("cat", "dog", "test/cat", "test/dog"):
        (tmp_path / folder).mkdir(parents=True)
        Image.new("RGB", (20, 20), (10, 20, 30)).save(tmp_path / folder / "a.png")
    dataset = read_dataset(tmp_path)
    assert dataset.class_names == ["cat", "dog"]
    assert len(dataset.train) == 2 and len(dataset.test) == 2


def test_csv_that_is_not_utf8_is_a_layout_error(tmp_path: Path) -> None:
    written = lw.write_kaggle(tmp_path / "data")
    (written.root / "Train.csv").write_bytes(b"Width,Height\n\xff\xfe\xfa,1\n")
    with pytest.raises(LayoutError, match="not UTF-8"):
        read_dataset(written.root)
