"""`signpost monitor` on prediction logs made from the reference itself, darkened, or with another class mix."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import insert

from signpost.cli import EXIT_DRIFT, main
from signpost.data.stats import STAT_NAMES
from signpost.serve import predlog
from signpost.stages.monitor import load_reference, monitor


def _write_log(url: str, data_dir: Path, n: int, *, darken: float = 1.0, only_class: int | None = None,
               latency_ms: float = 5.0, experiment: str = "t") -> None:
    """``n`` records drawn from the monitor's own reference (the training images as served, the training class
    mix), as if served by a server of ``experiment`` (by default the test config's name: the monitor's own)."""
    reference = load_reference(data_dir, None, None)
    rng = np.random.default_rng(1)
    pick = rng.integers(0, len(reference.samples["brightness"]), n)
    classes = reference.class_counts / reference.class_counts.sum()
    labels = rng.choice(len(classes), size=n, p=classes)
    rows = []
    for i, j in enumerate(pick):
        row = {"ts": 1000.0 + i, "request_id": f"r{i}", "model_version": "v1", "experiment": experiment,
               "class_id": int(labels[i]) if only_class is None else only_class, "class_name": "c",
               "confidence": float(rng.uniform(0.7, 1.0)), "entropy": 0.2, "top_k": "[]",
               "latency_ms": latency_ms, "width": int(reference.samples["width"][j]),
               "height": int(reference.samples["height"][j])}
        for name in STAT_NAMES:
            scale = darken if name in ("brightness", "red", "green", "blue", "contrast") else 1.0
            row[name] = float(reference.samples[name][j]) * scale
        row.update({name: 0.0 for name in predlog.EMBEDDING_COLUMNS})
        rows.append(row)
    engine = predlog.make_engine(url)
    with engine.begin() as conn:
        conn.execute(insert(predlog.predictions), rows)
    engine.dispose()


@pytest.fixture
def config(optimized: dict, tmp_path: Path):
    config = optimized["config"].model_copy(deep=True)
    config.workdir = tmp_path / "work"
    return config


@pytest.mark.parametrize("rows", [600, 3000])  # KS below monitor.ks_max_window, Wasserstein above
def test_a_window_like_the_reference_raises_nothing(config, optimized: dict, tmp_path: Path, rows: int) -> None:
    url = f"sqlite:///{tmp_path / 'log.db'}"
    _write_log(url, optimized["data_dir"], rows)
    result = monitor(config, data_dir=optimized["data_dir"], log_url=url, last=rows)
    r = result.result
    assert r["window"]["rows"] == rows and not result.retrain, r["verdict"]
    assert not r["prediction_drift"]["drifted"] and not r["input_drift"]["drifted"]
    method = "ks" if rows <= config.monitor.ks_max_window else "wasserstein"
    assert {f["method"] for f in r["input_drift"]["features"].values()} == {method}
    assert r["alerts"] == [] and not r["health"]["breached"]
    assert "as served" in r["reference"]  # measured from the training files, the server's way
    assert {p.name for p in result.path.iterdir()} == {"result.json", "report.html", "drift.png"}


def test_darker_images_and_another_class_mix_are_caught_and_alerted(config, optimized: dict,
                                                                    tmp_path: Path) -> None:
    dark = f"sqlite:///{tmp_path / 'dark.db'}"
    _write_log(dark, optimized["data_dir"], 1500, darken=0.5, latency_ms=80.0)
    result = monitor(config, data_dir=optimized["data_dir"], log_url=dark)
    r = result.result
    assert result.retrain and r["input_drift"]["drifted"] and "input drift" in r["verdict"]["reasons"]
    assert r["input_drift"]["features"]["brightness"]["drifted"]
    assert not r["input_drift"]["features"]["width"]["drifted"]  # sizes did not change
    assert r["health"]["breached"] and r["health"]["latency_p99_ms"] == pytest.approx(80.0, rel=0.01)
    assert {a["incident"] for a in r["alerts"]} == {"input-drift", "latency"}

    skewed = f"sqlite:///{tmp_path / 'skewed.db'}"
    _write_log(skewed, optimized["data_dir"], 1500, only_class=0)
    r = monitor(config, data_dir=optimized["data_dir"], log_url=skewed).result
    assert r["prediction_drift"]["drifted"] and r["prediction_drift"]["class_js"] > 0.5
    assert not r["input_drift"]["drifted"]
    # The input-drift and latency incidents cleared: resolved messages; the prediction drift is new.
    assert {(a["incident"], a["status"]) for a in r["alerts"]} == {
        ("input-drift", "resolved"), ("latency", "resolved"), ("prediction-drift", "firing")}


def test_embedding_reference_comes_from_the_model(config, optimized: dict, tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'log.db'}"
    _write_log(url, optimized["data_dir"], 400)
    r = monitor(config, data_dir=optimized["data_dir"], log_url=url, model_dir=optimized["model_dir"],
                alerts=False).result
    assert set(r["embedding_drift"]["dimensions"]) == set(predlog.EMBEDDING_COLUMNS)
    assert r["embedding_drift"]["drifted"]  # the log's summaries are all zero: far from the model's


def test_the_cli_exits_5_on_drift_and_says_when_there_is_too_little_data(
    config, optimized: dict, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    base = ["monitor", "--data", str(optimized["data_dir"]), f"workdir={config.workdir}", "tracking.backend=none",
            "name=t", "--no-alerts"]
    dark = f"sqlite:///{tmp_path / 'dark.db'}"
    _write_log(dark, optimized["data_dir"], 800, darken=0.4)
    assert main([*base, "--log", dark]) == EXIT_DRIFT
    out = capsys.readouterr().out
    assert "verdict: retrain (input drift)" in out and "brightness" in out
    small = f"sqlite:///{tmp_path / 'small.db'}"
    _write_log(small, optimized["data_dir"], 50)
    assert main([*base, "--log", small]) == 0
    assert "at least 200 are needed" in capsys.readouterr().out
    report = sorted((config.workdir / "monitor").glob("*/result.json"))
    assert json.loads(report[0].read_text())["verdict"]["retrain"]


def test_a_high_error_rate_is_an_incident(config, optimized: dict, tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'log.db'}"
    _write_log(url, optimized["data_dir"], 300)  # ts 1000 .. 1299
    engine = predlog.make_engine(url)
    with engine.begin() as conn:
        conn.execute(insert(predlog.request_errors), [
            {"ts": 1000.0 + i * 4, "route": "/v1/predict", "status": 400, "code": "corrupt_image", "experiment": "t"}
            for i in range(60)])
        conn.execute(insert(predlog.request_errors), [{"ts": 50.0, "route": "/v1/predict", "status": 400,
                                                       "code": "old", "experiment": "t"}])  # outside the window
    engine.dispose()
    r = monitor(config, data_dir=optimized["data_dir"], log_url=url).result
    assert r["health"]["errors"] == 60 and r["health"]["error_rate"] == pytest.approx(60 / 360)
    assert r["health"]["errors_breached"] and not r["verdict"]["retrain"]  # unhealthy, not drifted
    assert [a["incident"] for a in r["alerts"]] == ["errors"]
