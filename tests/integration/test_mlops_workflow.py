""".github/workflows/mlops.yml run for real, job by job, on demo data (tests/integration/workflow_runner.py).

Every ``run:`` step runs as GitHub runs it, in ``needs`` order, with the workflow's env and artifacts passed as
upload/download-artifact v4 pass them; tracking and the model registry are a real MLflow SQLite store (the
MLFLOW_TRACKING_URI secret) and every artifact is signed with a generated key (the SIGNPOST_SIGNING_KEY secret) and
checked by the jobs downstream. Stood in for: GitHub itself. This x86-64 machine runs both legs of each matrix job,
so it stands in for the Arm64 runner too; setup-python and the install steps are this checkout's .venv; the image
build, push and start are stand-ins (the packaged context's model served by ``signpost serve`` on loopback, probed
by tools/ci/probe.py for real; tests/integration/test_container.py builds and runs the image itself); GitHub's
REST API for the pull request's comment job (``gh``: main's runs and their artifacts, the issue comments) is
tests/integration/gh_standin.py over a state folder.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.integration.workflow_runner import Status, WorkflowError, WorkflowRun, condition, load_workflow

ROOT = Path(__file__).resolve().parents[2]
WORKFLOW = ROOT / ".github" / "workflows" / "mlops.yml"
REGISTERED = "signpost-wf"  # tracking.registered_model's default for name: wf

# configs/demo.yaml made small enough for a 2-core machine: six classes, a few epochs, a lean optimize (no
# AOTInductor, ExecuTorch or OpenVINO forms: tests/optimize covers them) and a bench
# of two variants under oneDNN and the OpenBLAS path (the comparison the job summary shows), short timings.
SMALL = {
    "name": "wf",
    "data": {"synthetic": {"num_classes": 6, "min_tracks": 4, "max_tracks": 8, "frames_per_track": 10,
                           "test_tracks": 2, "max_size": 120}},
    "train": {"epochs": 15, "batch_size": 32},
    "evaluate": {"min_accuracy": 0.5, "min_class_accuracy": 0.0},
    "optimize": {"export_aoti": False, "export_executorch": False, "export_openvino": False,
                 "distill": {"enabled": False}, "prune": {"finetune_epochs": 1},
                 "calibration_batches": 2, "accuracy_budget": 1.0},
    "bench": {"variants": ["fp32", "int8"], "runtimes": ["eager", "onnxruntime"], "math": ["default", "no-onednn"],
              "threads": [1], "batch_sizes": [1, 8], "min_seconds": 0.05, "max_seconds": 0.2,
              "deploy_batch_size": 8, "repeats": 0},
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


def _versions(secrets: dict[str, str]) -> list[str]:
    """Every version of the registered model, read straight from the SQLite store."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=secrets["MLFLOW_TRACKING_URI"], registry_uri=secrets["MLFLOW_TRACKING_URI"])
    return sorted(str(v.version) for v in client.search_model_versions(f"name='{REGISTERED}'"))


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
            "bench (arm64)", "package (amd64)", "package (arm64)", "publish", "summary", "promote", "deploy")
    assert {job: results[job] for job in legs} == dict.fromkeys(legs, "success")
    assert results["comment"] == "skipped", "a dispatch is not a pull request"
    assert run.order[-2:] == ["promote", "deploy"] and run.order.index("publish") < run.order.index("promote")

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
    # each leg's deployed cell profiled in a bench of its own, unless it runs on ONNX Runtime (the summary says so)
    for section in summary.split("### Bench on x86-64")[1:]:
        assert "ops by self CPU time: " in section or "runs on ONNX Runtime (" in section, section
    assert "## Image" in summary

    # Deploy, after promotion: no cluster secret, so the manifests of the multi-arch index (by digest) are rendered,
    # uploaded and not applied, and the summary says so.
    index = run.job_outputs["publish"]
    assert index["digest"].startswith("sha256:") and index["image"] == "ghcr.io/team/signpost"
    assert run.job_outputs["promote"] == {"deploy": "true"}
    tree = tmp_path / "run" / "artifacts-store" / "deploy-manifests"
    for overlay in ("plain", "canary", "kserve", "monitoring"):
        assert (tree / "overlays" / overlay / "kustomization.yaml").is_file(), overlay
    deployment = (tree / "base" / "deployment.yaml").read_text(encoding="utf-8")
    assert f"ghcr.io/team/signpost@{index['digest']}" in deployment
    assert "Not applied: no cluster credentials (secret SIGNPOST_KUBECONFIG)" in summary


@pytest.mark.slow
def test_a_pull_request_gets_one_comment_updated_on_each_push_and_registers_nothing(tmp_path: Path) -> None:
    """Two pushes to pull request 7, whose commit makes configs/demo.yaml the small settings above (eager only, so
    the deployed cell is one the torch profiler sees into). Between them main gets a champion (this model, scored
    and promoted by `signpost evaluate` as `signpost run` does) and a successful run whose bench-amd64 artifact is
    the first push's bench: the second comment has a champion and a baseline to compare against. GitHub's API is
    tests/integration/gh_standin.py (runs, their artifacts, issue comments)."""
    secrets = _secrets(tmp_path / "tracking")
    github = tmp_path / "github"
    demo = _config(tmp_path, "demo", bench={"runtimes": ["eager"]}).read_text(encoding="utf-8")

    def push(number: int) -> tuple[WorkflowRun, dict[str, str]]:
        run = WorkflowRun(WORKFLOW, ROOT, tmp_path / f"push-{number}", event="pull_request", secrets=secrets,
                          event_payload={"pull_request": {"number": 7}}, github=github,
                          changed={"configs/demo.yaml": demo})
        results = run.run()
        failures = [path.read_text() for path in (tmp_path / f"push-{number}" / "jobs").glob("*/failure.txt")]
        assert set(results.values()) <= {"success", "skipped"}, (results, failures)
        assert results["comment"] == "success"
        assert results["publish"] == results["promote"] == results["deploy"] == "skipped"
        assert not (tmp_path / f"push-{number}" / "docker" / "pushed.jsonl").exists(), "a pull request pushes nothing"
        return run, results

    def comments() -> list[dict[str, Any]]:
        return json.loads((github / "comments.json").read_text(encoding="utf-8"))

    first, _ = push(1)
    (comment,) = comments()
    assert comment["issue"] == "team/signpost#7" and comment["updates"] == 0
    assert comment["body"].startswith("<!-- signpost-pr-comment -->\n## Signpost: the gate passed")
    assert "No baseline results from main" in comment["body"], "main has no successful run yet"
    assert "No champion compared: signpost-wf has no champion yet." in comment["body"]
    assert _versions(secrets) == [] and _champion(secrets) is None, "a pull request registers nothing"
    summary = first.summary.read_text(encoding="utf-8")
    assert summary.count("ops by self CPU time: ") == 2, summary  # each leg's deployed cell, profiled
    assert "| self CPU % | self CPU | calls |" in summary

    # main: a champion, and a successful run whose bench-amd64 artifact is the first push's bench
    store = tmp_path / "push-1" / "artifacts-store"
    (model,), (data,) = (store / "trained-model").iterdir(), (store / "prepared-data").iterdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "SIGNPOST_"))} | secrets
    subprocess.run([str(Path(sys.executable).parent / "signpost"), "evaluate", "--config", str(tmp_path / "demo.yaml"),
                    "--model", str(model), "--data", str(data), "tracking.backend=mlflow",
                    f"workdir={tmp_path / 'main'}"], env=env, check=True, capture_output=True)
    assert _champion(secrets) == "1"
    shutil.copytree(store / "bench-amd64", github / "runs" / "41" / "bench-amd64")
    (github / "runs.json").write_text(json.dumps(
        [{"databaseId": 41, "workflow": "mlops.yml", "branch": "main", "status": "success"}]), encoding="utf-8")

    push(2)
    (comment,) = comments()
    assert comment["updates"] == 1, "the second push edits the comment (PATCH), it does not add one"
    body = comment["body"]
    assert body.startswith("<!-- signpost-pr-comment -->\n## Signpost: the gate passed")
    assert "### Gate" in body and "| max_drop | top1 |" in body
    # main's champion, scored on this pull request's test split in its evaluate job
    assert "Both scored on the test split of data" in body and "| top1 |" in body and "No champion" not in body
    assert re.search(r"\*\*(REGRESSION|No regression)\*\* against main", body) and "Verdict:" in body
    assert "### Model card" in body and "| classes | 6: " in body
    assert "(https://github.com/team/signpost/actions/runs/1)" in body
    assert _versions(secrets) == ["1"] and _champion(secrets) == "1", "main's: the pull request registered nothing"
    calls = [json.loads(line) for line in (github / "calls.jsonl").read_text(encoding="utf-8").splitlines()]
    assert any(call[:5] == ["run", "download", "41", "--name", "bench-amd64"] for call in calls), calls


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
    assert results["publish"] == results["promote"] == results["deploy"] == "skipped"
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


def test_the_comment_step_posts_once_then_edits_through_the_github_api_stand_in(tmp_path: Path) -> None:
    """mlops.yml's own "Post or update the comment" step, run twice for pull request 7 beside a comment of someone
    else's: one POST, then a PATCH of the same comment; the API stand-in refuses what the step does not use."""
    (post,) = [step for step in load_workflow(WORKFLOW)["jobs"]["comment"]["steps"]
               if step.get("name") == "Post or update the comment"]
    github = tmp_path / "github"
    github.mkdir()
    (github / "comments.json").write_text(json.dumps(
        [{"id": 5, "issue": "team/signpost#7", "body": "looks good", "updates": 0}]), encoding="utf-8")
    for number, body in enumerate(["<!-- signpost-pr-comment -->\nfirst\n", "<!-- signpost-pr-comment -->\nsecond\n"]):
        write = {"run": f"cat > \"$RUNNER_TEMP/comment.md\" <<'MD'\n{body}MD\n"}
        workflow = {"on": "pull_request", "jobs": {"comment": {"runs-on": "ubuntu-24.04", "steps": [write, post]}}}
        path = tmp_path / f"comment-{number}.yml"
        path.write_text(yaml.safe_dump(workflow), encoding="utf-8")
        run = WorkflowRun(path, ROOT, tmp_path / f"run-{number}", event="pull_request", github=github,
                          event_payload={"pull_request": {"number": 7}})
        assert run.run() == {"comment": "success"}, list((tmp_path / f"run-{number}").rglob("failure.txt"))
    others, ours = json.loads((github / "comments.json").read_text(encoding="utf-8"))
    assert others == {"id": 5, "issue": "team/signpost#7", "body": "looks good", "updates": 0}
    assert ours["body"] == "<!-- signpost-pr-comment -->\nsecond\n" and ours["updates"] == 1
    env = {**os.environ, "SIGNPOST_GH_STANDIN": str(github), "GH_TOKEN": "t"}
    standin = [sys.executable, str(ROOT / "tests" / "integration" / "gh_standin.py")]
    refused = subprocess.run([*standin, "api", "repos/team/signpost/issues/7/comments", "--jq", ".[].user"],
                             env=env, capture_output=True, text=True)
    assert refused.returncode == 2 and "not an expression this stand-in evaluates" in refused.stderr
    no_token = subprocess.run([*standin, "run", "list"], env={**env, "GH_TOKEN": ""}, capture_output=True, text=True)
    assert no_token.returncode == 4 and "GH_TOKEN" in no_token.stderr


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
