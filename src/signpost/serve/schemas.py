"""What the service's routes answer, as pydantic models (these make the OpenAPI docs too)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field


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
