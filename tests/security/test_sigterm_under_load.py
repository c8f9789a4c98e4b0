"""`signpost serve` as a real process: it answers over loopback, and SIGTERM flushes the prediction log."""

from __future__ import annotations

import concurrent.futures
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from signpost.serve.predlog import count, default_url
from tests.serve.conftest import image_bytes


def test_sigterm_after_n_requests_leaves_n_records(optimized: dict, tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    workdir = tmp_path / "work"
    server = subprocess.Popen(
        [sys.executable, "-m", "signpost.cli", "serve", "--model", str(optimized["model_dir"]), "--port", str(port),
         f"workdir={workdir}", "tracking.backend=none", "serve.log_interval_s=30", "serve.log_batch_size=100000"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            assert server.poll() is None, server.stderr.read()
            assert time.monotonic() < deadline, "the server did not become ready"
            try:
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        images = [image_bytes(seed=i) for i in range(8)]

        def post(i: int) -> int:
            with httpx.Client(timeout=30) as client:
                return client.post(f"{url}/v1/predict", content=images[i % 8],
                                   headers={"Content-Type": "image/png"}).status_code

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            statuses = list(pool.map(post, range(60)))
        assert statuses == [200] * 60
        # The writer holds everything (30 s interval, huge batches): only the shutdown can have written it.
        assert count(default_url(workdir)) == 0
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(60)
    assert count(default_url(workdir)) == 60
