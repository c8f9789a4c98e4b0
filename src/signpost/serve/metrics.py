"""The service's Prometheus metrics, and the middleware that counts and times every HTTP request.

Each app has a registry of its own (``Metrics``), so two apps in one process (as in the tests) never share
counters. ``MetricsMiddleware`` labels requests by route template, not by the path a client sent, so
the number of label values stays bounded whatever clients send.
"""

from __future__ import annotations

import time
from collections import Counter as Tally  # prometheus_client has a Counter too
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


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
        # By predicted class too (bounded: the model's classes), for the dashboard's class mix.
        self.predicted_classes = Counter("signpost_predicted_classes", "images classified, by predicted class",
                                         ["model_version", "class_name"], registry=r)
        self.queue_depth = Gauge("signpost_queue_depth", "images waiting for a forward pass", registry=r)
        # The depth's ceiling (serve.max_queue), so an alert on depth / capacity needs no copy of the config.
        self.queue_capacity = Gauge("signpost_queue_capacity", "images the queue holds before answering 503",
                                    registry=r)
        self.log_pending = Gauge("signpost_prediction_log_pending", "records not yet written", registry=r)
        self.log_dropped = Gauge("signpost_prediction_log_dropped", "records the log could not keep", registry=r)
        self.device_dropped = Gauge("signpost_device_dropped_records", "records a device dropped past its local "
                                    "buffer bound, all told, as its latest batch said", ["device"], registry=r)
        self.model_info = Gauge("signpost_model_info", "the models being served (value 1); role main or canary",
                                ["model_version", "runtime", "role"], registry=r)
        # Clients, not server errors: each is also in signpost_requests (an abort as status 499, as nginx logs it).
        self.client_aborts = Counter("signpost_client_aborts", "requests whose client closed the connection before "
                                     "sending the whole body", ["route"], registry=r)
        self.slow_clients = Counter("signpost_slow_clients", "connections cut off for a client too slow or too big: "
                                    "idle, header_timeout, header_too_large, body_timeout", ["reason"], registry=r)

    def count_classes(self, model_version: str, class_names: list[str]) -> None:
        """Count one request's predicted classes: one increment per class, not per image."""
        for name, count in Tally(class_names).items():
            self.predicted_classes.labels(model_version, name).inc(count)


class MetricsMiddleware:
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
