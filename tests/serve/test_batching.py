"""Request batching: concurrent requests share forward passes, within the size and wait limits, bounded in queue."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time

import httpx
import pytest

from signpost.serve.app import create_app
from signpost.serve.batching import Batcher, QueueFull
from tests.serve.conftest import LoopbackServer, image_bytes, serve_config


def _echo_batcher(calls: list[list[int]], **limits: float) -> Batcher:
    def run(payloads: list[int]) -> list[object]:
        calls.append(list(payloads))
        return [ValueError(f"bad {p}") if p < 0 else p * 10 for p in payloads]

    return Batcher(run, **{"max_batch": 4, "max_wait_s": 0.05, "max_queue": 100, **limits})


def test_concurrent_submits_are_batched_up_to_the_limit_and_answered_in_order() -> None:
    calls: list[list[int]] = []

    async def scenario() -> list[int]:
        batcher = _echo_batcher(calls)
        batcher.start()
        try:
            return await asyncio.gather(*(batcher.submit(i, 1) for i in range(10)))
        finally:
            await batcher.stop()

    assert asyncio.run(scenario()) == [i * 10 for i in range(10)]
    assert all(len(c) <= 4 for c in calls) and len(calls) == 3  # 4 + 4 + 2
    assert sorted(p for c in calls for p in c) == list(range(10))


def test_a_lone_request_waits_at_most_max_wait() -> None:
    async def scenario() -> float:
        batcher = _echo_batcher([], max_wait_s=0.05)
        batcher.start()
        started = time.perf_counter()
        await batcher.submit(1, 1)
        elapsed = time.perf_counter() - started
        await batcher.stop()
        return elapsed

    assert 0.04 <= asyncio.run(scenario()) < 0.5


def test_an_error_fails_only_its_own_request() -> None:
    async def scenario() -> list[object]:
        batcher = _echo_batcher([])
        batcher.start()
        try:
            return await asyncio.gather(batcher.submit(1, 1), batcher.submit(-1, 1), batcher.submit(2, 1),
                                        return_exceptions=True)
        finally:
            await batcher.stop()

    first, second, third = asyncio.run(scenario())
    assert first == 10 and third == 20 and isinstance(second, ValueError)


def test_a_full_queue_refuses_at_once() -> None:
    release = threading.Event()

    def run(payloads: list[int]) -> list[int]:
        release.wait(5)
        return payloads

    async def scenario() -> None:
        batcher = Batcher(run, max_batch=1, max_wait_s=0, max_queue=2)
        batcher.start()
        first = asyncio.ensure_future(batcher.submit(1, 1))
        await asyncio.sleep(0.05)  # the worker takes it: the queue is empty again, the worker busy
        queued = [asyncio.ensure_future(batcher.submit(i, 1)) for i in (2, 3)]
        await asyncio.sleep(0.01)
        with pytest.raises(QueueFull, match="max_queue=2"):
            await batcher.submit(4, 1)
        release.set()
        assert await first == 1 and [await q for q in queued] == [2, 3]
        await batcher.stop()

    asyncio.run(scenario())


def test_the_real_server_batches_concurrent_requests_and_sheds_load_with_503(optimized: dict, tmp_path) -> None:
    config = serve_config(optimized, tmp_path, "serve.max_batch_size=16", "serve.max_wait_ms=20",
                          "serve.max_queue=24")
    app = create_app(config, str(optimized["model_dir"]))
    image = image_bytes()
    with LoopbackServer(app) as server:
        with httpx.Client(base_url=server.url, timeout=30) as client:
            deadline = time.monotonic() + 120
            while client.get("/readyz").status_code != 200:
                assert time.monotonic() < deadline
                time.sleep(0.05)

        def post(_: int) -> httpx.Response:
            with httpx.Client(base_url=server.url, timeout=30) as c:
                return c.post("/v1/predict", content=image, headers={"Content-Type": "image/png"})

        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            answers = list(pool.map(post, range(32)))
        assert all(a.status_code == 200 for a in answers)
        batches = app.state.signpost.metrics.batch_size
        count = next(s.value for s in batches.collect()[0].samples if s.name.endswith("_count"))
        assert count < 32, "every request ran its own forward pass"

        # Hold the worker, fill the queue: the overflow is told to come back later.
        model = app.state.signpost.model
        original = model.predictor.forward
        release = threading.Event()

        def held(x):
            release.wait(10)
            return original(x)

        model.predictor.forward = held
        try:
            with concurrent.futures.ThreadPoolExecutor(40) as pool:
                futures = [pool.submit(post, i) for i in range(40)]
                time.sleep(1.0)
                release.set()
                answers = [f.result() for f in futures]
        finally:
            model.predictor.forward = original
        refused = [a for a in answers if a.status_code == 503]
        assert refused and all(a.headers["Retry-After"] == "1" for a in refused)
        assert refused[0].json()["error"]["code"] == "overloaded"
        assert all(a.status_code in (200, 503) for a in answers)
        with httpx.Client(base_url=server.url) as client:
            assert client.post("/v1/predict", content=image, headers={"Content-Type": "image/png"}).status_code == 200
