"""`signpost monitor --by device`: a fleet's records in one log, each device judged alone beside the fleet, so the
one device whose images went dark is named, and a device with too few records says so."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import insert

from signpost.cli import main
from signpost.data.stats import STAT_NAMES
from signpost.serve import predlog
from signpost.stages.monitor import load_reference, monitor
from tests.conftest import local_config

DARKENED = ("brightness", "red", "green", "blue", "contrast")


@pytest.fixture(scope="module")
def data_dir(synthetic_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from signpost.stages.prepare import prepare

    work = tmp_path_factory.mktemp("fleet")
    return prepare(local_config(synthetic_root, work, "tracking.backend=none"), progress=False).path


def _fleet_log(url: str, data_dir: Path, devices: dict[str, tuple[int, float]]) -> None:
    """Per device id (``""``: the server itself), ``n`` records drawn from the monitor's own reference (the
    training images as served, the training class mix), their brightness and colour scaled by ``darken``; the
    devices' records interleaved, as their batches arrive."""
    reference = load_reference(data_dir, None, None)
    classes = reference.class_counts / reference.class_counts.sum()
    rows = []
    for seed, (device, (n, darken)) in enumerate(devices.items()):
        rng = np.random.default_rng(seed)
        pick = rng.integers(0, len(reference.samples["brightness"]), n)
        labels = rng.choice(len(classes), size=n, p=classes)
        for i, j in enumerate(pick):
            row = {"ts": 1000.0 + i + seed / 10, "request_id": f"{device}-{i}", "model_version": "v1",
                   "experiment": "t", "device_id": device, "class_id": int(labels[i]), "class_name": "c",
                   "confidence": float(rng.uniform(0.7, 1.0)), "entropy": 0.2, "top_k": "[]",
                   "latency_ms": 5.0 + seed, "width": int(reference.samples["width"][j]),
                   "height": int(reference.samples["height"][j]),
                   **{name: 0.0 for name in predlog.EMBEDDING_COLUMNS}}
            for name in STAT_NAMES:
                row[name] = float(reference.samples[name][j]) * (darken if name in DARKENED else 1.0)
            rows.append(row)
    rows.sort(key=lambda row: row["ts"])
    engine = predlog.make_engine(url)
    with engine.begin() as conn:
        conn.execute(insert(predlog.predictions), rows)
    engine.dispose()


def test_only_the_drifted_device_is_named(data_dir: Path, tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'log.db'}"
    _fleet_log(url, data_dir, {"cam-1": (400, 1.0), "cam-2": (400, 1.0), "cam-3": (400, 0.5), "cam-4": (30, 1.0),
                               "": (300, 1.0)})
    config = local_config(Path("unused"), tmp_path / "work", "tracking.backend=none", "monitor.min_window=100")
    result = monitor(config, data_dir=data_dir, log_url=url, alerts=True, by_device=True)
    devices = result.result["devices"]

    assert set(devices["devices"]) == {"cam-1", "cam-2", "cam-3", "cam-4", "(server)"}
    assert devices["drifted"] == ["cam-3"]
    dark = devices["devices"]["cam-3"]
    assert dark["records"] == 400 and "input drift" in dark["drift"] and "brightness" in dark["drifted_inputs"]
    for clean in ("cam-1", "cam-2", "(server)"):
        assert devices["devices"][clean]["drift"] == [], devices["devices"][clean]
        assert devices["devices"][clean]["enough_data"]
    # Each its own: p99 as the upper edge of its histogram bin (0.5 % wide bins; 7.0 lies on an edge).
    assert devices["devices"]["cam-1"]["latency_p99_ms"] == pytest.approx(5.0, rel=0.02)
    assert devices["devices"]["cam-3"]["latency_p99_ms"] == pytest.approx(7.0, rel=0.02)
    few = devices["devices"]["cam-4"]
    assert few["records"] == 30 and not few["enough_data"] and "too few records" in few["note"]
    assert devices["fleet"]["records"] == 1530
    assert "device-drift" in {alert["incident"] for alert in result.result["alerts"]}
    page = (result.path / "report.html").read_text()
    assert "<h2>Devices</h2>" in page and "cam-3" in page and "too few records" in page

    plain = monitor(config, data_dir=data_dir, log_url=url, alerts=False)  # without --by device: no section
    assert "devices" not in plain.result


def test_the_cli_prints_each_device(data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    url = f"sqlite:///{tmp_path / 'log.db'}"
    _fleet_log(url, data_dir, {"cam-1": (300, 1.0), "cam-2": (300, 0.5)})
    code = main(["monitor", "--by", "device", "--log", url, "--data", str(data_dir), f"workdir={tmp_path / 'work'}",
                 "name=t", "tracking.backend=none", "monitor.min_window=100", "--no-alerts"])
    out = capsys.readouterr().out
    assert code in (0, 5), out
    assert "device (fleet): 600 predictions" in out
    assert "device cam-1: 300 predictions" in out and "INPUT DRIFT" not in out.split("device cam-1")[1].split("\n")[0]
    assert "INPUT DRIFT" in out.split("device cam-2")[1].split("\n")[0]
    written = json.loads(next((tmp_path / "work" / "monitor").glob("t-*/result.json")).read_text())
    assert written["devices"]["drifted"] == ["cam-2"]
