"""The deploy stage: the tree it writes from a package folder, what `--apply` asks kubectl to do (kubectl renders each
applied overlay for real; the cluster is a stand-in runner), the rollback when the rollout or the smoke test fails,
and the canary's verdict from real prediction-log rows."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import yaml

from signpost.artifacts import ArtifactError, write_manifest
from signpost.cli import EXIT_CANARY_WAIT, EXIT_GATE, main
from signpost.config import SignpostConfig, load_config
from signpost.k8s.manifests import Release
from signpost.serve.predlog import default_url
from signpost.serve.predlog_writer import PredictionLog
from signpost.stages.deploy import (
    DeployError,
    Smoke,
    canary_decision,
    deploy,
    port_forward_command,
    promote_canary,
    read_release,
    release_from,
)
from tests.k8s.crd import validate_custom
from tests.k8s.fake_cluster import FakeCluster, fake_cluster
from tests.k8s.validate import kubectl, kustomize, validate

CHAMPION = Release("ghcr.io/acme/signpost@sha256:" + "a" * 64, "train/t-champion", "d" * 64, "train/t-champion")
CHALLENGER = Release("ghcr.io/acme/signpost@sha256:" + "b" * 64, "optimize/t-champion/pruned", "d" * 64,
                     "optimize/t-champion/pruned")
SERVE_YAML = "name: t\nserve:\n  host: 0.0.0.0\n"


def _config(tmp_path: Path, *overrides: str) -> SignpostConfig:
    return load_config(None, ["name=t", f"workdir={tmp_path / 'work'}", *overrides])


class Cluster:
    """A stand-in for the cluster behind kubectl: records each command, renders what `apply -k` names with the
    real kubectl, and fails the commands it is told to fail."""

    def __init__(self, fail: tuple[str, ...] = ()):
        self.commands: list[list[str]] = []
        self.applied: list[dict] = []
        self.fail = fail

    def __call__(self, command: list[str], timeout_s: float) -> tuple[int, str]:
        self.commands.append(command)
        if command[1:3] == ["apply", "-k"]:
            self.applied = kustomize(Path(command[3]))
        joined = " ".join(command)
        if any(pattern in joined for pattern in self.fail):
            return 1, f'error: deployment "{command[3] if len(command) > 3 else ""}" exceeded its progress deadline'
        return 0, "ok"


@pytest.fixture
def service() -> Iterator[dict]:
    """A stand-in for the deployed service on 127.0.0.1: ready, and answering class ``state["class_id"]``."""
    state = {"class_id": 7, "ready": True, "predictions": 0}

    class Handler(BaseHTTPRequestHandler):
        def _answer(self, status: int, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            self._answer(200 if state["ready"] else 503, {"ready": state["ready"]})

        def do_POST(self) -> None:
            self.rfile.read(int(self.headers["Content-Length"]))
            state["predictions"] += 1
            self._answer(200, {"class_id": state["class_id"], "model_version": "v"})

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    state["url"] = f"http://127.0.0.1:{server.server_address[1]}"
    yield state
    server.shutdown()
    server.server_close()


def _smoke(tmp_path: Path, url: str, class_id: int = 7) -> Smoke:
    image = tmp_path / "known.png"
    image.write_bytes(b"\x89PNG stand-in")
    return Smoke(image, class_id, url=url, timeout_s=5)


def test_release_from_a_package_folder_needs_the_digest(tmp_path: Path) -> None:
    folder = tmp_path / "package" / "t-0"
    (folder / "context").mkdir(parents=True)
    (folder / "context" / "signpost.yaml").write_text(SERVE_YAML)
    labels = {"io.signpost.model.version": "train/t-1", "io.signpost.data.hash": "e" * 64}
    write_manifest(folder, stage="package", key="0", experiment="t", inputs={}, config={}, code="c",
                   extra={"image": {"name": "signpost", "labels": labels, "runtime": "onnxruntime",
                                    "model_path": "train/t-1"}})
    release, serve_yaml = release_from(folder, CHAMPION.image)
    assert release == Release(CHAMPION.image, "train/t-1", "e" * 64, "train/t-1", "onnxruntime")
    assert serve_yaml == SERVE_YAML
    with pytest.raises(DeployError, match=r"--image REGISTRY/signpost@sha256:DIGEST"):
        release_from(folder, None)
    (folder / "context" / "signpost.yaml").write_text("changed after packaging\n")
    with pytest.raises(ArtifactError, match=r"context/signpost\.yaml"):
        release_from(folder, CHAMPION.image)


def test_the_alerting_rules_and_dashboard_come_as_their_own_overlay(tmp_path: Path) -> None:
    result = deploy(_config(tmp_path, "deploy.namespace=prod"), (CHAMPION, SERVE_YAML))
    objects = {obj["kind"]: obj for obj in kustomize(result.out / "overlays" / "monitoring")}
    assert set(objects) == {"PrometheusRule", "ConfigMap"}
    validate_custom(objects["PrometheusRule"], "prometheusrule-v1.json.gz")
    validate(objects["ConfigMap"])
    assert {obj["metadata"]["namespace"] for obj in objects.values()} == {"prod"}
    assert objects["ConfigMap"]["metadata"]["labels"]["grafana_dashboard"] == "1"
    # The service's overlays apply on a cluster without the Prometheus operator: no PrometheusRule in them.
    assert all(obj["kind"] != "PrometheusRule" for obj in kustomize(result.out / "overlays" / "plain"))


def test_apply_rolls_out_and_smoke_tests(tmp_path: Path, service: dict) -> None:
    config = _config(tmp_path, "deploy.namespace=prod", "deploy.rollout_timeout_s=60")
    cluster = Cluster()
    result = deploy(config, (CHAMPION, SERVE_YAML), apply=True, smoke=_smoke(tmp_path, service["url"]),
                    runner=cluster)
    out = tmp_path / "work" / "deploy"
    assert result.failure is None and not result.rolled_back
    assert cluster.commands == [
        ["kubectl", "apply", "-k", str(out / "overlays" / "plain")],
        ["kubectl", "rollout", "status", "deployment/signpost", "-n", "prod", "--timeout=60s"],
    ]
    assert {obj["kind"] for obj in cluster.applied} == {"ConfigMap", "Service", "Deployment",
                                                         "HorizontalPodAutoscaler", "PodDisruptionBudget"}
    assert {obj["metadata"]["namespace"] for obj in cluster.applied} == {"prod"}
    assert service["predictions"] == 1


def test_a_failed_rollout_is_undone(tmp_path: Path, service: dict) -> None:
    cluster = Cluster(fail=("rollout status",))
    result = deploy(_config(tmp_path), (CHAMPION, SERVE_YAML), apply=True, smoke=_smoke(tmp_path, service["url"]),
                    runner=cluster)
    assert result.rolled_back and "rollout of deployment/signpost did not finish" in (result.failure or "")
    assert "progress deadline" in (result.failure or "")
    assert cluster.commands[-1] == ["kubectl", "rollout", "undo", "deployment/signpost", "-n", "default"]
    assert service["predictions"] == 0  # no smoke test of a rollout that did not finish


def test_a_wrong_answer_in_the_smoke_test_is_undone(tmp_path: Path, service: dict) -> None:
    service["class_id"] = 3
    cluster = Cluster()
    result = deploy(_config(tmp_path), (CHAMPION, SERVE_YAML), canary=(CHALLENGER, SERVE_YAML), overlay="canary",
                    apply=True, smoke=_smoke(tmp_path, service["url"], class_id=7), runner=cluster)
    assert result.rolled_back and "classified as 3" in (result.failure or "") and "not as 7" in result.failure
    assert cluster.commands[1:] == [
        ["kubectl", "rollout", "status", "deployment/signpost", "-n", "default", "--timeout=300s"],
        ["kubectl", "rollout", "status", "deployment/signpost-canary", "-n", "default", "--timeout=300s"],
        ["kubectl", "rollout", "undo", "deployment/signpost", "-n", "default"],
        ["kubectl", "delete", "deployment", "signpost-canary", "-n", "default", "--ignore-not-found"],
    ]
    assert sorted(d["metadata"]["name"] for d in cluster.applied if d["kind"] == "Deployment") == [
        "signpost", "signpost-canary"]


def test_a_service_that_never_gets_ready_is_undone(tmp_path: Path, service: dict) -> None:
    service["ready"] = False
    smoke = Smoke(_smoke(tmp_path, service["url"]).image, 7, url=service["url"], timeout_s=1)
    result = deploy(_config(tmp_path), (CHAMPION, SERVE_YAML), apply=True, smoke=smoke, runner=Cluster())
    assert result.rolled_back and "not ready within 1 s (/readyz answered 503)" in (result.failure or "")


def test_a_failed_apply_is_an_error_with_nothing_to_undo(tmp_path: Path, service: dict) -> None:
    cluster = Cluster(fail=("apply -k",))
    with pytest.raises(DeployError, match="kubectl apply failed"):
        deploy(_config(tmp_path), (CHAMPION, SERVE_YAML), apply=True, smoke=_smoke(tmp_path, service["url"]),
               runner=cluster)
    assert len(cluster.commands) == 1


def test_apply_without_a_smoke_image_is_refused_before_anything_runs(tmp_path: Path) -> None:
    cluster = Cluster()
    with pytest.raises(DeployError, match="--smoke-image FILE --smoke-class ID"):
        deploy(_config(tmp_path), (CHAMPION, SERVE_YAML), apply=True, runner=cluster)
    assert cluster.commands == []


def test_kserve_waits_for_the_inference_service_and_smoke_tests_its_url(tmp_path: Path, service: dict) -> None:
    config = _config(tmp_path)
    with pytest.raises(DeployError, match="--smoke-url"):
        deploy(config, (CHAMPION, SERVE_YAML), overlay="kserve", apply=True,
               smoke=Smoke(tmp_path / "x.png", 7, url=None), runner=Cluster())
    cluster = Cluster()
    result = deploy(config, (CHAMPION, SERVE_YAML), canary=(CHALLENGER, SERVE_YAML), overlay="kserve", apply=True,
                    smoke=_smoke(tmp_path, service["url"]), runner=cluster)
    assert result.failure is None and service["predictions"] == 1
    assert cluster.commands[1] == ["kubectl", "wait", "--for=condition=Ready", "inferenceservice/signpost", "-n",
                                   "default", "--timeout=300s"]
    assert {obj["kind"] for obj in cluster.applied} == {"ConfigMap", "InferenceService"}
    service["class_id"] = 1
    failed = deploy(config, (CHAMPION, SERVE_YAML), overlay="kserve", apply=True,
                    smoke=_smoke(tmp_path, service["url"]), runner=Cluster())
    assert "classified as 1" in (failed.failure or "") and not failed.rolled_back


def test_the_port_forward_listens_on_loopback_only() -> None:
    assert port_forward_command("prod", "signpost", 8123) == [
        "kubectl", "port-forward", "--address", "127.0.0.1", "-n", "prod", "service/signpost", "8123:80"]


def _log(config: SignpostConfig, rows: dict[str, tuple[int, float]]) -> str:
    """Real prediction-log rows: per model version, (records, confidence)."""
    url = default_url(config.workdir)
    rng = np.random.default_rng(0)
    log = PredictionLog(url, interval_s=0.01, experiment=config.name)
    i = 0
    for version, (n, confidence) in rows.items():
        for _ in range(n):
            i += 1
            class_id = int(rng.integers(0, 5))
            log.add({"ts": 1.0 + i, "request_id": f"r{i}", "model_version": version, "class_id": class_id,
                     "class_name": "c", "confidence": confidence, "entropy": 0.3, "top_k": [[class_id, confidence]],
                     "latency_ms": 2.0, "width": 32, "height": 32,
                     "embedding": rng.random(8, dtype=np.float32), "image": np.full((8, 8, 3), 128, np.uint8)})
    log.close()
    return url


@pytest.mark.parametrize(("canary_rows", "confidence", "action"), [
    (30, 0.9, "wait"),  # under deploy.canary.min_requests
    (60, 0.88, "promote"),  # within monitor.confidence_shift of the champion
    (60, 0.6, "rollback"),  # 0.3 less confident: worse
])
def test_the_canary_verdict_comes_from_the_prediction_log(tmp_path: Path, canary_rows: int, confidence: float,
                                                          action: str) -> None:
    config = _config(tmp_path, "deploy.canary.min_requests=50")
    url = _log(config, {"train/t-old": (20, 0.99), CHAMPION.model_version: (200, 0.9),
                        CHALLENGER.model_version: (canary_rows, confidence)})
    decision = canary_decision(config, url, CHAMPION.model_version, CHALLENGER.model_version)
    assert decision.action == action, decision.reason
    assert decision.records == {CHAMPION.model_version: 200, CHALLENGER.model_version: canary_rows}
    if action == "rollback":
        assert "mean confidence -0.300" in decision.reason


def test_a_canary_taking_most_requests_is_refused(tmp_path: Path) -> None:
    config = _config(tmp_path, "deploy.canary.min_requests=50")
    url = _log(config, {CHAMPION.model_version: (60, 0.9), CHALLENGER.model_version: (100, 0.9)})
    with pytest.raises(DeployError, match=r"lower deploy\.canary\.replicas"):
        canary_decision(config, url, CHAMPION.model_version, CHALLENGER.model_version)


@pytest.mark.parametrize("confidence", [0.9, 0.5])
def test_promote_canary_renders_and_applies_the_winner(tmp_path: Path, confidence: float) -> None:
    config = _config(tmp_path, "deploy.canary.min_requests=50")
    deploy(config, (CHAMPION, SERVE_YAML), canary=(CHALLENGER, SERVE_YAML + "# challenger\n"), overlay="canary")
    _log(config, {CHAMPION.model_version: (200, 0.9), CHALLENGER.model_version: (60, confidence)})
    cluster = Cluster()
    result = promote_canary(config, apply=True, runner=cluster)
    out = tmp_path / "work" / "deploy"
    delete = ["kubectl", "delete", "deployment", "signpost-canary", "-n", "default", "--ignore-not-found"]
    base = yaml.safe_load((out / "base" / "deployment.yaml").read_text())
    image = base["spec"]["template"]["spec"]["containers"][0]["image"]
    served = yaml.safe_load((out / "config" / "configmap.yaml").read_text())["data"]["config.yaml"]
    assert read_release(out)["canary"] is None
    if confidence == 0.9:
        assert result.decision == "promote"
        assert cluster.commands == [["kubectl", "apply", "-k", str(out / "overlays" / "plain")], delete]
        assert image == CHALLENGER.image and served.endswith("# challenger\n")
        assert [d["spec"]["template"]["spec"]["containers"][0]["image"] for d in cluster.applied
                if d["kind"] == "Deployment"] == [CHALLENGER.image]
    else:
        assert result.decision == "rollback"
        assert cluster.commands == [delete]
        assert image == CHAMPION.image and served == SERVE_YAML


def test_the_cli_waits_with_its_own_exit_code_and_changes_nothing(tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture) -> None:
    config = _config(tmp_path, "deploy.canary.min_requests=50")
    deploy(config, (CHAMPION, SERVE_YAML), canary=(CHALLENGER, SERVE_YAML), overlay="canary")
    out = tmp_path / "work" / "deploy"
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    _log(config, {CHAMPION.model_version: (200, 0.9), CHALLENGER.model_version: (10, 0.9)})
    argv = ["deploy", "--promote-canary", "name=t", f"workdir={tmp_path / 'work'}", "deploy.canary.min_requests=50"]
    assert main(argv) == EXIT_CANARY_WAIT
    assert "answered 10 of the 50 requests" in capsys.readouterr().out
    assert before == {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    _log(config, {CHALLENGER.model_version: (60, 0.4)})
    assert main(argv) == EXIT_GATE
    assert "canary rollback: worse" in capsys.readouterr().out


@pytest.fixture
def api_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeCluster]:
    """The real kubectl, pointed at a stand-in API server on 127.0.0.1 (tests/k8s/fake_cluster.py)."""
    with fake_cluster(tmp_path) as (cluster, kubeconfig):
        monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
        monkeypatch.setenv("KUBECACHEDIR", str(tmp_path / "kube-cache"))
        yield cluster


def _image(cluster: FakeCluster, name: str = "signpost") -> str:
    deployment = cluster.deployment("default", name)
    assert deployment is not None, f"no deployment/{name}"
    return deployment["spec"]["template"]["spec"]["containers"][0]["image"]


def test_kubectl_applies_and_undoes_a_failed_rollout_on_a_cluster(tmp_path: Path, service: dict,
                                                                   api_server: FakeCluster) -> None:
    kubectl()
    config = _config(tmp_path)
    first = deploy(config, (CHAMPION, SERVE_YAML), apply=True, smoke=_smoke(tmp_path, service["url"]))
    assert first.failure is None and _image(api_server) == CHAMPION.image
    created = {path.split("?")[0].rsplit("/", 1)[1] for method, path in api_server.requests if method == "POST"}
    assert created == {"configmaps", "services", "deployments", "horizontalpodautoscalers", "poddisruptionbudgets"}

    api_server.failing.add("signpost")  # the next rollout exceeds its progress deadline
    second = deploy(config, (CHALLENGER, SERVE_YAML), apply=True, smoke=_smoke(tmp_path, service["url"]))
    assert second.rolled_back and 'deployment "signpost" exceeded its progress deadline' in (second.failure or "")
    assert _image(api_server) == CHAMPION.image  # kubectl rollout undo put the previous template back
    assert service["predictions"] == 1  # the failed rollout was not smoke-tested


def test_kubectl_promotes_a_canary_on_a_cluster(tmp_path: Path, service: dict, api_server: FakeCluster) -> None:
    kubectl()
    config = _config(tmp_path, "deploy.canary.min_requests=50")
    deploy(config, (CHAMPION, SERVE_YAML), canary=(CHALLENGER, SERVE_YAML), overlay="canary", apply=True,
           smoke=_smoke(tmp_path, service["url"]))
    assert _image(api_server, "signpost-canary") == CHALLENGER.image
    _log(config, {CHAMPION.model_version: (200, 0.9), CHALLENGER.model_version: (60, 0.9)})
    assert promote_canary(config, apply=True).decision == "promote"
    assert _image(api_server) == CHALLENGER.image and api_server.deployment("default", "signpost-canary") is None
