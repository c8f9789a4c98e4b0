"""The monitor's result, typed: one dataclass per section of ``result.json``.

The CLI and ``simulate`` read the sections by field; ``MonitorReport.to_dict`` writes ``result.json`` from them. A
key that does not apply is left out rather than written as null (a p-value under Wasserstein, the comparisons of a
main model, the scores when no feedback was scored), and keys keep one order: the file's readers (people, CI jobs,
tests) see one stable shape.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from signpost.config import MonitorConfig, config_to_dict


@dataclass
class FeatureDrift:
    """One image statistic, or one output-summary dimension, of the window against the reference."""

    psi: float
    method: str  # "ks" for small windows, "wasserstein" for large ones (monitor.ks_max_window)
    statistic: float
    drifted: bool
    reference_mean: float
    current_mean: float
    p_value: float | None = None  # KS only: Wasserstein has none

    def to_dict(self) -> dict[str, Any]:
        entry: dict[str, Any] = {"psi": self.psi, "method": self.method, "statistic": self.statistic}
        if self.p_value is not None:
            entry["p_value"] = self.p_value
        return entry | {"drifted": self.drifted, "reference_mean": self.reference_mean,
                        "current_mean": self.current_mean}


@dataclass
class PredictionDrift:
    """The predicted class mix and the mean top-1 confidence against the reference's."""

    class_psi: float
    class_js: float
    class_p_value: float  # chi-square: is the class mix's change more than a small window's noise
    drifted: bool
    mean_confidence: float | None
    # The three below only when the reference has a confidence histogram (an evaluation or a model gave one).
    reference_confidence: float | None = None
    confidence_shift: float | None = None
    confidence_psi: float | None = None

    def to_dict(self) -> dict[str, Any]:
        entry: dict[str, Any] = {"class_psi": self.class_psi, "class_js": self.class_js,
                                 "class_p_value": self.class_p_value, "drifted": self.drifted,
                                 "mean_confidence": self.mean_confidence}
        if self.reference_confidence is not None:
            entry |= {"reference_confidence": self.reference_confidence, "confidence_shift": self.confidence_shift,
                      "confidence_psi": self.confidence_psi}
        return entry


@dataclass
class InputDrift:
    """Every image statistic the server logs, and whether the inputs drifted as a whole."""

    features: dict[str, FeatureDrift]
    drifted_share: float
    major: list[str]  # drifted with a PSI of monitor.psi_major or more
    drifted: bool

    def to_dict(self) -> dict[str, Any]:
        return {"features": {name: f.to_dict() for name, f in self.features.items()},
                "drifted_share": self.drifted_share, "major": list(self.major), "drifted": self.drifted}


@dataclass
class EmbeddingDrift:
    """The logged output summaries against the model's own on the reference images; ``note`` when not measured."""

    drifted: bool
    dimensions: dict[str, FeatureDrift] | None = None
    drifted_share: float | None = None
    note: str | None = None

    def to_dict(self) -> dict[str, Any]:
        if self.dimensions is None:
            return {"drifted": self.drifted, "note": self.note}
        return {"dimensions": {name: f.to_dict() for name, f in self.dimensions.items()},
                "drifted_share": self.drifted_share, "drifted": self.drifted}


@dataclass
class Health:
    """Service health over the window: latency against its SLO, failed prediction requests against their limit."""

    latency_p99_ms: float
    latency_p50_ms: float
    slo_ms: float
    latency_breached: bool
    errors: int  # prediction requests answered with an error in the window's span
    error_rate: float  # of all prediction requests
    max_error_rate: float
    errors_breached: bool

    @property
    def breached(self) -> bool:
        return self.latency_breached or self.errors_breached

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self) | {"breached": self.breached}


@dataclass
class WindowChecks:
    """The checks of a window big enough to judge (``monitor.min_window`` predictions or more)."""

    prediction_drift: PredictionDrift
    input_drift: InputDrift
    embedding_drift: EmbeddingDrift
    health: Health

    def to_dict(self) -> dict[str, Any]:
        return {"prediction_drift": self.prediction_drift.to_dict(), "input_drift": self.input_drift.to_dict(),
                "embedding_drift": self.embedding_drift.to_dict(), "health": self.health.to_dict()}


@dataclass
class Verdict:
    """Whether the model should be retrained, and why; ``note`` says why not judged when the window is too small."""

    retrain: bool
    reasons: list[str]
    enough_data: bool
    note: str | None = None

    def to_dict(self) -> dict[str, Any]:
        entry: dict[str, Any] = {"retrain": self.retrain, "reasons": list(self.reasons),
                                 "enough_data": self.enough_data}
        return entry if self.note is None else entry | {"note": self.note}


@dataclass
class Quality:
    """Live accuracy on labelled feedback against the evaluation's; only ``note`` when nothing could be scored."""

    note: str | None = None
    images: int = 0
    trained_on: int = 0  # feedback images left out: the model was trained on them
    batches: list[str] = dataclasses.field(default_factory=list)
    accuracy: float | None = None
    per_class: dict[int, float] = dataclasses.field(default_factory=dict)
    baseline: float | None = None  # the evaluation's top-1, when an evaluation was given
    dropped: bool = False  # by more than monitor.accuracy_drop

    def to_dict(self) -> dict[str, Any]:
        if self.accuracy is None:
            return {"note": self.note}
        return {"images": self.images, "trained_on": self.trained_on, "batches": list(self.batches),
                "accuracy": self.accuracy, "per_class": dict(self.per_class), "baseline": self.baseline,
                "dropped": self.dropped}


@dataclass
class ModelStats:
    """One model version's part of the window (canary mode); the comparisons only for a canary."""

    records: int
    share: float
    mean_confidence: float
    latency_p50_ms: float
    latency_p99_ms: float
    role: str  # "main" (the version with most records) or "canary"
    class_psi_vs_main: float | None = None
    confidence_vs_main: float | None = None
    worse: list[str] | None = None
    verdict: str | None = None

    def to_dict(self) -> dict[str, Any]:
        entry: dict[str, Any] = {"records": self.records, "share": self.share,
                                 "mean_confidence": self.mean_confidence, "latency_p50_ms": self.latency_p50_ms,
                                 "latency_p99_ms": self.latency_p99_ms, "role": self.role}
        if self.role == "canary":
            entry |= {"class_psi_vs_main": self.class_psi_vs_main, "confidence_vs_main": self.confidence_vs_main,
                      "worse": list(self.worse or []), "verdict": self.verdict}
        return entry


@dataclass
class Canary:
    """Every model version in the window, when it holds more than one."""

    main: str
    versions: dict[str, ModelStats]

    def to_dict(self) -> dict[str, Any]:
        return {"main": self.main, "versions": {version: m.to_dict() for version, m in self.versions.items()}}


@dataclass
class DeviceStats:
    """One device's records of the window judged alone against the reference (``monitor --by device``), or the
    whole fleet's; ``note`` says why not judged when it has too few records (``monitor.min_window``)."""

    records: int
    enough_data: bool
    drift: list[str]  # what drifted: "prediction drift", "input drift", "embedding drift"
    drifted_inputs: list[str]  # the image statistics that drifted
    mean_confidence: float | None
    confidence_shift: float | None  # against the reference's mean confidence, when it has one
    latency_p50_ms: float | None
    latency_p99_ms: float | None
    latency_breached: bool
    note: str | None = None

    @property
    def drifted(self) -> bool:
        return bool(self.drift)

    def to_dict(self) -> dict[str, Any]:
        entry = dataclasses.asdict(self) | {"drifted": self.drifted}
        return entry if self.note is not None else {k: v for k, v in entry.items() if k != "note"}


@dataclass
class Devices:
    """The window by device (``monitor --by device``): the fleet as a whole and each device alone. The server's own
    records (device id "") are listed as ``SERVER``."""

    fleet: DeviceStats
    devices: dict[str, DeviceStats]

    @property
    def drifted(self) -> list[str]:
        return [name for name, d in self.devices.items() if d.drifted]

    def to_dict(self) -> dict[str, Any]:
        return {"fleet": self.fleet.to_dict(), "devices": {name: d.to_dict() for name, d in self.devices.items()},
                "drifted": self.drifted}


SERVER = "(server)"  # how the by-device result names the server's own records; no device id can be this


@dataclass
class Skipped:
    """The log's records of the window that the monitor passed over: other experiments', or unnamed ones."""

    name: str  # the monitored experiment
    skipped: dict[str, int]  # records per other experiment
    skipped_total: int
    note: str

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class AlertSent:
    """One alert message sent (or failed) to one sink, as ``AlertManager.update`` records it."""

    sink: str
    status: str  # "firing" or "resolved"
    incident: str
    ok: bool
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        entry: dict[str, Any] = {"sink": self.sink, "status": self.status, "incident": self.incident, "ok": self.ok}
        return entry if self.error is None else entry | {"error": self.error}


@dataclass
class MonitorReport:
    """What one monitor run found: the content of its ``result.json``.

    ``evaluate_window`` fills the window's part; the stage adds the feedback quality, the canary comparison, the
    log, the experiment's skipped records, the reference's name, the window by device and the alerts sent.
    """

    rows: int  # predictions in the window
    settings: MonitorConfig
    verdict: Verdict
    checks: WindowChecks | None = None  # None: too few predictions to judge
    quality: Quality = dataclasses.field(default_factory=Quality)
    models: Canary | None = None  # None: one model version in the window
    log: str = ""  # the prediction log's URL, password redacted
    experiment: Skipped | None = None
    reference: str = ""  # what the window was compared with
    alerts: list[AlertSent] | None = None  # None: run without alerts
    devices: Devices | None = None  # None: not asked for (monitor --by device)

    @property
    def retrain(self) -> bool:
        return bool(self.verdict.retrain)

    def to_dict(self) -> dict[str, Any]:
        """The ``result.json`` content, in its order."""
        result: dict[str, Any] = {"window": {"rows": self.rows}, "settings": config_to_dict(self.settings)}
        if self.checks is not None:
            result |= self.checks.to_dict()
        result |= {"verdict": self.verdict.to_dict(), "quality": self.quality.to_dict(),
                   "models": None if self.models is None else self.models.to_dict(), "log": self.log,
                   "experiment": None if self.experiment is None else self.experiment.to_dict(),
                   "reference": self.reference}
        if self.devices is not None:
            result["devices"] = self.devices.to_dict()
        if self.alerts is not None:
            result["alerts"] = [alert.to_dict() for alert in self.alerts]
        return result
