"""Request batching: concurrent requests share one forward pass.

Requests put their payload (the uploaded image bytes) on a queue and wait. One worker task takes the first waiting
request, then keeps taking requests until the batch holds ``max_batch`` images or ``max_wait`` has passed since that
first request arrived, and hands the whole batch to ``run`` in a thread, off the event loop: decoding and the
forward pass happen there, so the event loop only moves bytes. While it runs, new requests queue up, so under load
batches fill without waiting at all. The queue is bounded in images: past it, ``submit`` raises ``QueueFull`` at
once (the server answers 503 with Retry-After) instead of letting latency grow without end.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)


class QueueFull(RuntimeError):
    """The batching queue holds its maximum number of images."""


@dataclass
class _Pending:
    payload: Any
    size: int  # images in the payload
    arrived: float
    future: asyncio.Future = field(repr=False)


class Batcher:
    """Gathers payloads from concurrent ``submit`` calls into batches for ``run``.

    ``run(payloads) -> results`` is called in a worker thread, one batch at a time, and returns one result per
    payload, in order; a result that is an exception is raised in its own request only. ``on_batch(size)`` is told
    the number of images in every batch (for metrics).
    """

    def __init__(
        self,
        run: Callable[[list[Any]], list[Any]],
        *,
        max_batch: int,
        max_wait_s: float,
        max_queue: int,
        on_batch: Callable[[int], Any] | None = None,
    ) -> None:
        self.run = run
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.max_queue = max_queue
        self.on_batch = on_batch
        self.queued_images = 0  # images submitted and not yet taken into a batch
        self._queue: asyncio.Queue[_Pending] = asyncio.Queue()
        self._worker: asyncio.Task | None = None

    def start(self) -> None:
        self._worker = asyncio.get_running_loop().create_task(self._loop(), name="signpost-batcher")

    async def stop(self) -> None:
        """Stop the worker and fail whatever is still queued. The server calls it after its open requests have been
        answered (uvicorn's graceful shutdown), so normally nothing is left."""
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
        while not self._queue.empty():
            pending = self._queue.get_nowait()
            if not pending.future.done():
                pending.future.set_exception(RuntimeError("the server is shutting down"))

    async def submit(self, payload: Any, size: int) -> Any:
        """Queue ``payload`` (``size`` images) and wait for its result."""
        if self.queued_images + size > self.max_queue:
            raise QueueFull(f"{self.queued_images} images are waiting (serve.max_queue={self.max_queue})")
        future: asyncio.Future = asyncio.get_running_loop().create_future()
        self.queued_images += size
        self._queue.put_nowait(_Pending(payload, size, time.perf_counter(), future))
        return await future

    async def _loop(self) -> None:
        carry: _Pending | None = None
        while True:
            first = carry or await self._queue.get()
            carry = None
            batch = [first]
            size = first.size
            deadline = first.arrived + self.max_wait_s
            while size < self.max_batch:
                try:
                    nxt = self._queue.get_nowait()
                except asyncio.QueueEmpty:
                    remaining = deadline - time.perf_counter()
                    if remaining <= 0:
                        break
                    try:
                        nxt = await asyncio.wait_for(self._queue.get(), remaining)
                    except asyncio.TimeoutError:  # not the builtin TimeoutError on Python 3.10
                        break
                if size + nxt.size > self.max_batch:
                    carry = nxt  # it starts the next batch rather than overfilling this one
                    break
                batch.append(nxt)
                size += nxt.size
            await self._run(batch, size)

    async def _run(self, batch: list[_Pending], size: int) -> None:
        self.queued_images -= size
        live = [p for p in batch if not p.future.done()]  # a request that timed out waiting is skipped
        if not live:
            return
        if self.on_batch is not None:
            self.on_batch(sum(p.size for p in live))
        try:
            results = await asyncio.to_thread(self.run, [p.payload for p in live])
        except Exception as exc:  # one bad batch fails its requests, not the worker
            log.exception("a batch of %d requests failed", len(live))
            results = [exc] * len(live)
        for p, result in zip(live, results, strict=True):
            if p.future.done():
                continue
            if isinstance(result, BaseException):
                p.future.set_exception(result)
            else:
                p.future.set_result(result)
