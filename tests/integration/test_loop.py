"""The loop from the CLI: a served champion sees drifted traffic, the monitor calls for retraining, reviewed
feedback makes a new data version, `signpost run` retrains and promotes the better challenger, `rollback` undoes it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from signpost.cli import EXIT_DRIFT, main
from signpost.config import load_config
from signpost.registry import CHAMPION, Registry
from signpost.serve import predlog
from signpost.serve.app import create_app
from signpost.stages.monitor import monitor, served_model_dir
from tests.serve.conftest import LoopbackServer

TRAIN = ["train.epochs=10", "train.batch_size=16", "train.threads=1", "optimize.enabled=false", "data.roi_crops=true"]
LAX = ["evaluate.min_accuracy=0", "evaluate.min_class_accuracy=0", "evaluate.max_drop=1.0"]


def test_drift_feedback_retrain_promote_and_rollback(
    synthetic_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    args = ["--no-progress", "data.source=local", f"data.root={synthetic_root}", f"workdir={tmp_path}", "name=loop",
            *TRAIN, *LAX, "monitor.latency_p99_ms=10000"]
    config = load_config(None, args[1:])
    registry = Registry(config.tracking, config.workdir)

    # The first model to pass the gate becomes champion: there is nothing to beat.
    assert main(["run", *args]) == 0
    out = capsys.readouterr().out
    assert "promoted signpost-loop v1 to champion" in out and "no champion yet" in out
    assert registry.get(CHAMPION).version == "1"

    # Serve the champion; clean traffic, then blurred traffic of which a reviewer labels 200 images.
    app = create_app(config, f"models:/{config.tracking.registered_model}@{CHAMPION}")
    with LoopbackServer(app) as server:
        code = main(["simulate", *args, "--url", server.url, "--per-window", "300", "--clean-windows", "1",
                     "--drifts", "blur", "--feedback", "200"])
        out = capsys.readouterr().out
        assert code == 0, out
        assert "false alarms: 0 of 2 clean windows" in out and "blur yes" in out
    # The monitor finds the model the log names (the registry's v1) for its embedding reference.
    served = served_model_dir(config, predlog.default_url(tmp_path))
    assert served is not None and served.parent == tmp_path / "registry"
    assert (tmp_path / "train" / served.name).is_dir()  # the registered copy keeps the trained model's name
    # The scheduled monitor over the last two windows (blurred, then clean again): drift, exit 5 = retrain.
    assert main(["monitor", *args, "--last", "600"]) == EXIT_DRIFT
    capsys.readouterr()
    (batch,) = (tmp_path / "feedback").glob("loop-*")
    assert len((batch / "labels.csv").read_text().splitlines()) == 201

    # The retrain: a new data version with the feedback, a new model, compared with the champion on held-out
    # feedback, promoted because it wins there.
    assert main(["run", *args]) == 0
    out = capsys.readouterr().out
    assert "prepare: ran" in out and "train: ran" in out and "held-out feedback: top-1" in out
    assert "promoted signpost-loop v2 to champion: feedback top-1" in out, out
    (data_dir,) = (Path(line.split("-> ")[1]) for line in out.splitlines() if line.strip().startswith("prepare:"))
    lineage = json.loads((data_dir / "manifest.json").read_text())["lineage"]
    assert [b["batch"] for b in lineage["feedback"]] == [batch.name] and lineage["base"] != data_dir.name
    decision = json.loads((_newest_run(tmp_path) / "promotion.json").read_text())
    assert decision["promoted"] and decision["deciding"] == "feedback", decision
    assert decision["scores"]["challenger"]["feedback"] > decision["scores"]["champion"]["feedback"]
    assert registry.get(CHAMPION).version == "2"
    # The new model's live accuracy is scored on the feedback it was not trained on: the held-out images.
    (model_dir,) = (Path(line.split("-> ")[1]) for line in out.splitlines() if line.strip().startswith("train:"))
    scored = monitor(config, data_dir=data_dir, model_dir=model_dir, last=600, alerts=False).result["quality"]
    assert scored["images"] == lineage["feedback"][0]["holdout"] and scored["trained_on"] == 200 - scored["images"]

    # Nothing changed: nothing retrained, nothing registered or promoted.
    assert main(["run", *args]) == 0
    out = capsys.readouterr().out
    assert "promote: skipped (not run: no new challenger was registered)" in out and "as challenger" not in out

    # Rollback restores the previous champion.
    assert main(["rollback", *args]) == 0
    assert "v1 is the champion again" in capsys.readouterr().out
    assert registry.get(CHAMPION).version == "1"


def _newest_run(workdir: Path) -> Path:
    return max((workdir / "runs").iterdir(), key=lambda p: p.stat().st_mtime_ns)
