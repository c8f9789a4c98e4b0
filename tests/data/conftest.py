"""A local HTTP server on 127.0.0.1 for the download and fetch tests: serves files the tests make, with byte ranges,
and misbehaves on request (cut connections, resets, 500s, Range ignored)."""

from __future__ import annotations

import hashlib
import socket
import struct
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest

from signpost.data import download


@dataclass
class Seen:
    path: str
    range: str | None
    user_agent: str | None


@dataclass
class Behaviour:
    """What the server does; the one-shot misbehaviours apply to the first request for a path, then clear."""

    root: Path
    drop_after: dict[str, int] = field(default_factory=dict)  # path -> body bytes sent before closing
    reset: bool = False  # drop with a TCP reset instead of a clean close
    fail_once: set[str] = field(default_factory=set)  # paths answered 500 once
    fail_always: set[str] = field(default_factory=set)  # paths answered 500 every time
    ignore_range: bool = False  # answer Range requests with 200 and the whole body
    requests: list[Seen] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


class FileHandler(BaseHTTPRequestHandler):
    """Serves files under ``Behaviour.root``, with byte ranges, and misbehaves on request."""

    server: FileServer

    def do_GET(self) -> None:
        state = self.server.behaviour
        path = unquote(urlsplit(self.path).path)
        requested_range = self.headers.get("Range")
        with state.lock:
            state.requests.append(Seen(path, requested_range, self.headers.get("User-Agent")))
            fail = path in state.fail_always or path in state.fail_once
            state.fail_once.discard(path)
            drop = state.drop_after.pop(path, None)
        file = state.root / path.lstrip("/")
        if not path.lstrip("/") or not file.is_file():
            self.send_error(404, "Not Found")
            return
        if fail:
            self.send_error(500, "Internal Server Error")
            return
        body = file.read_bytes()
        start = 0
        if requested_range and not state.ignore_range:
            digits = requested_range.removeprefix("bytes=").removesuffix("-")
            if not digits.isdigit():  # the client only ever asks for "bytes=N-"
                self.send_error(400, f"unexpected Range {requested_range!r}")
                return
            start = int(digits)
            if start >= len(body):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(body)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(body) - start))
        self.send_header("Content-Type", "application/octet-stream")
        self.end_headers()
        if drop is None:
            self.wfile.write(body[start:])
            return
        self.wfile.write(body[start : start + drop])
        self.wfile.flush()
        self.close_connection = True
        if state.reset:  # with SO_LINGER 0, close() sends a TCP reset instead of an orderly FIN
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.connection.close()
        else:
            self.connection.shutdown(socket.SHUT_WR)

    def log_message(self, format: str, *args: object) -> None:  # keep test output quiet
        pass


class FileServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, behaviour: Behaviour) -> None:
        super().__init__(("127.0.0.1", 0), FileHandler)
        self.behaviour = behaviour

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    @property
    def requests(self) -> list[Seen]:
        with self.behaviour.lock:
            return list(self.behaviour.requests)

    def put(self, name: str, data: bytes) -> str:
        """Serve ``data`` as ``/name``; returns its sha256 checksum string."""
        (self.behaviour.root / name).write_bytes(data)
        return "sha256:" + hashlib.sha256(data).hexdigest()


@pytest.fixture
def server(tmp_path: Path) -> Iterator[FileServer]:
    served = tmp_path / "served"
    served.mkdir()
    httpd = FileServer(Behaviour(root=served))
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield httpd
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


@pytest.fixture(autouse=True)
def no_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(download, "_BACKOFF_S", 0.0)
