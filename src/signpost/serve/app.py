"""The app factory: ``create_app(config, model)`` puts the service together and says what happens at start-up
and shut-down.

It makes the server's state (``signpost.serve.state``) and an app with the metrics middleware
(``signpost.serve.metrics``), the error handlers (``signpost.serve.errors``) and the routes
(``signpost.serve.routes``, the Open Inference Protocol's in ``signpost.serve.oip``, the fleet's ingest in
``signpost.serve.ingest``). On start-up the lifespan opens the prediction log, starts the batchers and the decode
pool, and loads the model in a background thread:
``/healthz`` answers at once, ``/readyz`` and the prediction routes only once the model is loaded and warmed up.
On shut-down (after uvicorn has answered the open requests) it stops the batchers and the decode pool and writes
every queued log record.

Canary mode (``canary=`` a second model): each prediction request goes to the canary with probability
``serve.canary_share``, else to the main model, each with its own batcher (``signpost.serve.predict``).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
from collections.abc import AsyncIterator

from fastapi import FastAPI

from signpost import __version__
from signpost.config import ConfigError, SignpostConfig
from signpost.serve import ingest, oip, predlog, predlog_writer, routes, uploads
from signpost.serve.batching import Batcher
from signpost.serve.errors import add_error_handlers
from signpost.serve.metrics import MetricsMiddleware
from signpost.serve.model import load, resolve
from signpost.serve.predict import processor
from signpost.serve.routes import ADMIN_KEY_ENV, API_KEY_ENV
from signpost.serve.state import ServerState

# The prediction log's URL from the environment (a Kubernetes Secret: it holds the database's credentials) overrides
# serve.prediction_log, which a config file, and so a ConfigMap, should not hold with a password in it.
PREDICTION_LOG_ENV = "SIGNPOST_PREDICTION_LOG"

log = logging.getLogger(__name__)


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
        log_url = os.environ.get(PREDICTION_LOG_ENV) or cfg.prediction_log or predlog.default_url(config.workdir)
        state.log = predlog_writer.PredictionLog(log_url,
                                                 batch_size=cfg.log_batch_size, interval_s=cfg.log_interval_s,
                                                 experiment=config.name)
        if cfg.batching:
            lanes = [("batcher", lambda: state.model)] + ([("canary_batcher", lambda: state.canary)]
                                                           if state.canary_source else [])
            for attribute, current in lanes:
                batcher = Batcher(processor(state, current), max_batch=cfg.max_batch_size,
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

    # serve.protect_metrics: FastAPI's own docs routes are open to all; routes.protected_docs serves them behind
    # the API key instead.
    docs = {"docs_url": None, "redoc_url": None, "openapi_url": None} if config.serve.protect_metrics else {}
    app = FastAPI(title="Signpost inference service", version=__version__, lifespan=lifespan,
                  description="Traffic-sign classification: predict, health, readiness, metrics and the model card.",
                  **docs)
    app.state.signpost = state
    app.add_middleware(MetricsMiddleware, metrics=state.metrics)
    add_error_handlers(app)
    app.include_router(routes.router)
    app.include_router(oip.router)
    ingest.include(app, config)  # POST /v1/predictions/ingest: the fleet's records
    if config.serve.protect_metrics:
        app.include_router(routes.protected_docs)
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
