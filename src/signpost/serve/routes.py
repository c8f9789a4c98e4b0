"""The service's routes, and who may call them: health, readiness, metrics, the model card, prediction (single and
batch) and the admin reload, on one ``APIRouter``; ``protected_docs`` holds the docs routes that
``serve.protect_metrics`` puts behind the API key.

Auth is a dependency of the routes that need it: ``require_api_key`` (``SIGNPOST_API_KEY``: the prediction routes,
and with ``serve.protect_metrics`` the metrics and docs) and ``require_admin_key`` (``SIGNPOST_ADMIN_KEY``: the
admin routes, which answer 403 while it is unset). A route reads the server's state through ``State``
(``signpost.serve.state``); it reads uploads with ``signpost.serve.uploads`` and classifies them with
``signpost.serve.predict``.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from pathlib import PurePath
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from signpost.serve import uploads
from signpost.serve.errors import ERROR_RESPONSES, ApiError, public_error
from signpost.serve.model import REGISTRY_SCHEME, ServedModel, load, resolve
from signpost.serve.predict import classify, loaded_model
from signpost.serve.schemas import (
    BatchPrediction,
    Health,
    ModelInfo,
    Prediction,
    Readiness,
    ReloadRequest,
    ReloadResponse,
)
from signpost.serve.state import ServerState, State

# The service's request log keeps the name it had when the routes lived in the app module (see errors.py).
log = logging.getLogger("signpost.serve.app")

API_KEY_ENV = "SIGNPOST_API_KEY"  # when set, prediction routes need it (X-API-Key or Authorization: Bearer)
ADMIN_KEY_ENV = "SIGNPOST_ADMIN_KEY"  # when set, the admin routes exist behind it; unset, they answer 403


async def require_api_key(request: Request, state: State) -> None:
    """The request carries the API key, when the server has one (401 otherwise)."""
    if state.api_key is None:
        return
    if not _key_matches(request, state.api_key):
        raise ApiError(401, "unauthorized", "missing or wrong API key: send it as X-API-Key or "
                       "Authorization: Bearer <key>", {"WWW-Authenticate": "Bearer"})


async def require_admin_key(request: Request, state: State) -> None:
    """The request carries the admin key (401 otherwise; 403 when the server has none)."""
    if state.admin_key is None:
        raise ApiError(403, "admin_disabled", f"admin routes are off: start the server with {ADMIN_KEY_ENV} set")
    if not _key_matches(request, state.admin_key, header="x-admin-key"):
        raise ApiError(401, "unauthorized", "missing or wrong admin key: send it as X-Admin-Key")


async def require_key_for_metrics(request: Request, state: State) -> None:
    """serve.protect_metrics: what the service runs and how busy it is, for API key holders only."""
    if state.config.serve.protect_metrics:
        await require_api_key(request, state)


router = APIRouter()


@router.get("/healthz", response_model=Health, tags=["health"])
async def healthz() -> Health:
    """The process is alive and answering."""
    return Health(status="ok")


@router.get("/readyz", response_model=Readiness, responses={503: {"model": Readiness}}, tags=["health"])
async def readyz(request: Request, state: State) -> Any:
    """The model is loaded and warmed up: send traffic. Until then, why not (with X-Admin-Key: the full
    detail, paths included)."""
    if not state.ready():
        error = state.load_error if _is_admin(request, state) else public_error(state)
        detail = error or ("loading the canary" if state.model else "loading the model")
        return JSONResponse(Readiness(ready=False, detail=detail).model_dump(), status_code=503)
    return Readiness(ready=True, model_version=state.model.version,
                     canary_version=state.canary.version if state.canary else None)


@router.get("/metrics", tags=["health"], response_class=Response, dependencies=[Depends(require_key_for_metrics)])
async def metrics(state: State) -> Response:
    """Prometheus metrics."""
    m = state.metrics
    m.queue_depth.set(state.batcher.queued_images if state.batcher else 0)
    m.queue_capacity.set(state.config.serve.max_queue)
    if state.log is not None:
        m.log_pending.set(state.log.pending())
        m.log_dropped.set(state.log.dropped + state.log.failed_writes)
    return Response(generate_latest(m.registry), media_type=CONTENT_TYPE_LATEST)


@router.get("/v1/model", response_model=ModelInfo, responses=ERROR_RESPONSES, tags=["model"])
async def model_info(request: Request, state: State) -> ModelInfo:
    """The model card of the model being served, with its version and runtime (and the canary's, if any).
    ``origin`` is what the server was started with: a folder's name only, unless X-Admin-Key is sent."""
    admin = _is_admin(request, state)

    def describe(model: ServedModel) -> dict[str, Any]:
        facts = model.describe()
        return facts if admin else {**facts, "origin": _public_origin(facts["origin"])}

    canary = {**describe(state.canary), "share": state.canary_share} if state.canary else None
    return ModelInfo(**describe(loaded_model(state)), canary=canary)


@router.post("/v1/predict", response_model=Prediction, responses=ERROR_RESPONSES, tags=["predict"],
             dependencies=[Depends(require_api_key)],
             openapi_extra={"requestBody": {"content": {"image/*": {"schema": {"type": "string", "format": "binary"}},
                                                        "multipart/form-data": {"schema": {"type": "object"}}}}})
async def predict(request: Request, state: State) -> JSONResponse:
    """Classify one image, sent as the raw body (Content-Type image/... or application/octet-stream) or as the
    one file of a multipart form."""
    started = time.perf_counter()
    blobs = await _read_images(request, state)
    if len(blobs) != 1:
        raise ApiError(400, "one_image_expected", f"send one image, not {len(blobs)}; "
                       "use /v1/predict/batch for several")
    answers = await classify(state, blobs, started)
    # Built as plain data and serialized once: the route's response_model documents the shape.
    return JSONResponse(answers[0])


@router.post("/v1/predict/batch", response_model=BatchPrediction, responses=ERROR_RESPONSES, tags=["predict"],
             dependencies=[Depends(require_api_key)],
             openapi_extra={"requestBody": {"content": {"multipart/form-data": {"schema": {"type": "object"}}}}})
async def predict_batch(request: Request, state: State) -> JSONResponse:
    """Classify several images sent as the files of one multipart form (field names are free)."""
    started = time.perf_counter()
    if not uploads.content_type(request).startswith("multipart/form-data"):
        raise ApiError(415, "unsupported_media_type", "send the images as multipart/form-data files")
    blobs = await _read_images(request, state)
    answers = await classify(state, blobs, started)
    return JSONResponse({"predictions": answers, "model_version": answers[0]["model_version"],
                         "latency_ms": answers[0]["latency_ms"], "request_id": answers[0]["request_id"]})


@router.post("/v1/admin/reload", response_model=ReloadResponse, responses=ERROR_RESPONSES, tags=["admin"],
             dependencies=[Depends(require_admin_key)])
async def reload(body: ReloadRequest, state: State) -> ReloadResponse:
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


# FastAPI's own docs routes, behind the API key: create_app includes these (and turns FastAPI's off) when
# serve.protect_metrics is set.
protected_docs = APIRouter(include_in_schema=False, dependencies=[Depends(require_api_key)])


@protected_docs.get("/openapi.json")
async def openapi(request: Request) -> JSONResponse:
    return JSONResponse(request.app.openapi())


@protected_docs.get("/docs")
async def docs(request: Request) -> HTMLResponse:
    return get_swagger_ui_html(openapi_url="/openapi.json", title=f"{request.app.title} - docs")


@protected_docs.get("/redoc")
async def redoc(request: Request) -> HTMLResponse:
    return get_redoc_html(openapi_url="/openapi.json", title=f"{request.app.title} - ReDoc")


async def _read_images(request: Request, state: ServerState) -> list[bytes]:
    """The request's uploaded images, within ``serve.*``'s limits; a body that arrives too slowly is counted in
    ``signpost_slow_clients{reason="body_timeout"}`` and logged in one line."""
    cfg = state.config.serve

    def too_slow(received: int) -> None:
        state.metrics.slow_clients.labels("body_timeout").inc()
        log.info("%s %s: %s bytes of the body in %g s (serve.body_timeout_s); answered 408", request.method,
                 request.url.path, f"{received:,}", cfg.body_timeout_s)

    return await uploads.read_images(request, limit=cfg.max_upload_bytes, max_images=cfg.max_batch_images,
                                     timeout_s=cfg.body_timeout_s, on_timeout=too_slow)


def _load_new(state: ServerState, spec: str, runtime: str) -> ServedModel:
    source = resolve(spec, state.config, runtime)
    return load(source, threads=state.config.serve.threads, max_batch=state.config.serve.max_batch_size)


def _key_matches(request: Request, key: str, header: str = "x-api-key") -> bool:
    sent = request.headers.get(header)
    if sent is None:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        sent = token.strip() if scheme.lower() == "bearer" else None
    # compare_digest takes as long whatever the first wrong byte: the key cannot be guessed byte by byte.
    return sent is not None and hmac.compare_digest(sent.encode(), key.encode())


def _is_admin(request: Request, state: ServerState) -> bool:
    """The request carries the admin key: it may read full errors and paths."""
    return state.admin_key is not None and _key_matches(request, state.admin_key, header="x-admin-key")


def _public_origin(origin: str) -> str:
    """What the server was started with, for clients without the admin key: a registry URI as it is, a path as
    its folder's name."""
    return origin if origin.startswith(REGISTRY_SCHEME) else PurePath(origin).name
