"""Slow, idle, vanishing and crowding clients, against a real uvicorn on 127.0.0.1 started as ``signpost serve``
starts it, with a raw socket as the client: a client that vanishes mid-body is an abort (not a 500, no traceback);
slow headers, slow bodies and idle connections are cut off after the configured time; past ``serve.max_connections``
a request gets 503."""

from __future__ import annotations

import json
import logging
import re
import select
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from signpost.serve.app import create_app
from tests.security.served import Served, make_config, read_all, small_model
from tests.serve.conftest import image_bytes

PROTOCOLS = {"httptools": HttpToolsProtocol, "h11": H11Protocol}
PREDICT_HEAD = "POST /v1/predict HTTP/1.1\r\nHost: test\r\nContent-Type: image/png\r\nContent-Length: {n}\r\n\r\n"


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return small_model(tmp_path_factory.mktemp("models") / "train" / "small-0123456789ab")


@pytest.fixture
def serve(model: Path, tmp_path: Path) -> Iterator[Callable[..., Served]]:
    """``serve(*overrides, http="httptools" or "h11", **keys)``: the service on a real uvicorn, ready; stopped
    after the test."""
    running: list[Served] = []

    def start(*overrides: str, http: str = "httptools", **keys: str) -> Served:
        config = make_config(tmp_path / f"work{len(running)}", *overrides)
        served = Served(create_app(config, str(model), **keys), config, base=PROTOCOLS[http])
        running.append(served.__enter__())
        served.wait_ready()
        return served

    yield start
    for served in running:
        served.__exit__()


def metric(served: Served, name: str, **labels: str) -> float:
    """The sum of ``name``'s samples in /metrics whose labels include ``labels``."""
    total = 0.0
    for line in httpx.get(f"{served.url}/metrics", timeout=5).text.splitlines():
        match = re.fullmatch(rf"{name}(?:\{{(.*)\}})? (\S+)", line)
        if match:
            have = dict(re.findall(r'(\w+)="([^"]*)"', match.group(1) or ""))
            if all(have.get(key) == value for key, value in labels.items()):
                total += float(match.group(2))
    return total


def wait_for(check: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not true after {timeout} s")
        time.sleep(0.05)


def trickle(sock: socket.socket, data: bytes, every_s: float = 0.1) -> bytes:
    """Send ``data`` a byte every ``every_s`` s (a slowloris client) until the server answers or closes, then read
    everything it sends. Bounded: ``len(data)`` bytes, then the socket's own read timeout."""
    for byte in data:
        readable, _, _ = select.select([sock], [], [], every_s)
        if readable:  # the server answered (or closed): stop sending, so its close cannot turn into a reset
            break
        try:
            sock.sendall(bytes([byte]))
        except OSError:
            break
    return read_all(sock)


def error_of(answer: bytes) -> dict:
    return json.loads(answer.partition(b"\r\n\r\n")[2])["error"]


def test_a_client_that_vanishes_mid_body_is_an_abort_not_a_server_error(
    serve: Callable[..., Served], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    served = serve()
    body = image_bytes(size=(200, 200))
    for _ in range(5):
        with served.connect() as sock:  # half the body, then gone
            sock.sendall(PREDICT_HEAD.format(n=len(body)).encode() + body[: len(body) // 2])
    wait_for(lambda: metric(served, "signpost_client_aborts_total", route="/v1/predict") == 5)
    assert metric(served, "signpost_requests_total", route="/v1/predict", status="499") == 5
    assert metric(served, "signpost_requests_total", status="500") == 0
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]
    assert "Traceback" not in caplog.text
    aborts = [r.getMessage() for r in caplog.records if r.name == "signpost.serve.app" and "closed" in r.getMessage()]
    assert len(aborts) == 5 and all("\n" not in line for line in aborts), aborts
    # The server is unharmed: a whole request is answered.
    answer = httpx.post(f"{served.url}/v1/predict", content=body, headers={"Content-Type": "image/png"}, timeout=30)
    assert answer.status_code == 200, answer.text


@pytest.mark.parametrize("http", PROTOCOLS)
def test_headers_sent_too_slowly_are_cut_off_with_408(serve: Callable[..., Served], http: str) -> None:
    served = serve("serve.header_timeout_s=0.5", http=http)
    with served.connect() as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: test\r\n")
        # Each byte arrives well within any per-read timeout: only a deadline on the whole head cuts this off.
        answer = trickle(sock, b"X-Slow: " + b"a" * 100)
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    error = error_of(answer)
    assert error["code"] == "header_timeout" and "serve.header_timeout_s" in error["message"]
    assert metric(served, "signpost_slow_clients_total", reason="header_timeout") == 1


def test_idle_connections_are_closed(serve: Callable[..., Served]) -> None:
    served = serve("serve.header_timeout_s=0.5", "serve.keep_alive_s=0.5")
    with served.connect() as fresh:  # connects, sends nothing
        assert read_all(fresh) == b""
    with served.connect() as kept:  # one request, then idle on the kept-alive connection
        kept.sendall(b"GET /healthz HTTP/1.1\r\nHost: test\r\n\r\n")
        answer = read_all(kept)
    assert answer.startswith(b"HTTP/1.1 200") and answer.endswith(b'{"status":"ok"}'), answer
    assert metric(served, "signpost_slow_clients_total", reason="idle") == 1


def test_a_body_sent_too_slowly_gets_408(serve: Callable[..., Served]) -> None:
    served = serve("serve.body_timeout_s=0.5")
    body = image_bytes()
    with served.connect() as sock:
        sock.sendall(PREDICT_HEAD.format(n=len(body)).encode())
        answer = trickle(sock, body[:100])
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    error = error_of(answer)
    assert error["code"] == "body_timeout" and "serve.body_timeout_s" in error["message"]
    assert metric(served, "signpost_requests_total", route="/v1/predict", status="408") == 1
    assert metric(served, "signpost_slow_clients_total", reason="body_timeout") == 1
    assert metric(served, "signpost_requests_total", status="500") == 0


def test_a_slow_body_that_a_route_reads_without_a_deadline_is_cut_off_too(serve: Callable[..., Served]) -> None:
    # The admin route's JSON body is read by FastAPI before the key is checked: a stranger could trickle it.
    served = serve("serve.body_timeout_s=0.5", admin_key="admin-secret")
    with served.connect() as sock:
        sock.sendall(b"POST /v1/admin/reload HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 1000\r\n\r\n{")
        answer = trickle(sock, b" " * 100)
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert metric(served, "signpost_slow_clients_total", reason="body_timeout") == 1


def test_an_oversized_request_head_gets_431(serve: Callable[..., Served]) -> None:
    served = serve("serve.max_header_bytes=2048")
    with served.connect() as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: test\r\nX-Big: " + b"a" * 8192 + b"\r\n\r\n")
        answer = read_all(sock)
    assert answer.startswith(b"HTTP/1.1 431"), answer[:200]
    assert "serve.max_header_bytes" in error_of(answer)["message"]
    # A body many times that size, sent with its head in one go, is body: it does not count.
    body = image_bytes(size=(200, 200))
    with served.connect() as sock:
        sock.sendall(PREDICT_HEAD.format(n=len(body)).encode() + body)
        status = sock.recv(64)
    assert status.startswith(b"HTTP/1.1 200"), status


def test_requests_beyond_max_connections_get_503(serve: Callable[..., Served]) -> None:
    served = serve("serve.max_connections=4")
    held = [served.connect() for _ in range(4)]  # open, idle (the header deadline is 10 s)
    try:
        wait_for(lambda: httpx.get(f"{served.url}/healthz", timeout=5).status_code == 503)
    finally:
        for sock in held:
            sock.close()
    wait_for(lambda: httpx.get(f"{served.url}/healthz", timeout=5).status_code == 200)
