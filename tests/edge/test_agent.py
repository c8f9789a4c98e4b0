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
    expected = {f"img{i}.png": label for i, (_, label) in enumerate(samples)}
    for i, (path, _) in enumerate(samples):
        drop(watch, f"img{i}.png", path.read_bytes())
    drop(watch, "broken.png", b"\x89PNG but not really an image")
    (watch / "half.png.part").write_bytes(samples[0][0].read_bytes()[:20])  # still being written: left alone
    log_path = tmp_path / "log.sqlite"
    agent = Agent(model, LocalLog(log_path, "cam-1", max_buffer=100), folder=watch, poll_s=0.05)
    with running(agent):
        wait_for(lambda: len(list((watch / "done").iterdir())) == len(samples)
                 and (watch / "rejected" / "broken.png").exists(), "the folder to be classified")
    rows = logged(log_path)
    assert sorted(source.split(":")[0] for source, _ in rows) == sorted(expected)
    for source, r in rows:
        assert r["class_id"] == expected[source.split(":")[0]]  # the class the model gave it when packaged
        assert r["class_name"] == model.bundle.class_names[r["class_id"]]
    assert {r["model_version"] for _, r in rows} == {model.bundle.model_version}
    assert "not an image" in (watch / "rejected" / "broken.png.reason.txt").read_text()
    assert (watch / "half.png.part").exists() and agent.rejected == 1

    # A kill after logging img0 but before moving it, simulated: the same file (name, size, mtime) is back. A new
    # agent on the same log moves it without classifying it again, and classifies the one new file.
    os.replace(watch / "done" / "img0.png", watch / "img0.png")
    drop(watch, "new.png", samples[0][0].read_bytes())
    agent = Agent(model, LocalLog(log_path, "cam-1", max_buffer=100), folder=watch, poll_s=0.05)
    with running(agent):
        wait_for(lambda: not (watch / "img0.png").exists() and not (watch / "new.png").exists(), "the restart")
    rows = logged(log_path)
    assert len(rows) == len(samples) + 1 and agent.classified == 1
    assert rows[-1][0].startswith("new.png:") and rows[-1][1]["class_id"] == samples[0][1]


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
    ]
    for extra, message in cases:
        assert main([*base, *extra]) == 2, extra
        assert message in capsys.readouterr().err
    assert not (tmp_path / "log.sqlite").exists()  # refused before anything was made
