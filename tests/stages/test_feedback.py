"""feedback: labelled production images stored as a batch, checked first; the monitor scores the model on them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from signpost.cli import main
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
    folder.mkdir(parents=True)
    bins = [{"count": 10 if i == 9 else 0} for i in range(10)]
    (folder / "report.json").write_text(json.dumps({"metrics": {"top1": top1}, "calibration": {"bins": bins}}))
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
