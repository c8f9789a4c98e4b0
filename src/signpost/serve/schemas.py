"""What the service's routes answer, as pydantic models (these make the OpenAPI docs too)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

# The ingest route's body: the record shape the server logs, kept beside the log (importable without FastAPI, for
# a device agent) and named here with the service's other schemas.
from signpost.monitoring.records import IngestBatch as IngestBatch
from signpost.monitoring.records import PredictionRecord as PredictionRecord


class ClassScore(BaseModel):
    class_id: int
    class_name: str
    confidence: float = Field(description="softmax probability, 0..1")


class Prediction(BaseModel):
    class_id: int
    class_name: str
    confidence: float = Field(description="softmax probability of the predicted class, 0..1")
    top_k: list[ClassScore] = Field(description="the most probable classes, most probable first")
    model_version: str
    latency_ms: float = Field(description="server-side, from the body received to the answer, ms")
    request_id: str


class BatchPrediction(BaseModel):
    predictions: list[Prediction] = Field(description="one per image, in the order they were sent")
    model_version: str
    latency_ms: float
    request_id: str


class ErrorDetail(BaseModel):
    code: str = Field(description="machine-readable, e.g. payload_too_large, unsupported_media_type")
    message: str = Field(description="what was wrong and what to change")


class ErrorResponse(BaseModel):
    error: ErrorDetail


class Health(BaseModel):
    status: str


class Readiness(BaseModel):
    ready: bool
    model_version: str | None = None
    canary_version: str | None = None
    detail: str = ""


class ReloadRequest(BaseModel):
    """Which model to switch to: a path or ``models:/name@alias`` (``model``), or a registry alias (``alias``)."""

    model: str | None = None
    alias: str | None = Field(None, pattern=r"^[A-Za-z0-9_.-]+$")
    runtime: str = "auto"


class ReloadResponse(BaseModel):
    model_version: str
    previous_version: str | None
    load_seconds: float


class ModelInfo(BaseModel):
    version: str
    origin: str
    artifact: str
    runtime: str
    form: str
    small_batches: dict[str, Any] | None = None  # the runtime that runs small batches, when the bench chose one
    loaded_at: float
    card: dict[str, Any]
    canary: dict[str, Any] | None = None  # canary mode: the second model's facts and its share of the requests


class IngestResponse(BaseModel):
    """What ``POST /v1/predictions/ingest`` answers. Its body is ``signpost.monitoring.records.IngestBatch`` (of
    ``PredictionRecord``s), a module a device agent imports without FastAPI."""

    stored: int = Field(description="records stored from this batch; 0 for a batch sent before")
    duplicate: bool = Field(False, description="present, true, when the device sent this batch id before: nothing "
                            "was stored again")
