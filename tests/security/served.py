"""Helpers for the serving security tests: a small model artifact made by hand, and the app on a real uvicorn on
127.0.0.1, started with the settings ``signpost serve`` uses (``serve.server.uvicorn_config``)."""

from __future__ import annotations

import hashlib
import socket
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import uvicorn
from fastapi import FastAPI

from signpost.artifacts import atomic_dir, write_manifest
from signpost.config import SignpostConfig, load_config
from signpost.models import build_model
from signpost.models.artifact import ModelCard, save_model
from signpost.serve.server import uvicorn_config
from tests.serve.conftest import LoopbackServer

CLASSES = ["stop", "yield", "priority road"]


def small_model(folder: Path) -> Path:
    """An untrained signnet in a model artifact folder, written the way the train stage writes one (these tests
    look at what the server says and when, not at what the model predicts)."""
    card = ModelCard(architecture="signnet", num_classes=len(CLASSES), class_names=CLASSES, image_size=32,
                     mean=[0.5, 0.5, 0.5], std=[0.25, 0.25, 0.25], data_artifact="data-0123456789ab",
                     data_key="0" * 64)
    with atomic_dir(folder) as tmp:
        save_model(tmp, build_model("signnet", len(CLASSES), 32), card)
        write_manifest(tmp, stage="train", key=hashlib.sha256(folder.name.encode()).hexdigest(), inputs={},
                       config={}, code="test")
    return folder


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_config(workdir: Path, *overrides: str) -> SignpostConfig:
    """Defaults plus ``overrides``, writing under ``workdir``, on a free port of 127.0.0.1."""
    return load_config(None, [f"workdir={workdir}", "tracking.backend=none", "serve.host=127.0.0.1",
                              f"serve.port={free_port()}", *overrides])


class Served(LoopbackServer):
    """A real uvicorn server on 127.0.0.1 in a thread, started the way ``signpost serve`` starts it (with
    ``serve.*``'s client limits): ``LoopbackServer``'s start and stop, on ``uvicorn_config``."""

    def __init__(self, app: FastAPI, config: SignpostConfig, **options: Any) -> None:
        self.port = config.serve.port
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn_config(app, config, log_config=None, **options))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def connect(self, timeout: float = 10.0) -> socket.socket:
        """A raw TCP connection to the server; reads give up after ``timeout`` s."""
        return socket.create_connection(("127.0.0.1", self.port), timeout=timeout)

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while httpx.get(f"{self.url}/readyz", timeout=5).status_code != 200:
            if time.monotonic() > deadline:
                raise AssertionError(f"not ready after {timeout} s")
            time.sleep(0.05)


def read_all(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (raises ``TimeoutError`` if it does not)."""
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)
