"""The champion / challenger decision: the deciding score, the margin, ties and the test-split guard."""

from __future__ import annotations

import pytest

from signpost.config import EvaluateConfig
from signpost.contracts import EvaluationReport
from signpost.stages.promote import decide


def _report(test: float, feedback: float | None = None, data: str = "d1") -> EvaluationReport:
    """An evaluation report with test top-1 ``test`` (and feedback top-1 ``feedback``) on data ``data``; the rest
    is what the decision does not read."""
    report = {"data": {"path": data, "key": data, "split": "test", "images": 100}, "metrics": {"top1": test},
              "feedback": None}
    if feedback is not None:
        report["feedback"] = {"top1": feedback, "images": 50, "per_class": {}}
    unread = {"model": {"path": "m", "key": "m", "architecture": "signnet", "data_key": data}, "image_size": 32,
              "class_names": [], "warnings": [], "champion": None, "champion_skipped": None, "per_class": [],
              "worst_classes": [], "confused_pairs": [], "confusion_matrix": [],
              "calibration": {"num_bins": 10, "ece": 0.0, "bins": []},
              "gate": {"passed": True, "failures": [], "rules": []}}
    return EvaluationReport.model_validate(unread | report)


def test_feedback_decides_when_the_data_has_it() -> None:
    decision = decide(EvaluateConfig(promote_margin=0.02), _report(0.95, 0.90), _report(0.95, 0.70))
    assert decision.promoted and decision.deciding == "feedback"
    assert "feedback top-1 0.9000 vs the champion's 0.7000 (+0.2000)" in decision.reason
    assert decision.scores == {"challenger": {"test": 0.95, "feedback": 0.90},
                               "champion": {"test": 0.95, "feedback": 0.70}}


def test_a_lead_below_the_margin_or_a_tie_keeps_the_champion() -> None:
    settings = EvaluateConfig(promote_margin=0.05)
    short = decide(settings, _report(0.95, 0.74), _report(0.95, 0.70))
    assert not short.promoted and "at least evaluate.promote_margin 0.05" in short.reason
    tie = decide(EvaluateConfig(promote_margin=0.0), _report(0.95, 0.70), _report(0.95, 0.70))
    assert not tie.promoted and "more than 0" in tie.reason
    assert decide(EvaluateConfig(promote_margin=0.04), _report(0.95, 0.74), _report(0.95, 0.70)).promoted  # exactly


def test_a_challenger_that_loses_on_the_test_split_is_not_promoted_whatever_the_feedback() -> None:
    decision = decide(EvaluateConfig(max_drop=0.01), _report(0.90, 0.99), _report(0.95, 0.50))
    assert not decision.promoted and decision.deciding == "test"
    assert "more than evaluate.max_drop 0.01 below the champion's 0.9500" in decision.reason


def test_without_feedback_the_test_split_decides() -> None:
    assert decide(EvaluateConfig(), _report(0.96), _report(0.95)).deciding == "test"
    assert decide(EvaluateConfig(), _report(0.96), _report(0.95)).promoted
    assert not decide(EvaluateConfig(), _report(0.95), _report(0.96)).promoted


def test_reports_of_different_data_cannot_be_compared() -> None:
    with pytest.raises(ValueError, match="same data"):
        decide(EvaluateConfig(), _report(0.9, data="a"), _report(0.8, data="b"))
