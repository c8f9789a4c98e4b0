"""Shipping the local log to the central server: batches of unshipped records to ``POST /v1/predictions/ingest``
(``signpost.serve.ingest``) with the device's key, stdlib ``urllib`` only.

A batch's id is fixed when it is formed and stored in the log (``LocalLog.next_batch``): after a timeout, a lost
answer or a restart the same records go again under the same id, and the server stores them once. Records are
marked shipped only on a 2xx whose body is the ingest route's answer (``{"stored": N}`` or ``{"duplicate": true}``):
a proxy's or a captive portal's 200 page is a failure. A redirect is refused, not followed: urllib would resend the
batch as a GET, with the key, to wherever it points. A failure waits before the next try: a random time between
half of ``backoff_s`` and a ceiling that doubles with each failure up to ``cap_s`` (the jitter keeps a fleet that
lost its server together from coming back in step); a 4xx that a retry cannot fix (a bad or revoked key, a wrong
device id) is logged as an error and retried only at the cap, so a key fixed in the key
file is picked up without a restart and the device never hammers the server. A batch the server finds too large
(413: nothing of it was stored) is formed again, in halves, under new ids.
"""

from __future__ import annotations

import json
import logging
import random
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from signpost.edge.locallog import Batch, LocalLog

log = logging.getLogger(__name__)

# signpost.serve.ingest.ROUTE (not imported: a device has no FastAPI); a test checks the two agree.
INGEST_ROUTE = "/v1/predictions/ingest"
RETRYABLE_4XX = {408, 425, 429}  # the server's "not now", not "never": ordinary backoff


@dataclass
class ShipperStatus:
    """For the agent's status line: batches delivered, failures since the last success, the last error."""

    batches: int = 0
    failures: int = 0
    last_error: str = ""


class Shipper:
    """Ships ``log``'s records to ``server`` (its base URL) as ``device_id``, with the key in ``key_file``."""

    def __init__(self, log_: LocalLog, server: str, key_file: Path, *, batch_size: int = 500,
                 flush_s: float = 10.0, backoff_s: float = 1.0, cap_s: float = 60.0, timeout_s: float = 10.0,
                 rng: random.Random | None = None) -> None:
        if batch_size < 1 or flush_s < 0 or backoff_s <= 0 or cap_s < backoff_s or timeout_s <= 0:
            raise ValueError("shipping needs --batch-size >= 1, --flush-seconds >= 0 and a backoff cap at least "
                             "its first wait")
        self.log = log_
        self.url = server.rstrip("/") + INGEST_ROUTE
        self.key_file = Path(key_file)
        self.batch_size = batch_size
        self.flush_s = flush_s
        self.backoff_s = backoff_s
        self.cap_s = cap_s
        self.timeout_s = timeout_s
        self.status = ShipperStatus()
        self._rng = rng or random.Random()
        # No proxy from the environment: the server is named by the operator, and a proxy variable meant for a
        # browser must not reroute (or leak) a device's key.
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}), _NoRedirects)
        read_key(self.key_file)  # a missing or empty key file fails at start, not at the first batch
        parts = urllib.parse.urlsplit(self.url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"--server {server}: give the server's base URL, http(s)://host:port")
        if parts.scheme == "http" and parts.hostname not in ("127.0.0.1", "localhost", "::1"):
            log.warning("--server %s is plain http: the device's key and its predictions cross the network "
                        "unencrypted; use https", server)

    def ship_once(self, *, force: bool = False) -> float:
        """Form or resume one batch and send it: the seconds to wait before the next call (0: more to send now)."""
        batch = self.log.next_batch(self.batch_size, self.flush_s, force=force)
        if batch is None:
            return min(1.0, self.flush_s) if self.flush_s > 0 else 0.2
        try:
            status, body = self._post(batch)
        except (OSError, urllib.error.URLError) as exc:  # refused, reset, timed out, DNS: the server may come back
            return self._failed(f"cannot reach {self.url}: {getattr(exc, 'reason', exc)}")
        if 200 <= status < 300 and not _stored(body):
            return self._failed(f"{self.url} answered {status} but not as the ingest route does ({body[:200]!r}); "
                                "check --server")
        if 200 <= status < 300:
            shipped = self.log.mark_shipped(batch.batch_id)
            self.status = ShipperStatus(self.status.batches + 1, 0, "")
            log.info("shipped batch %s: %d records (%s)", batch.batch_id, shipped, body[:200])
            return 0.0
        message = f"{self.url} answered {status}: {body[:300]}"
        if 300 <= status < 400:
            message = f"{self.url} answered {status}, a redirect, which is not followed: give the final URL as --server"
        if status == 413 and len(batch.records) > 1:  # over the server's serve.max_ingest_records or _bytes
            self.batch_size = max(1, len(batch.records) // 2)
            self.log.release(batch.batch_id)  # a 413 stores nothing: the records may go again under new ids
            log.warning("%s; sending batches of %d records from now on", message, self.batch_size)
            return 0.0
        if 400 <= status < 500 and status not in RETRYABLE_4XX:
            log.error("the server refuses this device's batches (%s); fix the key file %s or the device id, "
                      "retrying every %g s", message, self.key_file, self.cap_s)
            self.status.failures += 1
            self.status.last_error = message
            return self.cap_s
        return self._failed(message)

    def run(self, stop: threading.Event) -> None:
        """Ship until ``stop`` is set."""
        while not stop.is_set():
            try:
                wait = self.ship_once()
            except Exception:  # a bug or a full disk must not end shipping silently: say it, back off, go on
                log.exception("shipping failed")
                wait = self.cap_s
            if wait:
                stop.wait(wait)

    def flush(self, seconds: float) -> bool:
        """Ship what is unshipped, for at most ``seconds`` (at shutdown): whether everything went."""
        deadline = time.monotonic() + seconds
        timeout, self.timeout_s = self.timeout_s, max(0.5, min(self.timeout_s, seconds))
        try:
            while time.monotonic() < deadline:
                if self.log.status().unshipped == 0:
                    return True
                if self.ship_once(force=True) > 0:
                    return False  # the server is away: the records stay in the log for the next start
            return self.log.status().unshipped == 0
        finally:
            self.timeout_s = timeout

    def _post(self, batch: Batch) -> tuple[int, str]:
        body = json.dumps({"device_id": self.log.device_id, "batch_id": batch.batch_id,
                           "records": batch.records, "dropped": self.log.status().dropped}).encode()
        request = urllib.request.Request(self.url, data=body, method="POST", headers={
            "Content-Type": "application/json", "X-API-Key": read_key(self.key_file)})
        try:
            with self._opener.open(request, timeout=self.timeout_s) as answer:
                return answer.status, answer.read(4096).decode("utf-8", "replace")
        except urllib.error.HTTPError as exc:
            with exc:
                return exc.code, exc.read(4096).decode("utf-8", "replace")

    def _failed(self, message: str) -> float:
        """Count a failure and the wait before the next try: full jitter over an exponential, capped."""
        self.status.failures += 1
        self.status.last_error = message
        ceiling = min(self.cap_s, self.backoff_s * 2 ** min(self.status.failures - 1, 30))
        wait = self._rng.uniform(self.backoff_s / 2, ceiling)
        log.warning("%s; try %d failed, next in %.1f s", message, self.status.failures, wait)
        return wait


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    """A redirect is an answer (a failure), not followed: urllib would send the batch on to wherever it points as a
    GET, with the device's key, and a 2xx there would mark records shipped that no server stored."""

    def redirect_request(self, req: urllib.request.Request, fp: Any, code: int, msg: str, headers: Any,
                         newurl: str) -> None:
        raise urllib.error.HTTPError(req.full_url, code, f"redirected to {newurl}, which is not followed: give the "
                                     "server's final URL as --server", headers, fp)


def _stored(body: str) -> bool:
    """Whether ``body`` is the ingest route's 2xx answer: ``{"stored": N}`` or ``{"duplicate": true}``."""
    try:
        answer = json.loads(body)
    except ValueError:
        return False
    if not isinstance(answer, dict):
        return False
    stored = answer.get("stored")
    return (isinstance(stored, int) and not isinstance(stored, bool)) or answer.get("duplicate") is True


def read_key(path: Path) -> str:
    """The device's API key: the key file's one line. A ValueError naming the file when it is missing or empty."""
    try:
        key = Path(path).read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ValueError(f"--key-file {path}: cannot read it ({exc.strerror}); give the file holding this "
                         "device's API key") from None
    if not key or "\n" in key:
        raise ValueError(f"--key-file {path}: expected the device's API key on one line")
    return key
