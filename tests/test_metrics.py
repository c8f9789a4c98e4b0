"""The metrics and the gate's rules, on hand-made numbers."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from signpost.config import EvaluateConfig
from signpost.metrics import apply_gate, calibration


def test_ece_is_zero_when_confidence_matches_accuracy() -> None:
    # Four images at confidence 0.75 of which three are right, two at 1.0 both right: perfectly calibrated.
    probs = torch.tensor([[0.75, 0.25]] * 4 + [[1.0, 0.0]] * 2, dtype=torch.float64)
    labels = torch.tensor([0, 0, 0, 1, 0, 0])
    ece, bins = calibration(probs, labels, 10)
    assert ece == pytest.approx(0.0, abs=1e-12)
    assert [b["count"] for b in bins] == [0, 0, 0, 0, 0, 0, 0, 4, 0, 2]
    assert bins[7] == {"lower": 0.7, "upper": 0.8, "confidence": 0.75, "accuracy": 0.75, "count": 4}
    assert bins[0]["accuracy"] is None and bins[0]["confidence"] is None


def test_ece_weights_each_bin_by_its_share_of_images() -> None:
    # Bin (0.5, 0.6]: 2 images at 0.6, both wrong (gap 0.6). Bin (0.9, 1.0]: 2 images at 0.9, both right (gap 0.1).
    probs = torch.tensor([[0.6, 0.4], [0.6, 0.4], [0.9, 0.1], [0.1, 0.9]], dtype=torch.float64)
    labels = torch.tensor([1, 1, 0, 1])
    ece, _ = calibration(probs, labels, 10)
    assert ece == pytest.approx(0.5 * 0.6 + 0.5 * 0.1)
    confident_and_wrong = torch.tensor([[1.0, 0.0]] * 3, dtype=torch.float64)
    assert calibration(confident_and_wrong, torch.tensor([1, 1, 1]), 15)[0] == pytest.approx(1.0)


def _metrics(top1: float, recalls: list[float]) -> dict[str, Any]:
    per_class = [{"id": i, "name": f"class {i}", "recall": r} for i, r in enumerate(recalls)]
    return {"metrics": {"top1": top1}, "per_class": per_class}


def test_the_class_rule_names_at_most_five_failing_classes_lowest_first() -> None:
    recalls = [0.9, 0.1, 0.2, 0.3, 0.4, 0.45, 0.46, 0.95]
    gate = apply_gate(_metrics(0.95, recalls), EvaluateConfig(min_class_accuracy=0.5), None)
    assert not gate["passed"] and len(gate["failures"]) == 1
    message = gate["failures"][0]
    assert message.startswith("6 of 8 classes have recall < evaluate.min_class_accuracy 0.500: 1 class 1: 0.100, ")
    assert "5 class 5: 0.450" in message and "class 6" not in message and message.endswith("and 1 more")
    rule = gate["rules"][1]
    assert (rule["rule"], rule["threshold"], rule["value"], rule["verdict"]) == ("min_class_accuracy", 0.5, 0.1, "fail")


def test_gate_messages_show_enough_decimals_to_differ() -> None:
    gate = apply_gate(_metrics(0.8996, [1.0, 1.0]), EvaluateConfig(min_accuracy=0.9), None)
    assert gate["failures"] == ["top1 0.8996 < evaluate.min_accuracy 0.9000"]
    gate = apply_gate(_metrics(0.812, [1.0, 1.0]), EvaluateConfig(min_accuracy=0.9), None)
    assert gate["failures"] == ["top1 0.812 < evaluate.min_accuracy 0.900"]
    exactly = apply_gate(_metrics(0.9, [1.0]), EvaluateConfig(min_accuracy=0.9, max_drop=0.1), {"top1": 1.0})
    assert exactly["passed"]
