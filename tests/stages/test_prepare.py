"""The prepare stage: a content-hashed cache that is reused, invalidated and written exactly when it should be."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from signpost.artifacts import verify_artifact
from signpost.data.cache import load_split
from signpost.data.stats import STAT_NAMES
from signpost.stages import prepare as prepare_module
from signpost.stages.prepare import PrepareError, prepare
from tests.conftest import SMALL_SYNTHETIC, local_config


def _splits(path: Path) -> dict:
    return {name: load_split(path / f"{name}.safetensors") for name in ("train", "val", "test")}


def test_prepare_writes_a_complete_verified_cache(synthetic_root: Path, tmp_path: Path) -> None:
    result = prepare(local_config(synthetic_root, tmp_path), progress=False)
    assert not result.reused
    manifest = verify_artifact(result.path)
    splits = _splits(result.path)

    header, *rows = (result.path / "sources.tsv").read_text().splitlines()
    assert header.split("\t") == ["path", "sha256", "label", "track", "roi", "split", "origin"]
    sources = [dict(zip(header.split("\t"), row.split("\t"), strict=True)) for row in rows]
    assert len(sources) == sum(len(s) for s in splits.values())
    for name, split in splits.items():  # each split's files, in the order of its images
        assert [int(s["label"]) for s in sources if s["split"] == name] == split.labels.tolist()
    assert all(len(s["sha256"]) == 64 for s in sources)
    assert manifest["inputs"]["layout"] == "gtsrb"
    assert len(manifest["inputs"]["sources_sha256"]) == 64
    assert manifest["config"]["image_size"] == 32

    data = manifest["dataset"]
    assert data["num_classes"] == SMALL_SYNTHETIC.num_classes
    assert data["class_names"][0] == "Speed limit (20km/h)"
    for name, split in splits.items():
        assert split.images.dtype == torch.uint8 and split.images.shape[1:] == (3, 32, 32)
        assert manifest["metrics"][f"{name}_images"] == len(split)
        assert data["class_histogram"][name] == torch.bincount(split.labels, minlength=6).tolist()
        assert split.stats.shape == (len(split), len(STAT_NAMES))
    assert len(data["mean"]) == 3 and all(0 < m < 1 for m in data["mean"])
    assert set(manifest["reference_stats"]) == {*STAT_NAMES, "width", "height"}
    assert manifest["skipped"] == []

    # The validation split is by track: no track on both sides, and every class is validated.
    assert not set(splits["train"].tracks.tolist()) & set(splits["val"].tracks.tolist())
    assert set(splits["val"].labels.tolist()) == set(range(6))
    assert (result.path / "preview.png").is_file()


def test_unchanged_inputs_reuse_the_cache_without_decoding(
    synthetic_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = prepare(local_config(synthetic_root, tmp_path), progress=False)

    def no_decoding(*args: object, **kwargs: object) -> None:
        raise AssertionError("an unchanged dataset was decoded again")

    monkeypatch.setattr(prepare_module, "decode_samples", no_decoding)
    second = prepare(local_config(synthetic_root, tmp_path), progress=False)
    assert second.reused and second.path == first.path


def test_a_lost_hash_index_still_finds_the_same_cache(synthetic_root: Path, tmp_path: Path) -> None:
    first = prepare(local_config(synthetic_root, tmp_path), progress=False)
    for index in (tmp_path / "data" / ".index").iterdir():
        index.unlink()
    second = prepare(local_config(synthetic_root, tmp_path), progress=False)
    assert second.reused and second.path == first.path


def test_a_changed_setting_makes_a_new_cache(synthetic_root: Path, tmp_path: Path) -> None:
    first = prepare(local_config(synthetic_root, tmp_path), progress=False)
    bigger = prepare(local_config(synthetic_root, tmp_path, "data.image_size=40"), progress=False)
    assert not bigger.reused and bigger.path != first.path
    assert load_split(bigger.path / "train.safetensors").images.shape[-1] == 40
    reseeded = prepare(local_config(synthetic_root, tmp_path, "seed=5"), progress=False)
    assert reseeded.path not in (first.path, bigger.path)
    # A setting that does not change the cache (decode workers) reuses it.
    assert prepare(local_config(synthetic_root, tmp_path, "data.workers=1"), progress=False).reused


def test_a_changed_source_file_makes_a_new_cache(gtsrb_copy: Path, tmp_path: Path) -> None:
    first = prepare(local_config(gtsrb_copy, tmp_path), progress=False)
    victim = next((gtsrb_copy / "GTSRB" / "Final_Training" / "Images" / "00001").glob("*.ppm"))
    data = bytearray(victim.read_bytes())
    data[-30:] = bytes(255 - b for b in data[-30:])
    victim.write_bytes(bytes(data))
    second = prepare(local_config(gtsrb_copy, tmp_path), progress=False)
    assert not second.reused and second.path != first.path
    assert second.manifest["inputs"]["sources_sha256"] != first.manifest["inputs"]["sources_sha256"]


def test_corrupt_images_are_skipped_and_listed(gtsrb_copy: Path, tmp_path: Path) -> None:
    folder = gtsrb_copy / "GTSRB" / "Final_Training" / "Images" / "00002"
    truncated, garbage = sorted(folder.glob("*.ppm"))[:2]
    truncated.write_bytes(truncated.read_bytes()[:40])
    garbage.write_bytes(b"this is not an image")
    total = sum(1 for _ in gtsrb_copy.rglob("*.ppm"))

    result = prepare(local_config(gtsrb_copy, tmp_path, "data.max_bad_fraction=0.1"), progress=False)
    skipped = {s["path"]: s["reason"] for s in result.manifest["skipped"]}
    assert set(skipped) == {
        f"Final_Training/Images/00002/{truncated.name}",
        f"Final_Training/Images/00002/{garbage.name}",
    }
    assert all(skipped.values())
    assert sum(result.manifest["metrics"].values()) == total - 2


def test_too_many_corrupt_images_fail_and_write_nothing(gtsrb_copy: Path, tmp_path: Path) -> None:
    victim = next((gtsrb_copy / "GTSRB" / "Final_Training" / "Images" / "00000").glob("*.ppm"))
    victim.write_bytes(b"")
    with pytest.raises(PrepareError, match=r"max_bad_fraction=0\.0.*empty file"):
        prepare(local_config(gtsrb_copy, tmp_path, "data.max_bad_fraction=0"), progress=False)
    assert not any((tmp_path / "data").glob("t-*"))


def test_an_interrupted_prepare_leaves_no_artifact(
    synthetic_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(prepare_module, "save_split", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prepare(local_config(synthetic_root, tmp_path), progress=False)
    assert [p.name for p in (tmp_path / "data").iterdir()] == [".index"]
    monkeypatch.undo()
    assert not prepare(local_config(synthetic_root, tmp_path), progress=False).reused


def test_missing_root_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(PrepareError, match=r"data\.root .*does not exist.*--download"):
        prepare(local_config(tmp_path / "nowhere", tmp_path), progress=False)


def test_synthetic_source_generates_once(tmp_path: Path) -> None:
    overrides = [f"data.synthetic.{k}={v}" for k, v in SMALL_SYNTHETIC.model_dump().items()]
    config = local_config(tmp_path / "unused", tmp_path, "data.source=synthetic", *overrides)
    first = prepare(config, progress=False)
    raw = list((tmp_path / "raw").iterdir())
    assert len(raw) == 1 and (raw[0] / "manifest.json").is_file()
    assert prepare(config, progress=False).reused
    assert first.manifest["dataset"]["num_classes"] == SMALL_SYNTHETIC.num_classes


def test_dataset_root_given_as_the_current_folder(
    synthetic_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(synthetic_root / "GTSRB")
    result = prepare(local_config(Path("."), tmp_path), progress=False)
    _header, first, *_ = (result.path / "sources.tsv").read_text().splitlines()
    assert first.startswith("Final_Training/Images/00000/")
    assert len(result.manifest["key"]) == 64 and result.path.name == f"t-{result.manifest['key'][:12]}"
