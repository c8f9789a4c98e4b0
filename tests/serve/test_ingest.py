"""The fleet's ingest route, ``POST /v1/predictions/ingest``, on the real app: records stored under the device's
id, a retried batch stored once (also when the tries race), per-device keys (401 unknown, 403 another device's),
every record validated (400 naming it), size limits (413), and the keys file read again when it changes."""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from signpost.artifacts import atomic_dir, write_manifest
from signpost.config import ConfigError, SignpostConfig
from signpost.data.stats import STAT_NAMES
from signpost.models import build_model
from signpost.models.artifact import ModelCard, save_model
from signpost.monitoring.records import IngestBatch, PredictionRecord
from signpost.serve import predlog
from signpost.serve.app import create_app
from signpost.serve.ingest import ROUTE
from tests.conftest import local_config
from tests.serve.conftest import LoopbackServer
from tests.serve.postgres import running_postgres

KEYS = {"cam-1": "key-of-camera-one", "cam-2": "key-of-camera-two"}


def _hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained 3-class signnet as a train-stage artifact: the server needs a model; ingest never uses it."""
    folder = tmp_path_factory.mktemp("model") / "train" / "t-0123456789ab"
    card = ModelCard(architecture="signnet", num_classes=3, class_names=["a", "b", "c"], image_size=32,
                     mean=[0.5] * 3, std=[0.25] * 3, data_artifact="data-0123456789ab", data_key="a" * 64)
    with atomic_dir(folder) as tmp:
        save_model(tmp, build_model("signnet", 3, 32), card)
        write_manifest(tmp, stage="train", key="k" * 64, inputs={}, config={}, code="test")
    return folder


def _config(tmp_path: Path, *overrides: str, keys: dict[str, str] | None = None) -> SignpostConfig:
    config = local_config(Path("unused"), tmp_path / "work", "tracking.backend=none", *overrides)
    config.serve.device_keys = {device: _hash(key) for device, key in (KEYS if keys is None else keys).items()}
    return config


@pytest.fixture
def client(model_dir: Path, tmp_path: Path) -> Iterator[TestClient]:
    with TestClient(create_app(_config(tmp_path, "serve.max_ingest_records=50", "serve.max_ingest_bytes=65536"),
                               str(model_dir)), raise_server_exceptions=False) as started:
        yield started


def _record(i: int, **changes: object) -> dict:
    record = {"ts": 1_700_000_000.0 + i, "request_id": f"req-{i}", "model_version": "t-0123456789ab",
              "class_id": i % 3, "class_name": "abc"[i % 3], "confidence": 0.9, "entropy": 0.3,
              "top_k": [[i % 3, 0.9], [(i + 1) % 3, 0.05]], "latency_ms": 4.5, "width": 40, "height": 30,
              **{name: 0.25 for name in STAT_NAMES}, **{f"emb{j}": 0.1 * j for j in range(8)}}
    return record | changes


def _batch(device: str, batch_id: str, n: int, start: int = 0) -> dict:
    return {"device_id": device, "batch_id": batch_id, "records": [_record(start + i) for i in range(n)]}


def _post(client: TestClient | httpx.Client, body: object, key: str | None = KEYS["cam-1"]) -> httpx.Response:
    headers = {"Content-Type": "application/json", **({"X-API-Key": key} if key is not None else {})}
    return client.post(ROUTE, content=json.dumps(body), headers=headers)


def _rows(tmp_path: Path) -> list[tuple]:
    with sqlite3.connect(tmp_path / "work" / "serve" / "predictions.db") as conn:
        return conn.execute("SELECT device_id, experiment, request_id, top_k, confidence FROM predictions "
                            "ORDER BY id").fetchall()


def test_a_batch_is_stored_under_its_device_and_a_retry_stores_nothing(client: TestClient, tmp_path: Path) -> None:
    answer = _post(client, _batch("cam-1", "b-0001", 3))
    assert answer.status_code == 200, answer.text
    assert answer.json() == {"stored": 3}
    rows = _rows(tmp_path)
    assert [(d, e, r) for d, e, r, _, _ in rows] == [("cam-1", "t", f"req-{i}") for i in range(3)]
    assert json.loads(rows[0][3]) == [[0, 0.9], [1, 0.05]]  # top_k kept as the server keeps its own

    again = _post(client, _batch("cam-1", "b-0001", 3))  # the answer was lost: the device sends it again
    assert again.status_code == 200 and again.json() == {"stored": 0, "duplicate": True}
    # The same batch id of another device is another batch.
    other = _post(client, _batch("cam-2", "b-0001", 2, start=10), key=KEYS["cam-2"])
    assert other.json() == {"stored": 2}
    assert len(_rows(tmp_path)) == 5
    url = f"sqlite:///{tmp_path / 'work' / 'serve' / 'predictions.db'}"
    assert predlog.devices(url) == {"cam-1": 3, "cam-2": 2}
    assert predlog.count(url, experiment="t") == 5


def test_a_devices_dropped_count_reaches_the_metrics_and_the_log(client: TestClient,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    """A device that dropped records past its local buffer bound says so in every batch; the server shows the
    latest count per device on /metrics and logs a warning each time it grows. A negative count is a 400."""
    assert _post(client, _batch("cam-1", "d-1", 1)).status_code == 200
    with caplog.at_level("WARNING", logger="signpost.serve.ingest"):
        assert _post(client, {**_batch("cam-1", "d-2", 1, start=1), "dropped": 40}).status_code == 200
        assert _post(client, {**_batch("cam-1", "d-3", 1, start=2), "dropped": 40}).status_code == 200
    assert [r.getMessage() for r in caplog.records if "dropped" in r.getMessage()] == [
        "device cam-1 has dropped 40 records past its local buffer bound (its server was away too long)"]
    assert 'signpost_device_dropped_records{device="cam-1"} 40.0' in client.get("/metrics").text
    bad = _post(client, {**_batch("cam-1", "d-4", 1, start=3), "dropped": -1})
    assert bad.status_code == 400 and "dropped" in bad.text


def test_keys_a_wrong_one_is_401_and_another_devices_is_403(client: TestClient, tmp_path: Path) -> None:
    assert _post(client, _batch("cam-1", "b1", 1), key=None).status_code == 401
    wrong = _post(client, _batch("cam-1", "b1", 1), key="not-a-device-key")
    assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "unauthorized"
    bearer = client.post(ROUTE, content=json.dumps(_batch("cam-1", "b1", 1)),
                         headers={"Content-Type": "application/json", "Authorization": f"Bearer {KEYS['cam-1']}"})
    assert bearer.status_code == 200, bearer.text
    posing = _post(client, _batch("cam-1", "b2", 1), key=KEYS["cam-2"])  # cam-2's key, sending as cam-1
    assert posing.status_code == 403 and posing.json()["error"]["code"] == "wrong_device"
    assert "'cam-2'" in posing.json()["error"]["message"]
    assert len(_rows(tmp_path)) == 1


def test_a_server_without_device_keys_takes_no_batches(model_dir: Path, tmp_path: Path) -> None:
    with TestClient(create_app(_config(tmp_path, keys={}), str(model_dir))) as client:
        answer = _post(client, _batch("cam-1", "b1", 1))
    assert answer.status_code == 403 and "serve.device_keys" in answer.json()["error"]["message"]


@pytest.mark.parametrize(("changes", "field"), [
    ({"confidence": 1.5}, "records[1].confidence"),
    ({"confidence": float("nan")}, "records[1].confidence"),  # json.dumps writes NaN; Python's json reads it
    ({"class_id": "2"}, "records[1].class_id"),
    ({"width": 3.5}, "records[1].width"),
    ({"top_k": [[0.5, 0.9]]}, "records[1].top_k[0][0]"),
    ({"request_id": "x" * 37}, "records[1].request_id"),
    ({"colour": "red"}, "records[1].colour"),
])
def test_a_bad_record_is_400_naming_it_and_nothing_is_stored(client: TestClient, tmp_path: Path, changes: dict,
                                                            field: str) -> None:
    body = _batch("cam-1", "b1", 3)
    body["records"][1] |= changes
    answer = _post(client, body)
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"]["code"] == "invalid_record"
    assert answer.json()["error"]["message"].startswith(f"{field}: ")
    missing = _batch("cam-1", "b1", 3)
    del missing["records"][2]["brightness"]
    assert _post(client, missing).json()["error"]["message"].startswith("records[2].brightness: ")
    assert _rows(tmp_path) == []
    assert _post(client, _batch("cam-1", "b1", 3)).json() == {"stored": 3}  # the refused batch id is still free


def test_bad_batches_are_refused_with_what_to_change(client: TestClient) -> None:
    assert _post(client, {"device_id": "cam-1", "batch_id": "a/b", "records": []}).json()["error"]["message"] \
        .startswith("batch_id: ")
    not_json = client.post(ROUTE, content=b"{oops", headers={"Content-Type": "application/json",
                                                             "X-API-Key": KEYS["cam-1"]})
    assert not_json.status_code == 400 and not_json.json()["error"]["code"] == "invalid_json"
    form = client.post(ROUTE, content=b"{}", headers={"Content-Type": "text/plain", "X-API-Key": KEYS["cam-1"]})
    assert form.status_code == 415


def test_oversize_batches_are_413(client: TestClient, tmp_path: Path) -> None:
    many = _post(client, _batch("cam-1", "b1", 51))  # serve.max_ingest_records=50
    assert many.status_code == 413 and "serve.max_ingest_records" in many.json()["error"]["message"]
    big = _batch("cam-1", "b2", 1)
    big["padding"] = "x" * 70_000  # over serve.max_ingest_bytes=65536, whatever else is wrong with it
    large = _post(client, big)
    assert large.status_code == 413 and "serve.max_ingest_bytes" in large.json()["error"]["message"]
    assert _rows(tmp_path) == []


def _race(app: object, body: dict, tries: int = 8) -> list[dict]:
    """``tries`` threads sending ``body`` at once to ``app`` served on loopback; their answers."""
    answers: list[dict] = []
    lock = threading.Lock()

    def send() -> None:
        with httpx.Client(base_url=server.url, timeout=30) as http:
            answer = _post(http, body).json()
        with lock:
            answers.append(answer)

    with LoopbackServer(app) as server:
        threads = [threading.Thread(target=send) for _ in range(tries)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
    return answers


def test_concurrent_tries_of_one_batch_store_it_once(model_dir: Path, tmp_path: Path) -> None:
    answers = _race(create_app(_config(tmp_path), str(model_dir)), _batch("cam-1", "b-race", 20))
    assert sorted(a["stored"] for a in answers) == [0] * 7 + [20], answers
    assert sum(a.get("duplicate", False) for a in answers) == 7
    assert len(_rows(tmp_path)) == 20


def test_on_postgresql_a_racing_batch_is_stored_once_and_read_by_device(model_dir: Path, tmp_path: Path) -> None:
    with running_postgres() as postgres:
        url = postgres.url(postgres.database())
        config = _config(tmp_path, f"serve.prediction_log={url}")
        answers = _race(create_app(config, str(model_dir)), _batch("cam-1", "b-race", 20))
        assert sorted(a["stored"] for a in answers) == [0] * 7 + [20], answers
        assert predlog.devices(url, experiment="t") == {"cam-1": 20}
        chunks = list(predlog.read_window(url, ["ts", "confidence"], experiment="t", device_id="cam-1"))  # COPY
        assert sum(len(chunk) for chunk in chunks) == 20
        assert list(predlog.read_window(url, ["ts"], experiment="t", device_id=predlog.SERVER_DEVICE)) == []


def test_the_keys_file_is_read_again_when_it_changes(model_dir: Path, tmp_path: Path) -> None:
    keys_file = tmp_path / "device-keys.yaml"
    keys_file.write_text(f"cam-1: {_hash(KEYS['cam-1'])}\n")
    config = _config(tmp_path, keys={})
    config.serve.device_keys_file = keys_file
    with TestClient(create_app(config, str(model_dir))) as client:
        assert _post(client, _batch("cam-1", "b1", 1)).status_code == 200
        assert _post(client, _batch("cam-2", "b1", 1), key=KEYS["cam-2"]).status_code == 401
        keys_file.write_text(f"cam-1: {_hash(KEYS['cam-1'])}\ncam-2: {_hash(KEYS['cam-2'])}\n")
        assert _post(client, _batch("cam-2", "b1", 1), key=KEYS["cam-2"]).status_code == 200
        keys_file.write_text("cam-1: [half written")  # a bad file later: the keys read before stay
        assert _post(client, _batch("cam-2", "b2", 1), key=KEYS["cam-2"]).status_code == 200


def test_bad_key_settings_fail_at_start_naming_them(model_dir: Path, tmp_path: Path) -> None:
    keys_file = tmp_path / "device-keys.yaml"
    keys_file.write_text("cam-1: key-of-camera-one\n")  # the key itself, not its hash
    config = _config(tmp_path, keys={})
    config.serve.device_keys_file = keys_file
    with pytest.raises(ConfigError, match=r"device-keys.yaml: cam-1: .*never the key itself"):
        create_app(config, str(model_dir))
    shared = _config(tmp_path, keys={"cam-1": "one key", "cam-2": "one key"})
    with pytest.raises(ConfigError, match="cam-1, cam-2 have the same key"):
        create_app(shared, str(model_dir))
    with pytest.raises(ValueError, match="device_keys"):
        _config(tmp_path, keys={}).serve.device_keys = {"cam-1": KEYS["cam-1"]}


def test_the_record_is_the_logs_row() -> None:
    """A device builds IngestBatch/PredictionRecord; every column the server stores, less what it adds itself."""
    added_by_server = {"id", "experiment", "device_id"}
    assert set(PredictionRecord.model_fields) == {c.name for c in predlog.predictions.columns} - added_by_server
    batch = IngestBatch.model_validate_json(json.dumps(_batch("cam-1", "b1", 2)))
    assert batch.records[1].top_k == [(1, 0.9), (2, 0.05)]
