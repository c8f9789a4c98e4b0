"""The device's own prediction log: every record the agent makes, in a local SQLite file (stdlib ``sqlite3``, WAL),
until the shipper has delivered it to the central server.

A row is the ``PredictionRecord`` the server would log (``signpost.monitoring.records``, kept as its JSON, exactly
what is shipped), the device id, the watched file it came from (so a file is never classified twice, also across a
restart), the batch it was put in (the id is fixed when the batch is formed and stored with it, so a batch resent
after a timeout or a restart carries the same id and the server stores it once) and whether it was shipped.

The buffer is bounded: at most ``max_buffer`` unshipped records. Past that the oldest unshipped records not already
in a formed batch are deleted and counted (the ``dropped`` counter, kept in the file): the monitor cares about what
the device sees now, so a device cut off for days keeps its newest records rather than its oldest, and it never
stops answering. Every commit is synced (``synchronous=FULL``): a device loses power more often than a server, and a
record the agent has logged survives a kill -9 or a power cut.

Shipped rows are kept as a local history up to ``keep_shipped`` rows; past that the oldest are deleted after each
shipped batch (their number stays in the ``shipped`` counter). An unshipped row is never deleted that way, nor one
whose watched file is not moved out of the folder yet (its ``source`` is cleared once it is: ``moved``), so the file is
still never classified twice.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from signpost.monitoring.records import PredictionRecord

log = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS records (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    device_id TEXT NOT NULL,
    ts REAL NOT NULL,
    model_version TEXT NOT NULL,
    class_name TEXT NOT NULL,
    source TEXT UNIQUE,
    record TEXT NOT NULL,
    batch_id TEXT,
    shipped INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS records_unshipped ON records (shipped, seq);
"""


class LocalLogError(RuntimeError):
    """A log that cannot be used: unreadable, or another device's."""


@dataclass(frozen=True)
class LogStatus:
    """What the log holds: records still to ship, and those shipped and dropped past the buffer bound (ever)."""

    unshipped: int
    shipped: int
    dropped: int


@dataclass(frozen=True)
class Batch:
    """Records to ship together under one id; ``records`` are the JSON objects of ``PredictionRecord``."""

    batch_id: str
    records: list[dict[str, Any]]


class LocalLog:
    """The SQLite prediction log of one device (see the module doc). Safe to share between threads."""

    def __init__(self, path: Path, device_id: str, max_buffer: int, keep_shipped: int = 100_000) -> None:
        if max_buffer < 1:
            raise ValueError(f"max_buffer {max_buffer}: keep at least one unshipped record (--max-buffer >= 1)")
        if keep_shipped < 0:
            raise ValueError(f"keep_shipped {keep_shipped}: give a number of shipped rows to keep, 0 or more "
                             "(--keep-shipped)")
        self.path = Path(path)
        self.device_id = device_id
        self.max_buffer = max_buffer
        self.keep_shipped = keep_shipped
        self._lock = threading.Lock()
        self._full = False
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # isolation_level None: transactions are begun here explicitly, so a batch is formed in one of them
            self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=10)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(_SCHEMA)
            owner = self._db.execute("SELECT value FROM meta WHERE name = 'device_id'").fetchone()
            if owner is None:
                self._db.execute("INSERT INTO meta VALUES ('device_id', ?)", (device_id,))
            elif owner[0] != device_id:
                raise LocalLogError(f"{self.path} is device {owner[0]!r}'s log, not {device_id!r}'s: give each "
                                    "device its own --log file")
            self._unshipped = self._db.execute("SELECT COUNT(*) FROM records WHERE shipped = 0").fetchone()[0]
            # Counted once here, then kept up to date: status() runs on every shipped batch
            self._kept = self._db.execute("SELECT COUNT(*) FROM records WHERE shipped = 1").fetchone()[0]
            # A log from before the counter existed: every shipped record is still in it
            self._db.execute("INSERT OR IGNORE INTO counters VALUES ('shipped', ?)", (self._kept,))
            self._shipped = self._db.execute("SELECT value FROM counters WHERE name = 'shipped'").fetchone()[0]
        except sqlite3.Error as exc:
            raise LocalLogError(f"{self.path}: cannot open it as the agent's SQLite log ({exc}); give another "
                                "--log file") from None

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def seen(self, source: str) -> bool:
        """Whether a record from ``source`` (a watched file) is already in the log."""
        with self._lock:
            return self._db.execute("SELECT 1 FROM records WHERE source = ?", (source,)).fetchone() is not None

    def moved(self, source: str) -> None:
        """The watched file ``source`` is out of the folder (moved, or taken away): its row no longer guards it,
        so a new file with the same name, size and time is classified, and the row may be deleted once shipped."""
        with self._lock, self._transaction():
            self._db.execute("UPDATE records SET source = NULL WHERE source = ?", (source,))

    def add(self, record: PredictionRecord, source: str | None = None) -> int:
        """Keep ``record`` (from the watched file ``source``, or None), committed before this returns; the
        records dropped to keep the buffer bound, 0 mostly."""
        text = record.model_dump_json()
        with self._lock, self._transaction():
            self._db.execute(
                "INSERT INTO records (device_id, ts, model_version, class_name, source, record) VALUES "
                "(?, ?, ?, ?, ?, ?)",
                (self.device_id, record.ts, record.model_version, record.class_name, source, text))
            self._unshipped += 1
            over = self._unshipped - self.max_buffer
            dropped = 0
            if over > 0:
                dropped = self._db.execute(
                    "DELETE FROM records WHERE seq IN (SELECT seq FROM records WHERE shipped = 0 AND batch_id IS "
                    "NULL ORDER BY seq LIMIT ?)", (over,)).rowcount
                self._db.execute("INSERT INTO counters VALUES ('dropped', ?) ON CONFLICT (name) DO UPDATE SET "
                                 "value = value + excluded.value", (dropped,))
                self._unshipped -= dropped
        if dropped and not self._full:  # once per time the buffer fills, not once per record; status() counts them
            log.warning("buffer full (%d unshipped records, --max-buffer): dropping the oldest unshipped records "
                        "until the server takes some", self.max_buffer)
        self._full = dropped > 0
        return dropped

    def next_batch(self, size: int, flush_s: float, *, force: bool = False, now: float | None = None) -> Batch | None:
        """The batch to ship next: the one formed before and not yet shipped (same id, same records), else a new
        one of the oldest ``size`` unshipped records, formed when there are ``size`` of them, or the oldest is
        ``flush_s`` seconds old, or ``force``; None when there is nothing to ship yet."""
        now = time.time() if now is None else now
        with self._lock, self._transaction():
            row = self._db.execute("SELECT batch_id FROM records WHERE shipped = 0 AND batch_id IS NOT NULL "
                                   "ORDER BY seq LIMIT 1").fetchone()
            if row is None:
                oldest = self._db.execute("SELECT ts FROM records WHERE shipped = 0 ORDER BY seq LIMIT 1").fetchone()
                if oldest is None or (not force and self._unshipped < size and now - oldest[0] < flush_s):
                    return None
                row = (uuid.uuid4().hex,)
                self._db.execute("UPDATE records SET batch_id = ? WHERE seq IN (SELECT seq FROM records WHERE "
                                 "shipped = 0 ORDER BY seq LIMIT ?)", (row[0], size))
            records = self._db.execute("SELECT record FROM records WHERE batch_id = ? AND shipped = 0 ORDER BY seq",
                                       (row[0],)).fetchall()
        return Batch(row[0], [json.loads(text) for (text,) in records])

    def mark_shipped(self, batch_id: str) -> int:
        """The server has stored batch ``batch_id`` (or had before): its records are shipped. How many."""
        with self._lock:
            with self._transaction():
                count = self._db.execute("UPDATE records SET shipped = 1 WHERE batch_id = ? AND shipped = 0",
                                         (batch_id,)).rowcount
                self._db.execute("UPDATE counters SET value = value + ? WHERE name = 'shipped'", (count,))
                over = self._kept + count - self.keep_shipped
                deleted = 0
                if over > 0:  # the oldest shipped rows whose files are out of the folder; never an unshipped one
                    deleted = self._db.execute(
                        "DELETE FROM records WHERE seq IN (SELECT seq FROM records WHERE shipped = 1 AND source IS "
                        "NULL ORDER BY seq LIMIT ?)", (over,)).rowcount
            self._unshipped -= count  # after the commit: a rolled-back transaction changes no count
            self._shipped += count
            self._kept += count - deleted
        return count

    def release(self, batch_id: str) -> None:
        """Undo forming batch ``batch_id``: the server refused it whole (413, too large) and stored none of it,
        so its records may go again in smaller batches under new ids."""
        with self._lock, self._transaction():
            self._db.execute("UPDATE records SET batch_id = NULL WHERE batch_id = ? AND shipped = 0", (batch_id,))

    def status(self) -> LogStatus:
        with self._lock:
            dropped = self._db.execute("SELECT value FROM counters WHERE name = 'dropped'").fetchone()
            return LogStatus(self._unshipped, self._shipped, 0 if dropped is None else dropped[0])

    def _transaction(self) -> _Transaction:
        return _Transaction(self._db)


class _Transaction:
    """BEGIN IMMEDIATE ... COMMIT (ROLLBACK on an error): a write lock from the start, so two writers never both
    read a count and then write past each other."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def __enter__(self) -> None:
        self._db.execute("BEGIN IMMEDIATE")

    def __exit__(self, kind: object, value: object, traceback: object) -> None:
        self._db.execute("COMMIT" if kind is None else "ROLLBACK")
