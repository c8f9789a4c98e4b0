"""The service's Kubernetes manifests as a kustomize tree: a base, and overlays that pick what runs.

``render_tree`` returns ``{relative path: document(s)}``; ``write_tree`` writes it with ``yaml.safe_dump`` (keys
sorted, no timestamps), so the same inputs give the same bytes. The tree::

    config/    the serve config as a ConfigMap (shared by every overlay)
    base/      Deployment (the champion), Service, HorizontalPodAutoscaler, PodDisruptionBudget, + config/
    overlays/plain/    the base in the namespace
    overlays/canary/   the base + a second Deployment running the challenger behind the same Service: the traffic
                       splits by pod count (deploy.canary.replicas against the champion's)
    overlays/kserve/   a KServe InferenceService (custom predictor container, canaryTrafficPercent) + config/
    overlays/monitoring/   the alerting rules (a PrometheusRule) and the Grafana dashboard (a ConfigMap), applied
                       on their own: a cluster without the Prometheus operator has no PrometheusRule kind, and the
                       service's overlays must apply there too

The pods run as the image's non-root user with a read-only root filesystem; the server's workdir (its SQLite
prediction log) and /tmp are emptyDir volumes. Keys come from a Secret by reference, never by value. The image is
named by digest, and the model version, data hash and image digest ride along as labels (trimmed to what a label
value may hold) and in full as annotations.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from signpost.config import DeployConfig

SERVER_PORT = 8000  # the image's EXPOSE (signpost package)
SERVICE_PORT = 80
USER_ID = 10001  # the image's USER 10001:10001 (signpost package)
# The ConfigMap is mounted as a folder of its own (a subPath file mount would never see an update, and podman's
# kube play does not do subPath), and the server is started on the file in it: the image's /etc/signpost (with its
# trusted public keys) stays as built.
CONFIG_DIR = "/etc/signpost/deploy"
CONFIG_FILE = "config.yaml"
MODELS_DIR = "/srv/artifacts"  # where the image holds its model (signpost package: model_path under it)
WORKDIR = "/var/lib/signpost"  # the server's workdir in the image: the prediction log lives under it
API_KEY_ENV = "SIGNPOST_API_KEY"  # serve.routes.API_KEY_ENV; the server reads its key from it
PREDICTION_LOG_ENV = "SIGNPOST_PREDICTION_LOG"  # serve.app.PREDICTION_LOG_ENV: overrides serve.prediction_log
PREDICTION_LOG_KEY = "url"  # the key in deploy.prediction_log_secret that holds the log's URL
SECRET_KEY = "api-key"  # the key of deploy.api_key_secret that holds it
PREDICTOR_CONTAINER = "kserve-container"  # the name KServe gives a custom predictor's container
PREFIX = "signpost.io"
DIGEST_REF = re.compile(r"^[a-z0-9][a-z0-9._:/-]*@sha256:[0-9a-f]{64}$")
LABEL_MAX = 63


class ManifestError(ValueError):
    """The manifests cannot be rendered from what was given; the message says what to change."""


@dataclass(frozen=True)
class Release:
    """One image to run: referenced by digest, with what it serves."""

    image: str  # registry/name@sha256:<64 hex>
    model_version: str
    data_hash: str
    model_path: str  # the model's folder in the image, under /srv/artifacts (the package manifest's model_path)
    runtime: str = ""

    def __post_init__(self) -> None:
        if not DIGEST_REF.match(self.image):
            raise ManifestError(f"image {self.image!r} is not referenced by digest: give it as "
                                "registry/name@sha256:<64 hex digits> (what `podman push --digestfile` or "
                                "`docker buildx build --push` print), so every pod runs the same bytes")

    @property
    def digest(self) -> str:
        return self.image.rpartition("@")[2]


def label_value(text: str) -> str:
    """``text`` as a valid label value: [A-Za-z0-9._-], at most 63 characters, alphanumeric at both ends."""
    value = re.sub(r"[^A-Za-z0-9._-]+", "-", text)[:LABEL_MAX]
    return re.sub(r"^[^A-Za-z0-9]+|[^A-Za-z0-9]+$", "", value)


def render_tree(cfg: DeployConfig, champion: Release, serve_yaml: str, *, canary: Release | None = None,
                canary_yaml: str | None = None, namespace: str | None = None,
                monitoring: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """Every file of the kustomize tree: ``{relative path: a document, or a list of documents}``.

    ``serve_yaml``: the server's config file as the image holds it (the package's ``signpost.yaml``).
    ``canary``: the challenger, for the canary and KServe overlays, with its own server config ``canary_yaml``
    (default: the champion's); without it those overlays run the champion alone.
    ``monitoring``: the alerting objects (``{file name: object}``, ``signpost.k8s.alerting``) for
    ``overlays/monitoring/``; none: no such overlay.
    """
    namespace = namespace or cfg.namespace
    canary_yaml = canary_yaml if canary is not None and canary_yaml is not None else serve_yaml
    tree: dict[str, Any] = {
        "config/configmap.yaml": _configmap(cfg, "champion", serve_yaml),
        "config/kustomization.yaml": _kustomization(["configmap.yaml"]),
        "base/deployment.yaml": deployment(cfg, champion, "champion", serve_yaml),
        "base/service.yaml": _service(cfg),
        "base/hpa.yaml": _hpa(cfg),
        "base/pdb.yaml": _pdb(cfg),
        "base/kustomization.yaml": _kustomization(
            ["../config", "deployment.yaml", "service.yaml", "hpa.yaml", "pdb.yaml"]),
        "overlays/plain/kustomization.yaml": _kustomization(["../../base"], namespace),
        "overlays/canary/kustomization.yaml": _kustomization(
            ["../../base", "canary-configmap.yaml", "canary-deployment.yaml"], namespace),
        "overlays/canary/canary-configmap.yaml": _configmap(cfg, "canary", canary_yaml),
        "overlays/canary/canary-deployment.yaml": deployment(cfg, canary or champion, "canary", canary_yaml),
        # KServe runs one predictor spec at a time: the challenger's, with its config, when there is one.
        "overlays/kserve/kustomization.yaml": _kustomization(
            ["../../config", *(["canary-configmap.yaml"] if canary else []), "inferenceservice.yaml"], namespace),
        "overlays/kserve/inferenceservice.yaml": _inference_service(cfg, champion, canary, canary_yaml),
    }
    if canary is not None:
        tree["overlays/kserve/canary-configmap.yaml"] = _configmap(cfg, "canary", canary_yaml)
    if monitoring:
        tree["overlays/monitoring/kustomization.yaml"] = _kustomization(sorted(monitoring), namespace)
        tree.update({f"overlays/monitoring/{name}": obj for name, obj in monitoring.items()})
    return tree


def write_tree(tree: dict[str, Any], out: Path) -> list[Path]:
    """Write ``tree`` under ``out``; the paths written. A YAML file of the tree's folders that the tree no longer
    has (a canary's, after a promotion) is removed, so what is on disk is what the tree says; other files stay."""
    folders = {relative.split("/", 1)[0] for relative in tree}
    for folder in sorted(folders):
        for stale in sorted((out / folder).rglob("*.yaml")):
            if stale.relative_to(out).as_posix() not in tree:
                stale.unlink()
    written = []
    for relative, documents in sorted(tree.items()):
        path = out / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        docs = documents if isinstance(documents, list) else [documents]
        text = yaml.safe_dump_all(docs, sort_keys=True, default_flow_style=False, explicit_start=len(docs) > 1)
        path.write_text(text, encoding="utf-8")
        written.append(path)
    return written


def names(cfg: DeployConfig) -> dict[str, str]:
    """The Deployments' names: ``champion`` and ``canary``."""
    return {"champion": cfg.name, "canary": f"{cfg.name}-canary"}


def _config_name(cfg: DeployConfig, track: str) -> str:
    return f"{names(cfg)[track]}-config"


def _configmap(cfg: DeployConfig, track: str, serve_yaml: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": _config_name(cfg, track), "labels": _stable_labels(cfg)},
            "data": {CONFIG_FILE: serve_yaml}}


def _stable_labels(cfg: DeployConfig) -> dict[str, str]:
    # What selectors use: never a version, since a Deployment's selector cannot change after it is made.
    return {"app.kubernetes.io/name": "signpost", "app.kubernetes.io/instance": cfg.name,
            "app.kubernetes.io/managed-by": "signpost-deploy"}


def _selector(cfg: DeployConfig, track: str | None = None) -> dict[str, str]:
    selector = {"app.kubernetes.io/name": "signpost", "app.kubernetes.io/instance": cfg.name}
    return selector | ({f"{PREFIX}/track": track} if track else {})


def _release_metadata(release: Release) -> tuple[dict[str, str], dict[str, str]]:
    """Labels (trimmed to valid values) and annotations (in full) that say what a release serves."""
    labels = {"app.kubernetes.io/version": label_value(release.model_version),
              f"{PREFIX}/model-version": label_value(release.model_version),
              f"{PREFIX}/data-hash": label_value(release.data_hash),
              # a label value may not hold ':' and runs to 63 characters: "sha256." and the first 56 hex digits
              f"{PREFIX}/image-digest": label_value(release.digest.replace(":", "."))}
    annotations = {f"{PREFIX}/model-version": release.model_version, f"{PREFIX}/data-hash": release.data_hash,
                   f"{PREFIX}/image": release.image, f"{PREFIX}/image-digest": release.digest}
    if release.runtime:
        annotations[f"{PREFIX}/runtime"] = release.runtime
    return ({k: v for k, v in labels.items() if v}, annotations)


def _container(cfg: DeployConfig, release: Release, *, name: str, kserve: bool = False) -> dict[str, Any]:
    # Knative allows no port name but "http1"/"h2c" and probes only the declared port: name it by number there.
    probe_port: dict[str, Any] = {"port": SERVER_PORT if kserve else "http"}
    container: dict[str, Any] = {
        "name": name,
        "image": release.image,
        "imagePullPolicy": "IfNotPresent",  # a digest never changes what it names
        # The image's CMD, reading the config from the ConfigMap's folder instead of the image's copy.
        "args": ["signpost", "serve", "--config", f"{CONFIG_DIR}/{CONFIG_FILE}", "--model",
                 f"{MODELS_DIR}/{release.model_path}"],
        "ports": [{"containerPort": SERVER_PORT, "protocol": "TCP", **({} if kserve else {"name": "http"})}],
        "resources": {"requests": {"cpu": cfg.cpu_request, "memory": cfg.memory_request},
                      "limits": {"cpu": cfg.cpu_limit, "memory": cfg.memory_limit}},
        "securityContext": {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                            "runAsNonRoot": True, "runAsUser": USER_ID, "runAsGroup": USER_ID,
                            "capabilities": {"drop": ["ALL"]}, "seccompProfile": {"type": "RuntimeDefault"}},
        # Loading and checking the model takes seconds: the startup probe holds liveness off until /healthz answers.
        "startupProbe": {"httpGet": {"path": "/healthz", **probe_port}, "periodSeconds": 2, "timeoutSeconds": 2,
                         "failureThreshold": 60},
        "livenessProbe": {"httpGet": {"path": "/healthz", **probe_port}, "periodSeconds": 10, "timeoutSeconds": 2,
                          "failureThreshold": 3},
        "readinessProbe": {"httpGet": {"path": "/readyz", **probe_port}, "periodSeconds": 5, "timeoutSeconds": 2,
                           "failureThreshold": 2},
        "volumeMounts": [
            {"name": "config", "mountPath": CONFIG_DIR, "readOnly": True},
            {"name": "workdir", "mountPath": WORKDIR},
            {"name": "tmp", "mountPath": "/tmp"},
        ],
    }
    env = []
    if cfg.api_key_secret:
        env.append({"name": API_KEY_ENV, "valueFrom": {"secretKeyRef": {
            "name": cfg.api_key_secret, "key": SECRET_KEY}}})
    if cfg.prediction_log_secret:
        # The shared prediction log (PostgreSQL) every replica and the canary write to: its URL holds credentials,
        # so it comes from a Secret, never the ConfigMap.
        env.append({"name": PREDICTION_LOG_ENV, "valueFrom": {"secretKeyRef": {
            "name": cfg.prediction_log_secret, "key": PREDICTION_LOG_KEY}}})
    if env:
        container["env"] = env
    if not kserve:
        # The endpoints controller drops a terminating pod from the Service while this sleep runs, so no new request
        # reaches it after SIGTERM. (Knative rejects lifecycle hooks; its queue-proxy drains instead.)
        container["lifecycle"] = {"preStop": {"exec": {"command": ["sleep", str(cfg.pre_stop_s)]}}}
    return container


def _pod_spec(cfg: DeployConfig, container: dict[str, Any], track: str) -> dict[str, Any]:
    return {
        "automountServiceAccountToken": False,  # the server never talks to the API server
        "enableServiceLinks": False,
        # preStop sleep + the server's own graceful stop (it answers open requests, flushes the log) within this
        "terminationGracePeriodSeconds": cfg.pre_stop_s + 30,
        "securityContext": {"runAsNonRoot": True, "runAsUser": USER_ID, "runAsGroup": USER_ID, "fsGroup": USER_ID,
                            "seccompProfile": {"type": "RuntimeDefault"}},
        "containers": [container],
        "volumes": [
            {"name": "config", "configMap": {"name": _config_name(cfg, track)}},
            {"name": "workdir", "emptyDir": {"sizeLimit": "1Gi"}},  # the SQLite prediction log, when not PostgreSQL
            {"name": "tmp", "emptyDir": {"sizeLimit": "256Mi"}},
        ],
    }


def deployment(cfg: DeployConfig, release: Release, track: str, serve_yaml: str) -> dict[str, Any]:
    """The Deployment of ``release`` as the ``champion`` or the ``canary``, reading ``serve_yaml``."""
    labels, annotations = _release_metadata(release)
    config_sha = hashlib.sha256(serve_yaml.encode("utf-8")).hexdigest()
    pod_labels = _stable_labels(cfg) | _selector(cfg, track) | labels
    # A changed config changes the pod template, so `kubectl apply` rolls the pods onto it.
    pod_annotations = annotations | {f"{PREFIX}/config-sha256": config_sha}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": names(cfg)[track], "labels": pod_labels, "annotations": annotations},
        "spec": {
            "replicas": cfg.replicas if track == "champion" else cfg.canary.replicas,
            "revisionHistoryLimit": 5,  # what `kubectl rollout undo` can go back to
            "selector": {"matchLabels": _selector(cfg, track)},
            # Never below the wanted pods while rolling: a new pod serves before an old one stops.
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
            "template": {
                "metadata": {"labels": pod_labels, "annotations": pod_annotations},
                "spec": _pod_spec(cfg, _container(cfg, release, name="server"), track),
            },
        },
    }


def _service(cfg: DeployConfig) -> dict[str, Any]:
    # Both tracks behind one Service: the canary's share of requests is its share of the ready pods.
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": cfg.name, "labels": _stable_labels(cfg)},
            "spec": {"type": "ClusterIP", "selector": _selector(cfg),
                     "ports": [{"name": "http", "port": SERVICE_PORT, "targetPort": "http", "protocol": "TCP"}]}}


def _hpa(cfg: DeployConfig) -> dict[str, Any]:
    return {"apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler",
            "metadata": {"name": cfg.name, "labels": _stable_labels(cfg)},
            "spec": {"scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": cfg.name},
                     "minReplicas": cfg.hpa_min, "maxReplicas": cfg.hpa_max,
                     "metrics": [{"type": "Resource", "resource": {"name": "cpu", "target": {
                         "type": "Utilization", "averageUtilization": cfg.hpa_cpu_percent}}}]}}


def _pdb(cfg: DeployConfig) -> dict[str, Any]:
    # A node drain takes one pod at a time, however many there are.
    return {"apiVersion": "policy/v1", "kind": "PodDisruptionBudget",
            "metadata": {"name": cfg.name, "labels": _stable_labels(cfg)},
            "spec": {"maxUnavailable": 1, "selector": {"matchLabels": _selector(cfg)}}}


def _inference_service(cfg: DeployConfig, champion: Release, canary: Release | None,
                       serve_yaml: str) -> dict[str, Any]:
    """KServe's InferenceService with Signpost's image as a custom predictor. With a ``canary``, the predictor is
    the challenger and ``canaryTrafficPercent`` sends it that share while the last ready revision (the champion)
    keeps the rest: KServe's canary rollout (serverless mode)."""
    release = canary or champion
    labels, annotations = _release_metadata(release)
    config_sha = hashlib.sha256(serve_yaml.encode("utf-8")).hexdigest()
    pod = _pod_spec(cfg, _container(cfg, release, name=PREDICTOR_CONTAINER, kserve=True),
                    "canary" if canary else "champion")
    predictor: dict[str, Any] = {
        "minReplicas": cfg.hpa_min, "maxReplicas": cfg.hpa_max, "scaleMetric": "cpu",
        "scaleTarget": cfg.hpa_cpu_percent, "labels": _stable_labels(cfg) | labels,
        "annotations": annotations | {f"{PREFIX}/config-sha256": config_sha}, **pod,
    }
    if canary is not None:
        predictor["canaryTrafficPercent"] = cfg.canary.traffic_percent
    return {"apiVersion": "serving.kserve.io/v1beta1", "kind": "InferenceService",
            "metadata": {"name": cfg.name, "labels": _stable_labels(cfg) | labels, "annotations": annotations},
            "spec": {"predictor": predictor}}


def _kustomization(resources: list[str], namespace: str | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
                            "resources": resources}
    if namespace:
        body["namespace"] = namespace
    return body
