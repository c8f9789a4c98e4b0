"""deploy: the service on Kubernetes, from a packaged image referenced by digest.

``deploy`` renders the kustomize tree of ``signpost.k8s.manifests`` into a folder (default ``<workdir>/deploy``)
with ``release.json`` beside it (what runs: the champion, and the challenger in the canary overlays). The image's
digest comes from ``image`` (``name@sha256:…``, as the registry named it when it was pushed); what it serves (model
version, data hash, runtime) and the server's config come from the package folder it was built from.

With ``apply``, against kubectl's current context:

1. ``kubectl apply -k <out>/overlays/<overlay>``;
2. ``kubectl rollout status deployment/<name>`` (and the canary's), bounded by ``deploy.rollout_timeout_s``;
3. a smoke test through a reachable URL (``smoke_url``, else ``kubectl port-forward`` on 127.0.0.1): ``/readyz``,
   then a prediction of a known image whose class is checked;
4. when 2 or 3 fails: ``kubectl rollout undo`` of the champion (the canary's Deployment is deleted instead), and
   the result says why.

``promote_canary`` decides on a running canary from the prediction log, with the monitor's comparison
(``monitoring.verdict.compare_models``): fewer than ``deploy.canary.min_requests`` canary records → wait; worse →
the canary is deleted; no worse → the challenger becomes the champion (the tree is rendered again with its image,
applied, and the canary deleted). The kubectl commands go through a runner that tests replace.
"""

from __future__ import annotations

import hashlib
import json
import logging
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from signpost.artifacts import verify_artifact
from signpost.client import ask_server, service_url
from signpost.config import SignpostConfig
from signpost.k8s import alerting
from signpost.k8s.manifests import SERVICE_PORT, Release, names, render_tree, write_tree
from signpost.monitoring.drift import histogram
from signpost.monitoring.verdict import LATENCY_EDGES, ModelWindow, compare_models
from signpost.serve import predlog

log = logging.getLogger(__name__)

STAGE = "deploy"
RELEASE = "release.json"  # what the rendered tree runs, read back by --promote-canary
OVERLAYS = ("plain", "canary", "kserve")
Overlay = Literal["plain", "canary", "kserve"]
# A runner takes a command and a timeout (s) and gives back its exit status and output (stdout and stderr).
Runner = Callable[[list[str], float], tuple[int, str]]


class DeployError(RuntimeError):
    """The deployment cannot be rendered, applied or decided; the message says what to change."""


@dataclass
class DeployResult:
    """Where the tree is, what it runs, and what happened on the cluster."""

    out: Path
    overlay: str
    champion: Release
    canary: Release | None = None
    commands: list[list[str]] = field(default_factory=list)  # the kubectl commands issued, in order
    failure: str | None = None  # why the rollout or the smoke test failed (then it was rolled back)
    rolled_back: bool = False
    decision: str | None = None  # promote_canary: "promote", "rollback" or "wait"
    reason: str = ""


@dataclass(frozen=True)
class Smoke:
    """A known image and the class the service must answer for it."""

    image: Path
    class_id: int
    url: str | None = None  # reachable address of the service; None: kubectl port-forward on 127.0.0.1
    api_key: str | None = None
    timeout_s: float = 120.0


def run_command(command: list[str], timeout_s: float) -> tuple[int, str]:
    """Run ``command``; its exit status and its output (stdout, then stderr)."""
    log.info("running %s", " ".join(command))
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return 124, f"timed out after {timeout_s:.0f} s"
    except FileNotFoundError:
        return 127, f"{command[0]} is not installed (Debian: apt-get install kubernetes-client)"
    return done.returncode, (done.stdout + done.stderr).strip()


def release_from(package_dir: Path, image: str | None) -> tuple[Release, str]:
    """The release of the image built from ``package_dir`` (a ``signpost package`` folder) and pushed as ``image``
    (``name@sha256:…``), and the server config it carries."""
    manifest = verify_artifact(package_dir)
    if manifest.get("stage") != "package" or "image" not in manifest:
        raise DeployError(f"{package_dir} is not a `signpost package` folder: give the folder package wrote")
    if image is None:
        raise DeployError(f"the image built from {package_dir} must be given by digest: pass --image "
                          f"REGISTRY/{manifest['image']['name']}@sha256:DIGEST (pushed images only: a tag can move)")
    labels = manifest["image"]["labels"]
    release = Release(image, labels["io.signpost.model.version"], labels.get("io.signpost.data.hash", ""),
                      manifest["image"]["model_path"], manifest["image"].get("runtime", ""))
    return release, (package_dir / "context" / "signpost.yaml").read_text(encoding="utf-8")


def deploy(
    config: SignpostConfig,
    champion: tuple[Release, str],
    *,
    canary: tuple[Release, str] | None = None,
    out: Path | None = None,
    overlay: Overlay = "plain",
    namespace: str | None = None,
    apply: bool = False,
    smoke: Smoke | None = None,
    runner: Runner = run_command,
) -> DeployResult:
    """Render the tree for ``champion`` and ``canary`` (each a release and its server config, ``release_from``);
    apply ``overlay`` when ``apply``, roll back when the rollout or the smoke test fails."""
    if overlay not in OVERLAYS:
        raise DeployError(f"unknown overlay {overlay!r}: choose one of {', '.join(OVERLAYS)}")
    if overlay == "canary" and canary is None:
        raise DeployError("the canary overlay runs a challenger: pass --canary-image and --canary-package-result")
    if apply and smoke is None:
        raise DeployError("--apply smoke-tests the service: pass --smoke-image FILE --smoke-class ID (an image "
                          "whose class the model gets right)")
    if apply and overlay == "kserve" and smoke is not None and smoke.url is None:
        raise DeployError("KServe serves the model at its own address: pass --smoke-url (the InferenceService's "
                          "URL, `kubectl get inferenceservice`)")
    out = out or config.workdir / STAGE
    namespace = namespace or config.deploy.namespace
    _render(config, out, namespace, champion, canary)
    result = DeployResult(out, overlay, champion[0], canary[0] if canary else None)
    if apply:
        assert smoke is not None
        _apply(config, result, namespace, smoke, runner)
    return result


def _render(config: SignpostConfig, out: Path, namespace: str, champion: tuple[Release, str],
            canary: tuple[Release, str] | None) -> None:
    # The alerting rules and dashboard, for clusters with the Prometheus operator and Grafana's sidecar.
    name = config.deploy.name
    labels = {"app.kubernetes.io/name": "signpost", "app.kubernetes.io/instance": name}
    monitoring = {"prometheusrule.yaml": alerting.prometheus_rule(f"{name}-alerts", namespace, labels),
                  "dashboard.yaml": alerting.dashboard_configmap(f"{name}-dashboard", namespace, labels)}
    write_tree(render_tree(config.deploy, champion[0], champion[1], canary=canary[0] if canary else None,
                           canary_yaml=canary[1] if canary else None, namespace=namespace,
                           monitoring=monitoring), out)
    record = {"namespace": namespace, "name": config.deploy.name, "experiment": config.name,
              "champion": {**asdict(champion[0]), "serve_yaml": champion[1]},
              "canary": {**asdict(canary[0]), "serve_yaml": canary[1]} if canary else None}
    (out / RELEASE).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    log.info("wrote the manifests of %s%s to %s", champion[0].model_version,
             f" with the canary {canary[0].model_version}" if canary else "", out)


def _apply(config: SignpostConfig, result: DeployResult, namespace: str, smoke: Smoke, runner: Runner) -> None:
    cfg = config.deploy
    deployments = names(cfg)

    def kubectl(*args: str, timeout_s: float = 120.0) -> tuple[int, str]:
        command = ["kubectl", *args]
        result.commands.append(command)
        return runner(command, timeout_s)

    code, output = kubectl("apply", "-k", str(result.out / "overlays" / result.overlay))
    if code != 0:
        # Nothing reached the cluster, or only part of it: there is no rollout to wait for or undo.
        raise DeployError(f"kubectl apply failed (exit {code}): {output[-500:]}")
    if result.overlay == "kserve":
        code, output = kubectl("wait", "--for=condition=Ready", f"inferenceservice/{cfg.name}", "-n", namespace,
                               f"--timeout={cfg.rollout_timeout_s}s", timeout_s=cfg.rollout_timeout_s + 30)
        if code != 0:
            result.failure = f"the InferenceService did not become ready: {output[-500:]}"
        else:
            try:
                smoke_test(smoke, namespace=namespace, service=cfg.name)
            except (ConnectionError, RuntimeError, ValueError) as exc:
                result.failure = f"the smoke test failed: {exc}"
        # Nothing to undo: KServe sends traffic only to a ready revision, and a canary revision takes only its
        # canaryTrafficPercent; set it to 0 (or apply the champion again) to take the challenger out.
        return
    tracks = ["champion", "canary"] if result.overlay == "canary" else ["champion"]
    for track in tracks:
        code, output = kubectl("rollout", "status", f"deployment/{deployments[track]}", "-n", namespace,
                               f"--timeout={cfg.rollout_timeout_s}s", timeout_s=cfg.rollout_timeout_s + 30)
        if code != 0:
            result.failure = f"the rollout of deployment/{deployments[track]} did not finish: {output[-500:]}"
            break
    if result.failure is None:
        try:
            smoke_test(smoke, namespace=namespace, service=cfg.name)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            result.failure = f"the smoke test failed: {exc}"
    if result.failure is None:
        return
    log.warning("%s: rolling back", result.failure)
    kubectl("rollout", "undo", f"deployment/{deployments['champion']}", "-n", namespace)
    if result.overlay == "canary":
        kubectl("delete", "deployment", deployments["canary"], "-n", namespace, "--ignore-not-found")
    result.rolled_back = True


def port_forward_command(namespace: str, service: str, port: int) -> list[str]:
    """The port-forward to the Service, listening on loopback only."""
    return ["kubectl", "port-forward", "--address", "127.0.0.1", "-n", namespace, f"service/{service}",
            f"{port}:{SERVICE_PORT}"]


def smoke_test(smoke: Smoke, *, namespace: str, service: str) -> None:
    """Wait for ``/readyz`` (at most ``smoke.timeout_s``), predict ``smoke.image`` and check its class; through
    ``smoke.url``, else a port-forward to the Service that is stopped afterwards."""
    if smoke.url is not None:
        _smoke(service_url(smoke.url), smoke)
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryFile() as logs:
        forward = subprocess.Popen(port_forward_command(namespace, service, port), stdout=logs, stderr=logs)
        try:
            _smoke(f"http://127.0.0.1:{port}", smoke)
        finally:
            forward.terminate()
            forward.wait(10)


def _smoke(url: str, smoke: Smoke) -> None:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # the service named, not a proxy
    deadline = time.monotonic() + smoke.timeout_s
    why = "no answer"
    while True:
        try:
            with opener.open(f"{url}/readyz", timeout=2) as response:
                if response.status == 200:
                    break
        except urllib.error.HTTPError as exc:
            why = f"/readyz answered {exc.code}"
        except (urllib.error.URLError, OSError) as exc:
            why = str(getattr(exc, "reason", exc))
        if time.monotonic() > deadline:
            raise ConnectionError(f"{url} was not ready within {smoke.timeout_s:.0f} s ({why})")
        time.sleep(0.5)
    digest = hashlib.sha256(smoke.image.read_bytes()).hexdigest()
    answer = ask_server(url, [(smoke.image, digest)], concurrency=1, timeout_s=30.0, api_key=smoke.api_key,
                        progress=False)[0]
    if isinstance(answer, str):
        raise RuntimeError(f"{url}/v1/predict refused {smoke.image.name}: {answer}")
    if answer[0] != smoke.class_id:
        raise RuntimeError(f"{smoke.image.name} was classified as {answer[0]} by {answer[1]}, not as "
                           f"{smoke.class_id}")
    log.info("smoke test passed: %s is class %d (%s)", smoke.image.name, smoke.class_id, answer[1])


@dataclass(frozen=True)
class CanaryDecision:
    action: Literal["promote", "rollback", "wait"]
    reason: str
    records: dict[str, int]


def canary_decision(config: SignpostConfig, log_url: str, champion: str, canary: str) -> CanaryDecision:
    """What the prediction log says of the ``canary`` model version against the ``champion``: the monitor's
    comparison over the newest ``monitor.window`` records of this experiment, once the canary has
    ``deploy.canary.min_requests`` of them."""
    need = config.deploy.canary.min_requests
    if need > config.monitor.window:
        raise DeployError(f"deploy.canary.min_requests ({need}) is more than monitor.window "
                          f"({config.monitor.window}) records: the canary could never reach it; lower one or raise "
                          "the other")
    window = config.monitor.window
    counts = predlog.model_versions(log_url, last=window, experiment=config.name)
    records = {version: counts.get(version, 0) for version in (champion, canary)}
    if records[canary] < need:
        return CanaryDecision("wait", f"the canary {canary} has answered {records[canary]} of the "
                              f"{need} requests deploy.canary.min_requests asks for", records)
    if records[champion] == 0:
        raise DeployError(f"the prediction log has no records of the champion {champion} in its newest {window}: "
                          "nothing to compare the canary with")
    n_classes = 1 + max(int(chunk[:, 0].max()) for chunk in predlog.read_window(
        log_url, ["class_id"], last=window, experiment=config.name))
    windows = {version: _fold(log_url, version, window, config.name, n_classes) for version in records}
    compared = compare_models(windows, sum(records.values()), config.monitor)
    if compared.main != champion:
        raise DeployError(f"the canary {canary} answered more requests ({records[canary]}) than the champion "
                          f"({records[champion]}): it is meant to take the smaller share; lower "
                          "deploy.canary.replicas")
    stats = compared.versions[canary]
    if stats.worse:
        return CanaryDecision("rollback", stats.verdict or "worse", records)
    return CanaryDecision("promote", stats.verdict or "no worse than the main model", records)


def _fold(url: str, version: str, last: int, experiment: str, n_classes: int) -> ModelWindow:
    """One model version's records of the window: predictions per class, confidence sum, latency histogram."""
    classes, latency, confidence, n = np.zeros(n_classes), np.zeros(len(LATENCY_EDGES) - 1), 0.0, 0
    for chunk in predlog.read_window(url, ["class_id", "confidence", "latency_ms"], last=last,
                                     model_version=version, experiment=experiment):
        classes += np.bincount(chunk[:, 0].astype(np.int64), minlength=n_classes)
        confidence += float(chunk[:, 1].sum())
        latency += histogram(chunk[:, 2], LATENCY_EDGES)
        n += len(chunk)
    return ModelWindow(n, classes, confidence, latency)


def read_release(out: Path) -> dict[str, Any]:
    """The ``release.json`` of a rendered tree."""
    path = out / RELEASE
    if not path.is_file():
        raise DeployError(f"{path} does not exist: render the deployment first with `signpost deploy --out {out}`")
    record = json.loads(path.read_text(encoding="utf-8"))
    return record


def promote_canary(
    config: SignpostConfig,
    out: Path | None = None,
    *,
    log_url: str | None = None,
    apply: bool = False,
    runner: Runner = run_command,
) -> DeployResult:
    """Promote or roll back the canary of the tree in ``out`` on the prediction log's verdict; ``decision`` "wait"
    when the canary has not answered enough requests yet (nothing changes then)."""
    out = out or config.workdir / STAGE
    record = read_release(out)
    if not record.get("canary"):
        raise DeployError(f"the deployment in {out} has no canary: render one with --overlay canary --canary-image "
                          "… --canary-package-result …")
    champion_yaml, canary_yaml = record["champion"].pop("serve_yaml"), record["canary"].pop("serve_yaml")
    champion, canary = Release(**record["champion"]), Release(**record["canary"])
    url = log_url or config.serve.prediction_log or predlog.default_url(config.workdir)
    decision = canary_decision(config, url, champion.model_version, canary.model_version)
    result = DeployResult(out, "plain", champion, canary, decision=decision.action, reason=decision.reason)
    if decision.action == "wait":
        return result
    namespace, deployments = record["namespace"], names(config.deploy)
    # The tree runs one model again: the challenger when promoted, else the champion as before.
    winner = (canary, canary_yaml) if decision.action == "promote" else (champion, champion_yaml)
    result.champion, result.canary = winner[0], None
    _render(config, out, namespace, winner, None)
    if apply:
        commands = [["kubectl", "apply", "-k", str(out / "overlays" / "plain")]] if decision.action == "promote" else []
        commands.append(["kubectl", "delete", "deployment", deployments["canary"], "-n", namespace,
                         "--ignore-not-found"])
        for command in commands:
            result.commands.append(command)
            code, output = runner(command, 120.0)
            if code != 0:
                raise DeployError(f"{' '.join(command)} failed (exit {code}): {output[-500:]}")
    return result
