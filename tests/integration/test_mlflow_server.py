"""Tracking and the registry through a real ``mlflow server`` on loopback, as a team with a tracking server runs it.

The server is a subprocess of its own (own process group, SQLite backend, proxied artifact store in a temporary
folder), bound to 127.0.0.1 only, and always stopped when the test ends.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from mlflow import MlflowClient

from signpost.artifacts import write_manifest
from signpost.config import TrackingConfig
from signpost.registry import Registry
from signpost.tracking import start_run

# Starting the server (imports, schema migrations) takes 10-25 s on a loaded machine.
pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::sqlalchemy.exc.SADeprecationWarning")]

STARTUP_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 15.0


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM the server's process group (it runs uvicorn as a child), SIGKILL whatever outlives the timeout."""
    try:
        family = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.Error:
        family = []
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)  # the group id is the server's pid: start_new_session=True
    _, alive = psutil.wait_procs(family, timeout=STOP_TIMEOUT_S)
    for survivor in alive:
        with contextlib.suppress(psutil.Error):
            survivor.kill()
    psutil.wait_procs(alive, timeout=STOP_TIMEOUT_S)
    proc.wait(timeout=STOP_TIMEOUT_S)


@pytest.fixture
def mlflow_server(tmp_path: Path) -> Iterator[tuple[str, subprocess.Popen[bytes], Path]]:
    """A running ``mlflow server`` on 127.0.0.1; yields (URL, process, its artifact folder)."""
    port = _free_port()
    artifacts = tmp_path / "srv-artifacts"
    log_path = tmp_path / "server.log"
    command = [
        sys.executable, "-m", "mlflow", "server",
        "--host", "127.0.0.1",
        "--port", str(port),
        "--workers", "1",
        "--backend-store-uri", f"sqlite:///{(tmp_path / 'srv.db').as_posix()}",
        "--artifacts-destination", str(artifacts),
    ]  # fmt: skip
    env = {key: value for key, value in os.environ.items() if not key.startswith("MLFLOW_")}
    # The GenAI job runner starts a dozen huey consumer processes that a tracking test does not need.
    env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
    with open(log_path, "wb") as server_log:
        proc = subprocess.Popen(
            command, cwd=tmp_path, env=env, stdout=server_log, stderr=subprocess.STDOUT, start_new_session=True
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while not _healthy(url):
            if proc.poll() is not None or time.monotonic() > deadline:
                state = f"exited with {proc.returncode}" if proc.poll() is not None else "did not answer"
                output = log_path.read_text(encoding="utf-8", errors="replace")[-6000:]
                pytest.fail(f"mlflow server {state} within {STARTUP_TIMEOUT_S:.0f} s on {url}; its output:\n{output}")
            time.sleep(0.25)
        yield url, proc, artifacts
    finally:
        _stop(proc)


def _fake_model(root: Path, name: str, seed: int) -> Path:
    folder = root / name
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(bytes((seed * 17 + i) % 256 for i in range(8192)))
    card = {"architecture": "tiny", "num_classes": 3, "data_key": f"{seed:02d}" * 32, "data_artifact": "data-x"}
    (folder / "model_card.json").write_text(json.dumps(card), encoding="utf-8")
    write_manifest(folder, stage="train", key=f"{seed:064x}", inputs={}, config={"seed": seed}, code="test")
    return folder


def _files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _listening(proc: subprocess.Popen[bytes]) -> set[tuple[str, int]]:
    """Addresses the server's processes listen on (TCP)."""
    family = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    addresses = set()
    for member in family:
        for conn in member.net_connections(kind="tcp"):
            if conn.status == psutil.CONN_LISTEN:
                addresses.add((conn.laddr.ip, conn.laddr.port))
    return addresses


def test_tracking_and_registry_through_a_server(
    mlflow_server: tuple[str, subprocess.Popen[bytes], Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    url, proc, server_artifacts = mlflow_server
    port = int(url.rsplit(":", 1)[1])
    assert _listening(proc) == {("127.0.0.1", port)}, "the server must listen on loopback only"

    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    # Fail fast instead of MLflow's default minutes of retries if the server goes away mid-test.
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
    workdir = tmp_path / "work"
    config = TrackingConfig(registered_model="signpost-server-test")
    registry = Registry(config, workdir)
    caplog.set_level(logging.INFO, logger="signpost.tracking")

    run_ids = []
    for seed, accuracy in [(1, 0.81), (2, 0.87), (3, 0.91)]:
        model = _fake_model(tmp_path / "models", f"model-{seed:03d}", seed)
        with start_run(
            config, workdir=workdir, experiment="server", run_name=f"train-{seed}", tags={"stage": "train"}
        ) as run:
            run.log_params({"train": {"lr": 0.01 * seed, "epochs": 2}, "seed": seed})
            run.log_metrics({"loss": 1.0 / seed}, step=0)
            run.log_metrics({"loss": 0.5 / seed, "val/accuracy": accuracy}, step=1)
            registry.register(run, model)
            run_ids.append(run.run_id)
        if seed in (2, 3):
            registry.promote()

    champion = registry.get("champion")
    assert champion is not None and champion.run_id == run_ids[2]
    assert champion.metrics == {"loss": 0.5 / 3, "val/accuracy": 0.91}
    assert registry.rollback().run_id == run_ids[1]
    assert registry.get("challenger") is None

    downloaded = registry.download("champion", tmp_path / "served")
    assert downloaded.name == "model-002"
    assert _files(downloaded) == _files(tmp_path / "models" / "model-002")

    client = MlflowClient(url)
    got = client.get_run(run_ids[0])
    assert got.info.status == "FINISHED"
    assert got.data.params == {"train.lr": "0.01", "train.epochs": "2", "seed": "1"}
    assert [(m.step, m.value) for m in client.get_metric_history(run_ids[0], "loss")] == [(0, 1.0), (1, 0.5)]
    assert got.data.tags["stage"] == "train"
    assert [a.path for a in client.list_artifacts(run_ids[0], "model")] == [
        "model/manifest.json",
        "model/model.safetensors",
        "model/model_card.json",
    ]
    aliases = client.get_registered_model("signpost-server-test").aliases
    assert {alias: str(version) for alias, version in aliases.items()} == {"champion": "2"}

    # Artifacts went through the server's proxy to its own store; nothing was written to a local store.
    assert list(server_artifacts.rglob("model.safetensors"))
    assert not (workdir / "mlflow.db").exists() and not (workdir / "mlruns").exists()
    # MLflow's "View run ... at: <url>" lines are logged, not printed to the CLI's stdout.
    assert "View run" not in capsys.readouterr().out
    assert f"View run train-1 at: {url}" in caplog.text
