"""Canary mode: champion and challenger served side by side, the traffic split, compared live by the monitor."""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from signpost.serve import predlog
from signpost.serve.app import create_app
from signpost.stages.monitor import monitor
from tests.serve.conftest import image_bytes, serve_config, wait_ready


def test_the_canary_answers_its_share_and_the_monitor_compares_the_two(optimized: dict, tmp_path: Path) -> None:
    config = serve_config(optimized, tmp_path / "work")
    config.serve.canary_share = 0.3
    config.monitor.min_window = 50
    pruned = optimized["result"].path / "pruned"
    app = create_app(config, str(optimized["model_dir"]), canary=str(pruned))
    app.state.signpost.router.seed(0)
    with TestClient(app) as client:
        wait_ready(client)
        ready = client.get("/readyz").json()
        main_version, canary_version = ready["model_version"], ready["canary_version"]
        assert canary_version and canary_version != main_version
        info = client.get("/v1/model").json()
        assert info["version"] == main_version and info["canary"]["version"] == canary_version
        assert info["canary"]["share"] == 0.3
        answered = [client.post("/v1/predict", content=image_bytes(seed=i),
                                headers={"Content-Type": "image/png"}).json()["model_version"] for i in range(300)]
        metrics = client.get("/metrics").text
    share = answered.count(canary_version) / len(answered)
    assert 0.2 < share < 0.4, share  # 30 % of requests, give or take a binomial spread (sd 2.6 points)
    assert set(answered) == {main_version, canary_version}
    assert 'role="canary"' in metrics and f'model_version="{canary_version}"' in metrics

    url = predlog.default_url(config.workdir)
    assert predlog.model_versions(url) == {v: answered.count(v) for v in set(answered)}
    result = monitor(config, data_dir=optimized["data_dir"], log_url=url, last=300, alerts=False).result
    models = result["models"]
    assert models["main"] == main_version
    canary = models["versions"][canary_version]
    assert canary["role"] == "canary" and canary["records"] == answered.count(canary_version)
    assert "class_psi_vs_main" in canary and canary["verdict"]
    assert "<h2>Canary</h2>" in (next((config.workdir / "monitor").glob("t-*")) / "report.html").read_text()


def test_a_canary_that_is_the_main_model_is_refused(optimized: dict, tmp_path: Path) -> None:
    config = serve_config(optimized, tmp_path / "work")
    with pytest.raises(ValueError, match="same model"):
        create_app(config, str(optimized["model_dir"]), canary=str(optimized["model_dir"]))


def test_without_a_canary_the_monitor_has_no_comparison(optimized: dict, tmp_path: Path) -> None:
    config = serve_config(optimized, tmp_path / "work")
    config.monitor.min_window = 10
    with TestClient(create_app(config, str(optimized["model_dir"]))) as client:
        wait_ready(client)
        for i in range(20):
            client.post("/v1/predict", content=image_bytes(seed=i), headers={"Content-Type": "image/png"})
    url = predlog.default_url(config.workdir)
    assert monitor(config, data_dir=optimized["data_dir"], log_url=url, last=20, alerts=False).result["models"] is None
