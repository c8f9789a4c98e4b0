"""The loop's proof: clean traffic raises nothing, each injected drift is caught, the alert fires and resolves."""

from __future__ import annotations

from pathlib import Path

from signpost.serve.app import create_app
from signpost.stages.simulate import simulate, summary
from tests.serve.conftest import LoopbackServer, serve_config


def test_the_simulation_catches_each_drift_and_raises_no_false_alarm(optimized: dict, tmp_path: Path) -> None:
    config = serve_config(optimized, tmp_path / "work")
    config.monitor.latency_p99_ms = 10_000  # latency is not what this test injects (the in-process server is slow)
    app = create_app(config, str(optimized["model_dir"]))
    with LoopbackServer(app) as server:
        windows = simulate(config, url=server.url, data_dir=optimized["data_dir"], per_window=400,
                           clean_windows=2, model_dir=optimized["model_dir"])
    assert [w.kind for w in windows] == ["clean", "clean", "dark", "blur", "mix", "clean"]
    assert all(w.failed == 0 for w in windows)
    result = summary(windows)
    assert result["false_alarms"] == 0, [(w.kind, w.reasons) for w in windows]
    assert result["detected"] == {"dark": True, "blur": True, "mix": True}, [(w.kind, w.reasons) for w in windows]
    assert "input drift" in windows[2].reasons  # darker images move the image statistics
    fired = [a for w in windows for a in w.alerts if "firing" in a]
    resolved = windows[-1].alerts
    assert fired and resolved and all("resolved" in a for a in resolved)
    assert {a.split()[0] for a in fired} == {a.split()[0] for a in resolved}  # each incident fired once, cleared once
