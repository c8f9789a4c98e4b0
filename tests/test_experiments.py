"""Experiments never mix (issue 14 item 1): a stage finds its inputs by the experiment its manifest names, never by a
folder-name prefix, and says which input it used and why.

``gtsrb`` and ``gtsrb-kaggle`` share one workdir: a prefix glob ``gtsrb-*`` matched both, so ``train -c gtsrb.yaml``
trained on the Kaggle copy without a word.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from signpost.artifacts import atomic_dir, find_artifact, hash_json, latest_artifact, read_manifest, write_manifest
from signpost.cli import main
from signpost.models.artifact import CARD
from signpost.monitoring.feedback import feedback_batches

# Small, fast training on the session's synthetic dataset; no tracking server, no signing.
QUICK = ["train.epochs=1", "train.batch_size=16", "train.warmup_epochs=0.5", "train.threads=1",
         "tracking.backend=none", "--no-progress"]
# A gate every model passes: these tests are about which inputs were used, not how good the model is.
NO_GATE = ["evaluate.min_accuracy=0", "evaluate.min_class_accuracy=0"]


def _artifact(workdir: Path, stage: str, folder: str, experiment: str | None, config: dict, mtime: int) -> Path:
    """A finished artifact folder with one file, its manifest finished at ``mtime`` (s) so "newest" is certain."""
    path = workdir / stage / folder
    with atomic_dir(path) as tmp:
        (tmp / "payload.txt").write_text(folder, encoding="utf-8")
        write_manifest(tmp, stage=stage, key=folder, experiment=experiment, inputs={}, config=config, code="c")
    os.utime(path / "manifest.json", (mtime, mtime))
    return path


# --- finding an input: by the manifest's experiment ------------------------------------------------------------


def test_a_name_that_extends_another_is_not_its_artifact(tmp_path: Path) -> None:
    ours = _artifact(tmp_path, "data", "gtsrb-aaaaaaaaaaaa", "gtsrb", {"image_size": 32}, 1_000)
    theirs = _artifact(tmp_path, "data", "gtsrb-kaggle-bbbbbbbbbbbb", "gtsrb-kaggle", {"image_size": 32}, 2_000)
    assert latest_artifact(tmp_path, "data", "gtsrb") == ours
    assert latest_artifact(tmp_path, "data", "gtsrb-kaggle") == theirs
    found, passed_over = find_artifact(tmp_path, "data", "gtsrb")
    assert found == ours and passed_over == []  # another experiment's artifact is not even a near miss


def test_the_manifest_decides_not_the_folder_name(tmp_path: Path) -> None:
    # A folder renamed (or copied) to look like gtsrb's is still gtsrb-kaggle's.
    _artifact(tmp_path, "train", "gtsrb-cccccccccccc", "gtsrb-kaggle", {}, 2_000)
    assert latest_artifact(tmp_path, "train", "gtsrb") is None
    assert latest_artifact(tmp_path, "train", "gtsrb-kaggle") == tmp_path / "train" / "gtsrb-cccccccccccc"


def test_the_newest_of_the_experiment_wins(tmp_path: Path) -> None:
    _artifact(tmp_path, "train", "gtsrb-111111111111", "gtsrb", {}, 1_000)
    newer = _artifact(tmp_path, "train", "gtsrb-222222222222", "gtsrb", {}, 3_000)
    _artifact(tmp_path, "train", "gtsrb-kaggle-333333333333", "gtsrb-kaggle", {}, 5_000)
    assert latest_artifact(tmp_path, "train", "gtsrb") == newer


def test_same_name_with_other_settings_is_passed_over_and_named(tmp_path: Path) -> None:
    mine = {"image_size": 32, "seed": 0}
    older = _artifact(tmp_path, "data", "gtsrb-aaaaaaaaaaaa", "gtsrb", mine, 1_000)
    other = _artifact(tmp_path, "data", "gtsrb-bbbbbbbbbbbb", "gtsrb", {"image_size": 48, "seed": 0}, 2_000)
    found, passed_over = find_artifact(tmp_path, "data", "gtsrb", mine)
    assert found == older
    assert len(passed_over) == 1 and str(other) in passed_over[0]
    assert "image_size 48 there, 32 here" in passed_over[0] and "seed" not in passed_over[0]
    # Without a match at all, nothing is picked, and the near miss still says why.
    found, passed_over = find_artifact(tmp_path, "data", "gtsrb", {"image_size": 64, "seed": 0})
    assert found is None and len(passed_over) == 2


def test_an_older_signposts_artifact_is_not_picked_and_is_said_so(tmp_path: Path) -> None:
    old = _artifact(tmp_path, "data", "gtsrb-aaaaaaaaaaaa", None, {"image_size": 32}, 2_000)
    assert "experiment" not in read_manifest(old)
    found, passed_over = find_artifact(tmp_path, "data", "gtsrb")
    assert found is None
    assert passed_over == [f"{old} (made by an older Signpost: its manifest names no experiment)"]
    # An older artifact of another experiment is not this one's near miss.
    assert find_artifact(tmp_path, "data", "gtsrb-kaggle") == (None, [])


def test_the_manifest_records_the_experiment_and_its_settings_hash(tmp_path: Path) -> None:
    settings = {"image_size": 32, "roi_margin": 0.1}
    manifest = read_manifest(_artifact(tmp_path, "data", "exp-aaaaaaaaaaaa", "exp", settings, 1_000))
    assert manifest["experiment"] == {"name": "exp", "config_sha256": hash_json(settings)}


def test_feedback_batches_are_the_experiments_own(tmp_path: Path) -> None:
    ours = _artifact(tmp_path, "feedback", "gtsrb-aaaaaaaaaaaa", "gtsrb", {}, 1_000)
    _artifact(tmp_path, "feedback", "gtsrb-kaggle-bbbbbbbbbbbb", "gtsrb-kaggle", {}, 2_000)
    # Stored by an older Signpost: its folder name is exactly gtsrb's, and a person's labels are not dropped.
    legacy = _artifact(tmp_path, "feedback", "gtsrb-cccccccccccc", None, {}, 3_000)
    _artifact(tmp_path, "feedback", "gtsrb-kaggle-dddddddddddd", None, {}, 4_000)
    assert feedback_batches(tmp_path, "gtsrb") == [ours, legacy]
    assert len(feedback_batches(tmp_path, "gtsrb-kaggle")) == 2


# --- the CLI: two experiments in one workdir -------------------------------------------------------------------


def _cli(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def two_experiments(synthetic_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> dict[str, Path]:
    """``gtsrb`` prepared first, then ``gtsrb-kaggle`` (newer, other image size) in the same workdir."""
    found = {}
    for name, size in (("gtsrb", 32), ("gtsrb-kaggle", 24)):
        code, _, err = _cli(capsys, "prepare", "--data-root", str(synthetic_root), f"workdir={tmp_path}",
                              f"name={name}", f"data.image_size={size}", "--no-progress")
        assert code == 0, err
        found[name] = latest_artifact(tmp_path, "data", name)
    assert found["gtsrb"] != found["gtsrb-kaggle"]
    os.utime(found["gtsrb-kaggle"] / "manifest.json")  # certainly the newest
    return found


def test_train_uses_its_own_experiments_data_and_says_why(
    two_experiments: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    code, out, err = _cli(capsys, "train", f"workdir={tmp_path}", "name=gtsrb", *QUICK)
    assert code == 0, err
    data = two_experiments["gtsrb"]
    (model,) = (tmp_path / "train").glob("gtsrb-*")
    assert read_manifest(model)["inputs"]["data"] == data.name  # not gtsrb-kaggle's, the newer one
    assert json.loads((model / CARD).read_text(encoding="utf-8"))["data_artifact"] == data.name
    assert f"train: data {data} (newest for experiment gtsrb)" in out
    # Every manifest names its experiment and the hash of the settings it records.
    for folder in (data, model):
        manifest = read_manifest(folder)
        assert manifest["experiment"] == {"name": "gtsrb", "config_sha256": hash_json(manifest["config"])}

    # gtsrb-kaggle's model is newer; evaluate -c gtsrb still takes gtsrb's, and the data its card names.
    code, out, err = _cli(capsys, "train", f"workdir={tmp_path}", "name=gtsrb-kaggle", "data.image_size=24", *QUICK)
    assert code == 0, err
    assert f"train: data {two_experiments['gtsrb-kaggle']} (newest for experiment gtsrb-kaggle)" in out
    code, out, _ = _cli(capsys, "evaluate", f"workdir={tmp_path}", "name=gtsrb", *QUICK, *NO_GATE)
    assert f"evaluate: model {model} (newest for experiment gtsrb)" in out
    assert f"evaluate: data {data} (the model was trained on it, says its card)" in out


def test_same_name_other_data_settings_is_refused_naming_what_was_found(
    two_experiments: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    code, _, err = _cli(capsys, "train", f"workdir={tmp_path}", "name=gtsrb", "data.image_size=48", *QUICK)
    assert code == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: no data artifact of experiment 'gtsrb' made with this")
    assert str(two_experiments["gtsrb"]) in err and "image_size 32 there, 48 here" in err and "--data" in err
    assert str(two_experiments["gtsrb-kaggle"]) not in err  # another experiment's is no candidate
    assert latest_artifact(tmp_path, "train", "gtsrb") is None  # nothing was trained on the wrong data


def test_given_data_is_used_and_said_so(
    two_experiments: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    data = two_experiments["gtsrb"]
    code, out, err = _cli(capsys, "train", f"workdir={tmp_path}", "name=gtsrb", "data.image_size=48",
                          "--data", str(data), *QUICK)
    assert code == 0, err
    assert f"train: data {data} (--data)" in out


def test_an_older_signposts_data_is_refused_with_how_to_use_it(
    two_experiments: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    # The data as an older Signpost wrote it: a manifest without the experiment field.
    data = two_experiments["gtsrb"]
    manifest = read_manifest(data)
    del manifest["experiment"]
    (data / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    code, _, err = _cli(capsys, "train", f"workdir={tmp_path}", "name=gtsrb", *QUICK)
    assert code == 1
    assert f"{data} (made by an older Signpost" in err and "pass one with --data" in err


def test_run_says_which_input_each_stage_used(
    synthetic_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    common = ["run", "data.source=local", f"data.root={synthetic_root}", f"workdir={tmp_path}", "name=gtsrb",
              "optimize.enabled=false", "package.enabled=false", *NO_GATE, *QUICK]
    code, out, err = _cli(capsys, *common)
    assert code in (0, 3), err
    data, model = latest_artifact(tmp_path, "data", "gtsrb"), latest_artifact(tmp_path, "train", "gtsrb")
    assert f"input: data {data} (this run's prepare, made now)" in out
    code, out, err = _cli(capsys, *common)
    assert f"input: data {data} (this run's prepare, reused)" in out
    assert f"input: model {model} (this run's train, reused)" in out
