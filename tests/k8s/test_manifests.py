"""The kustomize tree `signpost deploy` writes: every overlay rendered by the real kubectl and every object checked
against its schema (Kubernetes' and KServe's), the pod hardened, the release written into labels and annotations."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from signpost.config import ConfigError, load_config
from signpost.k8s.manifests import LABEL_MAX, ManifestError, Release, label_value, render_tree, write_tree
from tests.k8s.validate import kustomize, validate

CHAMPION = Release("ghcr.io/acme/signpost@sha256:" + "a" * 64, "train/t-0123456789ab", "d" * 64,
                   "train/t-0123456789ab", "eager")
CHALLENGER = Release("ghcr.io/acme/signpost@sha256:" + "b" * 64, "optimize/t-0123456789ab/pruned", "d" * 64,
                     "optimize/t-0123456789ab/pruned", "onnxruntime")
SERVE_YAML = "name: demo\nserve:\n  host: 0.0.0.0\n  port: 8000\n"
LABEL = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")


def _tree(tmp_path: Path, canary: Release | None = CHALLENGER, **overrides: Any) -> Path:
    config = load_config(None, [f"{k}={v}" for k, v in overrides.items()])
    out = tmp_path / "deploy"
    write_tree(render_tree(config.deploy, CHAMPION, SERVE_YAML, canary=canary,
                           canary_yaml=SERVE_YAML.replace("demo", "challenger") if canary else None), out)
    return out


def _by_kind(objects: list[dict]) -> dict[str, list[dict]]:
    kinds: dict[str, list[dict]] = {}
    for obj in objects:
        kinds.setdefault(obj["kind"], []).append(obj)
    return kinds


@pytest.mark.parametrize("overlay", ["plain", "canary", "kserve"])
@pytest.mark.parametrize("with_canary", [True, False])
def test_every_overlay_renders_and_every_object_matches_its_schema(tmp_path: Path, overlay: str,
                                                                   with_canary: bool) -> None:
    objects = kustomize(_tree(tmp_path, CHALLENGER if with_canary else None) / "overlays" / overlay)
    expected = {"plain": {"ConfigMap", "Service", "Deployment", "HorizontalPodAutoscaler", "PodDisruptionBudget"},
                "canary": {"ConfigMap", "Service", "Deployment", "HorizontalPodAutoscaler", "PodDisruptionBudget"},
                "kserve": {"ConfigMap", "InferenceService"}}[overlay]
    assert {obj["kind"] for obj in objects} == expected
    for obj in objects:
        validate(obj)
        assert obj["metadata"].get("namespace") == "default"


def test_a_broken_deployment_fails_validation(tmp_path: Path) -> None:
    out = _tree(tmp_path)
    path = out / "base" / "deployment.yaml"
    deployment = yaml.safe_load(path.read_text())
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    container["securityContext"]["readOnlyRootFilesytem"] = True  # misspelled: the API server would refuse it
    path.write_text(yaml.safe_dump(deployment))
    broken = next(obj for obj in kustomize(out / "overlays" / "plain") if obj["kind"] == "Deployment")
    with pytest.raises(kubernetes_validate.ValidationError, match="readOnlyRootFilesytem"):
        validate(broken)
    broken["spec"]["template"]["spec"]["containers"][0]["securityContext"].pop("readOnlyRootFilesytem")
    broken["spec"]["replicas"] = "two"
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(broken)


@pytest.mark.parametrize("mutate", ["type", "unknown", "missing"])
def test_a_broken_inference_service_fails_validation(tmp_path: Path, mutate: str) -> None:
    isvc = next(obj for obj in kustomize(_tree(tmp_path) / "overlays" / "kserve")
                if obj["kind"] == "InferenceService")
    validate(isvc)
    predictor = isvc["spec"]["predictor"]
    if mutate == "type":
        predictor["canaryTrafficPercent"] = "ten"
    elif mutate == "unknown":
        predictor["canaryTraficPercent"] = 10
    else:
        predictor["containers"][0]["ports"][0].pop("containerPort")
    with pytest.raises(jsonschema.ValidationError):
        validate(isvc)


def test_the_pod_runs_hardened_with_probes_a_drain_pause_and_its_config(tmp_path: Path) -> None:
    objects = _by_kind(kustomize(_tree(tmp_path, None) / "overlays" / "plain"))
    deployment = objects["Deployment"][0]
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    security = container["securityContext"]
    assert security["runAsNonRoot"] and security["runAsUser"] == 10001  # the image's USER 10001:10001
    assert security["readOnlyRootFilesystem"] and security["allowPrivilegeEscalation"] is False
    assert security["capabilities"] == {"drop": ["ALL"]}
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    pause = container["lifecycle"]["preStop"]["exec"]["command"]
    assert pause[0] == "sleep" and int(pause[1]) == 5
    assert pod["terminationGracePeriodSeconds"] > int(pause[1])
    assert container["resources"] == {"requests": {"cpu": "500m", "memory": "1Gi"},
                                      "limits": {"cpu": "2", "memory": "2Gi"}}
    # Writable: the server's workdir (prediction log) and /tmp; the config file comes from the ConfigMap.
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert "emptyDir" in volumes[mounts["/var/lib/signpost"]["name"]] and "emptyDir" in volumes[mounts["/tmp"]["name"]]
    # The server starts on the ConfigMap's file and the model the image holds (the image's CMD, config moved).
    assert container["args"] == ["signpost", "serve", "--config", "/etc/signpost/deploy/config.yaml", "--model",
                                 "/srv/artifacts/train/t-0123456789ab"]
    config = mounts["/etc/signpost/deploy"]
    (configmap,) = objects["ConfigMap"]
    assert volumes[config["name"]]["configMap"]["name"] == configmap["metadata"]["name"] and config["readOnly"]
    assert configmap["data"]["config.yaml"] == SERVE_YAML
    # The key is referenced, never rendered: no Secret object, no value in the pod.
    assert "Secret" not in objects
    assert container["env"] == [{"name": "SIGNPOST_API_KEY", "valueFrom": {"secretKeyRef": {
        "name": "signpost-api-key", "key": "api-key"}}}]
    assert container["image"] == CHAMPION.image
    hpa, pdb, service = objects["HorizontalPodAutoscaler"][0], objects["PodDisruptionBudget"][0], objects["Service"][0]
    assert hpa["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (2, 10)
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()


def test_a_config_without_an_api_key_secret_renders_no_key(tmp_path: Path) -> None:
    objects = kustomize(_tree(tmp_path, None, **{"deploy.api_key_secret": "null"}) / "overlays" / "plain")
    deployment = next(obj for obj in objects if obj["kind"] == "Deployment")
    assert "env" not in deployment["spec"]["template"]["spec"]["containers"][0]


def test_a_shared_prediction_log_comes_from_a_secret_to_every_pod_champion_and_canary(tmp_path: Path) -> None:
    objects = kustomize(_tree(tmp_path, **{"deploy.prediction_log_secret": "signpost-prediction-log"})
                        / "overlays" / "canary")
    for obj in objects:
        validate(obj)
    deployments = [obj for obj in objects if obj["kind"] == "Deployment"]
    assert len(deployments) == 2
    for deployment in deployments:  # the champion and the canary write to one log, which --promote-canary reads
        env = deployment["spec"]["template"]["spec"]["containers"][0]["env"]
        assert {"name": "SIGNPOST_PREDICTION_LOG", "valueFrom": {"secretKeyRef": {
            "name": "signpost-prediction-log", "key": "url"}}} in env
    # The URL holds the database's credentials: never in a ConfigMap.
    assert all("postgresql" not in str(obj.get("data", "")) for obj in objects if obj["kind"] == "ConfigMap")


def test_labels_carry_the_release_trimmed_and_annotations_carry_it_whole(tmp_path: Path) -> None:
    long_version = "optimize/" + "t-" + "x" * 80 + "/pruned"
    release = Release(CHAMPION.image, long_version, "f" * 64, "models/m")
    config = load_config(None)
    tree = render_tree(config.deploy, release, SERVE_YAML)
    deployment = tree["base/deployment.yaml"]
    for meta in (deployment["metadata"], deployment["spec"]["template"]["metadata"]):
        labels, annotations = meta["labels"], meta["annotations"]
        assert all(len(v) <= LABEL_MAX and LABEL.match(v) for v in labels.values()), labels
        assert labels["signpost.io/model-version"].startswith("optimize-t-xxx")
        assert labels["signpost.io/image-digest"] == ("sha256." + "a" * 64)[:LABEL_MAX]
        assert labels["signpost.io/data-hash"] == "f" * LABEL_MAX
        assert annotations["signpost.io/model-version"] == long_version
        assert annotations["signpost.io/image-digest"] == "sha256:" + "a" * 64
        assert annotations["signpost.io/data-hash"] == "f" * 64
    assert label_value("-._a/b:c_.") == "a-b-c"


def test_the_canary_runs_beside_the_champion_behind_one_service(tmp_path: Path) -> None:
    objects = _by_kind(kustomize(_tree(tmp_path, **{"deploy.canary.replicas": 1}) / "overlays" / "canary"))
    deployments = {d["metadata"]["name"]: d for d in objects["Deployment"]}
    champion, canary = deployments["signpost"], deployments["signpost-canary"]
    assert champion["spec"]["template"]["spec"]["containers"][0]["image"] == CHAMPION.image
    assert canary["spec"]["template"]["spec"]["containers"][0]["image"] == CHALLENGER.image
    assert (champion["spec"]["replicas"], canary["spec"]["replicas"]) == (2, 1)  # a third of the pods
    (service,) = objects["Service"]
    for deployment in (champion, canary):
        assert service["spec"]["selector"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    # The selectors do not overlap: each Deployment owns its own pods.
    assert champion["spec"]["selector"] != canary["spec"]["selector"]
    configs = {c["metadata"]["name"]: c["data"]["config.yaml"] for c in objects["ConfigMap"]}
    canary_config = canary["spec"]["template"]["spec"]["volumes"][0]["configMap"]["name"]
    assert "challenger" in configs[canary_config]


def test_kserve_runs_the_challenger_as_a_canary_of_the_last_revision(tmp_path: Path) -> None:
    isvc = _by_kind(kustomize(_tree(tmp_path, **{"deploy.canary.traffic_percent": 20}) / "overlays" / "kserve"))
    predictor = isvc["InferenceService"][0]["spec"]["predictor"]
    assert predictor["canaryTrafficPercent"] == 20
    assert predictor["containers"][0]["image"] == CHALLENGER.image
    assert predictor["containers"][0]["name"] == "kserve-container"
    alone = _by_kind(kustomize(_tree(tmp_path / "alone", None) / "overlays" / "kserve"))
    assert "canaryTrafficPercent" not in alone["InferenceService"][0]["spec"]["predictor"]


def test_the_same_inputs_write_the_same_bytes(tmp_path: Path) -> None:
    first, second = _tree(tmp_path / "a"), _tree(tmp_path / "b")
    files = sorted(p.relative_to(first) for p in first.rglob("*") if p.is_file())
    assert files and files == sorted(p.relative_to(second) for p in second.rglob("*") if p.is_file())
    assert all((first / f).read_bytes() == (second / f).read_bytes() for f in files)


@pytest.mark.parametrize("image", ["ghcr.io/acme/signpost:latest", "signpost@sha256:abc",
                                   "ghcr.io/acme/signpost:v1@sha256:" + "A" * 64])
def test_an_image_not_named_by_digest_is_refused(image: str) -> None:
    with pytest.raises(ManifestError, match="by digest"):
        Release(image, "v", "d", "models/m")


def test_a_tree_written_again_without_the_canary_drops_its_files(tmp_path: Path) -> None:
    out = _tree(tmp_path)
    (out / "notes.txt").write_text("mine")
    assert (out / "overlays" / "kserve" / "canary-configmap.yaml").is_file()
    write_tree(render_tree(load_config(None).deploy, CHAMPION, SERVE_YAML), out)
    assert not (out / "overlays" / "kserve" / "canary-configmap.yaml").exists()
    assert (out / "notes.txt").read_text() == "mine"
    assert {obj["kind"] for obj in kustomize(out / "overlays" / "kserve")} == {"ConfigMap", "InferenceService"}


@pytest.mark.parametrize(("overrides", "named"), [
    (["deploy.cpu_limit=2 cores"], "deploy.cpu_limit"),
    (["deploy.name=Signpost_API"], "deploy.name"),
    (["deploy.hpa_min=5", "deploy.hpa_max=4"], "hpa_max (4) must be >= hpa_min (5)"),
])
def test_a_bad_deploy_setting_is_named(overrides: list[str], named: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(named)):
        load_config(None, overrides)
