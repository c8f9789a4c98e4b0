"""The monitor's verdict on a folded window, and the shape of the result.json written from its typed result."""

from __future__ import annotations

import numpy as np

from signpost.config import MonitorConfig
from signpost.monitoring.drift import histogram
from signpost.monitoring.verdict import (
    LATENCY_EDGES,
    ModelWindow,
    Reference,
    Window,
    compare_models,
    evaluate_window,
    incidents,
)


def _reference(rng: np.random.Generator) -> Reference:
    samples = {"brightness": rng.normal(0.5, 0.1, 4000), "width": rng.normal(60.0, 10.0, 4000)}
    edges = {name: np.histogram_bin_edges(v, bins=20) for name, v in samples.items()}
    return Reference("ref", np.full(4, 100.0), edges, samples, confidence=None, top1=None)


def _window(reference: Reference, rows: int, rng: np.random.Generator, *, latency_ms: float = 5.0,
            shift: float = 0.0) -> Window:
    """``rows`` predictions drawn like the reference (the brightness moved by ``shift``)."""
    sample = {name: rng.choice(values, rows) for name, values in reference.samples.items()}
    sample["brightness"] = sample["brightness"] + shift
    return Window(rows=rows, errors=0, classes=np.full(4, rows / 4), confidence=np.histogram(
        np.full(rows, 0.9), bins=10, range=(0, 1))[0], mean_confidence=0.9,
        latency=histogram(np.full(rows, latency_ms), LATENCY_EDGES),
        hist={name: histogram(v, reference.edges[name]) for name, v in sample.items()}, sample=sample,
        features=list(sample))


def test_too_small_a_window_is_not_judged() -> None:
    rng = np.random.default_rng(0)
    reference = _reference(rng)
    report = evaluate_window(_window(reference, 50, rng), reference, MonitorConfig())
    assert report.checks is None and not report.retrain and "at least 200" in (report.verdict.note or "")
    assert list(report.to_dict()) == ["window", "settings", "verdict", "quality", "models", "log", "experiment",
                                      "reference"]  # no checks, no alerts (none asked for)
    assert incidents(report) == []


def test_ks_and_wasserstein_rows_and_a_latency_incident() -> None:
    rng = np.random.default_rng(0)
    reference = _reference(rng)
    cfg = MonitorConfig()
    small = evaluate_window(_window(reference, 600, rng), reference, cfg).to_dict()
    assert not small["verdict"]["retrain"] and small["health"]["breached"] is False
    assert all(f["method"] == "ks" and "p_value" in f for f in small["input_drift"]["features"].values())
    assert list(small)[:7] == ["window", "settings", "prediction_drift", "input_drift", "embedding_drift",
                               "health", "verdict"]
    assert "reference_confidence" not in small["prediction_drift"]  # the reference has no confidence histogram
    slow = evaluate_window(_window(reference, 3000, rng, latency_ms=80.0, shift=0.3), reference, cfg)
    features = slow.to_dict()["input_drift"]["features"]
    assert all(f["method"] == "wasserstein" and "p_value" not in f for f in features.values())
    assert slow.retrain and slow.verdict.reasons == ["input drift"]
    assert [i.kind for i in incidents(slow)] == ["input-drift", "latency"]
    assert incidents(slow)[1].details["breached"]


def test_a_canary_with_lower_confidence_looks_worse() -> None:
    latency = histogram(np.full(100, 5.0), LATENCY_EDGES)
    windows = {"main": ModelWindow(300, np.array([100.0, 100, 100]), 0.9 * 300, latency * 3),
               "new": ModelWindow(100, np.array([30.0, 40, 30]), 0.6 * 100, latency)}
    canary = compare_models(windows, 400, MonitorConfig())
    assert canary.main == "main" and canary.versions["new"].share == 0.25
    assert canary.versions["new"].verdict.startswith("worse: mean confidence -0.300")
    versions = canary.to_dict()["versions"]
    assert "verdict" not in versions["main"] and versions["new"]["role"] == "canary"
