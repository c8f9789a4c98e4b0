"""The tracking interface (no-op and MLflow trackers), against a real MLflow SQLite store in a temporary folder."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from mlflow import MlflowClient

from signpost.config import TrackingConfig
from signpost.tracking import (
    MLflowTracker,
    NullTracker,
    Tracker,
    start_run,
    tracking_uri,
)

# MLflow's SQLAlchemy store uses a loader option that SQLAlchemy 2 deprecates; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore::sqlalchemy.exc.SADeprecationWarning")


@pytest.fixture(autouse=True)
def _no_ambient_mlflow(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    """A developer's own MLflow settings must not leak in, and nothing may fall back to MLflow's global default
    store (``sqlite:///mlflow.db`` in the current folder)."""
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL"):
        monkeypatch.delenv(name, raising=False)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    yield
    assert not list(cwd.iterdir()), "something used MLflow's global default store"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One workdir (so one default SQLite store) for the module: creating the schema costs about a second."""
    return tmp_path_factory.mktemp("tracking") / "work"


def _client(workdir: Path) -> MlflowClient:
    return MlflowClient(tracking_uri(TrackingConfig(), workdir))


def test_null_tracker_records_nothing(tmp_path: Path) -> None:
    work = tmp_path / "work"
    tracker = start_run(TrackingConfig(backend="none"), workdir=work, experiment="e", run_name="r")
    assert isinstance(tracker, NullTracker)
    assert isinstance(tracker, Tracker)
    assert tracker.run_id is None
    with tracker as run:
        run.log_params({"a": {"b": 1}})
        run.log_metrics({"loss": 1.0}, step=3)
        run.log_artifact(tmp_path / "missing")
        run.set_tags({"k": "v"})
    tracker.finish("FAILED")
    assert not work.exists(), "backend none must not create a tracking store"


def test_tracking_uri_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    default = tracking_uri(TrackingConfig(), tmp_path / "w")
    assert default == f"sqlite:///{(tmp_path / 'w').resolve().as_posix()}/mlflow.db"
    assert default.startswith("sqlite:////")  # an absolute path: sqlite:/// + /tmp/...

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5999")
    assert tracking_uri(TrackingConfig(), tmp_path) == "http://127.0.0.1:5999"
    assert tracking_uri(TrackingConfig(uri="sqlite:///other.db"), tmp_path) == "sqlite:///other.db"

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "  ")
    assert tracking_uri(TrackingConfig(), tmp_path / "w") == default


def test_mlflow_tracker_records_params_metrics_tags_and_artifacts(
    workdir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folder = tmp_path / "plots"
    (folder / "sub").mkdir(parents=True)
    (folder / "curve.txt").write_text("curve", encoding="utf-8")
    (folder / "sub" / "cm.json").write_text("{}", encoding="utf-8")
    single = tmp_path / "summary.json"
    single.write_text('{"ok": true}', encoding="utf-8")
    params = {
        "train": {"lr": 0.01, "epochs": 3, "schedule": {"warmup": 2}},
        "data": {"sizes": [32, 48], "root": None},
        "long": "x" * 7000,
        **{f"many.p{i:03d}": i for i in range(230)},  # more than two of MLflow's 100-param batches
    }

    config = TrackingConfig(experiment="tracker-test")
    with start_run(config, workdir=workdir, experiment="ignored", run_name="r1", tags={"stage": "train"}) as run:
        assert isinstance(run, MLflowTracker) and isinstance(run, Tracker)
        run.log_params(params)
        with caplog.at_level(logging.WARNING, logger="signpost.tracking"):
            run.log_params({"train": {"lr": 0.5, "momentum": 0.9}})  # lr changed: kept, momentum added
            run.log_metrics({"loss": float("nan"), "acc": float("inf")}, step=0)
        for step, loss in enumerate([1.0, 0.5, 0.25]):
            run.log_metrics({"loss": loss, "acc": 0.5 + step / 10}, step=step)
        run.log_metrics({"final": 1})
        run.set_tags({"data_key": "abc", "long_tag": "y" * 9000})
        run.log_artifact(folder)
        run.log_artifact(folder, "renamed")
        run.log_artifact(single, "reports")
        with pytest.raises(FileNotFoundError):
            run.log_artifact(tmp_path / "nope")
        run_id = run.run_id
    assert "train.lr was logged as '0.01'" in caplog.text
    assert "loss is nan" in caplog.text

    client = _client(workdir)
    got = client.get_run(run_id)
    assert got.info.status == "FINISHED"
    assert got.info.run_name == "r1"
    p = got.data.params
    assert p["train.lr"] == "0.01" and p["train.epochs"] == "3" and p["train.schedule.warmup"] == "2"
    assert p["train.momentum"] == "0.9"
    assert p["data.sizes"] == "[32, 48]" and p["data.root"] == "None"
    assert len(p["long"]) == 6000
    assert sum(k.startswith("many.") for k in p) == 230
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "loss")] == [(0, 1.0), (1, 0.5), (2, 0.25)]
    assert [m.step for m in client.get_metric_history(run_id, "acc")] == [0, 1, 2]
    assert got.data.metrics["final"] == 1.0
    assert got.data.tags["stage"] == "train" and got.data.tags["data_key"] == "abc"
    assert len(got.data.tags["long_tag"]) == 8000

    assert sorted(a.path for a in client.list_artifacts(run_id)) == ["plots", "renamed", "reports"]
    assert sorted(a.path for a in client.list_artifacts(run_id, "plots")) == ["plots/curve.txt", "plots/sub"]
    assert [a.path for a in client.list_artifacts(run_id, "renamed/sub")] == ["renamed/sub/cm.json"]
    assert [a.path for a in client.list_artifacts(run_id, "reports")] == ["reports/summary.json"]

    # The default store: SQLite in the workdir, the experiment's artifacts under <workdir>/mlruns.
    assert (workdir / "mlflow.db").is_file()
    experiment = client.get_experiment_by_name("tracker-test")
    assert experiment is not None
    assert experiment.artifact_location == (workdir / "mlruns" / "tracker-test").resolve().as_uri()
    assert (workdir / "mlruns" / "tracker-test" / run_id / "artifacts" / "plots" / "sub" / "cm.json").is_file()


def test_run_status_follows_the_with_block(workdir: Path) -> None:
    config = TrackingConfig()
    kwargs = {"workdir": workdir, "experiment": "status", "system_metrics": False}
    with pytest.raises(ValueError, match="boom"), start_run(config, run_name="failed", **kwargs) as failed:
        raise ValueError("boom")
    with pytest.raises(KeyboardInterrupt), start_run(config, run_name="killed", **kwargs) as killed:
        raise KeyboardInterrupt
    # Two runs open at once in one process: each tracker addresses its own run by id.
    first = start_run(config, run_name="a", **kwargs)
    second = start_run(config, run_name="b", **kwargs)
    first.log_metrics({"x": 1.0})
    second.log_metrics({"x": 2.0})
    second.finish()
    first.finish("KILLED")
    first.finish("FINISHED")  # a second call is a no-op
    with pytest.raises(ValueError, match="run status"):
        second.finish("DONE")

    client = _client(workdir)
    assert client.get_run(failed.run_id).info.status == "FAILED"
    assert client.get_run(killed.run_id).info.status == "KILLED"
    assert client.get_run(first.run_id).info.status == "KILLED"
    assert client.get_run(second.run_id).info.status == "FINISHED"
    assert client.get_run(first.run_id).data.metrics == {"x": 1.0}
    assert client.get_run(second.run_id).data.metrics == {"x": 2.0}


def test_system_metrics_are_sampled_and_stopped(workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.2")  # MLflow's own knob, in seconds
    client = _client(workdir)
    with start_run(TrackingConfig(), workdir=workdir, experiment="system", run_name="sys") as run:
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            metrics = client.get_run(run.run_id).data.metrics
            if "system/cpu_utilization_percentage" in metrics:
                break
            time.sleep(0.1)
    metrics = client.get_run(run.run_id).data.metrics
    assert "system/cpu_utilization_percentage" in metrics
    assert metrics["system/system_memory_usage_megabytes"] > 0
    assert not [t for t in threading.enumerate() if t.name == "SystemMetricsMonitor" and t.is_alive()]


def test_env_tracking_uri_is_honoured(workdir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The module's store stands in for a team's: an existing store saves creating another schema (seconds).
    uri = tracking_uri(TrackingConfig(), workdir)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    work = tmp_path / "new" / "work"
    with start_run(TrackingConfig(), workdir=work, experiment="env", run_name="r", system_metrics=False) as run:
        run.log_metrics({"m": 3.0})
    assert work.is_dir(), "the workdir is created"
    assert not (work / "mlflow.db").exists(), "MLFLOW_TRACKING_URI wins over the default store"
    assert MlflowClient(uri).get_run(run.run_id).data.metrics == {"m": 3.0}
