"""How the service is run: uvicorn, with ``serve.*``'s bounds on slow, idle and crowding clients.

Every open connection holds a file descriptor and some memory, so a client that connects and then takes its time
holds a share of the server. uvicorn bounds part of that with its own settings: an idle keep-alive connection is
closed after ``serve.keep_alive_s``, and past ``serve.max_connections`` open connections or requests in progress a
new request gets 503 (``limit_concurrency``). It has no deadline for a request's head or body: a client that connects
and sends nothing, or sends a header a byte every few seconds, keeps its connection as long as it likes, and under
httptools a request head has no size limit. ``DeadlineProtocol`` adds these to uvicorn's own HTTP/1.1 protocol:

- a request head (request line and headers) must be complete within ``serve.header_timeout_s`` of the connection, or
  of the first byte of the next request on a kept-alive connection, and within ``serve.max_header_bytes``; else the
  client gets 408 / 431 and the connection is closed (a connection that sent nothing is just closed; under h11, whose
  own limit is set to the same size, an oversized head gets h11's 400 first);
- a request body must be complete within ``serve.body_timeout_s`` of its head, plus a grace second: the upload reader
  (``uploads.read_body``) answers 408 at ``serve.body_timeout_s`` itself, so this only cuts off a body that a route
  reads without a deadline, or that nobody reads.

Each cut is one log line and counts in ``signpost_slow_clients{reason}``.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from typing import Any

import uvicorn
from fastapi import FastAPI

from signpost.config import ServeConfig, SignpostConfig

log = logging.getLogger(__name__)

BODY_GRACE_S = 1.0  # the backstop waits this much longer than the upload reader's own 408 (serve.body_timeout_s)


def uvicorn_config(
    app: FastAPI, config: SignpostConfig, *, base: type[asyncio.Protocol] | None = None, **options: Any
) -> uvicorn.Config:
    """The uvicorn config ``signpost serve`` runs ``app`` (made by ``create_app``) with: ``config.serve``'s address
    and client limits, on uvicorn's HTTP/1.1 protocol ``base`` (see ``http_protocol``); ``options`` are passed on
    (log level, graceful-shutdown time, ...)."""
    cfg = config.serve
    metrics = app.state.signpost.metrics
    protocol = http_protocol(cfg, on_cut=lambda reason: metrics.slow_clients.labels(reason).inc(), base=base)
    return uvicorn.Config(
        app, host=cfg.host, port=cfg.port, http=protocol,
        timeout_keep_alive=cfg.keep_alive_s, limit_concurrency=cfg.max_connections,
        h11_max_incomplete_event_size=cfg.max_header_bytes, **options,
    )


def http_protocol(
    cfg: ServeConfig, *, on_cut: Callable[[str], None] = lambda why: None, base: type[asyncio.Protocol] | None = None
) -> type[asyncio.Protocol]:
    """uvicorn's HTTP/1.1 protocol class ``base`` (default: httptools when installed, else h11, as uvicorn picks)
    with the deadlines and head limit of ``cfg``; ``on_cut(reason)`` is called for each connection cut off."""
    if base is None:
        try:
            from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol as base
        except ImportError:  # httptools is optional (uvicorn[standard] brings it); h11 always comes with uvicorn
            from uvicorn.protocols.http.h11_impl import H11Protocol as base
    return type("DeadlineProtocol", (_Deadlines, base), {"limits": cfg, "on_cut": staticmethod(on_cut)})


class _Deadlines:
    """Mixed in before a uvicorn HTTP/1.1 protocol: times each request's head and body (see the module doc).

    From uvicorn's protocol it uses ``loop``, ``transport``, ``client`` and ``cycle`` (the request being read or
    answered: a new one is made when a head is complete; ``more_body`` is false once its body is in).
    """

    limits: ServeConfig
    on_cut: Callable[[str], None]
    loop: asyncio.AbstractEventLoop
    transport: asyncio.Transport
    client: tuple[str, int] | None
    cycle: Any

    def connection_made(self, transport: asyncio.Transport) -> None:
        super().connection_made(transport)  # type: ignore[misc]
        self._stage: str | None = None  # "head" or "body" while one is timed
        self._timer: asyncio.TimerHandle | None = None
        self._timed_cycle: Any = None  # head: the request before the one timed; body: the request timed
        self._head_bytes, self._head_tail = 0, b""  # bytes of the head so far, and its last three
        self._start("head", self.limits.header_timeout_s)

    def data_received(self, data: bytes) -> None:
        if self._stage is None and (self.cycle is None or self.cycle.response_complete):
            self._start("head", self.limits.header_timeout_s)  # the next request on a kept-alive connection
        if self._stage == "head" and self._head_too_large(data):  # refused before the parser sees it
            self._cut("header_too_large", 431, "Request Header Fields Too Large",
                      f"the request head is over {self.limits.max_header_bytes:,} bytes (serve.max_header_bytes)")
            return
        super().data_received(data)  # type: ignore[misc]
        if self.transport.is_closing():
            return
        if self._stage == "head" and self.cycle is not None and self.cycle is not self._timed_cycle:
            # A new request: its head is complete. Time its body, if one is still to come.
            if self.cycle.more_body:
                self._start("body", self.limits.body_timeout_s + BODY_GRACE_S)
            else:
                self._stop()
        elif self._stage == "body" and not self._timed_cycle.more_body:
            self._stop()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop()
        super().connection_lost(exc)  # type: ignore[misc]

    def _head_too_large(self, data: bytes) -> bool:
        """Count ``data`` into the request head: is it now over ``serve.max_header_bytes``? The head ends at its
        blank line; when ``data`` holds that line within the limit, what follows is body and does not count."""
        window = self._head_tail + data[:max(0, self.limits.max_header_bytes - self._head_bytes)]
        self._head_bytes += len(data)
        if b"\r\n\r\n" in window or b"\n\n" in window:
            return False
        self._head_tail = window[-3:]
        return self._head_bytes > self.limits.max_header_bytes

    def _start(self, stage: str, seconds: float) -> None:
        self._stop()
        self._stage, self._timed_cycle, self._head_bytes, self._head_tail = stage, self.cycle, 0, b""
        self._timer = self.loop.call_later(seconds, self._expired)

    def _stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._stage, self._timer = None, None

    def _expired(self) -> None:
        self._timer = None
        if self.transport.is_closing():
            return
        if self._stage == "body":
            answered = self._timed_cycle.response_started  # the route's own answer is on its way: only close
            self._cut("body_timeout", None if answered else 408, "Request Timeout",
                      f"the body did not arrive within {self.limits.body_timeout_s:g} s of the headers "
                      "(serve.body_timeout_s): send it in one go, or a smaller image")
        elif self._head_bytes == 0:
            self._cut("idle", None, "", f"no request within {self.limits.header_timeout_s:g} s")
        else:
            self._cut("header_timeout", 408, "Request Timeout",
                      f"the request headers did not arrive within {self.limits.header_timeout_s:g} s "
                      "(serve.header_timeout_s)")

    def _cut(self, reason: str, status: int | None, phrase: str, message: str) -> None:
        """Answer ``status`` (None: nothing) with a JSON error naming ``message``, close, log one line, count."""
        self._stop()
        if status is not None:
            body = json.dumps({"error": {"code": reason, "message": message}}).encode()
            head = (f"HTTP/1.1 {status} {phrase}\r\ncontent-type: application/json\r\n"
                    f"content-length: {len(body)}\r\nconnection: close\r\n\r\n")
            self.transport.write(head.encode() + body)
        self.transport.close()
        client = f"{self.client[0]}:{self.client[1]}" if self.client else "a client"
        log.info("closed the connection of %s: %s", client, message)
        self.on_cut(reason)
