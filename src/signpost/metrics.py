"""Classification metrics and the gate's rules: pure functions of logits and labels.

``compute_metrics`` turns a model's logits on a labelled split into every number the evaluate stage reports
(top-1, top-5, macro F1, calibration, NLL, per-class scores, the confusion matrix and its largest mistakes);
``apply_gate`` holds those numbers to ``evaluate.*`` and, when one is given, the champion's top-1. Nothing here
reads or writes files, so the numbers can be checked on hand-made tensors.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from signpost.config import EvaluateConfig

TOP_K = 5
WORST_CLASSES = 5
CONFUSED_PAIRS = 10
_GATE_NAMES = 5  # failing classes named in a gate message
TOLERANCE = 1e-12  # float slack in gate comparisons: a top-1 exactly at a threshold passes


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
            "precision": rounded(scores["precision"][c]),
            "recall": rounded(scores["recall"][c]) if present[c] else None,
            "f1": rounded(scores["f1"][c]),
            "support": int(scores["support"][c]),
        }
        for c in range(num_classes)
    ]
    return {
        "metrics": {
            "top1": rounded((predicted == labels).double().mean()),
            "top5": rounded((top_k == labels[:, None]).any(dim=1).double().mean()),
            # Over the classes the test split has: an absent class has no recall to average.
            "macro_f1": rounded(scores["f1"][present].mean()),
            "ece": rounded(ece),
            "nll": rounded(-log_probs[torch.arange(len(labels)), labels].mean()),
        },
        "per_class": per_class,
        "worst_classes": sorted(
            ({k: row[k] for k in ("id", "name", "recall", "support")} for row in per_class if row["support"]),
            key=lambda row: (row["recall"], row["id"]),
        )[:WORST_CLASSES],
        "confused_pairs": confused_pairs(matrix, class_names),
        "confusion_matrix": matrix.tolist(),
        "calibration": {"num_bins": bins, "ece": rounded(ece), "bins": table},
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
            "lower": rounded(b / bins),
            "upper": rounded((b + 1) / bins),
            "confidence": rounded(confidence_sum[b] / count[b]) if count[b] else None,
            "accuracy": rounded(correct_sum[b] / count[b]) if count[b] else None,
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
                "share_of_true": rounded(errors[true, pred] / support[true]),
            }
        )
    return pairs


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
        (row for row in measured if row["recall"] + TOLERANCE < settings.min_class_accuracy),
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
    passed = value + TOLERANCE >= threshold
    return {
        "rule": name,
        "metric": metric,
        "threshold": rounded(threshold),
        "value": rounded(value),
        "verdict": "pass" if passed else "fail",
        "detail": f"{metric} {value:.4f} >= {threshold:.4f}" if passed else failure,
    }


def _apart(value: float, threshold: float) -> tuple[str, str]:
    """Both numbers with 3 decimals, or as many more (up to 6) as it takes for them to print apart."""
    digits = 3
    while digits < 6 and f"{value:.{digits}f}" == f"{threshold:.{digits}f}":
        digits += 1
    return f"{value:.{digits}f}", f"{threshold:.{digits}f}"


def rounded(x: float | torch.Tensor | np.floating) -> float:
    """A number as the reports hold it: a plain float, 6 decimals."""
    return round(float(x), 6)
