"""The evaluate stage: metrics that match a direct recomputation, a gate that fails and passes when it should."""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from signpost.artifacts import ArtifactError, atomic_dir, read_manifest, verify_artifact, write_manifest
from signpost.data.cache import load_split
from signpost.data.loader import normalize
from signpost.models import build_model
from signpost.models.artifact import ModelCard, load_model, save_model
from signpost.report import plots
from signpost.stages import evaluate as evaluate_module
from signpost.stages.evaluate import evaluate
from signpost.stages.prepare import prepare
from tests.conftest import local_config

LAX = ("evaluate.min_accuracy=0.0", "evaluate.min_class_accuracy=0.0")
FILES = {
    "report.json",
    "per_class.csv",
    "confusion_matrix.csv",
    "confusion_matrix.png",
    "reliability.png",
    "misclassified.png",
    "manifest.json",
}


@dataclass
class Models:
    """Prepared data and model artifacts shared by the tests of this module (built once: training takes a second)."""

    root: Path  # the raw synthetic dataset
    data: Path
    data_manifest: dict[str, Any]
    trained: Path
    untrained: Path


def _save(folder: Path, model: nn.Module, data_manifest: dict[str, Any], **card_changes: Any) -> Path:
    """A model artifact as the train stage writes one: weights, model card, manifest last."""
    dataset = data_manifest["dataset"]
    card = ModelCard(
        architecture="signnet",
        num_classes=dataset["num_classes"],
        class_names=dataset["class_names"],
        image_size=dataset["image_size"],
        mean=dataset["mean"],
        std=dataset["std"],
        data_artifact=f"t-{data_manifest['key'][:12]}",
        data_key=data_manifest["key"],
    ).model_copy(update=card_changes)
    with atomic_dir(folder) as tmp:
        save_model(tmp, model, card)
        key = hashlib.sha256(folder.name.encode()).hexdigest()
        write_manifest(tmp, stage="train", key=key, inputs={"data": data_manifest["key"]}, config={}, code="test")
    return folder


def _train(data: Path, dataset: dict[str, Any], steps: int = 30, batch: int = 16) -> nn.Module:
    """A few dozen Adam steps on random batches of the (small) training split: enough to beat chance."""
    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    train = load_split(data / "train.safetensors")
    x = normalize(train.images.float() / 255, dataset["mean"], dataset["std"])
    model = build_model("signnet", dataset["num_classes"], dataset["image_size"])
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    threads = torch.get_num_threads()
    # One thread: on 16 tiny images a thread team costs more than it gives, and far more on a busy machine.
    torch.set_num_threads(1)
    try:
        for _ in range(steps):
            rows = torch.randint(len(x), (batch,), generator=generator)
            optimizer.zero_grad()
            F.cross_entropy(model(x[rows]), train.labels[rows]).backward()
            optimizer.step()
    finally:
        torch.set_num_threads(threads)
    return model.eval()


@pytest.fixture
def no_pictures(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests of the gate and of reuse check numbers: they skip drawing (each picture costs ~0.5 s on a small CPU).

    The pictures of a real evaluation are checked in the first test, and each plot in tests/report/test_plots.py.
    """
    for name in ("confusion_matrix_png", "reliability_png", "image_grid_png"):
        monkeypatch.setattr(plots, name, lambda *args, **kwargs: Path(args[2]).write_bytes(b""))


@pytest.fixture(scope="module")
def models(synthetic_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Models:
    base = tmp_path_factory.mktemp("evaluate")
    data = prepare(local_config(synthetic_root, base / "work"), progress=False)
    dataset = data.manifest["dataset"]
    torch.manual_seed(1)
    untrained = build_model("signnet", dataset["num_classes"], dataset["image_size"])
    return Models(
        root=synthetic_root,
        data=data.path,
        data_manifest=data.manifest,
        trained=_save(base / "models" / "trained", _train(data.path, dataset), data.manifest),
        untrained=_save(base / "models" / "untrained", untrained, data.manifest),
    )


def _logits(model_dir: Path, data: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's logits on the test split and the labels, computed here without the stage's code."""
    model, card = load_model(model_dir)
    test = load_split(data / "test.safetensors")
    with torch.no_grad():
        return model(normalize(test.images.float() / 255, card.mean, card.std)), test.labels


def _top1(model_dir: Path, data: Path) -> float:
    logits, labels = _logits(model_dir, data)
    return (logits.argmax(1) == labels).double().mean().item()


def test_evaluate_writes_a_verified_report_that_matches_a_direct_recomputation(models: Models, tmp_path: Path) -> None:
    config = local_config(models.root, tmp_path, *LAX)
    result = evaluate(config, model_dir=models.trained, data_dir=models.data, progress=False)

    assert not result.reused and result.passed and result.failures == []
    assert {p.name for p in result.path.iterdir()} == FILES
    manifest = verify_artifact(result.path)
    assert manifest["stage"] == "evaluate"
    assert manifest["inputs"]["model"] == read_manifest(models.trained)["key"]
    assert manifest["inputs"]["data"] == models.data_manifest["key"]
    assert manifest["config"] == config.evaluate.model_dump()
    assert set(manifest["metrics"]) == {"top1", "top5", "macro_f1", "ece", "nll"}
    report = json.loads((result.path / "report.json").read_text())
    assert report == result.report.model_dump(mode="json")
    assert report["warnings"] == []

    # Accuracy, recomputed here with the model itself.
    logits, labels = _logits(models.trained, models.data)
    top1 = (logits.argmax(1) == labels).double().mean().item()
    top5 = (logits.topk(5, 1).indices == labels[:, None]).any(1).double().mean().item()
    nll = F.cross_entropy(logits.double(), labels).item()
    metrics = report["metrics"]
    assert metrics["top1"] == pytest.approx(top1, abs=1e-6)
    assert metrics["top5"] == pytest.approx(top5, abs=1e-6)
    assert metrics["nll"] == pytest.approx(nll, rel=1e-4)
    assert top1 > 1 / 6  # a few dozen steps learn something
    assert 0.0 <= metrics["ece"] <= 1.0

    # The confusion matrix, per-class table and calibration table agree with each other and with the labels.
    matrix = torch.tensor(report["confusion_matrix"])
    support = torch.bincount(labels, minlength=6)
    assert matrix.shape == (6, 6)
    assert matrix.sum(1).tolist() == support.tolist()
    assert matrix.diag().sum().item() / len(labels) == pytest.approx(top1, abs=1e-6)
    for row in report["per_class"]:
        c = row["id"]
        assert row["support"] == support[c].item()
        assert row["recall"] == pytest.approx(matrix[c, c].item() / support[c].item(), abs=1e-6)
        assert row["name"] == models.data_manifest["dataset"]["class_names"][c]
    assert sum(b["count"] for b in report["calibration"]["bins"]) == len(labels)
    assert len(report["calibration"]["bins"]) == config.evaluate.calibration_bins
    assert report["worst_classes"][0]["recall"] == min(row["recall"] for row in report["per_class"])
    assert all(pair["true"] != pair["predicted"] for pair in report["confused_pairs"])
    assert [rule["verdict"] for rule in report["gate"]["rules"]] == ["pass", "pass", "skipped"]

    with open(result.path / "per_class.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == ["id", "name", "precision", "recall", "f1", "support"]
    assert [int(r["support"]) for r in rows] == support.tolist()
    header, *lines = (result.path / "confusion_matrix.csv").read_text().splitlines()
    assert header.split(",")[1:] == [str(c) for c in range(6)]
    assert [list(map(int, line.split(",")[1:])) for line in lines] == report["confusion_matrix"]


@pytest.mark.usefixtures("no_pictures")
def test_an_untrained_model_fails_the_accuracy_gate_and_passes_a_lax_one(models: Models, tmp_path: Path) -> None:
    strict = local_config(models.root, tmp_path)
    result = evaluate(strict, model_dir=models.untrained, data_dir=models.data, progress=False)
    assert not result.passed
    assert any(message.startswith("top1 ") and "evaluate.min_accuracy 0.900" in message for message in result.failures)
    first = result.report.gate.rules[0]
    assert (first["rule"], first["threshold"], first["verdict"]) == ("min_accuracy", 0.9, "fail")
    assert read_manifest(result.path)["gate"]["passed"] is False

    lax = evaluate(
        local_config(models.root, tmp_path, *LAX), model_dir=models.untrained, data_dir=models.data, progress=False
    )
    assert lax.passed and lax.failures == [] and lax.path != result.path


@pytest.mark.usefixtures("no_pictures")
def test_the_champion_rule_allows_at_most_max_drop(models: Models, tmp_path: Path) -> None:
    config = local_config(models.root, tmp_path, *LAX, "evaluate.max_drop=0.05")
    top1 = _top1(models.trained, models.data)

    close = evaluate(
        config, model_dir=models.trained, data_dir=models.data, champion={"top1": top1 + 0.04}, progress=False
    )
    assert close.passed and close.report.gate.rules[2]["verdict"] == "pass"
    far = evaluate(
        config, model_dir=models.trained, data_dir=models.data, champion={"top1": top1 + 0.06}, progress=False
    )
    assert not far.passed
    assert len(far.failures) == 1 and "evaluate.max_drop 0.05 =" in far.failures[0]
    assert far.report.champion == {"top1": top1 + 0.06}
    with pytest.raises(ValueError, match="top1"):
        evaluate(config, model_dir=models.trained, data_dir=models.data, champion={"acc": 0.9}, progress=False)


@pytest.mark.usefixtures("no_pictures")
def test_a_second_call_reuses_the_evaluation(models: Models, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = local_config(models.root, tmp_path)
    first = evaluate(config, model_dir=models.untrained, data_dir=models.data, progress=False)

    def no_inference(*args: object, **kwargs: object) -> None:
        raise AssertionError("an unchanged evaluation ran the model again")

    monkeypatch.setattr(evaluate_module, "predict_logits", no_inference)
    second = evaluate(config, model_dir=models.untrained, data_dir=models.data, progress=False)
    assert second.reused and second.path == first.path
    assert second.report == first.report
    assert (second.passed, second.failures) == (first.passed, first.failures)


def test_a_tampered_model_is_refused(models: Models, tmp_path: Path) -> None:
    folder = Path(shutil.copytree(models.untrained, tmp_path / "model"))
    weights = folder / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=r"model\.safetensors does not match"):
        evaluate(local_config(models.root, tmp_path), model_dir=folder, data_dir=models.data, progress=False)


def test_a_model_for_another_image_size_or_class_count_is_refused(models: Models, tmp_path: Path) -> None:
    dataset = models.data_manifest["dataset"]
    bigger = _save(tmp_path / "m40", build_model("signnet", 6, 40), models.data_manifest, image_size=40)
    with pytest.raises(ValueError, match=r"40x40 images .* 32x32"):
        evaluate(local_config(models.root, tmp_path), model_dir=bigger, data_dir=models.data, progress=False)

    names = [*dataset["class_names"], "extra"]
    wider = _save(
        tmp_path / "m7", build_model("signnet", 7, 32), models.data_manifest, num_classes=7, class_names=names
    )
    with pytest.raises(ValueError, match=r"7 classes .* 6"):
        evaluate(local_config(models.root, tmp_path), model_dir=wider, data_dir=models.data, progress=False)


@pytest.mark.usefixtures("no_pictures")
def test_a_model_from_other_data_is_evaluated_with_a_warning(
    models: Models, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    model, _ = load_model(models.untrained)
    other = _save(tmp_path / "other", model, models.data_manifest, data_key="f" * 64)
    with caplog.at_level(logging.WARNING, logger="signpost.stages.evaluate"):
        result = evaluate(local_config(models.root, tmp_path), model_dir=other, data_dir=models.data, progress=False)
    assert len(result.report.warnings) == 1 and "ffffffffffff" in result.report.warnings[0]
    assert "ffffffffffff" in caplog.text
