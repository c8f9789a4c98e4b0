"""evaluate: a model artifact and the prepared test split → metrics, pictures and a pass/fail gate.

Read top to bottom: load the model (its files checked against its manifest) and the test split (likewise), check
that they fit each other, reuse the evaluation when one exists for these inputs, otherwise run the test images
through the model in batches, compute the metrics and apply the gate from ``config.evaluate`` (absolute thresholds,
and the current champion when one is given; both in ``signpost.metrics``), write the report, tables and pictures
atomically, and log the evaluation to its tracking run.

Evaluation runs on the CPU: it is a few seconds for GTSRB's 12,630 test images, and the numbers do not then depend
on which accelerator a machine has.

``served_parity`` (``signpost evaluate --served URL``) checks that a running server answers as this evaluation
does: it sends the test split's source files, as a client would, to the server (which must serve this very model,
its card says), and compares the answers with evaluate's own predictions on the cached test images, which prepare
decoded exactly as the server decodes an upload. Served and evaluated top-1 may differ by at most
``evaluate.max_served_gap`` percentage points.
"""

from __future__ import annotations

import csv
import json
import logging
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from signpost.artifacts import (
    artifact_path,
    atomic_dir,
    code_version,
    hash_json,
    is_complete,
    read_manifest,
    verify_artifact,
    write_manifest,
)
from signpost.client import ask_server, served_model, service_url
from signpost.config import SignpostConfig, config_to_dict
from signpost.contracts import EVALUATION_REPORT, EvaluationReport, read_evaluation
from signpost.data.cache import SOURCES, load_split, read_sources
from signpost.data.loader import normalize
from signpost.metrics import TOLERANCE, apply_gate, compute_metrics, rounded
from signpost.models.artifact import ModelCard, load_model
from signpost.report import plots
from signpost.tracking import RunFactory, Tracker

log = logging.getLogger(__name__)

STAGE = "evaluate"
# The loader is in the key for ``normalize``: how pixels are scaled is part of what a test score means.
_CODE = (__name__, "signpost.metrics", "signpost.contracts", "signpost.report.plots", "signpost.models",
         "signpost.data.loader")
TEST_SPLIT = "test.safetensors"
FEEDBACK_SPLIT = "feedback.safetensors"  # held-out labelled feedback, when prepare folded some in
BATCH = 512  # images per forward pass: 512 x 3 x 32 x 32 float32 is 6 MiB
GRID_IMAGES = 48


@dataclass
class EvaluateResult:
    """Where the evaluation is, whether it was reused, what it found, and the gate's verdict."""

    path: Path
    reused: bool
    report: EvaluationReport
    passed: bool
    failures: list[str]


def evaluate(
    config: SignpostConfig,
    *,
    model_dir: Path,
    data_dir: Path,
    champion: dict[str, float] | None = None,
    champion_skipped: str | None = None,
    progress: bool = True,
    tracking: RunFactory | None = None,
    on_logged: Callable[[Tracker, EvaluateResult], None] | None = None,
) -> EvaluateResult:
    """Evaluate the model artifact in model_dir on the test split of the prepared data in data_dir; apply the gate.

    ``champion`` holds the current champion's test metrics (at least ``top1``); without it the champion rule is
    skipped, and ``champion_skipped`` is why (e.g. the champion was trained for other classes), as the report says.
    ``tracking`` makes the stage's tracking run (``signpost.tracking.run_factory``), opened only when the evaluation
    is made, not reused: it gets the settings, the metrics, the artifact and the gate's verdict, and then
    ``on_logged`` runs inside it (registering the model needs the run its evaluation was logged in).
    Raises ``ArtifactError`` for a model or data folder that does not match its manifest, and
    ``ValueError`` for a model and data that do not fit each other (image size, class count).
    """
    model_dir, data_dir = Path(model_dir), Path(data_dir)
    model, card = load_model(model_dir)
    model_key = read_manifest(model_dir, signed=True)["key"]
    splits = [TEST_SPLIT] + ([FEEDBACK_SPLIT] if FEEDBACK_SPLIT in read_manifest(data_dir)["files"] else [])
    data_manifest = verify_artifact(data_dir, splits)
    data_key = data_manifest["key"]
    _check_fit(card, data_manifest["dataset"], model_dir, data_dir)
    if champion is not None and "top1" not in champion:
        raise ValueError(f"champion must give the champion's test 'top1', got keys {sorted(champion)}")
    if champion is not None and champion_skipped is not None:
        raise ValueError("give the champion's metrics or why it is not compared, not both")

    key = hash_json(
        {
            "model": model_key,
            "data": data_key,
            "settings": config_to_dict(config.evaluate),
            "champion": champion,
            "champion_skipped": champion_skipped,
            "code": code_version(*_CODE),
        }
    )
    path = artifact_path(config.workdir, STAGE, config.name, key)
    if is_complete(path):
        log.info("%s was evaluated on %s with these settings already: reusing %s", model_dir, data_dir, path)
        report = read_evaluation(path)  # checked against the manifest, as written
        return EvaluateResult(path, True, report, report.gate.passed, report.gate.failures)

    warnings = []
    if card.data_key != data_key:
        warnings.append(
            f"the model was trained on data {card.data_key[:12]} ({card.data_artifact}) but is evaluated on "
            f"{data_key[:12]} ({data_dir.name}): its test score is not comparable with its training run"
        )
        log.warning("%s", warnings[-1])

    started = time.perf_counter()
    test = load_split(data_dir / TEST_SPLIT)
    if len(test) == 0:
        raise ValueError(f"{data_dir / TEST_SPLIT} holds no images: there is nothing to evaluate on")
    logits = predict_logits(model, test.images, card.mean, card.std, progress=progress)
    seconds = time.perf_counter() - started
    metrics = compute_metrics(logits, test.labels, card.class_names, config.evaluate.calibration_bins)
    feedback = _score_feedback(model, card, data_dir) if FEEDBACK_SPLIT in splits else None
    if feedback is not None:
        metrics["metrics"]["feedback_top1"] = feedback["top1"]
    gate = apply_gate(metrics, config.evaluate, champion, skipped=champion_skipped)
    report = EvaluationReport.model_validate({
        "model": {
            "path": str(model_dir),
            "key": model_key,
            "architecture": card.architecture,
            "data_key": card.data_key,
        },
        "data": {"path": str(data_dir), "key": data_key, "split": "test", "images": len(test)},
        "image_size": card.image_size,
        "class_names": card.class_names,
        "warnings": warnings,
        "champion": champion,
        "champion_skipped": champion_skipped,
        **metrics,
        "feedback": feedback,
        "gate": gate,
    })
    summary = ", ".join(f"{name} {value:.4f}" for name, value in metrics["metrics"].items())
    verdict = "passed" if gate["passed"] else "failed: " + "; ".join(gate["failures"])
    verdict += f" ({champion_skipped})" if champion_skipped else ""
    log.info("%s on %d test images: %s; gate %s", model_dir.name, len(test), summary, verdict)

    with atomic_dir(path) as tmp:
        (tmp / EVALUATION_REPORT).write_text(json.dumps(report.model_dump(mode="json"), indent=2) + "\n",
                                             encoding="utf-8")
        _write_per_class(tmp / "per_class.csv", metrics["per_class"])
        _write_matrix(tmp / "confusion_matrix.csv", metrics["confusion_matrix"])
        top1 = metrics["metrics"]["top1"]
        classes = list(range(card.num_classes))
        plots.confusion_matrix_png(
            np.array(metrics["confusion_matrix"]),
            classes,
            tmp / "confusion_matrix.png",
            f"Confusion matrix (row-normalized) — top-1 {top1:.4f}",
        )
        plots.reliability_png(metrics["calibration"]["bins"], metrics["metrics"]["ece"], tmp / "reliability.png")
        images, captions = _worst_mistakes(logits, test.images, test.labels, card.class_names)
        plots.image_grid_png(images, captions, tmp / "misclassified.png", empty_message="no misclassified images")
        timing = {"images": len(test), "seconds": round(seconds, 3), "images_per_s": round(len(test) / seconds, 1)}
        write_manifest(
            tmp,
            stage=STAGE,
            key=key,
            experiment=config.name,
            inputs={
                "model": model_key,
                "data": data_key,
                "champion": champion,
                "model_path": str(model_dir),
                "data_path": str(data_dir),
            },
            config=config_to_dict(config.evaluate),
            code=code_version(*_CODE),
            metrics=metrics["metrics"],
            extra={"gate": {"passed": gate["passed"], "failures": gate["failures"]}, "timing": timing},
        )
    result = EvaluateResult(path, False, report, gate["passed"], gate["failures"])
    if tracking is not None:
        with tracking(STAGE) as tracker:
            tracker.log_params({"evaluate": config_to_dict(config.evaluate), "model": model_dir.name,
                                "data": data_dir.name})
            tracker.log_metrics(report.metrics)
            tracker.log_artifact(path, STAGE)
            tracker.set_tags({"signpost.gate": "passed" if result.passed else "failed"})
            if on_logged is not None:
                on_logged(tracker, result)
    return result


def _check_fit(card: ModelCard, dataset: dict[str, Any], model_dir: Path, data_dir: Path) -> None:
    """A model can only be evaluated on images of its input size and labels of its classes."""
    if card.image_size != dataset["image_size"]:
        raise ValueError(
            f"the model in {model_dir} takes {card.image_size}x{card.image_size} images but the data in {data_dir} "
            f"is cached at {dataset['image_size']}x{dataset['image_size']}: evaluate on data prepared with "
            f"data.image_size={card.image_size}"
        )
    if card.num_classes != dataset["num_classes"]:
        raise ValueError(
            f"the model in {model_dir} has {card.num_classes} classes but the data in {data_dir} has "
            f"{dataset['num_classes']}: evaluate it on the dataset it was trained for"
        )


def _score_feedback(model: nn.Module, card: ModelCard, data_dir: Path) -> dict[str, Any] | None:
    """Top-1 overall and per class on the held-out feedback: production images the model was not trained on."""
    held = load_split(data_dir / FEEDBACK_SPLIT)
    if len(held) == 0:
        return None
    correct = predict_logits(model, held.images, card.mean, card.std).argmax(dim=1) == held.labels
    per_class = {
        card.class_names[c]: rounded(correct[held.labels == c].double().mean())
        for c in sorted(set(held.labels.tolist()))
    }
    return {"images": len(held), "top1": rounded(correct.double().mean()), "per_class": per_class}


# --- served parity ----------------------------------------------------------------------------------------------


@dataclass
class ParityResult:
    """A running server's answers on the test files, against evaluate's own predictions on the same files."""

    url: str
    served_version: str  # the model version the server names (its GET /v1/model)
    runtime: str  # the runtime the server runs it on
    images: int
    served_top1: float
    evaluated_top1: float
    gap_points: float  # |evaluated - served| top-1, in percentage points
    agreement: float  # share of files on which the server and evaluate predict the same class
    failed: int  # files the server did not classify: counted as wrong, and as disagreeing
    max_gap: float  # evaluate.max_served_gap, percentage points
    disagreements: list[dict[str, Any]]  # the first PARITY_EXAMPLES: file, label, served (or why not), evaluated

    @property
    def passed(self) -> bool:
        return self.gap_points <= self.max_gap + TOLERANCE


PARITY_EXAMPLES = 10  # disagreeing files named in a ParityResult
MAX_CONCURRENCY = 64  # requests in flight at once, at most: a check, not a load test


def served_parity(
    config: SignpostConfig,
    *,
    model_dir: Path,
    data_dir: Path,
    url: str,
    concurrency: int = 8,
    timeout_s: float = 30.0,
    api_key: str | None = None,
    progress: bool = False,
) -> ParityResult:
    """Send the test split's source files to the server at ``url`` (``POST /v1/predict``, one file a request, at
    most ``concurrency`` at a time, each given up after ``timeout_s``) and compare its answers with evaluate's own
    predictions on the prepared test images of the same files.

    Raises ``ValueError`` for a bad URL or setting and for test files changed since prepare, ``FileNotFoundError``
    when they are gone, ``ConnectionError`` when the server cannot be reached or stops answering, and
    ``RuntimeError`` when it is not ready, serves another model (its card differs from ``model_dir``'s) or serves a
    canary beside it.
    """
    url = service_url(url)
    if not 1 <= concurrency <= MAX_CONCURRENCY:
        raise ValueError(f"--concurrency {concurrency}: give 1 to {MAX_CONCURRENCY} requests in flight at once")
    if not timeout_s > 0:
        raise ValueError(f"--timeout {timeout_s}: give the seconds a request may take, more than 0")
    model_dir, data_dir = Path(model_dir), Path(data_dir)
    model, card = load_model(model_dir)
    data_manifest = verify_artifact(data_dir, [TEST_SPLIT, SOURCES])
    _check_fit(card, data_manifest["dataset"], model_dir, data_dir)
    test = load_split(data_dir / TEST_SPLIT)
    if len(test) == 0:
        raise ValueError(f"{data_dir / TEST_SPLIT} holds no images: there is nothing to compare on")
    files = _test_files(data_dir, data_manifest, len(test))
    served = served_model(url, card, model_dir, timeout_s)

    evaluated = predict_logits(model, test.images, card.mean, card.std).argmax(dim=1).numpy()
    answers = ask_server(url, files, concurrency=concurrency, timeout_s=timeout_s, api_key=api_key,
                         progress=progress)
    classified = [answer for answer in answers if isinstance(answer, tuple)]
    if not classified:
        raise RuntimeError(f"{url} classified none of the {len(files)} test files; it answered the first with "
                           f"{answers[0]}")
    others = {version for _, version in classified} - {served["version"]}
    if others:
        raise RuntimeError(f"{url} answered with {', '.join(sorted(others))} as well as {served['version']} while it "
                           "was measured (was the model reloaded?): measure again")

    labels = test.labels.numpy()
    predicted = np.array([answer[0] if isinstance(answer, tuple) else -1 for answer in answers])
    served_top1, evaluated_top1 = float((predicted == labels).mean()), float((evaluated == labels).mean())
    differ = np.flatnonzero(predicted != evaluated)
    result = ParityResult(
        url=url,
        served_version=served["version"],
        runtime=str(served.get("runtime", "")),
        images=len(files),
        served_top1=rounded(served_top1),
        evaluated_top1=rounded(evaluated_top1),
        gap_points=rounded(100 * abs(evaluated_top1 - served_top1)),
        agreement=rounded(1 - len(differ) / len(files)),
        failed=len(answers) - len(classified),
        max_gap=config.evaluate.max_served_gap,
        disagreements=[
            {"file": str(files[i][0]), "label": int(labels[i]), "evaluated": int(evaluated[i]),
             "served": answers[i][0] if isinstance(answers[i], tuple) else answers[i]}
            for i in differ[:PARITY_EXAMPLES].tolist()
        ],
    )
    log.info("%s (%s) on %d test files: served top-1 %.4f, evaluated %.4f, %.2f points apart (limit %.2f), "
             "agreement %.4f, %d not classified", result.served_version, result.runtime, result.images,
             served_top1, evaluated_top1, result.gap_points, result.max_gap, result.agreement, result.failed)
    return result


def _test_files(data_dir: Path, manifest: dict[str, Any], count: int) -> list[tuple[Path, str]]:
    """The test split's source files (path, sha256), in the order of its images (``sources.tsv``)."""
    rows = read_sources(data_dir)
    if rows and "split" not in rows[0]:
        raise ValueError(f"{data_dir} was prepared by an older Signpost: its {SOURCES} does not say which files are "
                         "the test split; run `signpost prepare` again")
    root = Path(manifest.get("inputs", {}).get("root", ""))
    files = [(root / row["path"], row["sha256"]) for row in rows if row["split"] == "test"]
    if len(files) != count:
        raise ValueError(f"{data_dir / SOURCES} lists {len(files)} test files but {TEST_SPLIT} holds {count} images: "
                         "the folder is damaged; run `signpost prepare` again")
    missing = next((path for path, _ in files if not path.is_file()), None)
    if missing is not None:
        raise FileNotFoundError(f"{missing}: a test file of {data_dir.name} is missing; --served sends the original "
                                f"files, so it needs the raw dataset that prepare read under {root}")
    return files


# --- inference --------------------------------------------------------------------------------------------------


def predict_logits(
    model: nn.Module, images: torch.Tensor, mean: list[float], std: list[float], *, progress: bool = False
) -> torch.Tensor:
    """Class logits float32 [N, C] for uint8 images [N, 3, S, S], normalized with the model card's mean and std."""
    out = []
    with (
        torch.inference_mode(),
        tqdm(total=len(images), desc="evaluate", unit="img", disable=not progress, file=sys.stderr) as bar,
    ):
        for start in range(0, len(images), BATCH):
            batch = images[start : start + BATCH].float().div_(255.0)
            out.append(model(normalize(batch, mean, std)).float())
            bar.update(len(batch))
    return torch.cat(out)


# --- files ------------------------------------------------------------------------------------------------------


def _write_per_class(path: Path, rows: list[dict[str, Any]]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=["id", "name", "precision", "recall", "f1", "support"])
        writer.writeheader()
        writer.writerows({**row, "recall": "" if row["recall"] is None else row["recall"]} for row in rows)


def _write_matrix(path: Path, matrix: list[list[int]]) -> None:
    """Counts with a header row of predicted class ids; each row starts with its true class id."""
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["true\\predicted", *range(len(matrix))])
        writer.writerows([true, *row] for true, row in enumerate(matrix))


def _worst_mistakes(
    logits: torch.Tensor, images: torch.Tensor, labels: torch.Tensor, class_names: list[str]
) -> tuple[np.ndarray, list[str]]:
    """The most confident mistakes (up to GRID_IMAGES), with captions 'true → predicted (confidence)'."""
    confidence, predicted = torch.softmax(logits, dim=1).max(dim=1)
    wrong = torch.nonzero(predicted != labels).flatten()
    chosen = wrong[confidence[wrong].argsort(descending=True, stable=True)][:GRID_IMAGES]
    captions = [
        f"{t} → {p} ({c:.0%})\n{_short(class_names[t], 22)}\n→ {_short(class_names[p], 20)}"
        for t, p, c in zip(
            labels[chosen].tolist(), predicted[chosen].tolist(), confidence[chosen].tolist(), strict=True
        )
    ]
    return images[chosen].numpy(), captions


def _short(name: str, limit: int) -> str:
    return name if len(name) <= limit else name[: limit - 1] + "…"
