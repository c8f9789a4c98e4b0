"""Fixtures for the service: apps on the small optimized model, real images, and a real uvicorn on loopback."""

from __future__ import annotations

import io
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import uvicorn
from fastapi import FastAPI
from fastapi.testclient import TestClient
from PIL import Image

from signpost.config import SignpostConfig
from signpost.serve.app import create_app


def image_bytes(fmt: str = "PNG", size: tuple[int, int] = (48, 40), seed: int = 0) -> bytes:
    """A real image file in ``fmt``."""
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, fmt)
    return buffer.getvalue()


def serve_config(optimized: dict, workdir: Path, *overrides: str) -> SignpostConfig:
    base: SignpostConfig = optimized["config"]
    config = base.model_copy(deep=True)
    config.workdir = workdir
    for item in overrides:
        section, _, rest = item.partition(".")
        key, _, value = rest.partition("=")
        setattr(getattr(config, section), key, value)
    return config


def wait_ready(client: TestClient, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if client.get("/readyz").status_code == 200:
            return
        time.sleep(0.05)
    raise AssertionError(f"not ready after {timeout} s: {client.get('/readyz').json()}")


@pytest.fixture
def make_client(optimized: dict, tmp_path: Path) -> Iterator:
    """``make_client(model=..., overrides..., **keys)``: a started TestClient, ready; closed after the test."""
    clients: list[TestClient] = []

    def make(model: Path | str | None = None, *overrides: str, ready: bool = True, **keys: str) -> TestClient:
        config = serve_config(optimized, tmp_path / f"work{len(clients)}", *overrides)
        app = create_app(config, str(model or optimized["model_dir"]), **keys)
        client = TestClient(app, raise_server_exceptions=False)
        client.__enter__()
        clients.append(client)
        if ready:
            wait_ready(client)
        return client

    yield make
    for client in clients:
        client.__exit__(None, None, None)


class LoopbackServer:
    """A real uvicorn server for ``app`` on 127.0.0.1, in a thread."""

    def __init__(self, app: FastAPI) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> LoopbackServer:
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise AssertionError("uvicorn did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(30)
