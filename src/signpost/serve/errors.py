"""How the service answers when it cannot answer a request: errors become HTTP responses here, at the edge.

Every error a client can cause is a 4xx with a JSON body ``{"error": {"code", "message"}}`` (``ApiError``, or an
upload ``Refused`` by ``signpost.serve.uploads``); anything else is a 500 with the same shape and no traceback (the
traceback goes to the server's log). A client that left mid-upload gets nothing: it is counted and logged in one
line. What a client without the admin key is told never holds a filesystem path (``public_error``).
"""

from __future__ import annotations

import logging
import re
from pathlib import PurePath
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from signpost.serve import uploads
from signpost.serve.schemas import ErrorResponse
from signpost.serve.state import ServerState

# The service's request log keeps the name it had before errors and routes were split from the app module:
# deployments filter on it.
log = logging.getLogger("signpost.serve.app")

# The error answers a route may give, for its OpenAPI docs.
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorResponse}, 401: {"model": ErrorResponse}, 413: {"model": ErrorResponse},
    415: {"model": ErrorResponse}, 503: {"model": ErrorResponse}, 504: {"model": ErrorResponse}}


class ApiError(Exception):
    """An error to answer with ``status`` and a JSON body naming the problem."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers


def error_body(code: str, message: str) -> dict[str, Any]:
    """The JSON body of every error answer."""
    return {"error": {"code": code, "message": message}}


def add_error_handlers(app: FastAPI) -> None:
    """Answer every error ``app``'s routes raise with ``error_body``'s shape."""

    @app.exception_handler(uploads.Refused)
    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError | uploads.Refused) -> JSONResponse:
        state: ServerState = request.app.state.signpost
        if state.log is not None and request.url.path.startswith("/v1/predict"):
            state.log.add_error(request.url.path, exc.status, exc.code)  # the monitor's error rate
        return JSONResponse(error_body(exc.code, exc.message), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(uploads.ClientAborted)
    async def aborted(request: Request, exc: uploads.ClientAborted) -> Response:
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
        return JSONResponse(error_body("invalid_request", problems or "invalid request"), status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return JSONResponse(error_body(code, str(exc.detail)), status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def internal(_request: Request, exc: Exception) -> JSONResponse:
        log.error("internal error: %s", exc, exc_info=exc)
        return JSONResponse(error_body("internal_error", "the server failed to answer this request; it is logged"),
                            status_code=500)


def public_error(state: ServerState) -> str | None:
    """Why the model did not load, without paths: what a client without the admin key is told (the log and
    /readyz with X-Admin-Key have it whole)."""
    if state.load_error is None:
        return None
    sources = [s for s in (state.source, state.canary_source) if s is not None]
    given = [state.config.workdir] + [s.folder for s in sources] + [s.origin for s in sources]
    return redact(state.load_error, [str(place) for place in given])


# A path in a message: absolute (/..., C:\...), home- or dot-relative, up to a space, quote, colon or bracket.
_PATH_END = r"""[^\s'"`,;:()<>\[\]{}]*"""
_PATH = re.compile(r"(?<![\w~.:\\-])(?:~|\.{1,2}|[A-Za-z]:)?[/\\]" + _PATH_END)


def redact(text: str, relative: list[str]) -> str:
    """``text`` with each path replaced by ``<path>``: absolute ones, and those under one of the ``relative``
    places (the workdir or a model as the user gave them, e.g. ``artifacts/train/x``). What was wrong stays."""
    for place in sorted({p for p in relative if p and not PurePath(p).is_absolute() and p != "."}, key=len,
                        reverse=True):
        # A one-word place ("artifacts") only as the start of a longer path: the word alone may be plain English.
        ahead = r"(?![\w.-])" if re.search(r"[/\\]", place) else r"(?=[/\\])"
        text = re.sub(rf"(?<![\w~.-]){re.escape(place)}{ahead}{_PATH_END}", "<path>", text)
    return _PATH.sub("<path>", text)
