"""The prediction log on a real PostgreSQL server (issue 17, item 6): its schema made by the migrations, several
`signpost serve` processes writing to it at once and losing nothing to SIGTERM, and the monitor reading the same
verdicts from it as from SQLite."""

from __future__ import annotations

import hashlib
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import create_engine, insert, text

from signpost.artifacts import atomic_dir, write_manifest
from signpost.data.stats import STAT_NAMES
from signpost.models import build_model
from signpost.models.artifact import ModelCard, save_model
from signpost.serve import predlog, predlog_writer
from signpost.stages.monitor import load_reference, monitor
from tests.conftest import local_config
from tests.serve.conftest import image_bytes
from tests.serve.postgres import Postgres, running_postgres


@pytest.fixture(scope="module")
def postgres() -> Iterator[Postgres]:
    with running_postgres() as server:
        yield server


def _schema_diff(url: str) -> list:
    """What the log's tables lack or have beyond ``predlog``'s models (columns, types, defaults, indexes)."""
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            context = MigrationContext.configure(conn, opts={"compare_type": True, "compare_server_default": True,
                                                             "version_table": predlog.VERSION_TABLE})
            return compare_metadata(context, predlog.metadata)
    finally:
        engine.dispose()


def _revision(url: str) -> str:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return conn.execute(text(f"SELECT version_num FROM {predlog.VERSION_TABLE}")).scalar_one()
    finally:
        engine.dispose()


def test_an_empty_database_gets_the_schema_through_the_migrations(postgres: Postgres) -> None:
    url = postgres.url(postgres.database(), driver="postgresql")  # plain postgresql://: psycopg 3, not psycopg2
    predlog.make_engine(url).dispose()
    assert _revision(url) == predlog._script().get_current_head()
    assert _schema_diff(url) == []
    log = predlog_writer.PredictionLog(url, batch_size=7, interval_s=0.01, experiment="it's")  # a quote, escaped
    for i in range(50):
        log.add(_record(i))
    log.add_error("/v1/predict", 400, "corrupt_image")
    log.close()
    assert log.written == 50 and log.failed_writes == 0
    window = np.concatenate(list(predlog.read_window(url, ["ts", "class_id"], last=20, chunk=6,
                                                     experiment="it's")))
    assert window[:, 0].tolist() == [float(i) for i in range(30, 50)]
    assert predlog.model_versions(url, last=20, experiment="it's") == {"v1": 20}
    assert predlog.experiments(url) == {"it's": 50}
    assert predlog.error_count(url, 0.0, 2e10, experiment="it's") == 1
    predlog.make_engine(url).dispose()  # again: at head, left alone
    assert predlog.count(url) == 50


def test_a_log_of_a_newer_signpost_is_refused_and_left_alone(postgres: Postgres) -> None:
    url = postgres.url(postgres.database())
    predlog.make_engine(url).dispose()
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(text(f"UPDATE {predlog.VERSION_TABLE} SET version_num = '0099'"))
    engine.dispose()
    with pytest.raises(predlog.PredictionLogError, match=r"revision '0099'.*newer Signpost.*nothing was written"):
        predlog.make_engine(url)
    assert _revision(url) == "0099"


def _record(i: int) -> dict:
    return {"ts": float(i), "request_id": f"r{i}", "model_version": "v1", "class_id": i % 3, "class_name": "a",
            "confidence": 0.9, "entropy": 0.2, "top_k": [[i % 3, 0.9]], "latency_ms": 1.5, "width": 32,
            "height": 32, "embedding": np.zeros(predlog.EMBEDDING_DIMS), "image": np.zeros((8, 8, 3), np.uint8)}


# --- several server processes on one log -------------------------------------------------------------------------

def _model(folder: Path) -> Path:
    """An untrained 3-class signnet as a train-stage artifact: the servers only need a model to answer with."""
    card = ModelCard(architecture="signnet", num_classes=3, class_names=["a", "b", "c"], image_size=32,
                     mean=[0.5] * 3, std=[0.25] * 3, data_artifact="data-aaaaaaaaaaaa", data_key="a" * 64)
    with atomic_dir(folder) as tmp:
        save_model(tmp, build_model("signnet", 3, 32), card)
        write_manifest(tmp, stage="train", key=hashlib.sha256(folder.name.encode()).hexdigest(), inputs={},
                       config={}, code="test")
    return folder


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_server_does_not_start_on_a_log_of_a_newer_signpost(postgres: Postgres, tmp_path: Path) -> None:
    url = postgres.url(postgres.database())
    predlog.make_engine(url).dispose()
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(text(f"UPDATE {predlog.VERSION_TABLE} SET version_num = '0099'"))
    engine.dispose()
    model = _model(tmp_path / "work" / "train" / "t-0123456789ab")
    server = subprocess.run(
        [sys.executable, "-m", "signpost.cli", "serve", "--model", str(model), "--port", str(_free_port()),
         f"workdir={tmp_path / 'work'}", "tracking.backend=none", f"serve.prediction_log={url}"],
        capture_output=True, text=True, timeout=240)
    assert server.returncode != 0
    assert "revision '0099', which this Signpost does not know" in server.stderr
    assert _revision(url) == "0099"  # untouched
    engine = create_engine(url)
    with engine.connect() as conn:
        assert conn.execute(text("SELECT COUNT(*) FROM predictions")).scalar_one() == 0
    engine.dispose()


@pytest.mark.slow
def test_servers_writing_at_once_lose_nothing_to_sigterm(postgres: Postgres, tmp_path: Path) -> None:
    url = postgres.url(postgres.database())
    model = _model(tmp_path / "work" / "train" / "t-0123456789ab")
    ports = [_free_port() for _ in range(3)]
    servers = [subprocess.Popen(
        [sys.executable, "-m", "signpost.cli", "serve", "--model", str(model), "--port", str(port),
         f"workdir={tmp_path / 'work'}", "name=t", "tracking.backend=none", f"serve.prediction_log={url}",
         "serve.log_interval_s=0.2", "serve.log_batch_size=16"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for port in ports]
    answered: list[str] = []  # request ids of the 200 answers, from every server
    sent = [0]
    lock = threading.Lock()
    stop = threading.Event()

    def load(port: int, seed: int) -> None:
        """Predict until the server stops answering (SIGTERM) or 400 requests: bounded in count and time."""
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
            for i in range(400):
                if stop.is_set():
                    return
                with lock:
                    sent[0] += 1
                try:
                    answer = client.post("/v1/predict", content=image_bytes(seed=seed * 1000 + i),
                                         headers={"Content-Type": "image/png"})
                except httpx.TransportError:
                    return  # the server has stopped taking requests
                if answer.status_code == 200:
                    with lock:
                        answered.append(answer.json()["request_id"])

    try:
        deadline = time.monotonic() + 240  # three servers importing torch at once on a shared 2-core machine
        for server, port in zip(servers, ports, strict=True):
            while True:
                assert server.poll() is None, server.stderr.read() if server.stderr else ""
                assert time.monotonic() < deadline, "a server did not become ready"
                try:
                    if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                time.sleep(0.2)
        threads = [threading.Thread(target=load, args=(port, k * 2 + j)) for k, port in enumerate(ports)
                   for j in range(2)]
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 120
        while len(answered) < 60 and time.monotonic() < deadline and any(t.is_alive() for t in threads):
            time.sleep(0.05)
        assert len(answered) >= 60, "the servers answered too few requests under load"
        for server in servers:  # mid-load: the clients are still sending
            server.send_signal(signal.SIGTERM)
        for server in servers:
            server.wait(90)
        stop.set()
        for thread in threads:
            thread.join(60)
    finally:
        stop.set()
        for server in servers:
            if server.poll() is None:
                server.kill()
                server.wait(30)
    # uvicorn shuts down gracefully, then raises the signal it caught again: -SIGTERM is a clean stop (not killed).
    assert [server.returncode for server in servers] == [-signal.SIGTERM] * 3
    engine = create_engine(url)
    with engine.connect() as conn:
        logged = [row[0] for row in conn.execute(text("SELECT request_id FROM predictions WHERE experiment = 't'"))]
    engine.dispose()
    assert len(logged) == len(set(logged)), "a prediction was logged twice"
    assert set(answered) <= set(logged), f"{len(set(answered) - set(logged))} answered predictions are not logged"
    assert len(logged) <= sent[0]
    assert _revision(url) == predlog._script().get_current_head()  # three servers upgraded it at once, one at a time


# --- the monitor on PostgreSQL and on SQLite ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def data_dir(synthetic_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from signpost.stages.prepare import prepare

    work = tmp_path_factory.mktemp("pgdata")
    return prepare(local_config(synthetic_root, work, "tracking.backend=none"), progress=False).path


def _window(data_dir: Path, n: int) -> list[dict]:
    """``n`` records drawn from the reference, the second half darkened and served by a canary ``v2``, with
    another experiment's records in between: drift, a canary and a shared log for the monitor to find."""
    reference = load_reference(data_dir, None, None)
    rng = np.random.default_rng(3)
    classes = reference.class_counts / reference.class_counts.sum()
    rows = []
    for i in range(n):
        j = int(rng.integers(0, len(reference.samples["brightness"])))
        late = i >= n // 2
        row = {"ts": 1000.0 + i, "request_id": f"r{i}", "model_version": "v2" if late and i % 2 else "v1",
               "experiment": "other" if i % 7 == 0 else "t", "class_id": int(rng.choice(len(classes), p=classes)),
               "class_name": "c", "confidence": float(rng.uniform(0.5, 1.0)), "entropy": 0.2, "top_k": "[]",
               "latency_ms": float(rng.gamma(3.0, 2.0)), "width": int(reference.samples["width"][j]),
               "height": int(reference.samples["height"][j])}
        for name in STAT_NAMES:
            row[name] = float(reference.samples[name][j]) * (0.6 if late and name == "brightness" else 1.0)
        row.update({name: float(rng.normal()) for name in predlog.EMBEDDING_COLUMNS})
        rows.append(row)
    return rows


def test_the_monitor_says_the_same_on_postgresql_as_on_sqlite(postgres: Postgres, data_dir: Path,
                                                              tmp_path: Path) -> None:
    rows = _window(data_dir, 4000)
    urls = {"sqlite": f"sqlite:///{tmp_path / 'log.db'}", "postgresql": postgres.url(postgres.database())}
    results = {}
    for name, url in urls.items():
        engine = predlog.make_engine(url)
        with engine.begin() as conn:
            conn.execute(insert(predlog.predictions), rows)
            conn.execute(insert(predlog.request_errors), [{"ts": 2500.0, "route": "/v1/predict", "status": 400,
                                                           "code": "corrupt_image", "experiment": "t"}])
        engine.dispose()
        config = local_config(Path("unused"), tmp_path / name, "tracking.backend=none", "monitor.min_window=10")
        results[name] = monitor(config, data_dir=data_dir, log_url=url, last=3000, alerts=False).result
    sqlite, postgresql = results["sqlite"], results["postgresql"]
    assert sqlite["verdict"]["retrain"] and sqlite["input_drift"]["drifted"]  # the darkened half is seen
    assert sqlite["models"] is not None  # the canary is compared
    for key in ("verdict", "window", "health", "experiment", "input_drift", "prediction_drift", "embedding_drift",
                "models"):
        assert postgresql[key] == sqlite[key], key
