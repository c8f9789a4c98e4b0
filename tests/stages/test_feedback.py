"""feedback: labelled production images stored as a batch, checked first; the monitor scores the model on them."""

from __future__ import annotations

import json
from pathlib import Path

import fsspec
import numpy as np
import pytest
from PIL import Image

from signpost.cli import main
from signpost.contracts import (
    EVALUATION_REPORT,
    Calibration,
    EvaluatedData,
    EvaluatedModel,
    EvaluationReport,
    Gate,
)
from signpost.data.cache import load_split
from signpost.stages.feedback import FeedbackError, add_feedback
from signpost.stages.monitor import monitor


def _images(optimized: dict, folder: Path, n: int) -> tuple[list[Path], np.ndarray]:
    split = load_split(optimized["data_dir"] / "test.safetensors")
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, image in enumerate(split.images[:n].numpy()):
        path = folder / f"{i}.png"
        Image.fromarray(image.transpose(1, 2, 0)).save(path)
        paths.append(path)
    return paths, split.labels[:n].numpy()


@pytest.fixture
def config(optimized: dict, tmp_path: Path):
    config = optimized["config"].model_copy(deep=True)
    config.workdir = tmp_path / "work"
    return config


def test_a_batch_is_stored_once_and_bad_items_store_nothing(config, optimized: dict, tmp_path: Path) -> None:
    paths, labels = _images(optimized, tmp_path / "in", 6)
    items = [(p, str(int(label))) for p, label in zip(paths, labels, strict=True)]
    first = add_feedback(config, data_dir=optimized["data_dir"], items=items)
    assert not first.reused and first.manifest["metrics"]["images"] == 6
    assert len(list((first.path / "images").iterdir())) == 6
    assert add_feedback(config, data_dir=optimized["data_dir"], items=items).reused
    (tmp_path / "in" / "junk.png").write_bytes(b"not an image")
    bad = [*items, (tmp_path / "in" / "junk.png", "0"), (paths[0], "no such class")]
    with pytest.raises(FeedbackError, match="2 of 8 feedback items") as error:
        add_feedback(config, data_dir=optimized["data_dir"], items=bad)
    assert "junk.png" in str(error.value) and "'no such class'" in str(error.value)
    assert len(list((config.workdir / "feedback").glob("t-*"))) == 1


def test_the_cli_takes_a_csv_with_class_names(config, optimized: dict, tmp_path: Path,
                                              capsys: pytest.CaptureFixture) -> None:
    paths, labels = _images(optimized, tmp_path / "in", 4)
    names = json.loads((optimized["data_dir"] / "manifest.json").read_text())["dataset"]["class_names"]
    rows = ["path,label", *(f"{p.name},{names[int(label)]}" for p, label in zip(paths, labels, strict=True))]
    (tmp_path / "in" / "labels.csv").write_text("\n".join(rows) + "\n")
    args = ["feedback", "add", "--csv", str(tmp_path / "in" / "labels.csv"), "--data", str(optimized["data_dir"]),
            f"workdir={config.workdir}"]
    assert main(args) == 0 and "stored 4 images" in capsys.readouterr().out
    assert main(["feedback", "add", "--images", str(paths[0]), f"workdir={config.workdir}"]) == 2  # no --label


def _evaluation(folder: Path, top1: float) -> Path:
    """An evaluation folder whose report gives test top-1 ``top1`` and every confidence in the top bin; the rest of
    the report is what the monitor does not read."""
    folder.mkdir(parents=True)
    bins = [{"count": 10 if i == 9 else 0} for i in range(10)]
    report = EvaluationReport(
        model=EvaluatedModel(path="m", key="m", architecture="signnet", data_key="d"),
        data=EvaluatedData(path="d", key="d", split="test", images=10), image_size=32, class_names=[], warnings=[],
        champion=None, champion_skipped=None, metrics={"top1": top1}, per_class=[], worst_classes=[],
        confused_pairs=[], confusion_matrix=[], calibration=Calibration(num_bins=10, ece=0.0, bins=bins),
        feedback=None, gate=Gate(passed=True, failures=[], rules=[]))
    (folder / EVALUATION_REPORT).write_text(report.model_dump_json())
    return folder


def test_the_monitor_scores_the_model_on_feedback_and_calls_a_drop(config, optimized: dict, tmp_path: Path) -> None:
    paths, labels = _images(optimized, tmp_path / "in", 100)  # the whole (small) test split
    wrong = [(p, str((int(label) + 1) % 6)) for p, label in zip(paths, labels, strict=True)]
    add_feedback(config, data_dir=optimized["data_dir"], items=wrong)
    url = f"sqlite:///{tmp_path / 'empty.db'}"
    result = monitor(config, data_dir=optimized["data_dir"], log_url=url, model_dir=optimized["model_dir"],
                     evaluation_dir=_evaluation(tmp_path / "eval", 0.9)).result
    quality = result["quality"]
    assert quality["images"] == len(paths) and quality["baseline"] == 0.9 and quality["dropped"]
    assert set(quality["per_class"]) <= set(range(6)) and quality["accuracy"] < 0.5
    assert result["verdict"]["retrain"] and "accuracy drop on feedback" in result["verdict"]["reasons"]
    assert [a["incident"] for a in result["alerts"]] == ["accuracy"]
    without_model = monitor(config, data_dir=optimized["data_dir"], log_url=url).result
    assert "no model" in without_model["quality"]["note"]


def test_prepare_folds_feedback_into_a_new_version_with_its_lineage(synthetic_root: Path, tmp_path: Path) -> None:
    from signpost.stages.prepare import prepare
    from tests.conftest import local_config

    config = local_config(synthetic_root, tmp_path / "work", "data.feedback.holdout=0.5", "data.feedback.repeat=3")
    before = prepare(config, progress=False)
    assert before.manifest["lineage"]["feedback"] == [] and before.manifest["lineage"]["base"] == before.path.name
    assert not (before.path / "feedback.safetensors").exists()

    source = load_split(before.path / "train.safetensors")
    folder = tmp_path / "reviewed"
    folder.mkdir()
    items = []
    for i, image in enumerate(source.images[:40].numpy()):
        Image.fromarray(image.transpose(1, 2, 0) // 3).save(folder / f"{i}.png")  # darker than any training image
        items.append((folder / f"{i}.png", str(int(source.labels[i]))))
    batch = add_feedback(config, data_dir=before.path, items=items).path

    after = prepare(config, progress=False)
    assert after.path != before.path and not after.reused
    lineage = after.manifest["lineage"]
    assert lineage["base"] == before.path.name  # the raw data's version, which this one extends
    (entry,) = lineage["feedback"]
    assert entry["batch"] == batch.name and entry["images"] == 40 and 0 < entry["holdout"] < 40
    held = load_split(after.path / "feedback.safetensors")
    assert len(held) == entry["holdout"]
    counts = after.manifest["metrics"]
    old = before.manifest["metrics"]
    # Raw splits unchanged; each trained feedback image is in the train split `repeat` times.
    assert counts["test_images"] == old["test_images"] and counts["val_images"] == old["val_images"]
    assert counts["train_images"] == old["train_images"] + 3 * (40 - entry["holdout"])
    # Held-out images never reach training: no pixel-identical image on both sides.
    train = load_split(after.path / "train.safetensors")
    train_keys = {bytes(x) for x in train.images.numpy().reshape(len(train), -1)}
    assert not any(bytes(x) in train_keys for x in held.images.numpy().reshape(len(held), -1))
    rows = (after.path / "sources.tsv").read_text().splitlines()
    assert sum(r.endswith("\tfeedback-holdout") for r in rows) == entry["holdout"]
    assert all(not r.startswith("/") for r in rows)  # feedback paths are relative to the workdir

    again = prepare(config, progress=False)
    assert again.reused and again.path == after.path
    off = config.model_copy(deep=True)
    off.data.feedback.enabled = False
    assert prepare(off, progress=False).path == before.path  # without feedback: the raw data's version again


def test_prepare_refuses_a_damaged_feedback_batch(synthetic_root: Path, tmp_path: Path) -> None:
    from signpost.stages.prepare import PrepareError, prepare
    from tests.conftest import local_config

    config = local_config(synthetic_root, tmp_path / "work")
    data = prepare(config, progress=False)
    test = load_split(data.path / "test.safetensors")
    Image.fromarray(test.images[0].numpy().transpose(1, 2, 0)).save(tmp_path / "a.png")
    batch = add_feedback(config, data_dir=data.path, items=[(tmp_path / "a.png", "0")]).path
    (image,) = (batch / "images").iterdir()
    image.write_bytes(image.read_bytes()[:-10])
    with pytest.raises(PrepareError, match="damaged"):
        prepare(config, progress=False)
    assert prepare(config.model_copy(update={"data": config.data.model_copy(
        update={"feedback": config.data.feedback.model_copy(update={"enabled": False})})}), progress=False).reused


def test_feedback_batches_travel_through_a_store_to_another_workdir(synthetic_root: Path, tmp_path: Path) -> None:
    """`feedback add` on one machine copies the batch to data.feedback.url; prepare on another (the retrain job)
    copies it in and folds it in: the same data version as where it was added."""
    from signpost.data.download import DownloadError
    from signpost.stages.prepare import prepare
    from tests.conftest import local_config

    store = tmp_path / "store"
    here = local_config(synthetic_root, tmp_path / "here", f"data.feedback.url={store.as_uri()}")
    data = prepare(here, progress=False)
    test = load_split(data.path / "test.safetensors")
    items = []
    for i, image in enumerate(test.images[:6].numpy()):
        Image.fromarray(image.transpose(1, 2, 0)).save(tmp_path / f"{i}.png")
        items.append((tmp_path / f"{i}.png", str(int(test.labels[i]))))

    # A store whose backend is missing: the batch is still stored here, and the error names the extra.
    unreachable = here.model_copy(deep=True)
    unreachable.data.feedback.url = "s3://team-bucket/feedback"
    with pytest.raises(DownloadError, match=r"signpost\[s3\]"):
        add_feedback(unreachable, data_dir=data.path, items=items)
    (batch,) = (tmp_path / "here" / "feedback").iterdir()
    assert not store.exists()
    # The same feedback again, with the store reachable: already stored here, and now copied there.
    assert add_feedback(here, data_dir=data.path, items=items).reused
    copied = store / batch.name
    assert sorted(p.relative_to(copied) for p in copied.rglob("*")) == sorted(p.relative_to(batch)
                                                                             for p in batch.rglob("*"))
    folded_here = prepare(here, progress=False)
    without_store = here.model_copy(deep=True)
    without_store.data.feedback.url = None
    assert prepare(without_store, progress=False).path == folded_here.path  # the store's URL is not in the key

    there = local_config(synthetic_root, tmp_path / "there", f"data.feedback.url={store.as_uri()}")
    folded_there = prepare(there, progress=False)
    assert (tmp_path / "there" / "feedback" / batch.name / "manifest.json").is_file()
    assert [b["batch"] for b in folded_there.manifest["lineage"]["feedback"]] == [batch.name]
    assert folded_there.path.name == folded_here.path.name  # the same data version as where it was added
    other = local_config(synthetic_root, tmp_path / "other", f"data.feedback.url={store.as_uri()}", "name=u")
    assert prepare(other, progress=False).manifest["lineage"]["feedback"] == []  # another experiment's batch


def test_a_damaged_batch_in_the_store_is_refused_and_nothing_of_it_kept(synthetic_root: Path, tmp_path: Path) -> None:
    from signpost.monitoring.feedback import FeedbackStoreError, pull_batches, push_batch
    from signpost.stages.prepare import prepare
    from tests.conftest import local_config

    url = f"memory://signpost-feedback-{tmp_path.name}"
    config = local_config(synthetic_root, tmp_path / "here")
    data = prepare(config, progress=False)
    test = load_split(data.path / "test.safetensors")
    Image.fromarray(test.images[0].numpy().transpose(1, 2, 0)).save(tmp_path / "a.png")
    batch = add_feedback(config, data_dir=data.path, items=[(tmp_path / "a.png", "0")]).path
    assert push_batch(batch, url) and not push_batch(batch, url)  # once only
    (image,) = (batch / "images").iterdir()
    fs = fsspec.filesystem("memory")
    try:
        fs.pipe(f"{url}/{batch.name}/images/{image.name}", b"tampered")
        with pytest.raises(FeedbackStoreError, match=f"{batch.name} in {url} cannot be used"):
            pull_batches(url, tmp_path / "there", "t")
        assert not (tmp_path / "there" / "feedback").exists() or not any((tmp_path / "there" / "feedback").iterdir())
        fs.pipe(f"{url}/{batch.name}/images/{image.name}", image.read_bytes())
        (pulled,) = pull_batches(url, tmp_path / "there", "t")
        assert pulled == tmp_path / "there" / "feedback" / batch.name and (pulled / "manifest.json").is_file()
    finally:
        fs.rm(url, recursive=True)
