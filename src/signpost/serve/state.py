"""What one running service holds: its settings and keys, the models it serves, their batchers, the decode pool,
the prediction log and the metrics (``ServerState``), and ``State``, the dependency through which a route gets it.

``create_app`` (``signpost.serve.app``) makes the state and its lifespan fills it in; the routes and the error
handlers only read it. It lives in a module of its own so that they can name it without importing the app factory,
which imports them.
"""

from __future__ import annotations

import random
import threading
from dataclasses import dataclass, field
from typing import Annotated

from fastapi import Depends, Request

from signpost.config import SignpostConfig
from signpost.serve import predlog_writer, uploads
from signpost.serve.batching import Batcher
from signpost.serve.metrics import Metrics
from signpost.serve.model import ModelSource, ServedModel


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
    log: predlog_writer.PredictionLog | None = None
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


async def current_state(request: Request) -> ServerState:
    """The state of the app serving ``request`` (async: FastAPI runs a plain function in a thread instead)."""
    return request.app.state.signpost


State = Annotated[ServerState, Depends(current_state)]  # a route's parameter ``state: State`` receives it
