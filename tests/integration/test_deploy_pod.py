"""The deployment, run: `signpost deploy` renders the manifests of a real image (built with buildah, named by
digest), kubectl renders the base, every object is checked against its schema, and `podman kube play` starts the
pod from the rendered Deployment and ConfigMap; the test waits for /readyz, predicts a known image (its class
checked, the API key from the Secret required), and tears the pod down with `podman kube down`.

What podman 4.3 cannot take as Kubernetes does, and what this test does about it (the manifest itself is unchanged):
- only Pods, Deployments, ConfigMaps and volumes are played: the Service, HorizontalPodAutoscaler and
  PodDisruptionBudget are left out (they are schema-checked here and in tests/k8s);
- ``podman kube play`` has no ``--publish``: the container port gets a ``hostPort`` on ``hostIP: 127.0.0.1``;
- a ``kind: Secret`` in the played file is stored in a form podman's own ``secretKeyRef`` cannot read back, so the
  key is given as a podman secret instead (a JSON map of key to base64 value, which ``secretKeyRef`` reads);
- probes, ``lifecycle.preStop`` and ``startupProbe`` are not what podman acts on; the test probes /readyz itself.

Behind the ``container`` marker, with the image build of tests/integration/test_container.py (its fixtures).
"""

from __future__ import annotations

import base64
import json
import os
import platform
import subprocess
import time
from pathlib import Path

import httpx
import pytest
import yaml

from signpost.artifacts import read_manifest
from signpost.cli import main
from signpost.data.cache import read_sources
from signpost.data.images import open_image, preprocess
from signpost.serve.model import load, resolve
from signpost.stages.package import build_image, package
from tests.integration.test_container import BASE, _free_port, _pip_build_settings, _run, engine_env
from tests.k8s.validate import kustomize, validate

pytestmark = [pytest.mark.container, pytest.mark.slow]  # about 4 min: trains, builds an image, plays it
__all__ = ["engine_env"]  # the fixture, imported to be used here


def _known_image(optimized: dict, model: Path) -> tuple[Path, int]:
    """The test image whose label the model gets right with the widest margin (the test model trains for a few
    epochs only): its file and its class."""
    served = load(resolve(model, optimized["config"], "eager"), threads=1, max_batch=1)
    root = Path(read_manifest(optimized["data_dir"])["inputs"]["root"])  # what sources.tsv's paths are under
    right = []
    for row in (r for r in read_sources(optimized["data_dir"]) if r["split"] == "test"):
        data = (root / row["path"]).read_bytes()
        outputs = served.forward(preprocess(open_image(data), served.card.image_size)[None].copy(), top_k=1)
        if int(outputs.top_ids[0, 0]) == int(row["label"]):
            right.append((float(outputs.top_probs[0, 0]), row["path"], int(row["label"])))
    assert right, f"the model in {model} gets no test image right"
    _, path, label = max(right)
    return root / path, label


def test_the_rendered_deployment_runs_under_podman_kube_play(engine_env: None, optimized: dict,
                                                             tmp_path: Path) -> None:
    config = optimized["config"].model_copy(deep=True)
    config.workdir = tmp_path / "work"
    config.package.base_image = BASE
    arch = {"x86_64": "amd64", "aarch64": "arm64"}.get(platform.machine(), platform.machine())
    model = optimized["result"].path / "pruned"
    known, label = _known_image(optimized, model)
    result = package(config, model=str(model))
    args, volumes = _pip_build_settings()
    build_image(result, config, engine="buildah", platforms=[f"linux/{arch}"], build_args=args, volumes=volumes)
    digest = _run("podman", "image", "inspect", "--format", "{{.Digest}}", result.images[0]).strip()
    image = f"localhost/{result.manifest['image']['name']}@{digest}"
    version = result.manifest["image"]["labels"]["io.signpost.model.version"]

    name, secret = f"sp-{os.getpid()}", f"sp-key-{os.getpid()}"  # unique: other runs may share the engine's store
    out = tmp_path / "deploy"
    assert main(["deploy", "--package-result", str(result.path), "--image", image, "--out", str(out),
                 "name=t", f"workdir={config.workdir}", f"deploy.name={name}", f"deploy.api_key_secret={secret}",
                 "deploy.replicas=1"]) == 0
    objects = kustomize(out / "overlays" / "plain")
    for obj in objects:
        validate(obj)
    deployment = next(obj for obj in objects if obj["kind"] == "Deployment")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert container["image"] == image
    assert deployment["metadata"]["annotations"]["signpost.io/model-version"] == version

    port = _free_port()
    container["ports"][0] |= {"hostPort": port, "hostIP": "127.0.0.1"}
    played = tmp_path / "play.yaml"
    played.write_text(yaml.safe_dump_all([obj for obj in objects if obj["kind"] in ("Deployment", "ConfigMap")]))
    key = "deploy-test-key"
    key_file = tmp_path / "secret.json"
    key_file.write_text(json.dumps({"api-key": base64.b64encode(key.encode()).decode()}))
    _run("podman", "secret", "create", secret, str(key_file))
    try:
        _run("podman", "kube", "play", str(played), timeout=300)
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 180
        while True:
            try:
                ready = httpx.get(f"{url}/readyz", timeout=2)
                if ready.status_code == 200:
                    break
            except httpx.TransportError:
                pass
            logs = subprocess.run(["podman", "logs", f"{name}-pod-0-server"], capture_output=True, text=True)
            assert time.monotonic() < deadline, logs.stdout[-3000:] + logs.stderr[-3000:]
            time.sleep(0.5)
        assert ready.json()["model_version"] == version
        body, headers = known.read_bytes(), {"Content-Type": "application/octet-stream"}
        refused = httpx.post(f"{url}/v1/predict", content=body, headers=headers, timeout=30)
        assert refused.status_code == 401  # the key from the Secret is in force
        answer = httpx.post(f"{url}/v1/predict", content=body, headers=headers | {"X-API-Key": key}, timeout=30)
        assert answer.status_code == 200, answer.text
        assert answer.json()["class_id"] == label and answer.json()["model_version"] == version
        # Read-only root, the image's non-root user: what the manifest asked for, in force in the container.
        probe = subprocess.run(["podman", "exec", f"{name}-pod-0-server", "sh", "-c", "id -u; touch /x"],
                               capture_output=True, text=True)
        assert probe.stdout.split()[0] == "10001" and "Read-only file system" in probe.stderr
    finally:
        subprocess.run(["podman", "kube", "down", str(played)], capture_output=True, timeout=120)
        subprocess.run(["podman", "secret", "rm", secret], capture_output=True)
        for ref in result.images:
            subprocess.run(["podman", "rmi", "-f", ref], capture_output=True)
    pods = _run("podman", "pod", "ps", "--format", "{{.Name}}").split()
    assert f"{name}-pod-0" not in pods
