"""The prediction record, typed: what the server logs per answered image, and what a device ships to the server's
ingest route (``POST /v1/predictions/ingest``) in batches.

A device agent imports this module to build its batches: it needs pydantic and PyYAML only (no FastAPI, SQLAlchemy
or torch), and the server validates what arrives against the same models. A record is one row of the prediction log
(``signpost.serve.predlog``) less what the server adds itself: the row id, the experiment (the server's config
name) and the device id (the batch's, checked against the device's key).
"""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, Strict

from signpost.config import DEVICE_ID_PATTERN

# A device id (config.DEVICE_ID_PATTERN) and a batch id fit the log's columns and never need quoting: no separators,
# no ':', '%' or '?' that a SQL driver would take for a parameter. "" is no device's: it is the server's own rows.
BATCH_ID_PATTERN = DEVICE_ID_PATTERN


class PredictionRecord(BaseModel):
    """One answered image, as the log stores it. Numbers must be finite; ``top_k`` is ``[[class_id, probability],
    ...]``, most probable first. The image statistics (``brightness`` .. ``saturation``, 0..1, by
    ``signpost.data.stats.image_stats`` on the preprocessed pixels) and the output summary (``emb0`` .. ``emb7``,
    by ``signpost.data.stats.embedding_summary`` of the logits) are computed on the device the server's way."""

    # strict: a class id of "3" or 3.5, a width of true, is refused rather than guessed at.
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    ts: float = Field(gt=0, description="Unix time of the answer, seconds")
    request_id: str = Field(min_length=1, max_length=36, description="unique per answer, e.g. a UUID")
    model_version: str = Field(min_length=1, max_length=200, description="the model that answered")
    data_key: str = Field("", max_length=100, description="the model card's data_key; '' when not known")
    model_key: str = Field("", max_length=100, description="the model artifact's manifest key; '' when not known")
    class_id: int = Field(ge=0)
    class_name: str = Field(max_length=200)
    confidence: float = Field(ge=0.0, le=1.0, description="softmax probability of the predicted class")
    entropy: float = Field(ge=0.0, description="of the class distribution, nats")
    # Strict(False): a JSON pair (a list) becomes the tuple; its class id and probability are still checked strictly.
    top_k: list[Annotated[tuple[int, float], Strict(False)]] = Field(
        max_length=1000, description="[[class_id, probability], ...], most probable first")
    latency_ms: float = Field(ge=0.0, description="from the image received to the answer, ms")
    width: int = Field(ge=1, description="of the image as received, pixels")
    height: int = Field(ge=1)
    orientation: int = Field(1, ge=1, le=8, description="the EXIF orientation the image was turned upright by")
    # The image statistics (signpost.data.stats.STAT_NAMES, in that order).
    brightness: float
    contrast: float
    sharpness: float
    red: float
    green: float
    blue: float
    saturation: float
    # The output summary (signpost.data.stats.EMBEDDING_DIMS of them).
    emb0: float
    emb1: float
    emb2: float
    emb3: float
    emb4: float
    emb5: float
    emb6: float
    emb7: float


class IngestBatch(BaseModel):
    """The body of ``POST /v1/predictions/ingest``: a batch of one device's records. ``batch_id`` is the device's
    own and unique per batch: a batch sent again under the same id (a retry after a timeout) is stored once."""

    model_config = ConfigDict(extra="forbid")

    device_id: str = Field(pattern=DEVICE_ID_PATTERN, description="the device whose API key signs the request")
    batch_id: str = Field(pattern=BATCH_ID_PATTERN, description="unique per batch of this device, e.g. a UUID")
    records: list[PredictionRecord]
    # Never silent: a device whose local buffer overflowed (its server away too long) says how many it lost.
    dropped: int = Field(0, ge=0, description="records this device has dropped past its local buffer bound, all told, "
                         "when it formed this batch")

