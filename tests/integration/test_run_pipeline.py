"""`signpost run` end to end with real MLflow (SQLite store): skipping, the gate, challenger, promote, rollback."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
from PIL import Image

from signpost.cli import EXIT_GATE, main
from signpost.config import load_config
from signpost.registry import Registry

FAST = ["train.epochs=2", "train.batch_size=16", "train.threads=1", "evaluate.max_drop=1.0", "optimize.enabled=false"]
# optimize and bench in a run, kept small: no AOTInductor, ExecuTorch or OpenVINO forms, no students, a
# two-variant, two-runtime matrix.
SMALL_OPTIMIZE = ["optimize.enabled=true", "optimize.export_aoti=false", "optimize.export_executorch=false",
                  "optimize.export_openvino=false", "optimize.distill.enabled=false",
                  "optimize.prune.finetune_epochs=1", "optimize.calibration_batches=2", "bench.variants=[fp32,int8]",
                  "bench.runtimes=[eager,onnxruntime]", "bench.math=[default]", "bench.threads=[1]",
                  "bench.batch_sizes=[1,8]", "bench.min_seconds=0.05", "bench.max_seconds=0.2",
                  "bench.deploy_batch_size=8", "bench.repeats=0", "optimize.accuracy_budget=1.0"]
LAX = ["evaluate.min_accuracy=0", "evaluate.min_class_accuracy=0"]


def _args(root: Path, work: Path, *extra: str) -> list[str]:
    return ["--no-progress", "data.source=local", f"data.root={root}", f"workdir={work}", "name=e2e", *FAST, *extra]


def test_run_registers_promotes_and_rolls_back(
    synthetic_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    # Promotion by hand here (tests/integration/test_loop.py has `run` promoting a better challenger itself).
    lax = [*LAX, "evaluate.promote=false"]
    assert main(["run", *_args(synthetic_root, tmp_path, *lax)]) == 0
    out = capsys.readouterr().out
    assert "prepare: ran" in out and "train: ran" in out and "registered signpost-e2e v1 as challenger" in out
    for stage in ("data", "train", "evaluate"):
        assert len(list((tmp_path / stage).glob("e2e-*"))) == 1
    (run_dir,) = (tmp_path / "runs").iterdir()
    report = (run_dir / "report.html").read_text()
    assert f"report: {run_dir / 'report.html'}" in out
    for section in ("Stages", "Lineage", "Gate", "Test metrics", "Training", "Confusion matrix", "Per class", "Data"):
        assert f"<h2>{section}</h2>" in report
    assert report.count("data:image/png;base64,") == 5  # curves, confusion, reliability, mistakes, data preview
    assert "signpost-e2e v1 as challenger" in report and "gate passed" in report
    (model_dir,) = (tmp_path / "train").glob("e2e-*")
    run_id = json.loads((model_dir / "manifest.json").read_text())["tracking_run"]
    assert run_id and f"<code>{run_id[:12]}</code>" in report  # lineage: data → training run → model version
    assert report.count("<tr><td class=\"num\">") + report.count('<tr class="low"><td class="num">') >= 6
    assert (run_dir / "config.yaml").is_file()

    # Unchanged inputs: every stage is skipped, nothing new is registered.
    assert main(["run", *_args(synthetic_root, tmp_path, *lax)]) == 0
    out = capsys.readouterr().out
    assert out.count("skipped (") == 6 and "as challenger" not in out
    assert "optimize: skipped (not run: optimize.enabled is false)" in out
    assert "package: skipped (model, runtime, package and serve settings and code unchanged)" in out

    assert main(["promote", *_args(synthetic_root, tmp_path)]) == 0
    assert "v1 is now the champion" in capsys.readouterr().out

    # A changed training setting re-runs train and evaluate only; the new model becomes the challenger.
    assert main(["run", *_args(synthetic_root, tmp_path, *lax, "train.lr=0.002")]) == 0
    out = capsys.readouterr().out
    assert "prepare: skipped" in out and "train: ran" in out and "evaluate: ran" in out
    assert "v2 as challenger" in out
    assert main(["promote", *_args(synthetic_root, tmp_path)]) == 0
    assert main(["rollback", *_args(synthetic_root, tmp_path)]) == 0
    assert "v1 is the champion again" in capsys.readouterr().out

    registry = Registry(load_config(None, [f"workdir={tmp_path}", "name=e2e"]).tracking, tmp_path)
    champion = registry.get("champion")
    assert champion is not None and champion.version == "1" and "top1" in champion.metrics


def test_a_failing_gate_exits_3_and_registers_nothing(
    synthetic_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    code = main(["run", *_args(synthetic_root, tmp_path, "evaluate.min_accuracy=1.01", "tracking.backend=none")])
    assert code == 2  # 1.01 is not a valid accuracy: a config error names the key
    assert "evaluate.min_accuracy" in capsys.readouterr().err
    # A learning rate of 1e-7 leaves the model near chance: the gate must fail.
    untrained = ["train.lr=0.0000001", "evaluate.min_accuracy=0.9", "tracking.backend=none"]
    code = main(["run", *_args(synthetic_root, tmp_path, *untrained)])
    out = capsys.readouterr().out
    assert code == EXIT_GATE
    assert "gate: FAILED" in out and "evaluate.min_accuracy" in out
    assert "optimize: skipped (not run: the model failed the gate)" in out
    assert "package: skipped (not run: the model failed the gate)" in out
    assert not (tmp_path / "mlflow.db").exists()


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if found := shutil.which(name):
            return found
    raise AssertionError("Chromium is needed to check the HTML report renders: `make install` installs it as root")


def test_the_report_renders_in_headless_chromium(
    synthetic_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    assert main(["run", *_args(synthetic_root, tmp_path, *LAX, *SMALL_OPTIMIZE, "tracking.backend=none")]) == 0
    out = capsys.readouterr().out
    assert "optimize: ran" in out and "bench: ran" in out and "deployable: " in out and "package: ran" in out
    (context,) = (tmp_path / "package").glob("*/context")
    candidate = json.loads(next((tmp_path / "bench").glob("*/candidate.json")).read_text())
    assert f"/{candidate['variant']}" in (context / "Dockerfile").read_text()  # the deployable choice is packaged
    (report,) = (tmp_path / "runs").glob("*/report.html")
    html = report.read_text()
    assert "<h2>Optimized variants</h2>" in html and "<h2>Benchmark</h2>" in html and "Deployable choice" in html
    assert html.count("data:image/png;base64,") == 6  # the five of a run without bench, and the bench chart
    # Unchanged inputs: optimize and bench are reused like every other stage.
    assert main(["run", *_args(synthetic_root, tmp_path, *LAX, *SMALL_OPTIMIZE, "tracking.backend=none")]) == 0
    out = capsys.readouterr().out
    assert "optimize: skipped (model, data, optimize and train settings and code unchanged)" in out
    assert "bench: skipped (variants, test data, bench settings, machine and code unchanged)" in out
    assert "package: skipped" in out
    browser = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run([*browser, "--dump-dom", report.as_uri()], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert "<h2>Per class</h2>" in dom.stdout and "gate passed" in dom.stdout and "<h2>Benchmark</h2>" in dom.stdout
    shot = tmp_path / "report.png"
    subprocess.run([*browser, "--window-size=1200,2400", f"--screenshot={shot}", report.as_uri()],
                   capture_output=True, timeout=120, check=True)
    with Image.open(shot) as image:
        assert image.size == (1200, 2400)
        # A rendered page, not a blank one: the embedded plots and tables make many distinct colours.
        assert len(image.convert("RGB").getcolors(maxcolors=1 << 16) or range(1 << 16)) > 50


def test_a_run_stopped_before_the_promotion_decision_decides_next_time(
    synthetic_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    from signpost.stages import promote

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    decide = promote.promote_if_better

    def killed(*args: object, **kwargs: object) -> None:
        raise RuntimeError("the runner was stopped")

    monkeypatch.setattr(promote, "promote_if_better", killed)
    assert main(["run", *_args(synthetic_root, tmp_path, *LAX)]) == 1  # registered v1, then stopped
    registry = Registry(load_config(None, [f"workdir={tmp_path}", "name=e2e"]).tracking, tmp_path)
    assert registry.get("challenger").version == "1" and registry.get("champion") is None
    capsys.readouterr()

    monkeypatch.setattr(promote, "promote_if_better", decide)
    assert main(["run", *_args(synthetic_root, tmp_path, *LAX)]) == 0  # nothing retrained; the decision is made
    out = capsys.readouterr().out
    assert "evaluate: skipped" in out and "promoted signpost-e2e v1 to champion" in out
    assert registry.get("champion").version == "1"
    assert main(["run", *_args(synthetic_root, tmp_path, *LAX)]) == 0  # decided: nothing more to do
    assert "promote: skipped (not run: no new challenger was registered)" in capsys.readouterr().out
