"""The inference service: an app factory, its routes, and the errors they can answer.

``create_app(config, model)`` returns a FastAPI app. On start-up it opens the prediction log and loads the model in
a background thread: ``/healthz`` answers at once, ``/readyz`` and the prediction routes only once the model is
loaded and warmed up. Every error a client can cause is a 4xx with a JSON body ``{"error": {"code", "message"}}``;
anything else is a 500 with the same shape and no traceback (the traceback goes to the server's log).

Canary mode (``canary=`` a second model): each prediction request goes to the canary with probability
``serve.canary_share``, else to the main model, each with its own batcher; answers and log records name the model
version that made them, so ``signpost monitor`` compares the two on live traffic.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import hmac
import itertools
import logging
import os
import random
import re
import secrets
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from dataclasses import dataclass, field
from pathlib import PurePath
from typing import Any

import numpy as np
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from signpost import __version__
from signpost.config import ConfigError, SignpostConfig
from signpost.serve import predlog, uploads
from signpost.serve.batching import Batcher, QueueFull
from signpost.serve.model import REGISTRY_SCHEME, ModelSource, Outputs, ServedModel, load, resolve
from signpost.serve.schemas import (
    BatchPrediction,
    ErrorResponse,
    Health,
    ModelInfo,
    Prediction,
    Readiness,
    ReloadRequest,
    ReloadResponse,
)

log = logging.getLogger(__name__)

API_KEY_ENV = "SIGNPOST_API_KEY"  # when set, prediction routes need it (X-API-Key or Authorization: Bearer)
ADMIN_KEY_ENV = "SIGNPOST_ADMIN_KEY"  # when set, the admin routes exist behind it; unset, they answer 403
RAW_TYPES = ("image/", "application/octet-stream")
RETRY_AFTER_S = 1
_ERRORS = {400: {"model": ErrorResponse}, 401: {"model": ErrorResponse}, 413: {"model": ErrorResponse},
           415: {"model": ErrorResponse}, 503: {"model": ErrorResponse}, 504: {"model": ErrorResponse}}


class ApiError(Exception):
    """An error to answer with ``status`` and a JSON body naming the problem."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers


class ClientAborted(Exception):
    """The client closed its connection before its request was read whole: nothing to answer, not a server error."""

    def __init__(self, received: int) -> None:
        super().__init__(f"closed the connection after {received:,} bytes of the body")
        self.received = received  # bytes of the body that had arrived


@dataclass
class Metrics:
    """The service's Prometheus metrics, in a registry of its own (one per app)."""

    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        r = self.registry
        self.requests = Counter("signpost_requests", "HTTP requests by route and status", ["route", "method", "status"],
                                registry=r)
        self.latency = Histogram("signpost_request_duration_seconds", "HTTP request latency by route", ["route"],
                                 buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10),
                                 registry=r)
        self.batch_size = Histogram("signpost_batch_size", "images per forward pass",
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024), registry=r)
        self.predictions = Counter("signpost_predictions", "images classified", ["model_version"], registry=r)
        self.queue_depth = Gauge("signpost_queue_depth", "images waiting for a forward pass", registry=r)
        self.log_pending = Gauge("signpost_prediction_log_pending", "records not yet written", registry=r)
        self.log_dropped = Gauge("signpost_prediction_log_dropped", "records the log could not keep", registry=r)
        self.model_info = Gauge("signpost_model_info", "the models being served (value 1); role main or canary",
                                ["model_version", "runtime", "role"], registry=r)
        # Clients, not server errors: each is also in signpost_requests (an abort as status 499, as nginx logs it).
        self.client_aborts = Counter("signpost_client_aborts", "requests whose client closed the connection before "
                                     "sending the whole body", ["route"], registry=r)
        self.slow_clients = Counter("signpost_slow_clients", "connections cut off for a client too slow or too big: "
                                    "idle, header_timeout, header_too_large, body_timeout", ["reason"], registry=r)


@dataclass
class ServerState:
    config: SignpostConfig
    source: ModelSource
    api_key: str | None
    admin_key: str | None
    metrics: Metrics = field(default_factory=Metrics)
    model: ServedModel | None = None
    load_error: str | None = None
    batcher: Batcher | None = None
    log: predlog.PredictionLog | None = None
    reload_lock: threading.Lock = field(default_factory=threading.Lock)
    canary_source: ModelSource | None = None  # canary mode: a second model taking canary_share of the requests
    canary: ServedModel | None = None
    canary_batcher: Batcher | None = None
    canary_share: float = 0.0
    router: random.Random = field(default_factory=random.Random)
    decode_pool: uploads.DecodePool | None = None  # decodes large uploads apart from inference (signpost.serve.uploads)

    def set_model(self, model: ServedModel) -> None:
        self.model = model  # one reference swap: a batch in flight finishes on the model it started with
        self._show_models()

    def set_canary(self, model: ServedModel) -> None:
        self.canary = model
        self._show_models()

    def ready(self) -> bool:
        return self.model is not None and (self.canary_source is None or self.canary is not None)

    def _show_models(self) -> None:
        self.metrics.model_info.clear()
        for role, model in (("main", self.model), ("canary", self.canary)):
            if model is not None:
                self.metrics.model_info.labels(model.version, model.predictor.runtime, role).set(1)


def create_app(
    config: SignpostConfig,
    model: str,
    *,
    runtime: str | None = None,
    api_key: str | None = None,
    admin_key: str | None = None,
    canary: str | None = None,
) -> FastAPI:
    """The service for ``model`` (a path or ``models:/name@alias``) with ``config.serve``'s settings.

    ``api_key`` / ``admin_key`` default to the ``SIGNPOST_API_KEY`` / ``SIGNPOST_ADMIN_KEY`` environment variables.
    ``canary``: a second model (same forms as ``model``) that answers ``serve.canary_share`` of the requests.
    """
    source = resolve(model, config, runtime or config.serve.runtime)
    state = ServerState(config, source, api_key or os.environ.get(API_KEY_ENV) or None,
                        admin_key or os.environ.get(ADMIN_KEY_ENV) or None)
    if config.serve.protect_metrics and state.api_key is None:
        raise ConfigError(f"serve.protect_metrics puts /metrics and /docs behind the API key, but none is set: set "
                          f"{API_KEY_ENV}, or serve.protect_metrics=false")
    if canary is not None:
        state.canary_source = resolve(canary, config, runtime or config.serve.runtime)
        state.canary_share = config.serve.canary_share
        if state.canary_source.folder == source.folder:
            raise ValueError(f"the canary {canary} is the same model as {model}: nothing to compare")

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        cfg = config.serve
        # Every record names this config as its experiment: servers of other experiments may share the log.
        state.log = predlog.PredictionLog(cfg.prediction_log or predlog.default_url(config.workdir),
                                          batch_size=cfg.log_batch_size, interval_s=cfg.log_interval_s,
                                          experiment=config.name)
        if cfg.batching:
            lanes = [("batcher", lambda: state.model)] + ([("canary_batcher", lambda: state.canary)]
                                                           if state.canary_source else [])
            for attribute, current in lanes:
                batcher = Batcher(_processor(state, current), max_batch=cfg.max_batch_size,
                                  max_wait_s=cfg.max_wait_ms / 1000, max_queue=cfg.max_queue,
                                  on_batch=state.metrics.batch_size.observe)
                batcher.start()
                setattr(state, attribute, batcher)
        state.decode_pool = uploads.DecodePool(cfg.decode_workers, cfg.max_decode_queue)
        loader = asyncio.get_running_loop().create_task(asyncio.to_thread(_initial_load, state))
        try:
            yield
        finally:
            loader.cancel()
            for batcher in (state.batcher, state.canary_batcher):
                if batcher is not None:
                    await batcher.stop()
            state.decode_pool.close()
            state.log.close()

    # serve.protect_metrics: FastAPI's own docs routes are open to all; _add_routes adds them behind the API key.
    docs = {"docs_url": None, "redoc_url": None, "openapi_url": None} if config.serve.protect_metrics else {}
    app = FastAPI(title="Signpost inference service", version=__version__, lifespan=lifespan,
                  description="Traffic-sign classification: predict, health, readiness, metrics and the model card.",
                  **docs)
    app.state.signpost = state
    app.add_middleware(_MetricsMiddleware, metrics=state.metrics)
    _add_error_handlers(app)
    _add_routes(app, state)
    return app


def _initial_load(state: ServerState) -> None:
    try:
        state.set_model(load(state.source, threads=state.config.serve.threads,
                             max_batch=state.config.serve.max_batch_size))
        if state.canary_source is not None:
            state.set_canary(load(state.canary_source, threads=state.config.serve.threads,
                                  max_batch=state.config.serve.max_batch_size))
            log.info("canary %s takes %.0f%% of the requests; %s the rest", state.canary.version,
                     100 * state.canary_share, state.model.version)
        # torch, numpy and the model leave ~10^6 long-lived objects that every full collection would walk again:
        # 130-160 ms pauses about once a second under load, stalling every open request. Freezing them after
        # start-up leaves the collector only what requests allocate.
        gc.freeze()
    except Exception as exc:  # readyz reports it; the process stays up so the cause can be read from /readyz
        log.error("could not load %s: %s", state.source.origin, exc)
        state.load_error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:400]}"


@dataclass(frozen=True)
class Classified:
    """One request's images, classified: what the handler answers and logs."""

    model_version: str
    class_names: list[str]  # of the model that classified them (a reload may have swapped models since)
    outputs: Outputs
    images: np.ndarray  # uint8 [n, S, S, 3], as the model saw them
    sizes: np.ndarray  # [n, 2] original width, height (upright)
    orientations: np.ndarray  # [n] the EXIF orientation each image was turned upright by (1: none)
    lineage: tuple[str, str] = ("", "")  # the model's data key (its card's) and artifact key (its manifest's)


def _processor(
    state: ServerState, current: Callable[[], ServedModel | None]
) -> Callable[[list[list[bytes] | uploads.Decoded]], list[Classified | ApiError | uploads.Large]]:
    """Decode and classify the requests of one batch (in a worker thread) on the model ``current()`` gives; a
    request with a bad image gets its ApiError back, the others are classified together in one forward pass. A
    request is its image bytes, or its images already decoded by the decode pool; one with too much to decode here
    gets ``uploads.Large`` back, for the pool (``signpost.serve.uploads``)."""
    cfg = state.config.serve

    def process(requests: list[list[bytes] | uploads.Decoded]) -> list[Classified | ApiError | uploads.Large]:
        model = current()  # read once: a reload swaps it between batches, never inside one
        if model is None:
            raise ApiError(503, "not_ready", "the model is not loaded", {"Retry-After": str(RETRY_AFTER_S)})
        size = model.card.image_size
        results: list[Any] = [None] * len(requests)  # each becomes a Classified, an ApiError or a Large
        decoded: list[tuple[int, uploads.Decoded]] = []
        for i, payload in enumerate(requests):
            if isinstance(payload, uploads.Decoded):
                if payload.images.shape[1] != size:  # a reload to a model of another input size came in between
                    results[i] = ApiError(503, "model_changed", "the model changed while the images were decoded; "
                                          "send them again", {"Retry-After": str(RETRY_AFTER_S)})
                else:
                    decoded.append((i, payload))
                continue
            try:
                pending = uploads.open_request(payload, size=size, max_pixels=cfg.max_image_pixels)
                if uploads.is_large(pending):
                    results[i] = uploads.Large(pending, size)
                    continue
                decoded.append((i, uploads.decode(pending, size)))
            except uploads.Refused as exc:
                results[i] = ApiError(exc.status, exc.code, exc.message)
        if decoded:
            parts = [d.images for _, d in decoded]
            outputs = model.forward(parts[0] if len(parts) == 1 else np.concatenate(parts), cfg.top_k)
            start = 0
            for i, d in decoded:
                end = start + len(d.images)
                results[i] = Classified(model.version, model.card.class_names, outputs.rows(start, end), d.images,
                                        d.sizes, d.orientations, (model.card.data_key, model.key))
                start = end
        return results

    return process


def _add_routes(app: FastAPI, state: ServerState) -> None:
    cfg = state.config.serve

    async def require_api_key(request: Request) -> None:
        if state.api_key is None:
            return
        if not _key_matches(request, state.api_key):
            raise ApiError(401, "unauthorized", "missing or wrong API key: send it as X-API-Key or "
                           "Authorization: Bearer <key>", {"WWW-Authenticate": "Bearer"})

    async def require_admin_key(request: Request) -> None:
        if state.admin_key is None:
            raise ApiError(403, "admin_disabled", f"admin routes are off: start the server with {ADMIN_KEY_ENV} set")
        if not _key_matches(request, state.admin_key, header="x-admin-key"):
            raise ApiError(401, "unauthorized", "missing or wrong admin key: send it as X-Admin-Key")

    @app.get("/healthz", response_model=Health, tags=["health"])
    async def healthz() -> Health:
        """The process is alive and answering."""
        return Health(status="ok")

    @app.get("/readyz", response_model=Readiness, responses={503: {"model": Readiness}}, tags=["health"])
    async def readyz(request: Request) -> Any:
        """The model is loaded and warmed up: send traffic. Until then, why not (with X-Admin-Key: the full
        detail, paths included)."""
        if not state.ready():
            error = state.load_error if _is_admin(request, state) else _public_error(state)
            detail = error or ("loading the canary" if state.model else "loading the model")
            return JSONResponse(Readiness(ready=False, detail=detail).model_dump(), status_code=503)
        return Readiness(ready=True, model_version=state.model.version,
                         canary_version=state.canary.version if state.canary else None)

    # serve.protect_metrics: what the service runs and how busy it is, for key holders only.
    guarded = [Depends(require_api_key)] if cfg.protect_metrics else []

    @app.get("/metrics", tags=["health"], response_class=Response, dependencies=guarded)
    async def metrics() -> Response:
        """Prometheus metrics."""
        m = state.metrics
        m.queue_depth.set(state.batcher.queued_images if state.batcher else 0)
        if state.log is not None:
            m.log_pending.set(state.log.pending())
            m.log_dropped.set(state.log.dropped + state.log.failed_writes)
        return Response(generate_latest(m.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/model", response_model=ModelInfo, responses=_ERRORS, tags=["model"])
    async def model_info(request: Request) -> ModelInfo:
        """The model card of the model being served, with its version and runtime (and the canary's, if any).
        ``origin`` is what the server was started with: a folder's name only, unless X-Admin-Key is sent."""
        admin = _is_admin(request, state)

        def describe(model: ServedModel) -> dict[str, Any]:
            facts = model.describe()
            return facts if admin else {**facts, "origin": _public_origin(facts["origin"])}

        canary = {**describe(state.canary), "share": state.canary_share} if state.canary else None
        return ModelInfo(**describe(_ready(state)), canary=canary)

    if cfg.protect_metrics:  # FastAPI's docs routes, behind the API key (create_app turned its own off)
        @app.get("/openapi.json", include_in_schema=False, dependencies=guarded)
        async def openapi() -> JSONResponse:
            return JSONResponse(app.openapi())

        @app.get("/docs", include_in_schema=False, dependencies=guarded)
        async def docs() -> HTMLResponse:
            return get_swagger_ui_html(openapi_url="/openapi.json", title=f"{app.title} - docs")

        @app.get("/redoc", include_in_schema=False, dependencies=guarded)
        async def redoc() -> HTMLResponse:
            return get_redoc_html(openapi_url="/openapi.json", title=f"{app.title} - ReDoc")

    @app.post("/v1/predict", response_model=Prediction, responses=_ERRORS, tags=["predict"],
              dependencies=[Depends(require_api_key)],
              openapi_extra={"requestBody": {"content": {"image/*": {"schema": {"type": "string", "format": "binary"}},
                                                         "multipart/form-data": {"schema": {"type": "object"}}}}})
    async def predict(request: Request) -> JSONResponse:
        """Classify one image, sent as the raw body (Content-Type image/... or application/octet-stream) or as the
        one file of a multipart form."""
        started = time.perf_counter()
        blobs = await _read_images(request, cfg.max_upload_bytes, max_images=cfg.max_batch_images)
        if len(blobs) != 1:
            raise ApiError(400, "one_image_expected", f"send one image, not {len(blobs)}; "
                           "use /v1/predict/batch for several")
        answers = await _classify(state, blobs, started)
        # Built as plain data and serialized once: the route's response_model documents the shape.
        return JSONResponse(answers[0])

    @app.post("/v1/predict/batch", response_model=BatchPrediction, responses=_ERRORS, tags=["predict"],
              dependencies=[Depends(require_api_key)],
              openapi_extra={"requestBody": {"content": {"multipart/form-data": {"schema": {"type": "object"}}}}})
    async def predict_batch(request: Request) -> JSONResponse:
        """Classify several images sent as the files of one multipart form (field names are free)."""
        started = time.perf_counter()
        if not _content_type(request).startswith("multipart/form-data"):
            raise ApiError(415, "unsupported_media_type", "send the images as multipart/form-data files")
        blobs = await _read_images(request, cfg.max_upload_bytes, max_images=cfg.max_batch_images)
        answers = await _classify(state, blobs, started)
        return JSONResponse({"predictions": answers, "model_version": answers[0]["model_version"],
                             "latency_ms": answers[0]["latency_ms"], "request_id": answers[0]["request_id"]})

    @app.post("/v1/admin/reload", response_model=ReloadResponse, responses=_ERRORS, tags=["admin"],
              dependencies=[Depends(require_admin_key)])
    async def reload(body: ReloadRequest) -> ReloadResponse:
        """Load another model (a path, ``models:/name@alias``, or a registry ``alias``) and switch to it once it is
        warmed up; requests keep being answered by the current model meanwhile. A model that fails to load changes
        nothing."""
        if (body.model is None) == (body.alias is None):
            raise ApiError(400, "bad_reload_request", "give exactly one of model (a path or models:/name@alias) "
                           "and alias (e.g. champion)")
        spec = body.model or f"models:/{state.config.tracking.registered_model}@{body.alias}"
        if not state.reload_lock.acquire(blocking=False):
            raise ApiError(409, "reload_in_progress", "another reload is running; try again when it has finished")
        try:
            started = time.perf_counter()
            previous = state.model.version if state.model else None
            try:
                model = await asyncio.to_thread(_load_new, state, spec, body.runtime)
            except Exception as exc:
                raise ApiError(400, "model_load_failed", f"cannot load {spec}: {exc}; still serving "
                               f"{previous or 'nothing'}") from exc
            state.set_model(model)
            state.load_error = None
            log.info("switched from %s to %s", previous, model.version)
            return ReloadResponse(model_version=model.version, previous_version=previous,
                                  load_seconds=time.perf_counter() - started)
        finally:
            state.reload_lock.release()


def _load_new(state: ServerState, spec: str, runtime: str) -> ServedModel:
    source = resolve(spec, state.config, runtime)
    return load(source, threads=state.config.serve.threads, max_batch=state.config.serve.max_batch_size)


def _ready(state: ServerState) -> ServedModel:
    if not state.ready():
        raise ApiError(503, "not_ready", f"the model is not loaded yet ({_public_error(state) or 'loading'}); "
                       "retry when /readyz says ready", {"Retry-After": str(RETRY_AFTER_S)})
    return state.model


def _is_admin(request: Request, state: ServerState) -> bool:
    """The request carries the admin key: it may read full errors and paths."""
    return state.admin_key is not None and _key_matches(request, state.admin_key, header="x-admin-key")


def _public_error(state: ServerState) -> str | None:
    """Why the model did not load, without paths: what a client without the admin key is told (the log and
    /readyz with X-Admin-Key have it whole)."""
    if state.load_error is None:
        return None
    sources = [s for s in (state.source, state.canary_source) if s is not None]
    given = [state.config.workdir] + [s.folder for s in sources] + [s.origin for s in sources]
    return _redact(state.load_error, [str(place) for place in given])


def _public_origin(origin: str) -> str:
    """What the server was started with, for clients without the admin key: a registry URI as it is, a path as
    its folder's name."""
    return origin if origin.startswith(REGISTRY_SCHEME) else PurePath(origin).name


# A path in a message: absolute (/..., C:\...), home- or dot-relative, up to a space, quote, colon or bracket.
_PATH_END = r"""[^\s'"`,;:()<>\[\]{}]*"""
_PATH = re.compile(r"(?<![\w~.:\\-])(?:~|\.{1,2}|[A-Za-z]:)?[/\\]" + _PATH_END)


def _redact(text: str, relative: list[str]) -> str:
    """``text`` with each path replaced by ``<path>``: absolute ones, and those under one of the ``relative``
    places (the workdir or a model as the user gave them, e.g. ``artifacts/train/x``). What was wrong stays."""
    for place in sorted({p for p in relative if p and not PurePath(p).is_absolute() and p != "."}, key=len,
                        reverse=True):
        # A one-word place ("artifacts") only as the start of a longer path: the word alone may be plain English.
        ahead = r"(?![\w.-])" if re.search(r"[/\\]", place) else r"(?=[/\\])"
        text = re.sub(rf"(?<![\w~.-]){re.escape(place)}{ahead}{_PATH_END}", "<path>", text)
    return _PATH.sub("<path>", text)


def _key_matches(request: Request, key: str, header: str = "x-api-key") -> bool:
    sent = request.headers.get(header)
    if sent is None:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        sent = token.strip() if scheme.lower() == "bearer" else None
    # compare_digest takes as long whatever the first wrong byte: the key cannot be guessed byte by byte.
    return sent is not None and hmac.compare_digest(sent.encode(), key.encode())


def _content_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 as soon as it is known to be over ``limit`` bytes (declared or streamed), and
    with 408 when it has not arrived whole within ``serve.body_timeout_s``. A client that leaves before the end is
    ``ClientAborted``."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise ApiError(400, "bad_content_length", f"Content-Length {declared[:40]!r} is not a number")
        if int(declared) > limit:
            raise ApiError(413, "payload_too_large", f"the body is {int(declared):,} bytes; the limit is {limit:,} "
                           "(serve.max_upload_bytes)")
    state: ServerState = request.app.state.signpost
    timeout_s = state.config.serve.body_timeout_s
    chunks: list[bytes] = []
    total = 0

    async def read() -> None:
        nonlocal total
        async for chunk in request.stream():
            total += len(chunk)
            if total > limit:
                raise ApiError(413, "payload_too_large", f"the body is over the limit of {limit:,} bytes "
                               "(serve.max_upload_bytes)")
            chunks.append(chunk)

    try:
        # One deadline for the whole body: a client sending a byte now and then never trips a per-read timeout.
        await asyncio.wait_for(read(), timeout_s)
    except asyncio.TimeoutError:
        state.metrics.slow_clients.labels("body_timeout").inc()
        log.info("%s %s: %s bytes of the body in %g s (serve.body_timeout_s); answered 408", request.method,
                 request.url.path, f"{total:,}", timeout_s)
        raise ApiError(408, "body_timeout", f"the body did not arrive within {timeout_s:g} s "
                       "(serve.body_timeout_s): send it in one go, or a smaller image", {"Connection": "close"}) \
            from None
    except ClientDisconnect:
        raise ClientAborted(total) from None
    return b"".join(chunks)


async def _read_images(request: Request, limit: int, max_images: int) -> list[bytes]:
    """The uploaded image bytes: the raw body, or the files of a multipart form."""
    kind = _content_type(request)
    if not kind.startswith("multipart/form-data") and not kind.startswith(RAW_TYPES):
        raise ApiError(415, "unsupported_media_type", f"Content-Type {kind or '(none)'!r} is not accepted: send an "
                       "image (image/jpeg, image/png, ... or application/octet-stream) or multipart/form-data")
    body = await _read_body(request, limit)
    if not body:
        raise ApiError(400, "empty_body", "the request has no body: send the image bytes")
    if not kind.startswith("multipart/form-data"):
        return [body]
    form = await _parse_form(request, body, limit, max_images)
    files = [value for _, value in form.multi_items() if isinstance(value, UploadFile)]
    if not files:
        raise ApiError(400, "no_files", "the multipart form holds no files: attach the image(s) as file fields")
    if len(files) > max_images:
        raise ApiError(413, "too_many_images", f"{len(files)} images in one request; the limit is {max_images} "
                       "(serve.max_batch_images)")
    return [await f.read() for f in files]


async def _parse_form(request: Request, body: bytes, limit: int, max_images: int) -> Any:
    sent = False

    async def replay() -> MutableMapping[str, Any]:  # the body was already read (and capped): hand it over again
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        return await Request(request.scope, replay).form(max_files=max_images + 1, max_fields=max_images + 16,
                                                          max_part_size=limit)
    except StarletteHTTPException as exc:  # the parser's own 400s (too many files, a malformed form)
        raise ApiError(400, "bad_multipart", f"malformed multipart form: {exc.detail}") from None
    except Exception as exc:
        raise ApiError(400, "bad_multipart", f"malformed multipart form: {exc}") from None


async def _classify(state: ServerState, blobs: list[bytes], started: float) -> list[dict[str, Any]]:
    """Decode, predict and log ``blobs``; the answers as plain dicts shaped like ``Prediction``."""
    _ready(state)
    cfg = state.config.serve
    canary = state.canary is not None and state.router.random() < state.canary_share
    batcher = state.canary_batcher if canary else state.batcher
    current = (lambda: state.canary) if canary else (lambda: state.model)

    async def through_model(payload: list[bytes] | uploads.Decoded) -> Any:
        if batcher is not None:
            return await batcher.submit(payload, len(blobs))
        # one forward pass per request, concurrently in threads: the reference server's way
        state.metrics.batch_size.observe(len(blobs))
        return (await asyncio.to_thread(_processor(state, current), [payload]))[0]

    async def decode_and_classify() -> Any:
        result = await through_model(blobs)
        if isinstance(result, uploads.Large):  # too much to decode beside the forward pass: the pool does it first
            result = await through_model(await state.decode_pool.decode(result))
        return result

    try:
        result = await asyncio.wait_for(decode_and_classify(), cfg.request_timeout_s)
    except (QueueFull, uploads.DecoderBusy) as exc:
        raise ApiError(503, "overloaded", f"the server is at capacity: {exc}; retry shortly",
                       {"Retry-After": str(RETRY_AFTER_S)}) from None
    except uploads.Refused as exc:  # an image the decode pool found bad
        raise ApiError(exc.status, exc.code, exc.message) from None
    except asyncio.TimeoutError:
        raise ApiError(504, "timeout", f"no answer within {cfg.request_timeout_s:g} s (serve.request_timeout_s)") \
            from None
    if isinstance(result, ApiError):
        raise result
    latency_ms = (time.perf_counter() - started) * 1000
    answers = _answers(result, latency_ms, _request_id())
    state.metrics.predictions.labels(result.model_version).inc(len(answers))
    if state.log is not None:
        _log_records(state.log, answers, result)
    return answers


_ID_PREFIX = secrets.token_hex(6)  # this process's; with a counter, request ids are unique without a syscall each
_ID_COUNTER = itertools.count()


def _request_id() -> str:
    return f"{_ID_PREFIX}-{next(_ID_COUNTER):x}"


def _answers(result: Classified, latency_ms: float, request_id: str) -> list[dict[str, Any]]:
    names = result.class_names
    answers = []
    for ids, probs in zip(result.outputs.top_ids.tolist(), result.outputs.top_probs.tolist(), strict=True):
        scores = [{"class_id": c, "class_name": names[c] if c < len(names) else str(c), "confidence": p}
                  for c, p in zip(ids, probs, strict=True)]
        answers.append({**scores[0], "top_k": scores, "model_version": result.model_version,
                        "latency_ms": latency_ms, "request_id": request_id})
    return answers


def _log_records(log_: predlog.PredictionLog, answers: list[dict[str, Any]], result: Classified) -> None:
    """Hand one record per image to the log; the image statistics are computed by its writer, in batches."""
    now = time.time()
    entropy = result.outputs.entropy.tolist()
    for i, answer in enumerate(answers):
        log_.add({
            "ts": now, "request_id": answer["request_id"], "model_version": answer["model_version"],
            "class_id": answer["class_id"], "class_name": answer["class_name"], "confidence": answer["confidence"],
            "entropy": entropy[i], "top_k": [[s["class_id"], round(s["confidence"], 6)] for s in answer["top_k"]],
            "latency_ms": answer["latency_ms"], "width": int(result.sizes[i, 0]), "height": int(result.sizes[i, 1]),
            "orientation": int(result.orientations[i]),
            "data_key": result.lineage[0], "model_key": result.lineage[1],
            "embedding": result.outputs.embeddings[i], "image": result.images[i],
        })


def _add_error_handlers(app: FastAPI) -> None:
    def body(code: str, message: str) -> dict[str, Any]:
        return {"error": {"code": code, "message": message}}

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        state: ServerState = request.app.state.signpost
        if state.log is not None and request.url.path.startswith("/v1/predict"):
            state.log.add_error(request.url.path, exc.status, exc.code)  # the monitor's error rate
        return JSONResponse(body(exc.code, exc.message), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(ClientAborted)
    async def aborted(request: Request, exc: ClientAborted) -> Response:
        state: ServerState = request.app.state.signpost
        route = getattr(request.scope.get("route"), "path", "unmatched")
        state.metrics.client_aborts.labels(route).inc()
        client = request.client.host if request.client else "?"
        log.info("%s %s: the client (%s) %s; not answered", request.method, route, client, exc)
        # Nobody is left to read this: 499 ("client closed request", as nginx logs it) is for signpost_requests.
        return Response(status_code=499)

    @app.exception_handler(RequestValidationError)
    async def invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg')}" for e in exc.errors())
        return JSONResponse(body("invalid_request", problems or "invalid request"), status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return JSONResponse(body(code, str(exc.detail)), status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def internal(_request: Request, exc: Exception) -> JSONResponse:
        log.error("internal error: %s", exc, exc_info=exc)
        return JSONResponse(body("internal_error", "the server failed to answer this request; it is logged"),
                            status_code=500)


class _MetricsMiddleware:
    """Counts requests by route template and status, and times them (pure ASGI: no per-request task)."""

    def __init__(self, app: Callable[..., Awaitable[None]], metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: MutableMapping[str, Any], receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def send_and_record(message: MutableMapping[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_record)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")  # the template: bounded label values
            self.metrics.requests.labels(route, scope.get("method", ""), str(status)).inc()
            self.metrics.latency.labels(route).observe(time.perf_counter() - started)
