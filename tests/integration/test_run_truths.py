"""`signpost run` tells the truth about what it used and what the registry holds (issue 14, item 7): a reused
evaluation's report names the model's registered version and aliases, ``run --data-root`` reads that folder (or
refuses it, as prepare does, when a synthetic source would ignore it), and the shipped configs/imagefolder.yaml reads
a user's own ImageFolder tree as the README's "Your own data" says."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from PIL import Image

from signpost.cli import main
from signpost.data.cache import load_split
from signpost.stages import evaluate as evaluate_module

# MLflow's SQLAlchemy store uses a loader option that SQLAlchemy 2 deprecates; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore::sqlalchemy.exc.SADeprecationWarning")

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
# Train briefly, pass any model through the gate, stop after evaluate/promote.
QUICK = ["name=t", "train.epochs=1", "train.batch_size=16", "train.threads=1", "evaluate.min_accuracy=0",
         "evaluate.min_class_accuracy=0", "optimize.enabled=false", "bench.enabled=false", "package.enabled=false"]
# A tiny synthetic dataset: were a refused run to go ahead anyway, it would fail the test in seconds, not minutes.
TINY = ["data.synthetic.num_classes=2", "data.synthetic.min_tracks=2", "data.synthetic.max_tracks=2",
        "data.synthetic.frames_per_track=8", "data.synthetic.test_tracks=1", "data.synthetic.max_size=40"]


def _one_line_error(capsys: pytest.CaptureFixture, *words: str) -> None:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    for word in words:
        assert word in lines[0], lines[0]


@pytest.mark.slow
def test_a_reused_evaluation_reports_the_champion_it_registered_before(
    synthetic_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):  # the workdir's own SQLite store, nothing ambient
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)
    for name in ("confusion_matrix_png", "reliability_png", "image_grid_png"):  # ~0.5 s each, not what is checked
        monkeypatch.setattr(evaluate_module.plots, name, lambda *args, **kwargs: Path(args[2]).write_bytes(b""))
    args = ["run", "--no-progress", f"data.root={synthetic_root}", "data.source=local", f"workdir={tmp_path / 'work'}",
            "tracking.registered_model=signpost-t", *QUICK]

    assert main(args) == 0
    first = capsys.readouterr().out
    assert "registered signpost-t v1 as challenger" in first and "promoted signpost-t v1 to champion" in first

    # The second run evaluates again (the champion is new: itself), the third reuses that evaluation; neither
    # registers a new version, and both say which version the model is and what it is now.
    for run in ("again", "reused"):
        assert main(args) == 0
        out = capsys.readouterr().out
        assert re.search(rf"evaluate: {'ran' if run == 'again' else 'skipped'}", out), out
        assert "registered signpost-t" not in out
        report = Path(re.search(r"^report: (.+)$", out, re.M).group(1)).read_text(encoding="utf-8")
        lineage = report[report.index("<h2>Lineage</h2>"):report.index("<h2>Gate")]
        assert "not registered" not in lineage
        assert "signpost-t v1 (champion; registered by an earlier run)" in lineage
        assert "registry: signpost-t v1 (champion; registered by an earlier run)" in out, out


def test_run_data_root_reaches_data_root(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    raw = tmp_path / "my-images"
    raw.mkdir()
    assert main(["run", "--no-progress", "--data-root", str(raw), "data.source=local",
                 f"workdir={tmp_path / 'work'}", "tracking.backend=none"]) == 1
    _one_line_error(capsys, "dataset folder is empty", str(raw))  # prepare read that folder, not data/gtsrb


@pytest.mark.parametrize("root_arg", ["--data-root", "data.root="])
def test_run_refuses_a_data_root_that_a_synthetic_source_would_ignore(
    tmp_path: Path, capsys: pytest.CaptureFixture, root_arg: str
) -> None:
    raw = tmp_path / "my-images"
    raw.mkdir()
    root = ["--data-root", str(raw)] if root_arg == "--data-root" else [f"data.root={raw}"]
    config = CONFIGS / "demo.yaml"
    assert main(["run", "--no-progress", "-c", str(config), *root, f"workdir={tmp_path / 'work'}",
                 "tracking.backend=none", *QUICK, *TINY]) == 2
    _one_line_error(capsys, str(raw), "is ignored because data.source is synthetic", str(config),
                    "data.source=local", "data.source=download")
    assert not (tmp_path / "work").exists()  # nothing generated, prepared or trained


def test_the_imagefolder_config_reads_numbered_grayscale_folders_as_the_readme_says(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    raw = tmp_path / "my-images"
    for name in ("10", "2", "0"):  # as text "0" < "10" < "2"; as numbers 0 < 2 < 10
        (raw / name).mkdir(parents=True)
        for i in range(10):
            Image.new("L", (20 + i, 24), color=20 * int(name) + i).save(raw / name / f"{i}.png")
    assert main(["prepare", "--no-progress", "-c", str(CONFIGS / "imagefolder.yaml"), "--data-root", str(raw),
                 f"workdir={tmp_path / 'work'}", "tracking.backend=none"]) == 0
    out = capsys.readouterr().out
    data = Path(re.search(r"^prepare: wrote (\S+)", out, re.M).group(1))
    dataset = json.loads((data / "manifest.json").read_text(encoding="utf-8"))["dataset"]
    assert dataset["layout"] == "imagefolder"
    assert dataset["class_names"] == ["0", "2", "10"]  # folder names, in numeric order: label i is folder i
    train = load_split(data / "train.safetensors")
    assert train.images.shape[1] == 3 and len(train) > 0
    # Grayscale made RGB: the three channels are the same picture, and label 2 (folder "10") is the brightest.
    assert (train.images[:, 0] == train.images[:, 1]).all() and (train.images[:, 1] == train.images[:, 2]).all()
    brightness = {int(label): float(train.images[train.labels == label].float().mean()) for label in (0, 1, 2)}
    assert brightness[0] < brightness[1] < brightness[2]
