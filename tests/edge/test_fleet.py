"""The fleet (issue 18): three device agents as processes, each with its own key and watched folder, shipping to a
real ``signpost serve`` through a loopback TCP proxy. The server is killed and restarted while they sync and the
proxy cuts the network for a while; in the end every record is on the server exactly once, nothing within the
buffer bound is lost, the one device forced past its bound reports how many it dropped, and ``signpost monitor
--by device`` reports the three devices."""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.edge.test_agent import drop, edge_bundle_sample, wait_for

IMAGES = 12  # per device and phase
WHILE_DOWN = 4  # per device, classified while the server is down
TOTAL = 2 * IMAGES + WHILE_DOWN
SMALL_BUFFER = 8  # cam-3's --max-buffer: it classifies IMAGES while cut off, so it must drop some


class Proxy:
    """A loopback TCP proxy from ``port`` to ``target``: ``cut`` closes the listener and every open connection (a
    network gone, as a device sees it), ``mend`` listens again on the same port."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.port = free_port()
        self._listener: socket.socket | None = None
        self._open: set[socket.socket] = set()
        self._lock = threading.Lock()

    def mend(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def cut(self) -> None:
        with self._lock:
            listener, self._listener = self._listener, None
            doomed, self._open = self._open, set()
        if listener is not None:
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)
            listener.close()
        for conn in doomed:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
            conn.close()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # cut
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target), timeout=5)
            except OSError:
                client.close()  # the server is down: the device sees a reset
                continue
            with self._lock:
                if self._listener is not listener:
                    client.close()
                    upstream.close()
                    return
                self._open |= {client, upstream}
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    def _pipe(self, source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                sink.sendall(data)
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_WR)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``signpost serve`` as a process, with the devices' keys; ``kill`` is kill -9."""

    def __init__(self, work: Path, model: Path, keys_file: Path, env: dict[str, str]) -> None:
        self.work, self.model, self.keys_file, self.env = work, model, keys_file, env
        self.port = free_port()
        self.process: subprocess.Popen | None = None
        self.db = work / "serve" / "predictions.db"

    def start(self) -> None:
        out = (self.work / "server.out").open("a")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "signpost.cli", "serve", "--model", str(self.model), "--port", str(self.port),
             "name=t", f"workdir={self.work}", "tracking.backend=none", f"serve.device_keys_file={self.keys_file}",
             "serve.batching=false"], stdout=out, stderr=subprocess.STDOUT, env=self.env)

        def ready() -> bool:
            assert self.process is not None and self.process.poll() is None, (self.work / "server.out").read_text()
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/readyz", timeout=2) as answer:
                    return answer.status == 200
            except OSError:
                return False

        wait_for(ready, "the server to be ready", 120)

    def kill(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait(30)

    def rows(self) -> list[tuple[str, str]]:
        """(device id, request id) of every row the devices shipped."""
        if not self.db.exists():
            return []
        with contextlib.closing(sqlite3.connect(self.db, timeout=10)) as db:
            return db.execute("SELECT device_id, request_id FROM predictions WHERE device_id != ''").fetchall()


@contextlib.contextmanager
def agents(edge_bundle, edge_keys, tmp_path: Path, proxy: Proxy) -> Iterator[dict[str, dict]]:
    """Three agents, each with its own key, folder and log; SIGTERM at the end (each must exit 0)."""
    devices: dict[str, dict] = {}
    try:
        for n in (1, 2, 3):
            name = f"cam-{n}"
            folder = tmp_path / name
            folder.mkdir()
            (folder / "key").write_text(f"key-of-{name}\n")
            args = [sys.executable, "-m", "signpost.cli", "edge", "run", "--bundle", str(edge_bundle.path),
                    "--device-id", name, "--watch", str(folder / "in"), "--log", str(folder / "log.sqlite"),
                    "--server", f"http://127.0.0.1:{proxy.port}", "--key-file", str(folder / "key"),
                    "--public-key", str(edge_keys.public), "--batch-size", "5", "--flush-seconds", "0.5",
                    "--max-buffer", str(SMALL_BUFFER if n == 3 else 1000), "--retry-max-seconds", "2",
                    "--poll-seconds", "0.1", "--status-seconds", "1"]
            out = (folder / "agent.out").open("w")
            devices[name] = {"folder": folder, "watch": folder / "in", "log": folder / "log.sqlite",
                             "process": subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT)}
        yield devices
        for device in devices.values():
            device["process"].send_signal(signal.SIGTERM)
        for device in devices.values():
            assert device["process"].wait(60) == 0, (device["folder"] / "agent.out").read_text()
    finally:
        for device in devices.values():
            device["process"].kill()


def local(log: Path) -> tuple[list[str], int, int]:
    """A device log's request ids, its unshipped count and its dropped count."""
    with contextlib.closing(sqlite3.connect(log, timeout=10)) as db:
        ids = [r for (r,) in db.execute("SELECT json_extract(record, '$.request_id') FROM records")]
        unshipped = db.execute("SELECT COUNT(*) FROM records WHERE shipped = 0").fetchone()[0]
        dropped = db.execute("SELECT COALESCE(SUM(value), 0) FROM counters WHERE name = 'dropped'").fetchone()[0]
    return ids, unshipped, dropped


@pytest.mark.slow  # four processes that load torch, a server restart and a network cut: about a minute
def test_three_devices_ship_every_record_exactly_once_through_a_restart_and_a_cut(
        edge_bundle, edge_keys, tmp_path: Path) -> None:
    work = tmp_path / "server"
    work.mkdir()
    keys_file = tmp_path / "device-keys.yaml"
    keys_file.write_text("".join(f"cam-{n}: {hashlib.sha256(f'key-of-cam-{n}'.encode()).hexdigest()}\n"
                                 for n in (1, 2, 3)))
    env = {**os.environ, "SIGNPOST_PUBLIC_KEYS": edge_keys.public.read_text()}
    server = Server(work, edge_bundle.model_dir, keys_file, env)
    server.start()
    proxy = Proxy(server.port)
    proxy.mend()
    image, _ = edge_bundle_sample(edge_bundle)
    data = image.read_bytes()
    try:
        with agents(edge_bundle, edge_keys, tmp_path, proxy) as devices:
            def done(name: str, count: int) -> bool:
                folder = devices[name]["watch"] / "done"
                return folder.is_dir() and len(list(folder.iterdir())) == count

            # Phase 1: every device classifies; the server is killed as soon as the first batches land, and
            # comes back while the devices still have records to ship.
            for name, device in devices.items():
                wait_for(lambda d=device: (d["watch"] / "done").is_dir(), f"{name} to start", 120)
                for i in range(IMAGES):
                    drop(device["watch"], f"a{i:02d}.png", data)
            wait_for(lambda: len(server.rows()) >= 5, "the first batches on the server")
            server.kill()
            for device in devices.values():  # records to ship whatever the kill caught: the restart is mid-sync
                for i in range(WHILE_DOWN):
                    drop(device["watch"], f"down{i:02d}.png", data)
            for name in devices:
                wait_for(lambda n=name: done(n, IMAGES + WHILE_DOWN), f"{name} to classify its images")
            server.start()

            # Phase 2: the network is cut; cam-3 classifies more than its buffer holds; then the network mends.
            wait_for(lambda: all(local(d["log"])[1] == 0 for d in devices.values()), "phase 1 to be shipped")
            proxy.cut()
            for device in devices.values():
                for i in range(IMAGES):
                    drop(device["watch"], f"b{i:02d}.png", data)
            for name in devices:
                wait_for(lambda n=name: done(n, TOTAL), f"{name} to classify while cut off")
            assert local(devices["cam-3"]["log"])[2] > 0  # past its bound while cut off: it dropped some
            time.sleep(1)  # a few failed tries against the cut network
            proxy.mend()
            wait_for(lambda: all(local(d["log"])[1] == 0 for d in devices.values()), "phase 2 to be shipped")

        rows = server.rows()
        assert len(rows) == len(set(rows)), "a record was stored twice"
        for name, device in devices.items():
            ids, unshipped, dropped = local(device["log"])
            on_server = sorted(r for d, r in rows if d == name)
            assert on_server == sorted(ids) and unshipped == 0  # exactly what the device kept, each once
            if name == "cam-3":
                assert dropped > 0 and len(ids) + dropped == TOTAL  # dropped only past its bound, and counted
                assert f"{dropped} dropped past --max-buffer" in (device["folder"] / "agent.out").read_text()
                # ... and told the server, whose /metrics shows it
                with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics", timeout=5) as answer:
                    metrics = answer.read().decode()
                assert f'signpost_device_dropped_records{{device="cam-3"}} {float(dropped)}' in metrics
            else:
                assert dropped == 0 and len(ids) == TOTAL  # within the bound nothing was lost
    finally:
        proxy.cut()
        server.kill()

    monitor = subprocess.run(
        [sys.executable, "-m", "signpost.cli", "monitor", "--by", "device", "--no-alerts", "--log",
         f"sqlite:///{server.db}", "--model", str(edge_bundle.model_dir), "--data", str(data_dir(edge_bundle)),
         "name=t", f"workdir={work}", "tracking.backend=none", "monitor.min_window=10"],
        capture_output=True, text=True, env=env, timeout=300)
    assert monitor.returncode in (0, 5), monitor.stdout + monitor.stderr
    for name in ("cam-1", "cam-2", "cam-3", "(fleet)"):
        assert f"device {name}:" in monitor.stdout, monitor.stdout


def data_dir(edge_bundle) -> Path:
    """The prepared data the bundle's model was trained on (the monitor's reference)."""
    (found,) = [p for p in (Path(edge_bundle.config.workdir) / "data").iterdir() if (p / "manifest.json").is_file()]
    return found
