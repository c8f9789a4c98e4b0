""".github/workflows/mlops.yml run for real, job by job, on demo data (tests/integration/workflow_runner.py).

Every ``run:`` step runs as GitHub runs it, in ``needs`` order, with the workflow's env and artifacts passed as
upload/download-artifact v4 pass them; tracking and the model registry are a real MLflow SQLite store (the
MLFLOW_TRACKING_URI secret) and every artifact is signed with a generated key (the SIGNPOST_SIGNING_KEY secret) and
checked by the jobs downstream. Stood in for: GitHub itself. This x86-64 machine runs both legs of each matrix job,
so it stands in for the Arm64 runner too; setup-python and the install steps are this checkout's .venv; the image
build, push and start are stand-ins (the packaged context's model served by ``signpost serve`` on loopback, probed
by tools/ci/probe.py for real; tests/integration/test_container.py builds and runs the image itself).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.integration.workflow_runner import Status, WorkflowError, WorkflowRun, condition

ROOT = Path(__file__).resolve().parents[2]
WORKFLOW = ROOT / ".github" / "workflows" / "mlops.yml"
REGISTERED = "signpost-wf"  # tracking.registered_model's default for name: wf

# configs/demo.yaml made small enough for a 2-core machine: six classes, a few epochs, a lean optimize and a bench
# of two variants under oneDNN and the OpenBLAS path (the comparison the job summary shows), short timings.
SMALL = {
    "name": "wf",
    "data": {"synthetic": {"num_classes": 6, "min_tracks": 4, "max_tracks": 8, "frames_per_track": 10,
                           "test_tracks": 2, "max_size": 120}},
    "train": {"epochs": 15, "batch_size": 32},
    "evaluate": {"min_accuracy": 0.5, "min_class_accuracy": 0.0},
    "optimize": {"export_aoti": False, "distill": {"enabled": False}, "prune": {"finetune_epochs": 1},
                 "calibration_batches": 2, "accuracy_budget": 1.0},
    "bench": {"variants": ["fp32", "int8"], "runtimes": ["eager", "onnxruntime"], "math": ["default", "no-onednn"],
              "threads": [1], "batch_sizes": [1, 8], "min_seconds": 0.05, "max_seconds": 0.2,
              "deploy_batch_size": 8},
}


def _merge(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in changes.items():
        merged[key] = _merge(base.get(key, {}), value) if isinstance(value, dict) else value
    return merged


def _config(tmp_path: Path, name: str, **sections: dict[str, Any]) -> Path:
    config = _merge(yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text(encoding="utf-8")), SMALL)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(_merge(config, sections)), encoding="utf-8")
    return path


def _secrets(store: Path) -> dict[str, str]:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    store.mkdir(parents=True)
    return {"MLFLOW_TRACKING_URI": f"sqlite:///{store / 'mlflow.db'}", "SIGNPOST_SIGNING_KEY": key.decode()}


def _champion(secrets: dict[str, str]) -> str | None:
    """The version the registry's `champion` alias points at, read straight from the SQLite store."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient(tracking_uri=secrets["MLFLOW_TRACKING_URI"], registry_uri=secrets["MLFLOW_TRACKING_URI"])
    try:
        return str(client.get_model_version_by_alias(REGISTERED, "champion").version)
    except MlflowException:
        return None


@pytest.mark.slow
def test_the_pipeline_runs_on_demo_data_and_promotes_last(tmp_path: Path) -> None:
    secrets = _secrets(tmp_path / "tracking")
    champion_before: dict[str, str | None] = {}

    def before(job: str) -> None:
        if job in ("publish", "promote"):
            champion_before[job] = _champion(secrets)

    run = WorkflowRun(WORKFLOW, ROOT, tmp_path / "run", inputs={"config": str(_config(tmp_path, "wf"))},
                      secrets=secrets, before_job=before)
    results = run.run()

    failures = [path.read_text() for path in (tmp_path / "run" / "jobs").glob("*/failure.txt")]
    assert set(results.values()) <= {"success", "skipped"}, (results, failures)
    legs = ("prepare", "train", "evaluate", "optimize (amd64)", "optimize (arm64)", "bench (amd64)",
            "bench (arm64)", "package (amd64)", "package (arm64)", "publish", "summary", "promote")
    assert {job: results[job] for job in legs} == dict.fromkeys(legs, "success")
    assert results["comment"] == "skipped", "a dispatch is not a pull request"
    assert run.order[-1] == "promote" and run.order.index("publish") < run.order.index("promote")

    # Promotion last: the challenger registered by evaluate became the champion only in the promote job.
    assert champion_before == {"publish": None, "promote": None} and _champion(secrets) == "1"
    promote_log = "\n".join(p.read_text() for p in (tmp_path / "run" / "jobs" / "promote").glob("step-*/log.txt"))
    assert "champion" in promote_log

    # Every artifact passed between jobs was signed by the job that wrote it (and verified by the ones that read it).
    manifests = list((tmp_path / "run" / "artifacts-store").rglob("manifest.json"))
    assert manifests and all((path.parent / "manifest.sig").is_file() for path in manifests)

    # Both legs' images were probed and pushed by digest, then joined under the package's tags.
    pushed = [json.loads(line) for line in (tmp_path / "run" / "docker" / "pushed.jsonl").read_text().splitlines()]
    assert sorted(p["platforms"] for p in pushed) == ["linux/amd64", "linux/arm64"]
    (joined,) = (tmp_path / "run" / "docker" / "imagetools.jsonl").read_text().splitlines()
    assert all(p["digest"] in joined for p in pushed) and "--tag" in joined

    summary = run.summary.read_text(encoding="utf-8")
    assert "Gate: **passed**" in summary and "| top1 |" in summary
    assert summary.count("### Bench on x86-64") == 2, summary  # one section per leg (both legs ran on x86-64 here)
    assert "(`no-onednn`)" in summary and "Deployed: **" in summary
    assert "## Image" in summary


@pytest.mark.slow
def test_the_gtsrb_config_runs_through_the_workflow_from_a_mirror_by_pin(tmp_path: Path) -> None:
    """configs/gtsrb.yaml as committed (data.source download, its archives pinned), fetched from a loopback mirror
    (data.base_url). The mirror serves a small synthetic GTSRB in the official archive layout, so the pins are those
    archives' sha256s (no loopback file can match the official MD5s); train/optimize/bench are made small as above."""
    import hashlib
    import threading
    from functools import partial
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    from signpost.config import SyntheticConfig
    from signpost.data.synthetic import generate_gtsrb
    from tests.integration.test_prepare_download import _official_archives

    served = tmp_path / "mirror"
    served.mkdir()
    generate_gtsrb(tmp_path / "gtsrb", SyntheticConfig(**SMALL["data"]["synthetic"]))
    archives = _official_archives(tmp_path / "gtsrb")
    for name, data in archives.items():
        (served / name).write_bytes(data)
    gtsrb = yaml.safe_load((ROOT / "configs" / "gtsrb.yaml").read_text(encoding="utf-8"))
    assert gtsrb["data"]["source"] == "download", "the committed config fetches its pinned archives"
    pins = {name: hashlib.sha256(data).hexdigest() for name, data in archives.items()}
    gtsrb["data"]["archives"] = [{"url": a["url"], "sha256": pins[a["url"].rsplit("/", 1)[1]]}
                                 for a in gtsrb["data"]["archives"]]

    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), partial(Quiet, directory=str(served)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        small = {key: value for key, value in SMALL.items() if key != "data"}
        config = _merge(_merge(gtsrb, small), {
            "name": "wf", "train": {"min_steps": 0},
            "data": {"base_url": f"http://127.0.0.1:{httpd.server_address[1]}", "max_bad_fraction": 0.01}})
        path = tmp_path / "gtsrb.yaml"
        path.write_text(yaml.safe_dump(config), encoding="utf-8")
        secrets = _secrets(tmp_path / "tracking")
        run = WorkflowRun(WORKFLOW, ROOT, tmp_path / "run", inputs={"config": str(path)}, secrets=secrets)
        results = run.run()
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)

    failures = [path.read_text() for path in (tmp_path / "run" / "jobs").glob("*/failure.txt")]
    assert set(results.values()) <= {"success", "skipped"}, (results, failures)
    assert results["prepare"] == results["promote"] == "success" and _champion(secrets) == "1"
    prepared = list((tmp_path / "run" / "artifacts-store" / "prepared-data").rglob("manifest.json"))
    manifest = json.loads(prepared[0].read_text(encoding="utf-8"))
    inputs = manifest["inputs"]
    assert [a["checksum"] for a in inputs["archives"]] == [f"sha256:{pin}" for pin in pins.values()], inputs
    assert inputs["source"] == "download" and inputs["base_url"].startswith("http://127.0.0.1:")


@pytest.mark.slow
def test_a_failing_gate_fails_the_run_and_stops_at_evaluate(tmp_path: Path) -> None:
    secrets = _secrets(tmp_path / "tracking")
    # A model trained for one epoch at a tiny learning rate cannot reach the 100 % top-1 the gate asks for.
    config = _config(tmp_path, "failing", train={"epochs": 1, "lr": 1e-6}, evaluate={"min_accuracy": 1.0})
    run = WorkflowRun(WORKFLOW, ROOT, tmp_path / "run", inputs={"config": str(config)}, secrets=secrets)
    results = run.run()

    assert results["prepare"] == results["train"] == "success"
    assert results["evaluate"] == "failure", "the gate's verdict fails the evaluate job, so the run fails"
    for job in ("optimize", "bench", "package"):
        assert results[f"{job} (amd64)"] == results[f"{job} (arm64)"] == "skipped"
    assert results["publish"] == results["promote"] == "skipped"
    assert results["summary"] == "failure", "summary always runs, and says no bench results reached it"
    assert _champion(secrets) is None
    # The evaluation report and summary outlive the failed gate.
    assert "Gate: **failed**" in run.summary.read_text(encoding="utf-8")


def test_a_condition_or_an_action_the_runner_does_not_know_fails_loudly(tmp_path: Path) -> None:
    with pytest.raises(WorkflowError, match=r"success\(\) && github\.ref"):
        condition("${{ success() && github.ref == 'refs/heads/main' }}", Status("push", {}, ok=True))

    workflow = tmp_path / "other.yml"
    workflow.write_text("on: push\njobs:\n  one:\n    runs-on: ubuntu-24.04\n    steps:\n"
                        "      - uses: actions/checkout@v6\n      - run: echo ran > ran.txt\n"
                        "      - uses: someone/else@v1\n", encoding="utf-8")
    with pytest.raises(WorkflowError, match="uses: someone/else@v1 has no stand-in"):
        WorkflowRun(workflow, ROOT, tmp_path / "run", event="push").run()
    assert (tmp_path / "run" / "jobs" / "one" / "workspace" / "ran.txt").read_text() == "ran\n"


ARTIFACTS = """\
on: push
env:
  WHO: ${{ vars.WHO || 'nobody' }}
jobs:
  make:
    runs-on: ubuntu-24.04
    steps:
      - id: out
        run: |
          mkdir -p out/.cache && echo data > out/a.txt && echo secret > out/.env && echo x > out/.cache/b.txt
          echo "greeting=hello ${WHO}" >> "$GITHUB_OUTPUT"
          echo "LATER=set" >> "$GITHUB_ENV"
      - run: test "$LATER" = set && echo "$GREETING" > out/greeting.txt
        env:
          GREETING: ${{ steps.out.outputs.greeting }}
      - uses: actions/upload-artifact@v7
        with:
          name: made
          path: out
  use:
    needs: make
    runs-on: ubuntu-24.04
    steps:
      - uses: actions/download-artifact@v8
        with:
          name: made
          path: got
      - run: test -f got/a.txt && test ! -e got/.env && test ! -e got/.cache && grep -qx "hello team" got/greeting.txt
      - run: exit 3
      - if: ${{ always() }}
        run: echo "after a failure" >> "$GITHUB_STEP_SUMMARY"
  never:
    needs: use
    runs-on: ubuntu-24.04
    steps:
      - run: touch never.txt
"""


def test_artifacts_outputs_and_env_pass_as_on_github(tmp_path: Path) -> None:
    workflow = tmp_path / "artifacts.yml"
    workflow.write_text(ARTIFACTS, encoding="utf-8")
    run = WorkflowRun(workflow, ROOT, tmp_path / "run", event="push", vars={"WHO": "team"})
    # `use` checks the download (hidden files and folders left out, as upload-artifact v4.4+ leaves them) and
    # then fails; `never` needs it, so it does not run.
    assert run.run() == {"make": "success", "use": "failure", "never": "skipped"}
    assert "after a failure" in run.summary.read_text(encoding="utf-8")
    failure = (tmp_path / "run" / "jobs" / "use" / "failure.txt").read_text(encoding="utf-8")
    assert failure.startswith("exit 3: exit 3")
