"""The image, for real: build it with buildah from a locally bootstrapped base, run it with podman, probe it over
loopback, push it to a registry on 127.0.0.1, pull it back and read its labels.

Behind the ``container`` marker; `make test` installs buildah, podman, skopeo and docker-registry when it runs as
root (as CI does), and the base image is cached in ~/.cache/signpost/containers between runs.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from signpost.stages.package import build_image, package
from tests.serve.conftest import image_bytes

pytestmark = pytest.mark.container
ROOT = Path(__file__).resolve().parents[2]
BASE = "localhost/signpost-python:bookworm"
TOOLS = ("buildah", "podman", "skopeo", "docker-registry", "debootstrap")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(*command: str, timeout: float = 900) -> str:
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{' '.join(command)}: {done.stderr[-3000:]}"
    return done.stdout


@pytest.fixture(scope="module")
def engine_env() -> Iterator[None]:
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed (`make test` installs them when run as root)")
    state = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "signpost" / "containers"
    exports = _run(str(ROOT / "tools" / "containers" / "env.sh"), str(state))
    saved = dict(os.environ)
    for line in exports.splitlines():
        for assignment in line.removeprefix("export ").split():
            key, _, value = assignment.partition("=")
            os.environ[key] = value.strip("'")
    _run(str(ROOT / "tools" / "containers" / "base-image.sh"), BASE)
    yield
    os.environ.clear()
    os.environ.update(saved)


def _pip_setting(name: str) -> str:
    """This machine's pip setting ``name`` (``cert``, ``find-links``) from any of its config files or variables."""
    listed = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True).stdout
    for line in listed.splitlines():
        key, _, value = line.partition("=")
        if key.rsplit(".", 1)[-1] == name:
            return value.strip().strip("'\"")
    return ""


def _pip_build_settings() -> tuple[dict[str, str], list[str]]:
    """Build arguments and mounts that give the image's pip what this machine's pip has: a wheel folder (where the
    CPU build of PyTorch lies here) and a CA bundle. Without them the Dockerfile's defaults apply."""
    args: dict[str, str] = {}
    volumes: list[str] = []
    links = _pip_setting("find-links")
    if links and Path(links).is_dir():
        args |= {"PIP_FIND_LINKS": links, "TORCH_INDEX_URL": "https://pypi.org/simple"}
        volumes.append(f"{links}:{links}:ro")
    cert = _pip_setting("cert")
    if cert and Path(cert).is_file():
        args["PIP_CERT"] = "/etc/signpost-pip-ca.crt"
        volumes.append(f"{cert}:/etc/signpost-pip-ca.crt:ro")
    return args, volumes


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[str]:
    port = _free_port()
    config = tmp_path / "registry.yml"
    config.write_text(f"version: 0.1\nstorage:\n  filesystem:\n    rootdirectory: {tmp_path / 'data'}\n"
                      f"http:\n  addr: 127.0.0.1:{port}\n", encoding="utf-8")
    server = subprocess.Popen(["docker-registry", "serve", str(config)], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/v2/", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the registry did not start"
            time.sleep(0.2)
        yield f"127.0.0.1:{port}"
    finally:
        server.terminate()
        server.wait(10)


def test_the_image_builds_runs_answers_pushes_and_pulls_back(engine_env: None, registry: str, optimized: dict,
                                                           tmp_path: Path) -> None:
    config = optimized["config"].model_copy(deep=True)
    config.workdir = tmp_path / "work"
    config.package.base_image = BASE
    arch = {"x86_64": "amd64", "aarch64": "arm64"}.get(platform.machine(), platform.machine())
    result = package(config, model=str(optimized["result"].path / "pruned"))
    args, volumes = _pip_build_settings()
    pushed = f"{registry}/signpost:{result.manifest['image']['tags'][0]}"
    build_image(result, config, engine="buildah", platforms=[f"linux/{arch}"], build_args=args, volumes=volumes,
                push=pushed)
    image = result.images[0]
    version = result.manifest["image"]["labels"]["io.signpost.model.version"]

    port = _free_port()
    container = _run("podman", "run", "-d", "-p", f"127.0.0.1:{port}:8000", image).strip()
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 180
        while True:
            try:
                ready = httpx.get(f"{url}/readyz", timeout=2)
                if ready.status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, _run("podman", "logs", container)
            time.sleep(0.5)
        assert ready.json()["model_version"] == version
        answer = httpx.post(f"{url}/v1/predict", content=image_bytes(), headers={"Content-Type": "image/png"})
        assert answer.status_code == 200 and answer.json()["model_version"] == version
        started = time.monotonic()
        _run("podman", "stop", "--time", "30", container)
        assert time.monotonic() - started < 15, "SIGTERM did not stop the server; podman waited to kill it"
        assert _run("podman", "inspect", "--format", "{{.State.ExitCode}}", container).strip() == "0"
        logs = subprocess.run(["podman", "logs", container], capture_output=True, text=True).stderr
        assert "prediction log closed: 1 written" in logs
    finally:
        subprocess.run(["podman", "rm", "-f", container], capture_output=True)

    inspected = json.loads(_run("skopeo", "inspect", "--tls-verify=false", f"docker://{pushed}"))
    labels = inspected["Labels"]
    assert labels["io.signpost.model.version"] == version
    assert labels["io.signpost.data.hash"] == result.manifest["image"]["labels"]["io.signpost.data.hash"]
    assert labels["org.opencontainers.image.revision"] and labels["org.opencontainers.image.created"]
    raw = json.loads(_run("skopeo", "inspect", "--raw", "--tls-verify=false", f"docker://{pushed}"))
    assert [m["platform"]["architecture"] for m in raw["manifests"]] == [arch]  # a manifest list

    for ref in result.images:
        subprocess.run(["podman", "rmi", "-f", ref], capture_output=True)
    _run("podman", "pull", "--tls-verify=false", pushed)
    pulled = json.loads(_run("podman", "image", "inspect", pushed))[0]
    assert pulled["Labels"]["io.signpost.model.version"] == version
    assert pulled["Config"]["User"] == "10001:10001" and pulled["Config"]["StopSignal"] == "SIGTERM"
    subprocess.run(["podman", "rmi", "-f", pushed], capture_output=True)
