"""The server's writes to the prediction log, off the request path: a queue and a writer thread.

Requests hand their records to ``PredictionLog.add``, which only appends to an in-memory queue. A writer thread
takes up to ``batch_size`` records at a time (or whatever has arrived after ``interval_s``) and inserts them in one
transaction into the log ``signpost.serve.predlog`` opens (a SQLite file in WAL mode by default: readers, such as
the monitor, never block the writer, and a crash loses at most the transaction in flight). ``close`` writes
everything still queued before it returns: the server calls it on shutdown (SIGTERM, SIGINT), so a stopped server
has logged every prediction it answered. The image statistics are computed here too, a batch at a time.

A device's batch (``store_batch``, for the ingest route) is written at once instead, in the caller's thread: the
device is told it is stored only once it is, and the batch's id goes in with its rows in one transaction.
"""

from __future__ import annotations

import json
import logging
import math
import queue
import threading
import time
from collections.abc import Mapping
from typing import Any

import numpy as np
from sqlalchemy import insert, select
from sqlalchemy.exc import IntegrityError

from signpost.data.stats import STAT_NAMES, image_stats
from signpost.serve.predlog import EMBEDDING_COLUMNS, ingest_batches, make_engine, predictions, request_errors

log = logging.getLogger(__name__)

_ERROR = "__error__"  # marks a queued request_errors row among prediction records


class PredictionLog:
    """Batched, off-request-path writes of prediction records (see the module doc).

    ``experiment``: the config name of the server writing, stamped on every record and error row that does not
    name one (without it, they read as UNKNOWN_EXPERIMENT).
    """

    def __init__(self, url: str, *, batch_size: int = 256, interval_s: float = 0.5, max_pending: int = 1_000_000,
                 experiment: str | None = None):
        self.url = url
        self.experiment = experiment
        self.batch_size = batch_size
        self.interval_s = interval_s
        self.max_pending = max_pending
        self.written = 0
        self.dropped = 0  # records refused because the writer fell max_pending behind (counted, never silent)
        self.failed_writes = 0
        self._engine = make_engine(url)
        self._queue: queue.SimpleQueue[dict[str, Any] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._write_loop, name="signpost-prediction-log", daemon=True)
        self._closed = False
        self._thread.start()

    def add(self, record: Mapping[str, Any]) -> None:
        """Queue one record; never blocks, never raises.

        A record holds the table's columns, except that ``top_k`` may be a list, and the image statistics and
        embedding columns come as ``image`` (uint8 [H, W, 3], the preprocessed pixels) and ``embedding`` (float
        [EMBEDDING_DIMS]): the writer computes the statistics a batch at a time, off the request path.
        """
        if self._closed or self._queue.qsize() >= self.max_pending:
            self.dropped += 1
            return
        self._queue.put(dict(record))

    def add_error(self, route: str, status: int, code: str) -> None:
        """Queue one answered-with-an-error prediction request (for the monitor's error rate); never blocks."""
        if self._closed or self._queue.qsize() >= self.max_pending:
            self.dropped += 1
            return
        self._queue.put({_ERROR: True, "ts": time.time(), "route": route, "status": status, "code": code})

    def pending(self) -> int:
        return self._queue.qsize()

    def store_batch(self, device_id: str, batch_id: str, rows: list[dict[str, Any]]) -> int | None:
        """Write a device's batch of table rows (each naming ``device_id``) now, with its ``ingest_batches`` row,
        in one transaction: the number of rows stored, or None when the device's ``batch_id`` was stored before
        (by an earlier try, or by a concurrent one that committed first), and nothing was written.

        One transaction: a crash between the two inserts leaves neither, so the device's retry stores the batch
        whole, once. Blocks for the write (call it from a worker thread).
        """
        marker = {"device_id": device_id, "batch_id": batch_id, "received_ts": time.time(), "records": len(rows)}
        try:
            with self._engine.connect() as conn:
                if self._engine.dialect.name == "sqlite":
                    # Take the write lock first: the id's check and the rows then see the same, newest database.
                    conn.exec_driver_sql("BEGIN IMMEDIATE")
                conn.execute(insert(ingest_batches), [marker])  # a batch id stored before: IntegrityError here
                if rows:
                    conn.execute(insert(predictions), rows)
                conn.commit()
        except IntegrityError:
            if not self._batch_stored(device_id, batch_id):
                raise  # not the batch id: a row the table refused, which validation should have caught
            return None
        return len(rows)

    def _batch_stored(self, device_id: str, batch_id: str) -> bool:
        with self._engine.connect() as conn:
            found = conn.execute(select(ingest_batches.c.records).where(
                ingest_batches.c.device_id == device_id, ingest_batches.c.batch_id == batch_id)).first()
        return found is not None

    def close(self, timeout_s: float = 30.0) -> None:
        """Write every queued record, then stop the writer. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        self._queue.put(None)
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            log.error("the prediction log writer did not finish in %.0f s; %d records unwritten",
                      timeout_s, self._queue.qsize())
        self._engine.dispose()
        log.info("prediction log closed: %d written, %d dropped, %d failed writes", self.written, self.dropped,
                 self.failed_writes)

    def _write_loop(self) -> None:
        stop = False
        while not stop:
            rows: list[dict[str, Any]] = []
            first = self._queue.get()
            if first is None:
                stop = True
            else:
                rows.append(first)
            deadline = time.monotonic() + self.interval_s
            while not stop and len(rows) < self.batch_size:
                try:
                    item = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if item is None:
                    stop = True
                else:
                    rows.append(item)
            if stop:  # drain whatever arrived before close()
                while True:
                    try:
                        item = self._queue.get_nowait()
                    except queue.Empty:
                        break
                    if item is not None:
                        rows.append(item)
            for start in range(0, len(rows), self.batch_size):
                self._write(rows[start : start + self.batch_size])

    def _write(self, rows: list[dict[str, Any]]) -> None:
        if self.experiment is not None:
            for row in rows:
                row.setdefault("experiment", self.experiment)
        errors = [{k: v for k, v in row.items() if k != _ERROR} for row in rows if _ERROR in row]
        if errors:
            try:
                with self._engine.begin() as conn:
                    conn.execute(insert(request_errors), errors)
            except Exception as exc:  # error counts are a health signal, not the record of an answer
                log.warning("writing %d request-error records failed: %s", len(errors), exc)
            rows = [row for row in rows if _ERROR not in row]
        if not rows:
            return
        try:
            rows = _columns(rows)
        except Exception:  # a malformed record must not stop the writer: count the batch as lost, loudly
            log.exception("%d prediction records could not be prepared for writing", len(rows))
            self.failed_writes += len(rows)
            return
        for attempt in range(3):
            try:
                with self._engine.begin() as conn:
                    conn.execute(insert(predictions), rows)
                self.written += len(rows)
                return
            except Exception as exc:  # a locked or unreachable store: retry, then count the loss loudly
                log.warning("writing %d prediction records failed (attempt %d): %s", len(rows), attempt + 1, exc)
                time.sleep(0.2 * (attempt + 1))
        self.failed_writes += len(rows)
        log.error("dropped %d prediction records after 3 failed writes to %s", len(rows), self.url)


def _columns(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Records as table rows: ``top_k`` as JSON, ``image`` -> the statistics columns (one vectorized call for the
    whole batch), ``embedding`` -> emb0.., non-finite floats -> 0 (SQL has no NaN everywhere)."""
    with_images = [i for i, row in enumerate(rows) if "image" in row]
    if with_images:
        stats = image_stats(np.stack([rows[i]["image"] for i in with_images]).transpose(0, 3, 1, 2))
        stats = np.nan_to_num(stats, nan=0.0, posinf=0.0, neginf=0.0)
        for i, values in zip(with_images, stats.tolist(), strict=True):
            rows[i].update(zip(STAT_NAMES, values, strict=True))
    out = []
    for row in rows:
        row.pop("image", None)
        embedding = row.pop("embedding", None)
        if embedding is not None:
            values = np.nan_to_num(np.asarray(embedding, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
            row.update(zip(EMBEDDING_COLUMNS, values.tolist(), strict=True))
        if not isinstance(row.get("top_k"), str):
            row["top_k"] = json.dumps(row.get("top_k", []))
        for key in ("confidence", "entropy", "latency_ms"):
            if not math.isfinite(row[key]):
                row[key] = 0.0
        out.append(row)
    return out
