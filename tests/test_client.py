"""The client for a running Signpost server, against a stand-in server on loopback that answers as one would."""

from __future__ import annotations

import hashlib
import json
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from signpost.client import ask_server, served_model, service_url
from signpost.models.artifact import ModelCard

CARD = ModelCard(architecture="signnet", num_classes=2, class_names=["stop", "yield"], image_size=32,
                 mean=[0.5, 0.5, 0.5], std=[0.25, 0.25, 0.25], data_artifact="data-1", data_key="k" * 64)


class _Handler(BaseHTTPRequestHandler):
    """``/ok``: a ready server serving CARD as v1; ``/moved``: redirects to ``/ok``; ``/starting``: not ready."""

    def do_GET(self) -> None:
        if self.path == "/ok/v1/model":  # the card as serve/model.py describes it: without the training config
            card = CARD.model_dump(mode="json", exclude={"config"})
            self._answer(200, {"version": "v1", "runtime": "eager", "card": card})
        elif self.path == "/moved/v1/model":
            self.send_response(302)
            self.send_header("Location", "/ok/v1/model")
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif self.path == "/starting/v1/model":
            self._answer(503, {"error": {"message": "the model is loading"}})
        else:
            self._answer(404, {"error": {"message": "not found"}})

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        if self.headers.get("X-API-Key") != "secret":
            self._answer(401, {"error": {"message": "missing or wrong API key"}})
        elif body == b"not an image":
            self._answer(400, {"error": {"message": "cannot decode the image"}})
        else:
            self._answer(200, {"class_id": len(body) % 2, "model_version": "v1"})

    def _answer(self, status: int, payload: dict) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: object) -> None:  # quiet: the test output is pytest's
        pass


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=10)


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_service_url_takes_a_server_address_only() -> None:
    assert service_url("http://127.0.0.1:8000/") == "http://127.0.0.1:8000"
    for bad in ("127.0.0.1:8000", "ftp://host/", "http://127.0.0.1:8000/?x=1", "http:///v1"):
        with pytest.raises(ValueError, match="give the server's address"):
            service_url(bad)


def test_served_model_is_checked_against_the_card(server: str, tmp_path: Path) -> None:
    info = served_model(f"{server}/ok", CARD, tmp_path, timeout_s=10)
    assert info["version"] == "v1"
    other = CARD.model_copy(update={"image_size": 48})
    with pytest.raises(RuntimeError, match="their cards differ in image_size"):
        served_model(f"{server}/ok", other, tmp_path, timeout_s=10)


def test_a_redirect_is_not_followed_and_a_server_not_ready_says_so(server: str, tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="answered HTTP 302"):
        served_model(f"{server}/moved", CARD, tmp_path, timeout_s=10)
    with pytest.raises(RuntimeError, match=r"is not ready yet \(the model is loading\)"):
        served_model(f"{server}/starting", CARD, tmp_path, timeout_s=10)
    with pytest.raises(ConnectionError, match="cannot reach"):
        served_model(f"http://127.0.0.1:{_closed_port()}", CARD, tmp_path, timeout_s=10)


def test_each_file_gets_its_class_or_the_servers_error(server: str, tmp_path: Path) -> None:
    files = []
    for name, body in (("a.ppm", b"xx"), ("b.ppm", b"not an image"), ("c.ppm", b"xxx")):
        (tmp_path / name).write_bytes(body)
        files.append((tmp_path / name, hashlib.sha256(body).hexdigest()))
    answers = ask_server(f"{server}/ok", files, concurrency=2, timeout_s=10, api_key="secret", progress=False)
    assert answers == [(0, "v1"), "HTTP 400: cannot decode the image", (1, "v1")]
    assert ask_server(f"{server}/ok", files[:1], concurrency=1, timeout_s=10, api_key=None,
                      progress=False) == ["HTTP 401: missing or wrong API key"]


def test_a_file_changed_since_prepare_stops_the_measurement(server: str, tmp_path: Path) -> None:
    path = tmp_path / "a.ppm"
    path.write_bytes(b"changed")
    with pytest.raises(ValueError, match="changed since the data was prepared"):
        ask_server(f"{server}/ok", [(path, hashlib.sha256(b"original").hexdigest())], concurrency=1, timeout_s=10,
                   api_key="secret", progress=False)
