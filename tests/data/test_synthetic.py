"""The synthetic GTSRB generator: official layout, ROIs, tracks, imbalance, determinism, learnability."""

from __future__ import annotations

import hashlib
import re
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from signpost.config import SyntheticConfig
from signpost.data.classes import CLASS_CATEGORY, PROHIBITORY
from signpost.data.synthetic import SyntheticSummary, generate_gtsrb

TRAIN_HEADER = "Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId"
TEST_HEADER = "Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2"
SMALL = SyntheticConfig(num_classes=5, min_tracks=1, max_tracks=3, frames_per_track=4, test_tracks=1)


def _generate(root: Path, **overrides: object) -> SyntheticSummary:
    return generate_gtsrb(root, SMALL.model_copy(update=overrides))


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> SyntheticSummary:
    return _generate(tmp_path_factory.mktemp("small"))


def _read_csv(path: Path) -> tuple[str, list[list[str]]]:
    header, *rows = path.read_text(encoding="utf-8").splitlines()
    return header, [row.split(";") for row in rows]


def _train_rows(root: Path, class_id: int) -> list[list[str]]:
    folder = root / "GTSRB" / "Final_Training" / "Images" / f"{class_id:05d}"
    return _read_csv(folder / f"GT-{class_id:05d}.csv")[1]


def _all_images(root: Path) -> list[tuple[Path, list[int], int]]:
    """(image path, [w, h, x1, y1, x2, y2], class id) for every training and test image."""
    out = []
    for folder in sorted((root / "GTSRB" / "Final_Training" / "Images").iterdir()):
        for row in _train_rows(root, int(folder.name)):
            out.append((folder / row[0], [int(v) for v in row[1:7]], int(row[7])))
    for row in _read_csv(root / "GT-final_test.csv")[1]:
        out.append((root / "GTSRB" / "Final_Test" / "Images" / row[0], [int(v) for v in row[1:7]], int(row[7])))
    return out


def _hashes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_training_layout_matches_official_archive(small: SyntheticSummary) -> None:
    images = small.root / "GTSRB" / "Final_Training" / "Images"
    assert sorted(p.name for p in images.iterdir()) == [f"{c:05d}" for c in range(SMALL.num_classes)]
    for class_id in range(SMALL.num_classes):
        folder = images / f"{class_id:05d}"
        header, rows = _read_csv(folder / f"GT-{class_id:05d}.csv")
        assert header == TRAIN_HEADER
        names = [row[0] for row in rows]
        assert all(re.fullmatch(r"\d{5}_\d{5}\.ppm", name) for name in names)
        assert sorted(p.name for p in folder.glob("*.ppm")) == sorted(names)
        assert {p.name for p in folder.iterdir()} == {*names, f"GT-{class_id:05d}.csv"}
        assert all(int(row[7]) == class_id for row in rows)


def test_every_image_matches_its_csv_row(small: SyntheticSummary) -> None:
    for path, (w, h, x1, y1, x2, y2), _ in _all_images(small.root):
        assert path.read_bytes()[:2] == b"P6", "binary PPM, as in GTSRB"
        with Image.open(path) as image:
            assert image.format == "PPM" and image.mode == "RGB"
            assert image.size == (w, h)
        assert 0 <= x1 < x2 < w and 0 <= y1 < y2 < h


def test_sizes_and_margins_like_gtsrb(small: SyntheticSummary) -> None:
    for _, (w, h, x1, y1, x2, y2), _ in _all_images(small.root):
        assert SMALL.min_size <= min(w, h) and max(w, h) <= SMALL.max_size
        assert abs(w - h) <= 3 + 0.08 * max(w, h), "square-ish"
        for side, before, after in ((w, x1, w - 1 - x2), (h, y1, h - 1 - y2)):
            # About 10% of the sign around it, at least 4-5 px once the image is 30 px or more.
            assert 1 <= before <= 0.2 * side + 1 and 1 <= after <= 0.2 * side + 1
            if side >= 30:
                assert min(before, after) >= 4


def test_sizes_respect_config_bounds(tmp_path: Path) -> None:
    _generate(tmp_path, min_size=40, max_size=48, num_classes=3)
    sizes = [v[:2] for _, v, _ in _all_images(tmp_path)]
    assert all(40 <= s <= 48 for wh in sizes for s in wh)


def _red(path: Path) -> np.ndarray:
    pixels = np.asarray(Image.open(path), dtype=np.float32)
    r, g, b = pixels[..., 0], pixels[..., 1], pixels[..., 2]
    return (r > 1.4 * g) & (r > 1.4 * b) & (r > 30)


def test_roi_is_the_signs_bounding_box(small: SyntheticSummary) -> None:
    # Classes 0-4 are prohibitory signs: a red ring that touches its bounding box in the middle of each side.
    # So red fills a band just inside each ROI edge and is rare just outside it, if the ROI is the true box.
    assert all(CLASS_CATEGORY[c] == PROHIBITORY for c in range(SMALL.num_classes))
    inside, outside, redder = [], [], []
    for path, (_, _, x1, y1, x2, y2), _ in _all_images(small.root):
        red = _red(path)
        roi = np.zeros(red.shape, dtype=bool)
        roi[y1 : y2 + 1, x1 : x2 + 1] = True
        redder.append(red[roi].mean() > red[~roi].mean())
        sw, sh = x2 - x1 + 1, y2 - y1 + 1
        band = max(1, round(0.12 * min(sw, sh)))  # the ring is about a ninth of the sign wide
        rows, cols = slice(y1 + sh // 3, y2 + 1 - sh // 3), slice(x1 + sw // 3, x2 + 1 - sw // 3)
        strips_in = [red[rows, x1 : x1 + band], red[rows, x2 + 1 - band : x2 + 1]]
        strips_in += [red[y1 : y1 + band, cols], red[y2 + 1 - band : y2 + 1, cols]]
        strips_out = [red[rows, max(0, x1 - 2) : x1], red[rows, x2 + 1 : x2 + 3]]
        strips_out += [red[max(0, y1 - 2) : y1, cols], red[y2 + 1 : y2 + 3, cols]]
        inside.append(np.concatenate([s.ravel() for s in strips_in]).mean())
        outside.append(np.concatenate([s.ravel() for s in strips_out]).mean())
    inside_a, outside_a = np.array(inside), np.array(outside)
    assert inside_a.mean() > 0.7 and outside_a.mean() < 0.1
    assert np.mean(inside_a > outside_a + 0.3) > 0.95
    assert np.mean(redder) > 0.95  # not all: a very dark frame can lose its reds


def test_tracks_grow_towards_the_camera(small: SyntheticSummary) -> None:
    for class_id in range(SMALL.num_classes):
        tracks: dict[str, list[tuple[int, int]]] = defaultdict(list)
        for row in _train_rows(small.root, class_id):
            track, frame = row[0].removesuffix(".ppm").split("_")
            tracks[track].append((int(frame), int(row[2])))
        assert sorted(tracks) == [f"{t:05d}" for t in range(len(tracks))]
        for frames in tracks.values():
            frames.sort()
            assert [f for f, _ in frames] == list(range(SMALL.frames_per_track))
            heights = [h for _, h in frames]
            assert heights[-1] > heights[0]
            assert np.mean(np.diff(heights)) > 0


def test_class_imbalance_matches_files(small: SyntheticSummary) -> None:
    counts = small.class_counts
    assert len(counts) == SMALL.num_classes
    assert len(set(counts)) > 1
    assert min(counts) == SMALL.min_tracks * SMALL.frames_per_track
    assert max(counts) == SMALL.max_tracks * SMALL.frames_per_track
    for class_id, count in enumerate(counts):
        folder = small.root / "GTSRB" / "Final_Training" / "Images" / f"{class_id:05d}"
        assert len(list(folder.glob("*.ppm"))) == count
    assert small.train_images == sum(counts)


def test_test_split_unlabelled_and_labelled_ground_truth(small: SyntheticSummary) -> None:
    images = small.root / "GTSRB" / "Final_Test" / "Images"
    header, rows = _read_csv(images / "GT-final_test.test.csv")
    assert header == TEST_HEADER
    assert all(len(row) == 7 for row in rows)
    gt_header, gt_rows = _read_csv(small.root / "GT-final_test.csv")
    assert gt_header == TRAIN_HEADER
    assert [row[:7] for row in gt_rows] == rows
    names = [row[0] for row in rows]
    assert names == [f"{i:05d}.ppm" for i in range(small.test_images)]
    assert sorted(p.name for p in images.glob("*.ppm")) == names
    labels = [int(row[7]) for row in gt_rows]
    assert set(labels) == set(range(SMALL.num_classes))
    assert labels != sorted(labels), "test images are shuffled across classes"
    # Every third frame of each test track: frames 0 and 3 of 4.
    assert small.test_images == SMALL.num_classes * SMALL.test_tracks * 2


def test_same_seed_same_bytes_other_seed_other_images(small: SyntheticSummary, tmp_path: Path) -> None:
    again = _generate(tmp_path / "again")
    assert _hashes(again.root) == _hashes(small.root)
    other = _generate(tmp_path / "other", seed=SMALL.seed + 1)
    base, changed = _hashes(small.root), _hashes(other.root)
    shared = [name for name in base if name.endswith(".ppm") and name in changed]
    assert shared and all(base[name] != changed[name] for name in shared)


def test_classes_are_learnable_and_distinct(tmp_path: Path) -> None:
    # Nearest class mean on 32x32 ROI crops, each standardised to undo lighting: far above chance means the
    # classes differ, and glyphs survive the resize. Ten classes, nine of them the same red-ringed disc.
    cfg = SMALL.model_copy(update={"num_classes": 10, "min_tracks": 2, "max_tracks": 3, "test_tracks": 2})
    generate_gtsrb(tmp_path, cfg)

    def features(path: Path, roi: list[int]) -> np.ndarray:
        x1, y1, x2, y2 = roi
        crop = Image.open(path).crop((x1, y1, x2 + 1, y2 + 1)).resize((32, 32), Image.Resampling.BILINEAR)
        a = np.asarray(crop, dtype=np.float32).ravel()
        return (a - a.mean()) / (a.std() + 1e-6)

    train = [(features(p, v[2:]), c) for p, v, c in _all_images(tmp_path) if "Final_Training" in p.parts]
    test = [(features(p, v[2:]), c) for p, v, c in _all_images(tmp_path) if "Final_Test" in p.parts]
    means = np.stack([np.mean([f for f, c in train if c == k], axis=0) for k in range(cfg.num_classes)])
    x = np.stack([f for f, _ in test])
    y = np.array([c for _, c in test])
    predicted = ((x[:, None, :] - means[None]) ** 2).sum(-1).argmin(1)
    accuracy = float((predicted == y).mean())
    assert accuracy > 3 / cfg.num_classes, f"nearest-class-mean accuracy {accuracy:.2f}"


def test_refuses_non_empty_target_but_accepts_empty(tmp_path: Path) -> None:
    (tmp_path / "full" / "GTSRB").mkdir(parents=True)
    (tmp_path / "full" / "GTSRB" / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="not empty"):
        _generate(tmp_path / "full")
    assert [p.name for p in (tmp_path / "full" / "GTSRB").iterdir()] == ["keep.txt"]

    (tmp_path / "empty" / "GTSRB").mkdir(parents=True)
    summary = _generate(tmp_path / "empty", num_classes=2, max_tracks=1, frames_per_track=1)
    assert summary.train_images == 2 and summary.test_images == 2


@pytest.mark.parametrize("error", [OSError(28, "No space left on device"), KeyboardInterrupt()],
                         ids=["disk-full", "interrupt"])
@pytest.mark.parametrize("existing", [False, True], ids=["new-folder", "empty-folder"])
def test_an_interrupted_run_leaves_the_folder_as_it_was(
    error: BaseException, existing: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "out"
    if existing:
        (root / "GTSRB").mkdir(parents=True)
    before = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*"))
    save = Image.Image.save
    written: list[object] = []

    def save_then_fail(image: Image.Image, fp: object, *args: object, **kwargs: object) -> None:
        if len(written) == 5:
            raise error
        written.append(fp)
        save(image, fp, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", save_then_fail)
    with pytest.raises(type(error)):
        _generate(root)
    monkeypatch.undo()

    assert len(written) == 5  # images were written before the failure...
    # ...yet no half-written dataset and no temporary folder is left: the folder is as it was
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")) == before
    summary = _generate(root, num_classes=2, max_tracks=1, frames_per_track=1)  # so a re-run is not refused
    assert summary.train_images == 2 and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_progress_bar_goes_to_stderr(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = SMALL.model_copy(update={"num_classes": 2, "max_tracks": 1, "frames_per_track": 1})
    generate_gtsrb(tmp_path / "new" / "root", cfg, progress=True)
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "synthetic GTSRB" in captured.err
