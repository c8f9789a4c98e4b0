"""The monitor's verdict on a folded window of the prediction log, and the incidents it raises.

Given the window (counts, histograms and a sample, folded by the monitor stage) and the reference it is compared
with, this decides, with the thresholds of ``monitor:`` in the config:

- prediction drift: the predicted class mix against the reference's (PSI or Jensen-Shannon over the threshold, and a
  chi-square test saying it is not a small window's noise), and the mean confidence against the reference's;
- input drift: every image statistic, KS for small windows and normed Wasserstein for large ones, and PSI; the
  inputs drift when ``drift_share`` of them do, or one of them shifts by a PSI of ``psi_major`` or more;
- embedding drift: the output summaries the same way, when the reference has them;
- service health: latency p99 against ``latency_p99_ms``, the share of failed prediction requests against
  ``max_error_rate``;
- quality: live accuracy on labelled feedback, overall and per class, against the evaluation's; a drop beyond
  ``accuracy_drop`` also calls for retraining;
- canary: with more than one model version in the window, each one's share, class mix, confidence and latency, and
  whether each canary looks no worse than the main model;
- devices (``monitor --by device``): each device's records judged alone like the window (``device_stats``), so one
  device whose camera went dark stands out of a fleet whose mix hides it.

``incidents`` turns a report into the named conditions ``signpost.monitoring.alerts`` fires and resolves.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from signpost.config import MonitorConfig
from signpost.data.stats import STAT_NAMES
from signpost.monitoring.alerts import Incident
from signpost.monitoring.drift import chi_square_p, histogram, jensen_shannon, ks_test, psi, wasserstein_normed
from signpost.monitoring.result import (
    Canary,
    Devices,
    DeviceStats,
    EmbeddingDrift,
    FeatureDrift,
    Health,
    InputDrift,
    ModelStats,
    MonitorReport,
    PredictionDrift,
    Quality,
    Verdict,
    WindowChecks,
)
from signpost.serve.predlog import EMBEDDING_COLUMNS

INPUTS = (*STAT_NAMES, "width", "height")  # the image statistics the server logs per prediction
EMBEDDINGS = EMBEDDING_COLUMNS  # the model's output summary, per prediction
LATENCY_EDGES = np.logspace(-2, 5, 1401)  # 0.01 ms .. 100 s, 0.5 % wide bins: p99 to within 0.5 %


@dataclass
class Reference:
    """What the live window is compared with."""

    name: str
    class_counts: np.ndarray
    edges: dict[str, np.ndarray]  # per input feature and embedding dimension
    samples: dict[str, np.ndarray]
    confidence: np.ndarray | None  # counts over equal-width confidence bins, from the evaluation's calibration
    top1: float | None


@dataclass
class Window:
    """A window of the prediction log folded into counts, histograms and a uniform sample."""

    rows: int
    errors: int  # failed prediction requests in the window's span
    classes: np.ndarray  # predictions per class
    confidence: np.ndarray  # predictions per equal-width top-1 confidence bin, as many bins as the reference's
    mean_confidence: float | None  # None for an empty window
    latency: np.ndarray  # predictions per LATENCY_EDGES bin
    hist: dict[str, np.ndarray]  # per feature, over the reference's edges
    sample: dict[str, np.ndarray]  # per feature, a uniform sample of the window
    features: list[str]  # the logged features the reference has


@dataclass
class ModelWindow:
    """One model version's records of the window (canary mode), folded."""

    records: int
    classes: np.ndarray  # predictions per class
    confidence_sum: float
    latency: np.ndarray  # predictions per LATENCY_EDGES bin


def evaluate_window(window: Window, reference: Reference, cfg: MonitorConfig) -> MonitorReport:
    """The drift, health and quality verdicts for a folded window."""
    rows = window.rows
    if rows < cfg.min_window:
        note = f"{rows} predictions in the window; at least {cfg.min_window} are needed (monitor.min_window)"
        return MonitorReport(rows, cfg, Verdict(retrain=False, reasons=[], enough_data=False, note=note))
    class_psi = psi(reference.class_counts, window.classes)
    class_js = jensen_shannon(reference.class_counts, window.classes)
    class_p = chi_square_p(reference.class_counts, window.classes)
    # Material (PSI or JS over the threshold) and significant (not the noise of a small window).
    prediction = PredictionDrift(class_psi, class_js, class_p,
                                 drifted=(class_psi >= cfg.psi_threshold or class_js >= cfg.js_threshold)
                                 and class_p < cfg.ks_p_value,
                                 mean_confidence=window.mean_confidence)
    if reference.confidence is not None:
        edges = np.linspace(0, 1, len(reference.confidence) + 1)
        ref_mean = float((reference.confidence * (edges[:-1] + edges[1:]) / 2).sum() / reference.confidence.sum())
        shift = window.mean_confidence - ref_mean
        prediction.reference_confidence, prediction.confidence_shift = ref_mean, shift
        prediction.confidence_psi = psi(reference.confidence, window.confidence)
        prediction.drifted = prediction.drifted or abs(shift) >= cfg.confidence_shift

    def feature_drift(name: str) -> FeatureDrift:
        current, ref = window.sample[name], reference.samples[name]
        psi_value = psi(histogram(ref, reference.edges[name]), window.hist[name])
        if rows <= cfg.ks_max_window:
            statistic, p_value = ks_test(ref, current)
            method, drifted = "ks", p_value < cfg.ks_p_value
        else:
            statistic, p_value = wasserstein_normed(ref, current), None
            method, drifted = "wasserstein", statistic >= cfg.wasserstein_threshold
        return FeatureDrift(psi_value, method, statistic, drifted, reference_mean=float(ref.mean()),
                            current_mean=float(current.mean()), p_value=p_value)

    inputs = {name: feature_drift(name) for name in INPUTS if name in window.features}
    share = sum(f.drifted for f in inputs.values()) / max(len(inputs), 1)
    # Many features moving a little, or one (blur: sharpness) moving a lot.
    major = [name for name, f in inputs.items() if f.drifted and f.psi >= cfg.psi_major]
    input_drift = InputDrift(inputs, share, major, drifted=share >= cfg.drift_share or bool(major))
    embeddings = {name: feature_drift(name) for name in EMBEDDINGS if name in window.features}
    if embeddings:
        e_share = sum(f.drifted for f in embeddings.values()) / len(embeddings)
        embedding_drift = EmbeddingDrift(e_share >= cfg.drift_share, dimensions=embeddings, drifted_share=e_share)
    else:
        embedding_drift = EmbeddingDrift(False, note="not measured: no model given for the reference")
    p99 = _quantile(window.latency, 0.99)
    error_rate = window.errors / (window.errors + rows)
    health = Health(latency_p99_ms=p99, latency_p50_ms=_quantile(window.latency, 0.5), slo_ms=cfg.latency_p99_ms,
                    latency_breached=p99 > cfg.latency_p99_ms, errors=window.errors, error_rate=error_rate,
                    max_error_rate=cfg.max_error_rate, errors_breached=error_rate > cfg.max_error_rate)
    reasons = [name for name, drifted in (("prediction drift", prediction.drifted),
                                          ("input drift", input_drift.drifted),
                                          ("embedding drift", embedding_drift.drifted)) if drifted]
    return MonitorReport(rows, cfg, Verdict(retrain=bool(reasons), reasons=reasons, enough_data=True),
                         checks=WindowChecks(prediction, input_drift, embedding_drift, health))


def feedback_quality(labels: np.ndarray, predicted: np.ndarray, *, batches: list[str], trained_on: int,
                     baseline: float | None, cfg: MonitorConfig) -> Quality:
    """Live accuracy of the model's ``predicted`` classes on labelled feedback, overall and per class, against the
    evaluation's top-1 (``baseline``); it dropped when lower by more than ``monitor.accuracy_drop``."""
    correct = predicted == labels
    per_class = {int(c): float(correct[labels == c].mean()) for c in np.unique(labels)}
    accuracy = float(correct.mean())
    return Quality(images=len(labels), trained_on=trained_on, batches=batches, accuracy=accuracy,
                   per_class=per_class, baseline=baseline,
                   dropped=baseline is not None and baseline - accuracy > cfg.accuracy_drop)


def compare_models(windows: dict[str, ModelWindow], total: int, cfg: MonitorConfig) -> Canary:
    """Per model version of the window (canary mode): records, share of the ``total``, class mix against the main
    model's (the version with most records), mean confidence and latency; a canary looks worse when its mean
    confidence is lower by ``monitor.confidence_shift`` or more, or its p99 latency breaks the SLO while the main
    model's does not."""
    stats = {version: ModelStats(w.records, w.records / total, w.confidence_sum / max(w.records, 1),
                                 _quantile(w.latency, 0.5), _quantile(w.latency, 0.99), role="canary")
             for version, w in windows.items()}
    main = max(stats, key=lambda v: stats[v].records)
    stats[main].role = "main"
    theirs = stats[main]
    for version, ours in stats.items():
        if version == main:
            continue
        ours.class_psi_vs_main = psi(windows[main].classes, windows[version].classes)
        ours.confidence_vs_main = ours.mean_confidence - theirs.mean_confidence
        worse = []
        if ours.confidence_vs_main <= -cfg.confidence_shift:
            worse.append(f"mean confidence {ours.confidence_vs_main:+.3f} against the main model")
        if ours.latency_p99_ms > cfg.latency_p99_ms >= theirs.latency_p99_ms:
            worse.append(f"p99 latency {ours.latency_p99_ms:.1f} ms over the {cfg.latency_p99_ms:.0f} ms SLO")
        ours.worse = worse
        ours.verdict = "worse: " + "; ".join(worse) if worse else "no worse than the main model"
    return Canary(main, stats)


def device_stats(report: MonitorReport) -> DeviceStats:
    """A device's (or the fleet's) window, as ``evaluate_window`` judged it, in one row of the by-device table."""
    checks = report.checks
    if checks is None or not report.verdict.enough_data:
        note = (f"too few records to judge: {report.rows} in the window, at least {report.settings.min_window} are "
                "needed (monitor.min_window)")
        return DeviceStats(report.rows, False, [], [], None, None, None, None, False, note=note)
    p, i, h = checks.prediction_drift, checks.input_drift, checks.health
    drift = [name for name, drifted in (("prediction drift", p.drifted), ("input drift", i.drifted),
                                        ("embedding drift", checks.embedding_drift.drifted)) if drifted]
    return DeviceStats(report.rows, True, drift,
                       [name for name, f in i.features.items() if f.drifted], p.mean_confidence, p.confidence_shift,
                       h.latency_p50_ms, h.latency_p99_ms, h.latency_breached)


def incidents(report: MonitorReport) -> list[Incident]:
    """The report's active incidents, by the names the alert state keeps between runs."""
    found = []
    q = report.quality
    if q.dropped:
        found.append(Incident("accuracy", f"live accuracy {q.accuracy:.3f} on {q.images} labelled feedback images, "
                              f"against {q.baseline:.3f} at evaluation", q.to_dict()))
    if report.checks is None or not report.verdict.enough_data:
        return found
    p = report.checks.prediction_drift
    if p.drifted:
        found.append(Incident("prediction-drift", f"class PSI {p.class_psi:.3f}, JS {p.class_js:.3f}, "
                              f"mean confidence {p.mean_confidence:.3f}", p.to_dict()))
    i = report.checks.input_drift
    if i.drifted:
        names = [n for n, f in i.features.items() if f.drifted]
        found.append(Incident("input-drift", f"{len(names)} of {len(i.features)} image statistics drifted: "
                              f"{', '.join(names)}", {"features": names}))
    e = report.checks.embedding_drift
    if e.drifted:
        found.append(Incident("embedding-drift", f"{e.drifted_share:.0%} of the output summaries drifted", {}))
    h = report.checks.health
    if h.latency_breached:
        found.append(Incident("latency", f"p99 {h.latency_p99_ms:.1f} ms over the {h.slo_ms:.0f} ms SLO",
                              h.to_dict()))
    if h.errors_breached:
        found.append(Incident("errors", f"{h.error_rate:.1%} of prediction requests failed ({h.errors}); "
                              f"the limit is {h.max_error_rate:.1%}", h.to_dict()))
    if report.devices is not None and report.devices.drifted:
        found.append(_device_incident(report.devices))
    return found


def _device_incident(devices: Devices) -> Incident:
    named = "; ".join(f"{name}: {', '.join(devices.devices[name].drift)}" for name in devices.drifted)
    return Incident("device-drift", f"{len(devices.drifted)} of {len(devices.devices)} devices drifted ({named})",
                    {"devices": devices.drifted})


def _quantile(counts: np.ndarray, q: float) -> float:
    """The ``q`` quantile of a latency histogram over LATENCY_EDGES, as its bin's upper edge (ms)."""
    total = counts.sum()
    if total == 0:
        return 0.0
    i = int(np.searchsorted(np.cumsum(counts), q * total))
    return float(LATENCY_EDGES[min(i + 1, len(LATENCY_EDGES) - 1)])
