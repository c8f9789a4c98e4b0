"""The device agent (``signpost edge run``): the local log and its bound, shipping with backoff and fixed batch
ids, the watched folder and the loopback endpoint, and the agent running with the server-side packages blocked."""

from __future__ import annotations

import contextlib
import io
import json
import os
import random
import shutil
import signal
import socket
import sqlite3
import struct
import subprocess
import sys
import textwrap
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from signpost.edge.locallog import LocalLog, LocalLogError
from signpost.edge.shipper import INGEST_ROUTE, Shipper
from signpost.monitoring.records import IngestBatch, PredictionRecord


def record(n: int, model_version: str = "demo-1/fp32") -> PredictionRecord:
    """A valid record, numbered by its request id."""
    stats = dict.fromkeys(("brightness", "contrast", "sharpness", "red", "green", "blue", "saturation"), 0.5)
    return PredictionRecord(ts=time.time(), request_id=f"r{n}", model_version=model_version, class_id=n % 3,
                            class_name=f"c{n % 3}", confidence=0.9, entropy=0.3, top_k=[(n % 3, 0.9)],
                            latency_ms=1.0, width=32, height=32, **stats, **{f"emb{i}": 0.0 for i in range(8)})


# --- the local log ----------------------------------------------------------------------------------------------------

def test_a_formed_batch_keeps_its_id_and_records_across_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "log.sqlite"
    log = LocalLog(path, "cam-1", max_buffer=100)
    for n in range(5):
        log.add(record(n))
    assert log.next_batch(10, flush_s=60) is None  # under a batch and young: wait for more
    first = log.next_batch(3, flush_s=60)
    assert first is not None and [r["request_id"] for r in first.records] == ["r0", "r1", "r2"]
    log.add(record(5))
    assert log.next_batch(3, flush_s=60) == first  # not shipped yet: the same id, the same records
    log.close()

    log = LocalLog(path, "cam-1", max_buffer=100)  # a restart (or a kill -9) before the answer came
    assert log.next_batch(3, flush_s=60) == first
    assert log.mark_shipped(first.batch_id) == 3
    second = log.next_batch(3, flush_s=60)
    assert second is not None and second.batch_id != first.batch_id
    assert [r["request_id"] for r in second.records] == ["r3", "r4", "r5"]
    assert PredictionRecord.model_validate(second.records[0]) == record(3).model_copy(
        update={"ts": second.records[0]["ts"]})
    log.mark_shipped(second.batch_id)
    assert log.status().unshipped == 0 and log.status().shipped == 6
    log.add(record(6))
    assert log.next_batch(3, flush_s=60) is None
    assert log.next_batch(3, flush_s=60, force=True) is not None  # at shutdown: whatever there is
    assert log.next_batch(3, flush_s=0.5, now=time.time() + 1) is not None  # or once the oldest is old enough


def test_past_the_buffer_bound_the_oldest_unbatched_records_are_dropped_and_counted(tmp_path: Path) -> None:
    path = tmp_path / "log.sqlite"
    log = LocalLog(path, "cam-1", max_buffer=5)
    for n in range(3):
        log.add(record(n))
    batch = log.next_batch(2, flush_s=60)  # r0, r1: formed, on their way
    assert batch is not None
    dropped = [log.add(record(n)) for n in range(3, 9)]
    assert sum(dropped) == 4 and log.status().unshipped == 5 and log.status().dropped == 4
    log.close()
    log = LocalLog(path, "cam-1", max_buffer=5)
    assert log.status().dropped == 4  # the count is in the file: a restart does not forget it
    assert log.next_batch(2, flush_s=60) == batch  # the batch in flight kept its records
    log.mark_shipped(batch.batch_id)
    rest = log.next_batch(10, flush_s=60, force=True)
    assert rest is not None and [r["request_id"] for r in rest.records] == ["r6", "r7", "r8"]  # the newest kept


def test_a_log_belongs_to_one_device(tmp_path: Path) -> None:
    LocalLog(tmp_path / "log.sqlite", "cam-1", max_buffer=5).close()
    with pytest.raises(LocalLogError, match=r"device 'cam-1'.s log, not 'cam-2'.s"):
        LocalLog(tmp_path / "log.sqlite", "cam-2", max_buffer=5)
    (tmp_path / "bad.sqlite").write_bytes(b"not a database at all, just bytes" * 100)
    with pytest.raises(LocalLogError, match="cannot open it as the agent's SQLite log"):
        LocalLog(tmp_path / "bad.sqlite", "cam-1", max_buffer=5)


def test_shipped_rows_past_the_retention_bound_are_deleted_but_never_unshipped_or_unmoved_ones(
        tmp_path: Path) -> None:
    path = tmp_path / "log.sqlite"
    log = LocalLog(path, "cam-1", max_buffer=100, keep_shipped=2)
    log.add(record(0), "a.png:1:1")  # its file is not moved yet: the row guards it, shipped or not
    for n in range(1, 5):
        log.add(record(n))
    batch = log.next_batch(5, flush_s=60)
    assert batch is not None and log.mark_shipped(batch.batch_id) == 5
    log.add(record(5))
    log.add(record(6))
    assert [r["request_id"] for _, r in logged(path)] == ["r0", "r4", "r5", "r6"]  # r1-r3: the oldest shipped
    assert log.status() == type(log.status())(2, 5, 0)  # shipped counts every record shipped, deleted or not
    assert log.seen("a.png:1:1")
    log.moved("a.png:1:1")  # out of the folder now
    assert not log.seen("a.png:1:1")
    batch = log.next_batch(1, flush_s=60)
    assert batch is not None and log.mark_shipped(batch.batch_id) == 1
    assert [r["request_id"] for _, r in logged(path)] == ["r4", "r5", "r6"]
    log.close()
    log = LocalLog(path, "cam-1", max_buffer=100, keep_shipped=2)
    assert log.status() == type(log.status())(1, 6, 0)  # the counter is in the file


# --- shipping ---------------------------------------------------------------------------------------------------------

class FakeIngest:
    """The server's ingest route as far as a device can tell: the key, the body validated against
    ``IngestBatch``, batch ids stored once. ``fail`` answers that many requests with 500 after storing them (a lost
    answer); ``status`` answers every request with it instead."""

    def __init__(self, port: int = 0, key: str = "k1") -> None:
        self.stored: dict[str, list[dict[str, Any]]] = {}
        self.requests: list[str] = []
        self.fail = 0
        self.status: int | None = None
        self.max_records = 5000  # serve.max_ingest_records
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                batch = IngestBatch.model_validate_json(body)
                outer.requests.append(batch.batch_id)
                if outer.status is not None:
                    return self._send(outer.status, {"error": "refused"})
                if len(batch.records) > outer.max_records:
                    return self._send(413, {"error": "too_many_records"})
                if self.path != INGEST_ROUTE or self.headers.get("X-API-Key") != key:
                    return self._send(401, {"error": "unauthorized"})
                duplicate = batch.batch_id in outer.stored
                outer.stored.setdefault(batch.batch_id, [r.model_dump() for r in batch.records])
                if outer.fail:
                    outer.fail -= 1
                    return self._send(500, {"error": "lost"})
                self._send(200, {"stored": 0, "duplicate": True} if duplicate else {"stored": len(batch.records)})

            def _send(self, code: int, body: dict[str, Any]) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@contextlib.contextmanager
def fake_ingest(port: int = 0) -> Iterator[FakeIngest]:
    server = FakeIngest(port)
    try:
        yield server
    finally:
        server.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def key_file(tmp_path: Path, key: str = "k1") -> Path:
    path = tmp_path / "device.key"
    path.write_text(key + "\n")
    return path


def test_a_server_that_is_down_is_retried_with_growing_jittered_waits_then_gets_each_record_once(
        tmp_path: Path) -> None:
    log = LocalLog(tmp_path / "log.sqlite", "cam-1", max_buffer=100)
    for n in range(7):
        log.add(record(n))
    port = free_port()  # nothing listens there yet: the server is down
    shipper = Shipper(log, f"http://127.0.0.1:{port}", key_file(tmp_path), batch_size=3, flush_s=60,
                      backoff_s=1.0, cap_s=8.0, timeout_s=2.0, rng=random.Random(0))
    waits = [shipper.ship_once() for _ in range(6)]
    ceilings = [1, 2, 4, 8, 8, 8]
    assert all(0.5 <= wait <= ceiling for wait, ceiling in zip(waits, ceilings, strict=True)), waits
    assert max(waits[3:]) > 2  # the waits grew
    assert len(set(waits)) == len(waits)  # jittered: a fleet that lost its server does not come back in step
    assert shipper.status.failures == 6 and "cannot reach" in shipper.status.last_error
    assert log.status().unshipped == 7

    with fake_ingest(port) as server:  # the server is back; its first answer is lost after storing the batch
        server.fail = 1
        assert shipper.ship_once() > 0
        assert shipper.ship_once() == 0  # the same batch again: the server says duplicate, it is shipped
        assert server.requests[0] == server.requests[1]
        assert shipper.ship_once() == 0
        assert shipper.ship_once() > 0  # one record left, young: it waits for --flush-seconds
        assert shipper.flush(5.0)
    shipped = [r["request_id"] for batch in server.stored.values() for r in batch]
    assert sorted(shipped) == [f"r{n}" for n in range(7)]  # each record once
    assert log.status() == type(log.status())(0, 7, 0)
    assert shipper.status.failures == 0 and shipper.status.last_error == ""


def test_a_refused_key_is_reported_and_retried_only_at_the_cap(tmp_path: Path, caplog) -> None:
    log = LocalLog(tmp_path / "log.sqlite", "cam-1", max_buffer=100)
    log.add(record(0))
    with fake_ingest() as server:
        shipper = Shipper(log, f"http://127.0.0.1:{server.port}", key_file(tmp_path, "wrong"), batch_size=1,
                          cap_s=30.0)
        assert shipper.ship_once() == 30.0
        assert "401" in shipper.status.last_error and "fix the key file" in caplog.text
        assert log.status().unshipped == 1 and server.stored == {}
        key_file(tmp_path, "k1")  # the operator fixes the key: the next try reads it again
        assert shipper.ship_once() == 0 and log.status().unshipped == 0


def test_a_batch_too_large_for_the_server_is_sent_again_in_smaller_ones(tmp_path: Path) -> None:
    log = LocalLog(tmp_path / "log.sqlite", "cam-1", max_buffer=100)
    for n in range(5):
        log.add(record(n))
    with fake_ingest() as server:
        server.max_records = 2
        shipper = Shipper(log, f"http://127.0.0.1:{server.port}", key_file(tmp_path), batch_size=5)
        assert shipper.ship_once() == 0 and shipper.batch_size == 2 and server.stored == {}
        assert shipper.flush(10.0)
    assert sorted(r["request_id"] for batch in server.stored.values() for r in batch) == [f"r{n}" for n in range(5)]
    assert max(len(batch) for batch in server.stored.values()) == 2


def test_a_missing_key_file_fails_at_start(tmp_path: Path) -> None:
    log = LocalLog(tmp_path / "log.sqlite", "cam-1", max_buffer=100)
    with pytest.raises(ValueError, match=r"--key-file .*missing\.key: cannot read it"):
        Shipper(log, "http://127.0.0.1:9", tmp_path / "missing.key")


class Stub:
    """A server that answers every request with ``status``, ``body`` and ``headers``, and notes each request's
    method and X-API-Key."""

    def __init__(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
        self.status, self.body, self.headers = status, body, headers or {}
        self.requests: list[tuple[str, str | None]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self) -> None:
                outer.requests.append((self.command, self.headers.get("X-API-Key")))
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                self.send_response(outer.status)
                for name, value in outer.headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(outer.body)))
                self.end_headers()
                self.wfile.write(outer.body)

            do_GET = do_POST = _answer

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_a_redirect_is_not_followed_and_a_2xx_that_is_not_the_ingest_answer_is_a_failure(
        tmp_path: Path, caplog) -> None:
    log = LocalLog(tmp_path / "log.sqlite", "cam-1", max_buffer=100)
    log.add(record(0))
    elsewhere = Stub(200, b'{"stored": 1}')  # would take anything, and answer as the ingest route does
    stubs = [elsewhere]
    try:
        for code in (301, 302, 303, 307):
            redirect = Stub(code, b"moved", {"Location": f"{elsewhere.url}{INGEST_ROUTE}"})
            stubs.append(redirect)
            shipper = Shipper(log, redirect.url, key_file(tmp_path), backoff_s=1.0)
            assert shipper.ship_once(force=True) > 0, code
            assert "redirect" in shipper.status.last_error and redirect.requests == [("POST", "k1")]
        assert elsewhere.requests == []  # no batch and no key went there
        for body in (b"<html>Welcome to the hotel wifi</html>", b'{"stored": "1"}', b'{"stored": true}', b"[1]",
                     b'{"duplicate": 1}'):
            portal = Stub(200, body)
            stubs.append(portal)
            shipper = Shipper(log, portal.url, key_file(tmp_path))
            assert shipper.ship_once(force=True) > 0, body
            assert "not as the ingest route does" in shipper.status.last_error
        assert log.status().unshipped == 1 and log.status().shipped == 0  # nothing marked shipped
        with fake_ingest() as server:
            assert Shipper(log, f"http://127.0.0.1:{server.port}", key_file(tmp_path)).ship_once(force=True) == 0
        assert log.status().unshipped == 0
    finally:
        for stub in stubs:
            stub.close()
    Shipper(log, "http://signpost.example.com:8000", key_file(tmp_path))
    assert "plain http" in caplog.text
    with pytest.raises(ValueError, match=r"--server ftp://example.com: give the server's base URL"):
        Shipper(log, "ftp://example.com", key_file(tmp_path))


def test_the_device_side_constants_match_the_server() -> None:
    from signpost.edge import agent
    from signpost.serve import ingest, uploads

    assert INGEST_ROUTE == ingest.ROUTE
    assert agent.IMAGE_FORMATS == uploads.IMAGE_FORMATS


# --- the agent, with a real bundle ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def model(edge_bundle, edge_keys):
    """The bundle loaded once for the module, as a device that trusts its signer."""
    from signpost import signing
    from signpost.edge.agent import Model

    before = signing.current()
    edge_keys.trust()
    try:
        yield Model(edge_bundle.path)
    finally:
        signing.configure(before)


def drop(folder: Path, name: str, data: bytes) -> None:
    """Write-then-rename, as a camera that writes safely does: the agent never sees the file half-written."""
    tmp = folder / f".{name}.tmp"
    tmp.write_bytes(data)
    os.replace(tmp, folder / name)


@contextlib.contextmanager
def running(agent) -> Iterator[None]:
    thread = threading.Thread(target=agent.run, daemon=True)
    thread.start()
    try:
        yield
    finally:
        agent.stop.set()
        thread.join(60)
        assert not thread.is_alive()


def wait_for(condition, what: str, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {seconds} s waiting for {what}")
        time.sleep(0.05)


def logged(path: Path) -> list[tuple[str | None, dict[str, Any]]]:
    with contextlib.closing(sqlite3.connect(path)) as db:
        return [(source, json.loads(text)) for source, text in
                db.execute("SELECT source, record FROM records ORDER BY seq")]


def test_the_watched_folder_is_classified_once_each_also_across_a_restart(model, tmp_path: Path) -> None:
    from signpost.edge.agent import Agent

    watch = tmp_path / "in"
    watch.mkdir()
    samples = model.bundle.samples
    for i, (path, _) in enumerate(samples):  # oldest first and in name order: classified in this order
        drop(watch, f"img{i:03d}.png", path.read_bytes())
    drop(watch, "broken.png", b"\x89PNG but not really an image")
    (watch / "half.png.part").write_bytes(samples[0][0].read_bytes()[:20])  # still being written: left alone
    log_path = tmp_path / "log.sqlite"
    agent = Agent(model, LocalLog(log_path, "cam-1", max_buffer=100), folder=watch, poll_s=0.05)
    with running(agent):
        wait_for(lambda: len(list((watch / "done").iterdir())) == len(samples)
                 and (watch / "rejected" / "broken.png").exists(), "the folder to be classified")
    rows = logged(log_path)
    assert [source for source, _ in rows] == [None] * len(samples)  # moved: the key no longer guards the name
    for (_, r), (_, label) in zip(rows, samples, strict=True):
        assert r["class_id"] == label  # the class the model gave it when packaged
        assert r["class_name"] == model.bundle.class_names[r["class_id"]]
    assert {r["model_version"] for _, r in rows} == {model.bundle.model_version}
    assert "not an image" in (watch / "rejected" / "broken.png.reason.txt").read_text()
    assert (watch / "half.png.part").exists() and agent.rejected == 1

    # A kill after logging killed.png but before moving it, simulated: its record is in the log under its key (name,
    # size, mtime), the file still in the folder. A new agent on the same log moves it without classifying it again,
    # and classifies the one new file.
    drop(watch, "killed.png", samples[0][0].read_bytes())
    stat = (watch / "killed.png").stat()
    with contextlib.closing(LocalLog(log_path, "cam-1", max_buffer=100)) as before:
        before.add(record(99), f"killed.png:{stat.st_size}:{stat.st_mtime_ns}")
    drop(watch, "new.png", samples[0][0].read_bytes())
    agent = Agent(model, LocalLog(log_path, "cam-1", max_buffer=100), folder=watch, poll_s=0.05)
    with running(agent):
        wait_for(lambda: not (watch / "killed.png").exists() and not (watch / "new.png").exists(), "the restart")
    assert (watch / "done" / "killed.png").exists()
    rows = logged(log_path)
    assert len(rows) == len(samples) + 2 and agent.classified == 1
    assert rows[-2][0] is None and rows[-2][1]["request_id"] == "r99"  # moved now, and not classified again
    assert rows[-1][1]["class_id"] == samples[0][1]


def test_the_loopback_endpoint_answers_as_the_server_would_and_refuses_bad_images(model, tmp_path: Path) -> None:
    import numpy as np
    from PIL import Image

    from signpost.data.stats import STAT_NAMES, image_stats
    from signpost.edge.agent import Agent
    from signpost.serve import uploads

    path, label = model.bundle.samples[0]
    log_path = tmp_path / "log.sqlite"
    agent = Agent(model, LocalLog(log_path, "cam-1", max_buffer=100), port=0)
    assert agent.server is not None and agent.server.server_address[0] == "127.0.0.1"
    url = f"http://127.0.0.1:{agent.port}"
    with running(agent):
        answer = post(f"{url}/v1/predict", path.read_bytes())
        assert answer[0] == 200
        assert answer[1]["class_id"] == label and answer[1]["model_version"] == model.bundle.model_version
        assert answer[1]["class_name"] == model.bundle.class_names[label] and 0 < answer[1]["confidence"] <= 1
        with Image.open(path) as image:  # another size and format: framed and resized the server's way
            buffer = io.BytesIO()
            image.resize((45, 37)).save(buffer, "JPEG", quality=90)
        jpeg = buffer.getvalue()
        assert post(f"{url}/v1/predict", jpeg)[0] == 200
        status, body = post(f"{url}/v1/predict", b"hello, not an image")
        assert status == 400 and body["error"] == "invalid_image" and "not an image" in body["message"]
        status, body = get(f"{url}/status")
        assert status == 200 and body["classified"] == 2 and body["unshipped"] == 2 and body["dropped"] == 0
        with pytest.raises(ValueError, match=f"--listen {agent.port}: cannot listen on 127.0.0.1"):
            Agent(model, LocalLog(tmp_path / "other.sqlite", "cam-2", max_buffer=100), port=agent.port)
    rows = logged(log_path)
    assert len(rows) == 2 and rows[0][1]["request_id"] == answer[1]["request_id"]
    served = uploads.decode(uploads.open_request([jpeg], size=model.bundle.image_size, max_pixels=2048 * 2048),
                            model.bundle.image_size)
    stats = image_stats(served.images.transpose(0, 3, 1, 2))[0]
    assert rows[1][1]["width"] == 45 and rows[1][1]["height"] == 37
    assert np.allclose([rows[1][1][name] for name in STAT_NAMES], stats, atol=1e-6)


def post(url: str, data: bytes) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(url, data=data, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, json.loads(exc.read())


def get(url: str) -> tuple[int, dict[str, Any]]:
    with urllib.request.urlopen(url, timeout=30) as answer:
        return answer.status, json.loads(answer.read())


def test_the_agent_follows_the_current_link_and_keeps_its_bundle_when_the_new_one_is_bad(
        edge_bundle, edge_keys, tmp_path: Path, caplog) -> None:
    from signpost import signing
    from signpost.edge.agent import Model

    home = tmp_path / "home"
    shutil.copytree(edge_bundle.path, home / "bundles" / "a")
    shutil.copytree(edge_bundle.path, home / "bundles" / "b")
    shutil.copytree(edge_bundle.path, home / "bundles" / "bad")
    (home / "bundles" / "bad" / "bundle.json").write_text('{"format": 1}')  # no longer what was signed
    (home / "current").symlink_to("bundles/a")
    before = signing.current()
    edge_keys.trust()
    try:
        current = Model(home / "current")
        assert current.bundle.root == (home / "bundles" / "a").resolve()
        swap(home, "bundles/bad")
        current.refresh()
        assert current.bundle.root == (home / "bundles" / "a").resolve() and "cannot be opened" in caplog.text
        swap(home, "bundles/b")
        current.refresh()
        assert current.bundle.root == (home / "bundles" / "b").resolve()
        path, label = current.bundle.samples[0]
        assert current.classify(path.read_bytes()).record.class_id == label
    finally:
        signing.configure(before)


def swap(home: Path, target: str) -> None:
    """What `edge update` does: a new link renamed over ``current``."""
    tmp = home / ".current.tmp"
    tmp.symlink_to(target)
    os.replace(tmp, home / "current")


# The agent as a device installs it (`signpost[edge]`): every one of these fails to import, and each try is noted.
BLOCKED = ("fastapi", "starlette", "uvicorn", "mlflow", "sqlalchemy", "alembic", "signpost.training",
           "signpost.serve", "signpost.stages", "signpost.tracking")
BLOCKER = textwrap.dedent("""
    import atexit, json, os, sys
    BLOCKED = %r
    tried = []
    class Blocked:
        def find_spec(self, name, path=None, target=None):
            if any(name == b or name.startswith(b + ".") for b in BLOCKED):
                tried.append(name)
                raise ModuleNotFoundError(f"No module named {name!r} (blocked: a device does not have it)", name=name)
    sys.meta_path.insert(0, Blocked())
    atexit.register(lambda: open(os.environ["TRIED_FILE"], "w").write(json.dumps(tried)))
    from signpost.cli import main
    sys.exit(main(sys.argv[1:]))
""") % (BLOCKED,)


def start_agent(args: list[str], tmp_path: Path, name: str) -> tuple[subprocess.Popen, str]:
    """``signpost edge run`` with the server side blocked; the process and its loopback URL."""
    out = (tmp_path / f"{name}.out").open("w")
    agent = subprocess.Popen([sys.executable, "-c", BLOCKER, "edge", "run", *args, "--listen", "0"],
                             stdout=subprocess.PIPE, stderr=out, text=True,
                             env={**os.environ, "TRIED_FILE": str(tmp_path / f"{name}.tried")})
    lines: list[str] = []  # read in a thread: a hung agent fails the wait below instead of blocking a readline
    threading.Thread(target=lambda: lines.extend(agent.stdout or ()), daemon=True).start()
    wait_for(lambda: any("listening on" in line for line in lines) or agent.poll() is not None, "the agent", 120)
    started = [line for line in lines if "listening on" in line]
    if not started:
        agent.kill()
        raise AssertionError(f"the agent did not start: {(tmp_path / f'{name}.out').read_text()}")
    return agent, started[0].split("listening on ")[1].split(";")[0].strip()


@pytest.mark.slow  # two agent processes start (~7 s each: torch and ExecuTorch load)
def test_the_agent_runs_without_the_server_side_ships_on_sigterm_and_survives_kill_9(
        edge_bundle, edge_keys, tmp_path: Path) -> None:
    watch, log_path = tmp_path / "in", tmp_path / "log.sqlite"
    watch.mkdir()
    path, label = edge_bundle_sample(edge_bundle)
    with fake_ingest() as server:
        args = ["--bundle", str(edge_bundle.path), "--device-id", "cam-1", "--watch", str(watch), "--log",
                str(log_path), "--server", f"http://127.0.0.1:{server.port}", "--key-file", str(key_file(tmp_path)),
                "--public-key", str(edge_keys.public), "--flush-seconds", "600", "--poll-seconds", "0.1"]
        agent, url = start_agent(args, tmp_path, "first")
        try:
            assert post(f"{url}/v1/predict", path.read_bytes())[1]["class_id"] == label
            drop(watch, "a.png", path.read_bytes())
            wait_for(lambda: (watch / "done" / "a.png").exists(), "the watched file")
            assert server.stored == {}  # --flush-seconds 600: nothing shipped yet
            agent.send_signal(signal.SIGTERM)
            assert agent.wait(60) == 0
        finally:
            agent.kill()
        # SIGTERM shipped what there was before the agent left
        assert [len(records) for records in server.stored.values()] == [2]
        assert json.loads((tmp_path / "first.tried").read_text()) == []  # nothing it ran even tried to import them

        agent, url = start_agent(args, tmp_path, "second")
        try:
            assert post(f"{url}/v1/predict", path.read_bytes())[0] == 200
        finally:
            agent.kill()  # kill -9 right after the answer: the record was committed before it was sent
            agent.wait(60)
    rows = logged(log_path)
    assert len(rows) == 3 and all(r["class_id"] == label for _, r in rows)


def edge_bundle_sample(edge_bundle) -> tuple[Path, int]:
    """The bundle's first sample image and its class, read from ``samples/samples.json``."""
    samples = json.loads((edge_bundle.path / "samples" / "samples.json").read_text())
    name, label = next(iter(samples.items()))
    return edge_bundle.path / "samples" / name, label


def test_the_command_refuses_bad_settings_naming_them(tmp_path: Path, capsys) -> None:
    from signpost.cli import main

    base = ["edge", "run", "--bundle", str(tmp_path), "--log", str(tmp_path / "log.sqlite")]
    cases = [
        (["--device-id", "cam 1", "--listen", "0"], "--device-id 'cam 1'"),
        (["--device-id", "cam-1"], "give --watch DIR, --listen PORT or both"),
        (["--device-id", "cam-1", "--listen", "0", "--server", "http://127.0.0.1:9"], "--server and --key-file"),
        (["--device-id", "cam-1", "--listen", "0", "--batch-size", "10", "--max-buffer", "5"],
         "--max-buffer 5 must hold at least one batch"),
        (["--device-id", "cam-1", "--listen", "0", "--keep-shipped", "-1"], "--keep-shipped -1"),
        (["--device-id", "cam-1", "--watch", str(tmp_path)], "is inside --watch"),
    ]
    for extra, message in cases:
        assert main([*base, *extra]) == 2, extra
        assert message in capsys.readouterr().err
    assert not (tmp_path / "log.sqlite").exists()  # refused before anything was made


# --- the agent against hostile or failing input -----------------------------------------------------------------------

def polls(agent, count: int = 2) -> None:
    """``count`` polls of the watched folder (two take a file: its size and time must hold), in a thread, so that
    a read that blocks fails the test instead of hanging it; what a poll raises is raised here."""
    raised: list[BaseException] = []

    def run() -> None:
        try:
            for _ in range(count):
                agent.poll()
        except BaseException as exc:  # handed to the test's thread, raised there
            raised.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(60)
    assert not thread.is_alive(), "a poll blocked"
    if raised:
        raise raised[0]


def test_symlinks_fifos_and_oversize_files_are_rejected_without_blocking(model, tmp_path: Path) -> None:
    from signpost.edge.agent import MAX_BODY, Agent

    watch = tmp_path / "in"
    watch.mkdir()
    image = model.bundle.samples[0][0].read_bytes()
    (watch / "zero.png").symlink_to("/dev/zero")
    (watch / "link.png").symlink_to(model.bundle.samples[0][0])
    os.mkfifo(watch / "pipe.png")
    with (watch / "huge.png").open("wb") as file:
        file.write(image)
        file.truncate(MAX_BODY + 1)  # sparse: no 20 MiB written
    drop(watch, "fine.png", image)
    agent = Agent(model, LocalLog(tmp_path / "log.sqlite", "cam-1", max_buffer=100), folder=watch)
    polls(agent)
    reasons = {path.name.removesuffix(".reason.txt"): path.read_text() for path in (watch / "rejected").iterdir()
               if path.name.endswith(".reason.txt")}
    assert sorted(reasons) == ["huge.png", "link.png", "pipe.png", "zero.png"]
    assert "symbolic link" in reasons["zero.png"] and "symbolic link" in reasons["link.png"]
    assert "not a regular file" in reasons["pipe.png"] and f"over {MAX_BODY:,} bytes" in reasons["huge.png"]
    assert (watch / "rejected" / "zero.png").is_symlink()  # the link moved, not what it points at
    assert (watch / "done" / "fine.png").exists() and agent.classified == 1 and agent.rejected == 4


def test_failures_that_are_not_the_file_s_fault_do_not_stop_the_agent(model, tmp_path: Path, monkeypatch) -> None:
    from signpost.edge import agent as agent_module

    watch = tmp_path / "in"
    watch.mkdir()
    image = model.bundle.samples[0][0].read_bytes()
    agent = agent_module.Agent(model, LocalLog(tmp_path / "log.sqlite", "cam-1", max_buffer=100), folder=watch)

    # the producer takes the file away while it is classified: the record stands, the agent goes on
    drop(watch, "gone.png", image)
    classify = agent.classify

    def classify_then_delete(data: bytes, source: str | None = None):
        answer = classify(data, source)
        (watch / "gone.png").unlink()
        return answer

    monkeypatch.setattr(agent, "classify", classify_then_delete)
    polls(agent)
    monkeypatch.setattr(agent, "classify", classify)
    assert agent.classified == 1 and len(logged(tmp_path / "log.sqlite")) == 1

    # the decoder raises something it does not document: that image is rejected with the reason
    frame_pixels = agent_module.frame_pixels

    def broken_once(*args: Any) -> Any:
        monkeypatch.setattr(agent_module, "frame_pixels", frame_pixels)
        raise struct.error("unpack requires a buffer of 4 bytes")

    monkeypatch.setattr(agent_module, "frame_pixels", broken_once)
    drop(watch, "odd.png", image)
    polls(agent)
    assert "error: unpack requires" in (watch / "rejected" / "odd.png.reason.txt").read_text()

    # the log cannot be written (a full disk): the file stays where it is, skipped until the next start
    add = agent.log.add

    def full_disk(*args: Any) -> int:
        raise sqlite3.OperationalError("database or disk is full")

    monkeypatch.setattr(agent.log, "add", full_disk)
    drop(watch, "stuck.png", image)
    polls(agent)
    monkeypatch.setattr(agent.log, "add", add)
    drop(watch, "next.png", image)
    polls(agent, 3)  # stuck.png is not tried again this session
    assert (watch / "stuck.png").exists() and agent.failed == 1
    assert (watch / "done" / "next.png").exists() and agent.classified == 2
    assert "failed 1" in agent.status().line()


def test_a_new_file_with_an_old_one_s_name_size_and_time_is_classified(model, tmp_path: Path) -> None:
    from signpost.edge.agent import Agent

    watch = tmp_path / "in"
    watch.mkdir()
    image = model.bundle.samples[0][0].read_bytes()
    agent = Agent(model, LocalLog(tmp_path / "log.sqlite", "cam-1", max_buffer=100), folder=watch)
    drop(watch, "a.png", image)
    mtime = (watch / "a.png").stat().st_mtime_ns
    polls(agent)
    drop(watch, "a.png", image)  # the camera's next picture: same name and size, its clock reset
    os.utime(watch / "a.png", ns=(mtime, mtime))
    polls(agent)
    assert agent.classified == 2 and len(logged(tmp_path / "log.sqlite")) == 2
    assert sorted(path.name for path in (watch / "done").iterdir()) == ["a.1.png", "a.png"]


def test_an_agent_started_during_an_update_s_self_test_runs_the_bundle_current_before_it(
        edge_bundle, edge_keys, tmp_path: Path, caplog) -> None:
    from signpost import signing
    from signpost.edge.agent import Model
    from signpost.edge.update import PENDING

    home = tmp_path / "home"
    shutil.copytree(edge_bundle.path, home / "bundles" / "a")
    shutil.copytree(edge_bundle.path, home / "bundles" / "b")
    (home / "current").symlink_to("bundles/b")  # switched to b; b's self-test has not finished (or was killed)
    (home / PENDING).write_text(json.dumps({"old": str(home / "bundles" / "a"), "previous": None,
                                            "new": str(home / "bundles" / "b")}))
    before = signing.current()
    edge_keys.trust()
    try:
        current = Model(home / "current")
        assert current.bundle.root == (home / "bundles" / "a").resolve()
        assert "has not finished its self-test" in caplog.text
        current.refresh()
        assert current.bundle.root == (home / "bundles" / "a").resolve()  # still pending: it waits
        (home / PENDING).unlink()  # the self-test passed
        current.refresh()
        assert current.bundle.root == (home / "bundles" / "b").resolve()
    finally:
        signing.configure(before)


def raw(port: int, request: bytes) -> tuple[int, dict[str, Any]]:
    """Send ``request`` as it is and read the answer: its status and JSON body."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as connection:
        connection.sendall(request)
        answer = b""
        while chunk := connection.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


def test_the_endpoint_refuses_web_pages_foreign_host_names_and_bad_lengths(model, tmp_path: Path) -> None:
    from signpost.edge.agent import Agent

    image = model.bundle.samples[0][0].read_bytes()
    agent = Agent(model, LocalLog(tmp_path / "log.sqlite", "cam-1", max_buffer=100), port=0)
    port = agent.port
    assert port is not None

    def predict(headers: str, body: bytes = image) -> tuple[int, dict[str, Any]]:
        return raw(port, f"POST /v1/predict HTTP/1.1\r\n{headers}Connection: close\r\n\r\n".encode("latin-1")
                   + body)

    length = f"Content-Length: {len(image)}\r\n"
    with running(agent):
        status, body = predict(f"Host: 127.0.0.1:{port}\r\nOrigin: https://evil.example\r\n{length}")
        assert status == 403 and "Origin" in body["message"]
        status, body = raw(port, f"GET /status HTTP/1.1\r\nHost: rebound.example:{port}\r\nConnection: close\r\n\r\n"
                           .encode())
        assert status == 403 and body["error"] == "forbidden"
        status, body = predict(f"Host: 127.0.0.1:{port}\r\nContent-Length: \xb2\r\n", b"")
        assert status == 400 and "Content-Length" in body["message"]
        assert predict(f"Host: localhost:{port}\r\n{length}")[0] == 200
        assert get(f"http://127.0.0.1:{port}/status")[1]["classified"] == 1  # the refused ones reached nothing
