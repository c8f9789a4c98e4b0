"""evaluate: a model artifact and the prepared test split → metrics, pictures and a pass/fail gate.

Read top to bottom: load the model (its files checked against its manifest) and the test split (likewise), check
that they fit each other, reuse the evaluation when one exists for these inputs, otherwise run the test images
through the model in batches, compute the metrics, apply the gate from ``config.evaluate`` (absolute thresholds, and
the current champion when one is given) and write the report, tables and pictures atomically.

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
import hashlib
import json
import logging
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
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
from signpost.config import EvaluateConfig, SignpostConfig, config_to_dict
from signpost.data.cache import SOURCES, load_split, read_sources
from signpost.data.loader import normalize
from signpost.models.artifact import ModelCard, load_model
from signpost.report import plots

log = logging.getLogger(__name__)

STAGE = "evaluate"
# The loader is in the key for ``normalize``: how pixels are scaled is part of what a test score means.
_CODE = (__name__, "signpost.report.plots", "signpost.models", "signpost.data.loader")
TEST_SPLIT = "test.safetensors"
FEEDBACK_SPLIT = "feedback.safetensors"  # held-out labelled feedback, when prepare folded some in
BATCH = 512  # images per forward pass: 512 x 3 x 32 x 32 float32 is 6 MiB
TOP_K = 5
WORST_CLASSES = 5
CONFUSED_PAIRS = 10
GRID_IMAGES = 48
_GATE_NAMES = 5  # failing classes named in a gate message
_TOLERANCE = 1e-12  # float slack in gate comparisons: a top-1 exactly at a threshold passes


@dataclass
class EvaluateResult:
    """Where the evaluation is, whether it was reused, what it found, and the gate's verdict."""

    path: Path
    reused: bool
    report: dict[str, Any]
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
) -> EvaluateResult:
    """Evaluate the model artifact in model_dir on the test split of the prepared data in data_dir; apply the gate.

    ``champion`` holds the current champion's test metrics (at least ``top1``); without it the champion rule is
    skipped, and ``champion_skipped`` is why (e.g. the champion was trained for other classes), as the report says.
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
        verify_artifact(path, ["report.json"])
        report = json.loads((path / "report.json").read_text(encoding="utf-8"))
        return EvaluateResult(path, True, report, report["gate"]["passed"], report["gate"]["failures"])

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
    report = {
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
    }
    summary = ", ".join(f"{name} {value:.4f}" for name, value in metrics["metrics"].items())
    verdict = "passed" if gate["passed"] else "failed: " + "; ".join(gate["failures"])
    verdict += f" ({champion_skipped})" if champion_skipped else ""
    log.info("%s on %d test images: %s; gate %s", model_dir.name, len(test), summary, verdict)

    with atomic_dir(path) as tmp:
        (tmp / "report.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
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
    return EvaluateResult(path, False, report, gate["passed"], gate["failures"])


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
        card.class_names[c]: _r(correct[held.labels == c].double().mean())
        for c in sorted(set(held.labels.tolist()))
    }
    return {"images": len(held), "top1": _r(correct.double().mean()), "per_class": per_class}


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
        return self.gap_points <= self.max_gap + _TOLERANCE


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
    url = _service_url(url)
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
    served = _served_model(url, card, model_dir, timeout_s)

    evaluated = predict_logits(model, test.images, card.mean, card.std).argmax(dim=1).numpy()
    answers = _ask_server(url, files, concurrency=concurrency, timeout_s=timeout_s, api_key=api_key,
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
        served_top1=_r(served_top1),
        evaluated_top1=_r(evaluated_top1),
        gap_points=_r(100 * abs(evaluated_top1 - served_top1)),
        agreement=_r(1 - len(differ) / len(files)),
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


def _service_url(url: str) -> str:
    """``url`` without a trailing slash, once it is checked to be an http(s) address of a server."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.query or parts.fragment:
        raise ValueError(f"--served {url!r}: give the server's address, e.g. http://127.0.0.1:8000")
    return url.rstrip("/")


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


def _served_model(url: str, card: ModelCard, model_dir: Path, timeout_s: float) -> dict[str, Any]:
    """What the server says it serves (``GET /v1/model``), once checked to be the model in ``model_dir``."""
    try:
        with _OPENER.open(f"{url}/v1/model", timeout=timeout_s) as response:
            info = json.loads(response.read())
        served_card = info["card"]
    except urllib.error.HTTPError as exc:
        if exc.code == 503:
            raise RuntimeError(f"{url} is not ready yet ({_error_message(exc)}): wait until {url}/readyz answers 200, "
                               "then measure again") from None
        raise RuntimeError(f"{url}/v1/model answered HTTP {exc.code} ({_error_message(exc)}): is it a Signpost "
                           "server?") from None
    except (urllib.error.URLError, OSError) as exc:
        raise ConnectionError(f"cannot reach {url} ({_reason(exc)}): is `signpost serve --model {model_dir}` "
                              "running there?") from None
    except (ValueError, KeyError, TypeError):
        raise RuntimeError(f"{url}/v1/model did not answer with a model card: is it a Signpost server?") from None
    if info.get("canary"):
        raise RuntimeError(f"{url} sends {info['canary'].get('share', 0):.0%} of its requests to a canary "
                           f"({info['canary'].get('version')}) beside {info.get('version')}: the answers would come "
                           "from two models; measure a server started without --canary")
    ours = card.model_dump(mode="json", exclude={"config"})
    differ = sorted(key for key in ours.keys() | served_card.keys() if ours.get(key) != served_card.get(key))
    if differ:
        raise RuntimeError(f"{url} serves {info.get('version')}, not the model in {model_dir}: their cards differ in "
                           f"{', '.join(differ)}; pass the served model with --model, or serve this one")
    return info


def _ask_server(
    url: str, files: list[tuple[Path, str]], *, concurrency: int, timeout_s: float, api_key: str | None,
    progress: bool,
) -> list[tuple[int, str] | str]:
    """Each file's answer: (class id, model version), or why the server did not classify it (its HTTP error).

    A file changed since prepare, or a server that stops answering (refused, reset, timed out), ends the whole
    measurement at once: the requests not yet sent are dropped, so a hung server costs about one ``timeout_s``.
    """
    endpoint = f"{url}/v1/predict"
    headers = {"Content-Type": "application/octet-stream"} | ({"X-API-Key": api_key} if api_key else {})
    stop = threading.Event()

    def ask(path: Path, digest: str) -> tuple[int, str] | str:
        if stop.is_set():
            return "not sent"
        body = path.read_bytes()
        if hashlib.sha256(body).hexdigest() != digest:
            raise ValueError(f"{path} changed since the data was prepared (its sha256 differs from {SOURCES}'s): "
                             "run `signpost prepare` again")
        request = urllib.request.Request(endpoint, data=body, headers=headers, method="POST")
        try:
            with _OPENER.open(request, timeout=timeout_s) as response:
                answer = json.loads(response.read())
            return int(answer["class_id"]), str(answer["model_version"])
        except urllib.error.HTTPError as exc:
            return f"HTTP {exc.code}: {_error_message(exc)}"
        except (urllib.error.URLError, OSError) as exc:
            raise ConnectionError(f"{endpoint} stopped answering ({_reason(exc)}): is the server still "
                                  "running?") from None
        except (ValueError, KeyError, TypeError):
            raise RuntimeError(f"{endpoint} did not answer with a prediction: is it a Signpost server?") from None

    answers: list[tuple[int, str] | str] = []
    with (
        ThreadPoolExecutor(concurrency, thread_name_prefix="signpost-parity") as pool,
        tqdm(total=len(files), desc="served", unit="img", disable=not progress, file=sys.stderr) as bar,
    ):
        futures = [pool.submit(ask, path, digest) for path, digest in files]
        try:
            for future in futures:
                answers.append(future.result())
                bar.update(1)
        except BaseException:
            stop.set()  # the threads drop what they have not sent yet
            for future in futures:
                future.cancel()
            raise
    return answers


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    """Requests go to the URL the user named and nowhere else: a redirect is answered as the error it is."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


# No proxy from the environment either: the measurement is of the server named, on the path the user gave.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}), _NoRedirects())


def _error_message(exc: urllib.error.HTTPError) -> str:
    """The message of a Signpost error answer (``{"error": {"message": ...}}``), else the HTTP reason."""
    try:
        return str(json.loads(exc.read())["error"]["message"])[:300]
    except Exception:  # any body at all may come back from something that is not a Signpost server
        return str(exc.reason)


def _reason(exc: BaseException) -> str:
    reason = getattr(exc, "reason", None) or exc
    return str(reason) or type(reason).__name__


# --- inference and metrics --------------------------------------------------------------------------------------


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


def compute_metrics(logits: torch.Tensor, labels: torch.Tensor, class_names: list[str], bins: int) -> dict[str, Any]:
    """Every number the report holds, from logits [N, C] and true labels [N]."""
    num_classes = logits.shape[1]
    log_probs = torch.log_softmax(logits.double(), dim=1)
    probs = log_probs.exp()
    predicted = logits.argmax(dim=1)
    top_k = logits.topk(min(TOP_K, num_classes), dim=1).indices
    matrix = confusion_matrix(labels, predicted, num_classes)
    scores = per_class_scores(matrix)
    present = scores["support"] > 0
    ece, table = calibration(probs, labels, bins)
    per_class = [
        {
            "id": c,
            "name": class_names[c],
            "precision": _r(scores["precision"][c]),
            "recall": _r(scores["recall"][c]) if present[c] else None,
            "f1": _r(scores["f1"][c]),
            "support": int(scores["support"][c]),
        }
        for c in range(num_classes)
    ]
    return {
        "metrics": {
            "top1": _r((predicted == labels).double().mean()),
            "top5": _r((top_k == labels[:, None]).any(dim=1).double().mean()),
            # Over the classes the test split has: an absent class has no recall to average.
            "macro_f1": _r(scores["f1"][present].mean()),
            "ece": _r(ece),
            "nll": _r(-log_probs[torch.arange(len(labels)), labels].mean()),
        },
        "per_class": per_class,
        "worst_classes": sorted(
            ({k: row[k] for k in ("id", "name", "recall", "support")} for row in per_class if row["support"]),
            key=lambda row: (row["recall"], row["id"]),
        )[:WORST_CLASSES],
        "confused_pairs": confused_pairs(matrix, class_names),
        "confusion_matrix": matrix.tolist(),
        "calibration": {"num_bins": bins, "ece": _r(ece), "bins": table},
    }


def confusion_matrix(labels: torch.Tensor, predicted: torch.Tensor, num_classes: int) -> np.ndarray:
    """Counts int64 [C, C]: row = true class, column = predicted class."""
    cells = torch.bincount(labels * num_classes + predicted, minlength=num_classes * num_classes)
    return cells.view(num_classes, num_classes).numpy()


def per_class_scores(matrix: np.ndarray) -> dict[str, np.ndarray]:
    """Precision, recall, F1 and support per class from a confusion matrix of counts.

    A class never predicted has precision 0 (as scikit-learn's default); a class absent from the labels has recall
    NaN, and F1 0.
    """
    hits = np.diag(matrix).astype(np.float64)
    support = matrix.sum(axis=1)
    predicted = matrix.sum(axis=0)
    precision = np.divide(hits, predicted, out=np.zeros_like(hits), where=predicted > 0)
    recall = np.divide(hits, support, out=np.full_like(hits, np.nan), where=support > 0)
    both = precision + np.nan_to_num(recall)
    f1 = np.divide(2 * precision * np.nan_to_num(recall), both, out=np.zeros_like(hits), where=both > 0)
    return {"precision": precision, "recall": recall, "f1": f1, "support": support}


def calibration(probs: torch.Tensor, labels: torch.Tensor, bins: int) -> tuple[float, list[dict[str, Any]]]:
    """Expected calibration error over ``bins`` equal-width bins of top-1 confidence, and the per-bin table.

    Bin i holds confidences in (i/bins, (i+1)/bins] (the first also 0). ECE = Σ_b (n_b / N) |accuracy_b -
    confidence_b|, between 0 (confidence always matches accuracy) and 1. Rows of the table: lower, upper,
    confidence (mean), accuracy and count; an empty bin has None for confidence and accuracy.
    """
    confidence, predicted = probs.double().max(dim=1)
    correct = (predicted == labels).double()
    index = (confidence * bins).ceil().long().clamp(1, bins) - 1
    count = torch.bincount(index, minlength=bins)
    confidence_sum = torch.bincount(index, weights=confidence, minlength=bins)
    correct_sum = torch.bincount(index, weights=correct, minlength=bins)
    # n_b/N · |acc_b - conf_b| = |Σ correct - Σ confidence| / N within each bin
    ece = float((correct_sum - confidence_sum).abs().sum() / max(len(labels), 1))
    table = [
        {
            "lower": _r(b / bins),
            "upper": _r((b + 1) / bins),
            "confidence": _r(confidence_sum[b] / count[b]) if count[b] else None,
            "accuracy": _r(correct_sum[b] / count[b]) if count[b] else None,
            "count": int(count[b]),
        }
        for b in range(bins)
    ]
    return ece, table


def confused_pairs(matrix: np.ndarray, class_names: list[str]) -> list[dict[str, Any]]:
    """The largest off-diagonal cells, most images first: which true class is taken for which."""
    errors = matrix.copy()
    np.fill_diagonal(errors, 0)
    order = np.argsort(-errors, axis=None, kind="stable")[:CONFUSED_PAIRS]
    support = matrix.sum(axis=1)
    pairs = []
    for true, pred in zip(*np.unravel_index(order, errors.shape), strict=True):
        if errors[true, pred] == 0:
            break
        pairs.append(
            {
                "true": int(true),
                "true_name": class_names[true],
                "predicted": int(pred),
                "predicted_name": class_names[pred],
                "count": int(errors[true, pred]),
                "share_of_true": _r(errors[true, pred] / support[true]),
            }
        )
    return pairs


# --- the gate ---------------------------------------------------------------------------------------------------


def apply_gate(
    metrics: dict[str, Any], settings: EvaluateConfig, champion: dict[str, float] | None, *, skipped: str | None = None
) -> dict[str, Any]:
    """Check the metrics against ``evaluate.*`` and the champion; each rule records threshold, value and verdict.
    Without a champion its rule is skipped, and its detail says why (``skipped``, else that none was given)."""
    top1 = metrics["metrics"]["top1"]
    value, threshold = _apart(top1, settings.min_accuracy)
    rules = [
        _rule("min_accuracy", "top1", top1, settings.min_accuracy, f"top1 {value} < evaluate.min_accuracy {threshold}")
    ]

    measured = [row for row in metrics["per_class"] if row["recall"] is not None]
    low = sorted(
        (row for row in measured if row["recall"] + _TOLERANCE < settings.min_class_accuracy),
        key=lambda row: (row["recall"], row["id"]),
    )
    named = ", ".join(f"{row['id']} {row['name']}: {row['recall']:.3f}" for row in low[:_GATE_NAMES])
    more = f" and {len(low) - _GATE_NAMES} more" if len(low) > _GATE_NAMES else ""
    message = (
        f"{len(low)} of {len(measured)} classes have recall < evaluate.min_class_accuracy "
        f"{settings.min_class_accuracy:.3f}: {named}{more}"
    )
    lowest = min(row["recall"] for row in measured)
    rules.append(_rule("min_class_accuracy", "lowest class recall", lowest, settings.min_class_accuracy, message))

    if champion is None:
        not_run = {"rule": "max_drop", "metric": "top1", "threshold": None, "value": top1, "verdict": "skipped"}
        rules.append(not_run | {"detail": skipped or "no champion given"})
    else:
        floor = champion["top1"] - settings.max_drop
        value, threshold = _apart(top1, floor)
        message = (
            f"top1 {value} < champion top1 {champion['top1']:g} - evaluate.max_drop {settings.max_drop:g} = {threshold}"
        )
        rules.append(_rule("max_drop", "top1", top1, floor, message))
    failures = [rule["detail"] for rule in rules if rule["verdict"] == "fail"]
    return {"passed": not failures, "failures": failures, "rules": rules}


def _rule(name: str, metric: str, value: float, threshold: float, failure: str) -> dict[str, Any]:
    """One gate rule: passes when value >= threshold; ``failure`` is its message when it does not."""
    passed = value + _TOLERANCE >= threshold
    return {
        "rule": name,
        "metric": metric,
        "threshold": _r(threshold),
        "value": _r(value),
        "verdict": "pass" if passed else "fail",
        "detail": f"{metric} {value:.4f} >= {threshold:.4f}" if passed else failure,
    }


def _apart(value: float, threshold: float) -> tuple[str, str]:
    """Both numbers with 3 decimals, or as many more (up to 6) as it takes for them to print apart."""
    digits = 3
    while digits < 6 and f"{value:.{digits}f}" == f"{threshold:.{digits}f}":
        digits += 1
    return f"{value:.{digits}f}", f"{threshold:.{digits}f}"


def _r(x: float | torch.Tensor | np.floating) -> float:
    return round(float(x), 6)


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
