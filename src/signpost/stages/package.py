"""package: a container build context for a model, and optionally the multi-arch image built and pushed.

The context (``package/<name>-<hash>/context/``) holds everything the image needs and nothing else:

- ``Dockerfile``: two stages on a Python base taken as the ``BASE_IMAGE`` build argument; the first installs the
  pinned requirements (CPU-only PyTorch from ``TORCH_INDEX_URL``) and Signpost into a virtual environment, the
  second copies that environment, the model and the server config, and runs as a non-root user with a HEALTHCHECK
  on ``/readyz``, STOPSIGNAL and OCI labels (model version, data hash, git revision);
- ``requirements.lock``: every package the server imports and their dependencies, pinned to the versions this
  machine serves with (the closure of the serving requirements in the installed environment);
- ``app/``: Signpost's own source, installed without dependencies;
- ``model/``: the model artifact folder, files checked against its manifest before they are copied;
- ``signpost.yaml``: the server's config (listen on 0.0.0.0:8000, the chosen runtime, no tracking);
- ``keys/trusted.pub``: the public keys the server trusts to have signed its model (those this process trusts, and
  the public half of the key it signs with), so the image refuses a model swapped in after the build; none when
  this process has no key, and the manifest says the image checks no signatures;
- ``.dockerignore``.

The runtime must run on every platform of the image without a compiler: ``eager`` and ``onnxruntime`` do;
``compile`` needs a C++ compiler at start-up and an AOTInductor package is native code for one architecture, so a
bench candidate on those is packaged on ONNX Runtime (or eager) instead, and the manifest says so.

``build_image`` builds with docker buildx when a Docker engine answers, else buildah, else podman, for every
platform in ``package.platforms`` as one manifest list; ``push_image`` pushes it.

``package_edge`` (``signpost package --target edge``) writes the other deployable: a signed edge bundle of the
model's ExecuTorch program (``edge/<name>-<hash>/`` and its ``.tar.gz``; the layout is ``signpost.edge.bundle``'s).
"""

from __future__ import annotations

import datetime as dt
import importlib.metadata
import json
import logging
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from signpost import __version__, signing
from signpost.artifacts import (
    artifact_path,
    atomic_dir,
    code_version,
    git_revision,
    hash_json,
    is_complete,
    verify_artifact,
    write_manifest,
)
from signpost.config import SecurityConfig, SignpostConfig, config_to_dict, save_config
from signpost.models.artifact import CARD, ModelCard
from signpost.runtime import FORMS, available_runtimes
from signpost.serve.model import resolve

log = logging.getLogger(__name__)

STAGE = "package"
CONTEXT = "context"
PORT = 8000
ENGINES = ("docker", "buildah", "podman")
# Run on every platform and need no compiler in the image: each has wheels for x86-64 and aarch64 Linux, and
# ExecuTorch's XNNPACK and OpenVINO's CPU plugin pick their kernels for the CPU at run time.
PORTABLE_RUNTIMES = ("eager", "onnxruntime", "executorch", "openvino")
# The runtime → the package the image needs for it beyond the server's own requirements.
RUNTIME_REQUIREMENTS = {"onnxruntime": "onnxruntime", "executorch": "executorch", "openvino": "openvino"}
# What the server imports; the lock is these and everything they depend on.
SERVE_REQUIREMENTS = ("torch", "numpy", "pillow", "pydantic", "pyyaml", "safetensors", "tqdm", "fastapi", "uvicorn",
                      "uvloop", "httptools", "prometheus-client", "python-multipart", "sqlalchemy",
                      "cryptography", "alembic")  # signatures (signpost.signing); the log's migrations (predlog)
_CODE = ("signpost",)  # the whole package is copied into the image
EDGE_STAGE = "edge"  # edge bundles live in workdir/edge/, apart from build contexts (deploy reads package/)
EDGE_SAMPLES = 6  # self-test images in a bundle: enough classes to catch a wrong program, a few KiB each
EDGE_SAMPLE_POOL = 2048  # test images the samples are picked from (a few seconds on ExecuTorch)

DOCKERFILE = """\
# syntax=docker/dockerfile:1
# The Signpost inference service for {model_version}, written by `signpost package`.
#   docker buildx build --platform {platforms} -t {image}:{tag} .
# BASE_IMAGE: a Debian-based Python {python} image (the default, or a local one where no registry can be reached).
ARG BASE_IMAGE={base_image}

FROM ${{BASE_IMAGE}} AS build
# Where pip finds CPU-only PyTorch wheels (the default index would bring CUDA builds on x86-64).
ARG TORCH_INDEX_URL={torch_index_url}
# Optional pip settings for a build behind a mirror: a wheel folder and a CA bundle (unset: not used).
ARG PIP_FIND_LINKS
ARG PIP_CERT
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python3 -m venv /opt/venv
COPY requirements.lock /tmp/requirements.lock
RUN /opt/venv/bin/pip install --extra-index-url "${{TORCH_INDEX_URL}}" -r /tmp/requirements.lock
COPY app /tmp/app
RUN /opt/venv/bin/pip install --no-deps /tmp/app

FROM ${{BASE_IMAGE}}
{labels}
RUN useradd --system --uid 10001 --user-group --create-home --home-dir /var/lib/signpost signpost
COPY --from=build /opt/venv /opt/venv
COPY model /srv/artifacts/{model_path}
COPY signpost.yaml /etc/signpost/config.yaml
COPY keys /etc/signpost/keys
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
USER 10001:10001
WORKDIR /var/lib/signpost
EXPOSE {port}
# uvicorn turns SIGTERM into a graceful stop: open requests are answered and the prediction log is flushed.
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=30s --timeout=3s --start-period=60s --retries=3 \\
  CMD ["python3", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:{port}/readyz', timeout=2)"]
CMD ["signpost", "serve", "--config", "/etc/signpost/config.yaml", "--model", "/srv/artifacts/{model_path}"]
"""

DOCKERIGNORE = """\
# The context holds only what the image needs; keep caches and editor files out of it anyway.
**/__pycache__
**/*.pyc
**/.DS_Store
"""

APP_PYPROJECT = """\
[build-system]
requires = ["setuptools>=68"]
build-backend = "setuptools.build_meta"

[project]
name = "signpost"
version = "{version}"
description = "Signpost, as installed in its inference image (dependencies come from requirements.lock)."
requires-python = ">=3.10"

[project.scripts]
signpost = "signpost.cli:entry"

[tool.setuptools.packages.find]
where = ["src"]
"""


class PackageError(RuntimeError):
    """The context cannot be written or the image cannot be built or pushed; the message says what to change."""


@dataclass
class PackageResult:
    """The build context, what it serves, and the image when one was built or pushed."""

    path: Path
    reused: bool
    manifest: dict[str, Any]
    images: list[str] = field(default_factory=list)  # local references built
    pushed: str | None = None

    @property
    def context(self) -> Path:
        return self.path / CONTEXT


def package(config: SignpostConfig, *, model: str | Path, runtime: str = "auto") -> PackageResult:
    """Write the build context for ``model`` (a model folder, a bench folder, or ``models:/name@alias``)."""
    source = resolve(model, config, runtime)
    model_manifest = verify_artifact(source.folder, signed=True)
    card = ModelCard.model_validate_json((source.folder / CARD).read_text(encoding="utf-8"))
    chosen, why = _portable_runtime(source.folder, source.runtime, config.package.platforms)
    lock = requirements_lock(chosen, source.folder)
    revision = git_revision() or "unknown"
    key = hash_json({"model": model_manifest["key"], "runtime": chosen, "asked": source.runtime,
                     "package": config_to_dict(config.package),
                     "serve": config_to_dict(config.serve), "lock": lock, "code": code_version(*_CODE),
                     "revision": revision, "trusted_keys": sorted(signing.image_keys(signing.current()))})
    path = artifact_path(config.workdir, STAGE, config.name, key)
    if is_complete(path):
        log.info("a build context for this model, runtime, settings and code exists: reusing %s", path)
        return PackageResult(path, True, verify_artifact(path))

    cfg = config.package
    # Where the model lives in the image: its path under the workdir it came from (train/<name>, or
    # optimize/<name>/<variant>), so the server reports the same version as everywhere else.
    model_path = _workdir_path(source.folder)
    labels = {
        "org.opencontainers.image.title": cfg.image,
        "org.opencontainers.image.description": f"Signpost inference service: {source.version} on {chosen}",
        "org.opencontainers.image.version": source.version,
        "org.opencontainers.image.revision": revision,
        "org.opencontainers.image.source": _source_url(),
        "org.opencontainers.image.licenses": "Apache-2.0",
        "io.signpost.model.version": source.version,
        "io.signpost.model.architecture": card.architecture,
        "io.signpost.model.runtime": chosen,
        "io.signpost.data.hash": card.data_key,
        "io.signpost.version": __version__,
    }
    label_lines = " \\\n      ".join(f"{k}={json.dumps(v)}" for k, v in labels.items() if v)
    with atomic_dir(path) as tmp:
        context = tmp / CONTEXT
        context.mkdir()
        shutil.copytree(source.folder, context / "model")
        _copy_app(context / "app")
        (context / "requirements.lock").write_text(lock, encoding="utf-8")
        (context / ".dockerignore").write_text(DOCKERIGNORE, encoding="utf-8")
        (context / "Dockerfile").write_text(DOCKERFILE.format(
            model_version=source.version, platforms=",".join(cfg.platforms), image=cfg.image,
            tag=image_tag(source.version), python=f"{sys.version_info.major}.{sys.version_info.minor}",
            base_image=cfg.base_image, torch_index_url=cfg.torch_index_url, labels=f"LABEL {label_lines}",
            model_path=model_path, port=PORT,
        ), encoding="utf-8")
        server = config.model_copy(deep=True)
        server.workdir = Path("/var/lib/signpost")
        server.tracking.backend = "none"
        server.serve.host, server.serve.port, server.serve.runtime = "0.0.0.0", PORT, chosen
        server.serve.prediction_log = None
        server.security = SecurityConfig()  # never the signing key: the image only verifies
        trusted = signing.public_pem(signing.image_keys(signing.current()))
        (context / "keys").mkdir()
        if trusted:
            (context / "keys" / "trusted.pub").write_text(trusted, encoding="utf-8")
            server.security.public_keys = [Path("/etc/signpost/keys/trusted.pub")]
        else:
            log.warning("no signing or public key configured: the image will not check its model's signature")
            (context / "keys" / "README").write_text(
                "No public key was configured when this image was packaged: the server checks file hashes only.\n",
                encoding="utf-8")
        save_config(server, context / "signpost.yaml")
        manifest = write_manifest(
            tmp, stage=STAGE, key=key, experiment=config.name,
            inputs={"model": source.folder.name, "model_key": model_manifest["key"], "origin": source.origin},
            config=config_to_dict(cfg), code=code_version(*_CODE),
            extra={"image": {"name": cfg.image, "tags": [image_tag(source.version), image_tag(revision[:12])],
                             "platforms": cfg.platforms, "runtime": chosen, "runtime_reason": why,
                             "labels": labels, "model_path": model_path,
                             "trusted_keys": sorted(signing.image_keys(signing.current()))}},
        )
    log.info("wrote the build context for %s (%s) to %s", source.version, chosen, path / CONTEXT)
    return PackageResult(path, False, manifest)


@dataclass
class EdgeBundleResult:
    """The signed edge bundle folder and its tarball (``signpost.edge.bundle``)."""

    path: Path
    tarball: Path
    reused: bool
    manifest: dict[str, Any]
    signed: bool


def package_edge(config: SignpostConfig, *, model: str | Path, samples: int = EDGE_SAMPLES) -> EdgeBundleResult:
    """Write the edge bundle of ``model`` (a variant with a ``model.pte``, a bench folder or ``models:/name@alias``)
    under ``workdir/edge/`` with its tarball beside it, signed with this process's key; reused when it exists.

    The self-test samples are test-split images of different classes on which the program is most sure (the
    largest gap between its first and second logit), so a device's other CPU does not flip them.
    """
    from signpost.edge import bundle as edge

    source = resolve(model, config, "executorch")
    model_manifest = verify_artifact(source.folder, signed=True)
    if edge.PTE not in model_manifest["files"]:
        why = model_manifest.get("config", {}).get("executorch_error") or "it was not exported to ExecuTorch"
        raise PackageError(f"{source.folder} has no {edge.PTE} ({why}); package a variant that has one, e.g. "
                           "optimize/<name>/fp32 with optimize.export_executorch=true")
    card = ModelCard.model_validate_json((source.folder / CARD).read_text(encoding="utf-8"))
    signer = signing.current().signer
    key = hash_json({"model": model_manifest["key"], "target": "edge", "samples": samples, "data": card.data_key,
                     "code": code_version("signpost.edge.bundle", "signpost.stages.package"),
                     "signer": signing.key_id(signer.public_key()) if signer else None})
    path = artifact_path(config.workdir, EDGE_STAGE, config.name, key)
    tarball = path.with_name(path.name + edge.TARBALL_SUFFIX)
    if is_complete(path):
        log.info("an edge bundle of this model, settings and code exists: reusing %s", path)
        if not tarball.is_file():
            edge.write_tarball(path, tarball)
        return EdgeBundleResult(path, tarball, True, verify_artifact(path), signer is not None)
    if signer is None:
        log.warning("NO SIGNING KEY: the edge bundle is UNSIGNED; devices refuse it unless run with "
                    "--allow-unsigned (set SIGNPOST_SIGNING_KEY or security.signing_key)")
    images, labels = _edge_samples(config.workdir / "data" / card.data_artifact, source.folder, samples)
    with atomic_dir(path) as tmp:
        for name in (edge.PTE, CARD):
            shutil.copy2(source.folder / name, tmp / name)  # checked against the model's manifest above
        info = edge.bundle_info(model_version=source.version, class_names=card.class_names,
                                image_size=card.image_size, source_key=model_manifest["key"], mean=card.mean,
                                std=card.std)
        (tmp / edge.BUNDLE_JSON).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
        edge.write_samples(tmp, images, labels)
        manifest = write_manifest(
            tmp, stage=STAGE, key=key, experiment=config.name,
            inputs={"model": source.folder.name, "model_key": model_manifest["key"], "origin": source.origin,
                    "data": card.data_artifact},
            config={"target": "edge", "samples": samples}, code=code_version("signpost.edge.bundle", *_CODE),
            extra={"bundle": {"format": edge.FORMAT, "model_version": source.version, "runtime": "executorch"}},
        )
    edge.write_tarball(path, tarball)
    log.info("wrote the edge bundle of %s to %s and %s", source.version, path, tarball)
    return EdgeBundleResult(path, tarball, False, manifest, signer is not None)


def _edge_samples(data_dir: Path, model_folder: Path, count: int) -> tuple[list[Any], list[int]]:
    """Up to ``count`` test images (uint8 HWC) of different classes, each with the class the program gives it."""
    from signpost.data.cache import load_split
    from signpost.runtime import load_predictor

    split_file = data_dir / "test.safetensors"
    if not split_file.is_file():
        raise PackageError(f"{split_file} is missing: the bundle's self-test samples come from the test split the "
                           "model was made from; run `signpost prepare` with the model's data settings")
    verify_artifact(data_dir, [split_file.name])
    split = load_split(split_file)
    images = split.images[:EDGE_SAMPLE_POOL].permute(0, 2, 3, 1).contiguous()  # [N, S, S, 3], as decoding gives
    logits = load_predictor(model_folder, "executorch", warmup=(1,)).from_images(images)
    top2 = logits.topk(2, dim=1)
    margin, predicted = (top2.values[:, 0] - top2.values[:, 1]).tolist(), top2.indices[:, 0].tolist()
    best: dict[int, int] = {}  # class -> the index of its most certain image
    for index, cls in enumerate(predicted):
        if cls not in best or margin[index] > margin[best[cls]]:
            best[cls] = index
    chosen = sorted(best.values(), key=lambda i: -margin[i])[:count]
    if not chosen:
        raise PackageError(f"{split_file}: no test images to make the bundle's self-test samples from")
    return [images[i] for i in chosen], [predicted[i] for i in chosen]


def _workdir_path(folder: Path) -> str:
    """``train/<name>`` or ``optimize/<name>/<variant>``: the model folder's place in a workdir."""
    folder = folder.resolve()
    if folder.parent.parent.name == "optimize":
        return f"optimize/{folder.parent.name}/{folder.name}"
    return f"{folder.parent.name if folder.parent.name == 'train' else 'models'}/{folder.name}"


def _source_url() -> str:
    """The repository the image is built from: GitHub Actions' variables, else the git remote, else empty."""
    if os.environ.get("GITHUB_REPOSITORY"):
        return f"{os.environ.get('GITHUB_SERVER_URL', 'https://github.com')}/{os.environ['GITHUB_REPOSITORY']}"
    import signpost

    try:
        done = subprocess.run(["git", "config", "--get", "remote.origin.url"], capture_output=True, text=True,
                              cwd=Path(signpost.__file__).parent, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return ""
    return done.stdout.strip() if done.returncode == 0 else ""


def image_tag(text: str) -> str:
    """``text`` as a valid image tag: [A-Za-z0-9_.-], at most 128 characters, not starting with . or -."""
    tag = re.sub(r"[^A-Za-z0-9_.-]+", "-", text).lstrip(".-")[:128]
    return tag or "latest"


def requirements_lock(runtime: str, model_folder: Path) -> str:
    """The serving requirements for ``runtime`` and every package they depend on, pinned to installed versions."""
    roots = list(SERVE_REQUIREMENTS)
    if runtime in RUNTIME_REQUIREMENTS:
        roots.append(RUNTIME_REQUIREMENTS[runtime])
    if (model_folder / FORMS["program"]).is_file():
        roots.append("torchao")  # the int8 program's quantized ops are registered by torchao
    pins = _closure(roots)
    python = f"{sys.version_info.major}.{sys.version_info.minor}"
    lines = [f"# Pinned by `signpost package` from the environment it ran in (Python {python}, {sys.platform}).",
             "# torch is the CPU build: the Dockerfile installs it from TORCH_INDEX_URL."]
    lines += [f"{name}=={version}" for name, version in sorted(pins.items())]
    return "\n".join(lines) + "\n"


def _closure(roots: list[str]) -> dict[str, str]:
    from packaging.requirements import InvalidRequirement, Requirement
    from packaging.utils import canonicalize_name

    pins: dict[str, str] = {}
    todo = list(roots)
    while todo:
        try:
            requirement = Requirement(todo.pop())
        except InvalidRequirement:
            continue
        if requirement.marker is not None and not requirement.marker.evaluate({"extra": ""}):
            continue  # an optional extra, or another platform's or Python's dependency
        name = canonicalize_name(requirement.name)
        if name in pins:
            continue
        try:
            dist = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            raise PackageError(f"{name} is needed in the image but not installed here; pip install {name}") from None
        pins[name] = dist.version.split("+")[0]  # 2.13.0+cpu -> 2.13.0: the index decides the build
        todo.extend(dist.requires or [])
    return pins


def _portable_runtime(folder: Path, runtime: str, platforms: list[str]) -> tuple[str, str]:
    """The runtime the image serves with, and why."""
    has_onnx = (folder / FORMS["onnx"]).is_file()
    fallback = "onnxruntime" if has_onnx else "eager"
    if runtime == "auto":
        return fallback, "auto: ONNX Runtime when the model has an ONNX file, else eager"
    if runtime in PORTABLE_RUNTIMES:
        if runtime not in available_runtimes(folder):
            raise PackageError(f"{folder} has no form the {runtime} runtime loads: it cannot be served on {runtime}")
        return runtime, "as asked"
    if runtime == "aoti" and len(platforms) == 1:
        return runtime, f"an AOTInductor package, built for this machine; the image is {platforms[0]} only"
    reason = ("torch.compile needs a C++ compiler at start-up, which the image does not have" if runtime == "compile"
              else "an AOTInductor package is native code for one architecture, and the image is multi-arch")
    return fallback, f"{runtime} asked for, but {reason}: serving on {fallback}"


def _copy_app(dest: Path) -> None:
    """Signpost's source as an installable project (no tests, no caches)."""
    import signpost

    package_dir = Path(signpost.__file__).parent
    shutil.copytree(package_dir, dest / "src" / "signpost", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    (dest / "pyproject.toml").write_text(APP_PYPROJECT.format(version=__version__), encoding="utf-8")


def detect_engine() -> str:
    """docker (buildx, with an engine that answers), else buildah, else podman."""
    if shutil.which("docker") and _ok(["docker", "info"]) and _ok(["docker", "buildx", "version"]):
        return "docker"
    for engine in ("buildah", "podman"):
        if shutil.which(engine):
            return engine
    raise PackageError("no container engine: install docker with buildx, buildah or podman (the build context is "
                       "written; build it elsewhere with `docker buildx build`)")


def build_image(
    result: PackageResult,
    config: SignpostConfig,
    *,
    engine: str | None = None,
    platforms: list[str] | None = None,
    build_args: dict[str, str] | None = None,
    volumes: list[str] | None = None,
    push: str | None = None,
) -> PackageResult:
    """Build the context for ``platforms`` (default ``package.platforms``) as one manifest list, tagged with the
    model version and the git revision; push it to ``push`` (``registry/name:tag``) when given.

    ``build_args`` and ``volumes`` (``SRC:DST[:ro]``, buildah/podman only) reach a build behind a mirror: pip's
    wheel folder and CA bundle, for instance.
    """
    engine = engine or detect_engine()
    if engine not in ENGINES:
        raise PackageError(f"unknown container engine {engine!r}; choose one of {', '.join(ENGINES)}")
    platforms = platforms or config.package.platforms
    info = result.manifest["image"]
    refs = [f"localhost/{info['name']}:{tag}" if engine != "docker" else f"{info['name']}:{tag}"
            for tag in info["tags"]]
    args = {"BASE_IMAGE": config.package.base_image, **(build_args or {})}
    labels = [f"org.opencontainers.image.created={dt.datetime.now(dt.timezone.utc).isoformat(timespec='seconds')}"]
    if engine == "docker":
        command = ["docker", "buildx", "build", "--platform", ",".join(platforms)]
        command += [item for ref in ([push] if push else []) + refs for item in ("-t", ref)]
        command += ["--push"] if push else (["--load"] if len(platforms) == 1 else [])
    else:
        _run([engine, "manifest", "rm", refs[0]], check=False)  # a rebuild replaces the list instead of adding to it
        command = [engine, "build", "--format", "docker", "--platform", ",".join(platforms), "--manifest", refs[0]]
        command += [item for volume in volumes or [] for item in ("--volume", volume)]
    command += [item for k, v in args.items() for item in ("--build-arg", f"{k}={v}")]
    command += [item for label in labels for item in ("--label", label)]
    command.append(str(result.context))
    log.info("building %s for %s with %s", refs[0], ", ".join(platforms), engine)
    _run(command)
    if engine != "docker":
        for ref in refs[1:]:
            _run([engine, "tag", refs[0], ref])
        if push:
            tls = ["--tls-verify=false"] if _is_loopback(push) else []
            _run([engine, "manifest", "push", "--all", *tls, refs[0], f"docker://{push}"])
    result.images, result.pushed = refs, push
    return result


def _is_loopback(reference: str) -> bool:
    host = reference.split("/", 1)[0].split(":")[0]
    return host in ("127.0.0.1", "localhost", "[::1]")


def _ok(command: list[str]) -> bool:
    try:
        return subprocess.run(command, capture_output=True, timeout=20).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def _run(command: list[str], check: bool = True) -> subprocess.CompletedProcess:
    log.debug("running %s", " ".join(command))
    done = subprocess.run(command, capture_output=True, text=True)
    if check and done.returncode != 0:
        tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-15:])
        raise PackageError(f"`{' '.join(command[:3])} ...` failed (exit {done.returncode}):\n{tail}")
    return done

