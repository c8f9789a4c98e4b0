"""The prediction log's writer: batched writes off the request path, WAL mode, nothing lost on close."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

import numpy as np

from signpost.data.stats import STAT_NAMES, image_stats
from signpost.serve.predlog import EMBEDDING_COLUMNS, count, default_url
from signpost.serve.predlog_writer import PredictionLog


def _record(i: int, image: np.ndarray) -> dict:
    return {"ts": 1.0 + i, "request_id": f"r{i}", "model_version": "v1", "class_id": i % 5, "class_name": "c",
            "confidence": 0.9, "entropy": 0.3, "top_k": [[i % 5, 0.9]], "latency_ms": 2.0, "width": 40,
            "height": 30, "embedding": np.arange(8, dtype=np.float32) * i, "image": image}


def test_every_record_is_written_with_its_statistics_and_embedding(tmp_path: Path) -> None:
    url = default_url(tmp_path)
    images = np.random.default_rng(0).integers(0, 256, (300, 16, 16, 3), dtype=np.uint8)
    log = PredictionLog(url, batch_size=64, interval_s=0.05)
    for i in range(300):
        log.add(_record(i, images[i]))
    log.close()
    assert count(url) == 300 and log.written == 300 and log.dropped == 0
    db = sqlite3.connect(tmp_path / "serve" / "predictions.db")
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    row = db.execute(f"SELECT {', '.join(STAT_NAMES)}, {', '.join(EMBEDDING_COLUMNS)}, top_k FROM predictions "
                     "WHERE request_id = 'r7'").fetchone()
    expected = image_stats(images[7:8].transpose(0, 3, 1, 2))[0]
    assert np.allclose(row[: len(STAT_NAMES)], expected, atol=1e-6)
    assert np.allclose(row[len(STAT_NAMES) : -1], np.arange(8) * 7)
    assert row[-1] == "[[2, 0.9]]"


def test_a_reader_does_not_block_the_writer(tmp_path: Path) -> None:
    url = default_url(tmp_path)
    log = PredictionLog(url, batch_size=16, interval_s=0.01)
    image = np.zeros((8, 8, 3), dtype=np.uint8)
    stop = threading.Event()
    seen: list[int] = []

    def read() -> None:
        db = sqlite3.connect(tmp_path / "serve" / "predictions.db")
        while not stop.is_set():
            seen.append(db.execute("SELECT count(*) FROM predictions").fetchone()[0])

    reader = threading.Thread(target=read)
    reader.start()
    for i in range(500):
        log.add(_record(i, image))
    log.close()
    stop.set()
    reader.join()
    assert count(url) == 500 and log.failed_writes == 0 and max(seen) <= 500


def test_a_malformed_record_is_counted_and_does_not_stop_the_writer(tmp_path: Path) -> None:
    url = default_url(tmp_path)
    log = PredictionLog(url, batch_size=1, interval_s=0.01)
    log.add({"ts": 1.0})  # missing columns
    log.add(_record(1, np.zeros((8, 8, 3), dtype=np.uint8)))
    log.close()
    assert count(url) == 1 and log.failed_writes == 1
    log.add(_record(2, np.zeros((8, 8, 3), dtype=np.uint8)))  # after close: counted, not lost silently
    assert log.dropped == 1
