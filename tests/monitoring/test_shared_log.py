"""Experiments sharing one prediction log (issue 14, item 3): every record names its experiment and its model's
lineage, each monitor reads only its own experiment's records and says how many others it skipped, and a log made
before records named their experiment still works, its old rows counted as an unknown experiment's.

The scenario of the issue: a traffic-sign server (experiment ``t``) and a digits server (experiment ``digits``)
run from one workdir, so both write to its default log; ``monitor -c digits.yaml`` read the other's predictions,
called the digits model a canary and built its reference with the traffic-sign model.
"""

from __future__ import annotations

import hashlib
import sqlite3
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Column, MetaData, Table, create_engine, insert

from signpost.artifacts import atomic_dir, write_manifest
from signpost.cli import main
from signpost.config import SignpostConfig
from signpost.data.stats import STAT_NAMES
from signpost.models import build_model
from signpost.models.artifact import ModelCard, save_model
from signpost.serve import predlog, predlog_writer
from signpost.serve.app import create_app
from signpost.stages.monitor import monitor, served_model_dir, skipped_records
from signpost.stages.simulate import _wait_for_log
from tests.conftest import local_config
from tests.serve.conftest import image_bytes, wait_ready

NEW_COLUMNS = ("experiment", "data_key", "model_key", "device_id")  # what a log made before this change lacks


def _model(folder: Path, data_key: str) -> Path:
    """An untrained 3-class signnet as a train-stage artifact, trained (its card says) on the data ``data_key``."""
    card = ModelCard(architecture="signnet", num_classes=3, class_names=["a", "b", "c"], image_size=32,
                     mean=[0.5] * 3, std=[0.25] * 3, data_artifact=f"data-{data_key[:12]}", data_key=data_key)
    with atomic_dir(folder) as tmp:
        save_model(tmp, build_model("signnet", 3, 32), card)
        write_manifest(tmp, stage="train", key=hashlib.sha256(folder.name.encode()).hexdigest(), inputs={},
                       config={}, code="test")
    return folder


@pytest.fixture(scope="module")
def shared(synthetic_root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One workdir, two experiments: prepared data (the monitors' reference), a model of each experiment."""
    from signpost.stages.prepare import prepare

    work = tmp_path_factory.mktemp("shared")
    data = prepare(local_config(synthetic_root, work / "prep", "tracking.backend=none"), progress=False)
    return {"data_dir": data.path, "work": work,
            "t": _model(work / "work" / "train" / "t-0123456789ab", "a" * 64),
            "digits": _model(work / "work" / "train" / "digits-ba9876543210", "d" * 64)}


def _config(work: Path, name: str, *overrides: str) -> SignpostConfig:
    # Both experiments' servers write to the workdir's default log: the shared database of the issue.
    return local_config(Path("unused"), work, f"name={name}", "tracking.backend=none", "monitor.min_window=10",
                        *overrides)


def _serve_both(shared: dict, tmp_path: Path, n_t: int, n_digits: int) -> tuple[SignpostConfig, SignpostConfig]:
    """Both servers up at once on one log; requests alternate until each has answered its share; the digits
    server also answers one bad request, amid the others (an error the digits monitor counts, the other must not)."""
    work = tmp_path / "work"
    (work / "train").mkdir(parents=True)
    for name in ("t", "digits"):
        (work / "train" / shared[name].name).symlink_to(shared[name])
    configs = _config(work, "t"), _config(work, "digits")
    apps = [create_app(config, str(shared[config.name])) for config in configs]
    with TestClient(apps[0]) as t, TestClient(apps[1]) as digits:
        wait_ready(t)
        wait_ready(digits)
        for i in range(max(n_t, n_digits)):
            for client, n in ((t, n_t), (digits, n_digits)):
                if i < n:
                    answer = client.post("/v1/predict", content=image_bytes(seed=i),
                                         headers={"Content-Type": "image/png"})
                    assert answer.status_code == 200, answer.text
            if i == n_digits // 2:
                refused = digits.post("/v1/predict", content=b"", headers={"Content-Type": "image/png"})
                assert refused.status_code == 400, refused.text
    return configs  # the clients closed: every record is written


def _logged(url: str) -> list[tuple]:
    with sqlite3.connect(url.removeprefix("sqlite:///")) as conn:
        return conn.execute("SELECT experiment, model_version, data_key, model_key FROM predictions "
                            "ORDER BY id").fetchall()


def test_two_experiments_on_one_log_each_monitor_reads_its_own(shared: dict, tmp_path: Path,
                                                                capsys: pytest.CaptureFixture) -> None:
    t, digits = _serve_both(shared, tmp_path, n_t=30, n_digits=18)
    url = predlog.default_url(t.workdir)
    assert url == predlog.default_url(digits.workdir)

    # Each record names its experiment and its model's lineage (the card's data key, the manifest's key).
    lineage = {name: (shared[name].name, "a" * 64 if name == "t" else "d" * 64,
                      hashlib.sha256(shared[name].name.encode()).hexdigest()) for name in ("t", "digits")}
    rows = _logged(url)
    assert sorted(set(rows)) == sorted((name, *lineage[name]) for name in ("t", "digits"))
    assert [r[0] for r in rows].count("t") == 30 and [r[0] for r in rows].count("digits") == 18

    for config, own, other, n_own, n_other in ((t, "t", "digits", 30, 18), (digits, "digits", "t", 18, 30)):
        r = monitor(config, data_dir=shared["data_dir"], log_url=url, alerts=False).result
        assert r["window"]["rows"] == n_own
        assert r["models"] is None  # one model in its own window: the other experiment's is no canary
        assert r["experiment"]["skipped"] == {other: n_other} and r["experiment"]["skipped_total"] == n_other
        assert f"{other}: {n_other}" in r["experiment"]["note"]
        assert r["health"]["errors"] == (1 if own == "digits" else 0)  # the digits server's 400 is not t's
        # The model behind the experiment's own records: the one its reference is built with.
        assert served_model_dir(config, url) == config.workdir / "train" / shared[own].name

    # The window counts only the experiment's records: its newest 10, whatever came between them.
    r = monitor(t, data_dir=shared["data_dir"], log_url=url, last=10, alerts=False).result
    assert r["window"]["rows"] == 10
    newest = [e for e, *_ in rows[-10:]]
    assert r["experiment"]["skipped"] == ({"digits": newest.count("digits")} if "digits" in newest else {})

    # What a user sees: the digits monitor says what it skipped, and names no canary.
    code = main(["monitor", "--data", str(shared["data_dir"]), f"workdir={digits.workdir}", "name=digits",
                 "tracking.backend=none", "monitor.min_window=10", "--no-alerts"])
    out = capsys.readouterr().out
    assert code in (0, 5), out
    assert "monitor: 18 predictions" in out
    assert "skipped 30 records among the log's newest 5,000 not of experiment 'digits': 30 of other experiments " \
           "(t: 30)" in out
    assert "canary" not in out and shared["t"].name not in out


def _old_log(path: Path, rows: int) -> str:
    """A log as Signpost made it before records named their experiment and lineage, with ``rows`` records and one
    request error."""
    old = MetaData()
    tables = {table.name: Table(table.name, old, *(Column(c.name, c.type, primary_key=c.primary_key,
                                                          nullable=c.nullable) for c in table.columns
                                                   if c.name not in NEW_COLUMNS))
              for table in (predlog.predictions, predlog.request_errors)}
    url = f"sqlite:///{path}"
    engine = create_engine(url)
    old.create_all(engine)
    record = {"request_id": "old", "model_version": "t-0123456789ab", "class_id": 1, "class_name": "b",
              "confidence": 0.9, "entropy": 0.2, "top_k": "[]", "latency_ms": 3.0, "width": 32, "height": 32,
              "orientation": 1, **{name: 0.5 for name in (*STAT_NAMES, *predlog.EMBEDDING_COLUMNS)}}
    with engine.begin() as conn:
        conn.execute(insert(tables["predictions"]), [{**record, "ts": 1000.0 + i} for i in range(rows)])
        conn.execute(insert(tables["request_errors"]), [{"ts": 2005.0, "route": "/v1/predict", "status": 400,
                                                         "code": "corrupt_image"}])
    engine.dispose()
    return url


def test_an_old_log_without_the_columns_still_works(shared: dict, tmp_path: Path) -> None:
    url = _old_log(tmp_path / "predictions.db", rows=25)
    config = _config(tmp_path / "work", "t")

    r = monitor(config, data_dir=shared["data_dir"], log_url=url, alerts=False).result
    assert r["window"]["rows"] == 0  # the old rows name no experiment: not taken for this one's
    assert r["experiment"]["skipped"] == {predlog.UNKNOWN_EXPERIMENT: 25}
    assert "25 of an unknown experiment" in r["experiment"]["note"]
    with sqlite3.connect(tmp_path / "predictions.db") as conn:  # the columns were added, old rows marked unknown
        assert conn.execute("SELECT DISTINCT experiment, data_key, model_key FROM predictions").fetchall() == [
            (predlog.UNKNOWN_EXPERIMENT, "", "")]
        assert conn.execute("SELECT experiment FROM request_errors").fetchall() == [(predlog.UNKNOWN_EXPERIMENT,)]

    # A new server writes to the old log; the monitor reads its records, still saying what it passed over.
    log = predlog_writer.PredictionLog(url, interval_s=0.05, experiment="t")
    for i in range(12):
        log.add({"ts": 2000.0 + i, "request_id": f"new{i}", "model_version": "t-0123456789ab", "class_id": 0,
                 "class_name": "a", "confidence": 0.8, "entropy": 0.3, "top_k": [[0, 0.8]], "latency_ms": 2.0,
                 "width": 32, "height": 32, "data_key": "a" * 64, "model_key": "k" * 64,
                 "embedding": np.zeros(predlog.EMBEDDING_DIMS), "image": np.zeros((32, 32, 3), np.uint8)})
    log.close()
    assert log.written == 12 and log.failed_writes == 0
    r = monitor(config, data_dir=shared["data_dir"], log_url=url, alerts=False).result
    assert r["window"]["rows"] == 12
    assert r["experiment"]["skipped"] == {predlog.UNKNOWN_EXPERIMENT: 25}
    assert r["health"]["errors"] == 0  # the old error at ts 2005 is no known experiment's


def _records(url: str, experiments: list[str]) -> None:
    """One record per entry of ``experiments``, in that order (ts = position), as servers of those experiments."""
    engine = predlog.make_engine(url)
    base = {"request_id": "r", "model_version": "v", "class_id": 0, "class_name": "a", "confidence": 0.9,
            "entropy": 0.1, "top_k": "[]", "latency_ms": 1.0, "width": 8, "height": 8,
            **{name: 0.0 for name in (*STAT_NAMES, *predlog.EMBEDDING_COLUMNS)}}
    with engine.begin() as conn:
        conn.execute(insert(predlog.predictions), [{**base, "ts": float(i), "experiment": e}
                                                   for i, e in enumerate(experiments)])
    engine.dispose()


def test_the_window_counts_only_the_experiments_records(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'log.db'}"
    _records(url, ["a", "b", "b", "a", "b", "a", "b", "b", "a", "b"])  # a at ts 0, 3, 5, 8
    ts = [float(v) for chunk in predlog.read_window(url, ["ts"], last=3, experiment="a") for v in chunk[:, 0]]
    assert ts == [3.0, 5.0, 8.0]  # a's newest three, though b's records lie between them
    assert predlog.count(url, experiment="a") == 4 and predlog.count(url) == 10
    assert predlog.model_versions(url, last=3, experiment="a") == {"v": 3}
    since = [float(v) for chunk in predlog.read_window(url, ["ts"], since=4.0, experiment="b") for v in chunk[:, 0]]
    assert since == [4.0, 6.0, 7.0, 9.0]
    assert predlog.experiments(url, last=4) == {"a": 1, "b": 3}  # what the log's newest four hold
    skipped = skipped_records(url, "a", last=None, since=4.0)
    assert skipped["skipped"] == {"b": 4} and "skipped 4 records since 1970-01-01 00:00:04 UTC" in skipped["note"]


def test_simulate_waits_for_its_own_experiments_records(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'log.db'}"
    _records(url, ["other"] * 20)
    _wait_for_log(url, 0, "mine", timeout_s=0.2)
    with pytest.raises(TimeoutError, match=r"0 records of experiment 'mine'.*started with this config"):
        _wait_for_log(url, 1, "mine", timeout_s=0.2)  # another experiment's 20 records are not this window's
