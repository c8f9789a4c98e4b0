"""The model registry: register, promote, roll back and download, against a real MLflow SQLite store in a temporary
folder."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from mlflow import MlflowClient

from signpost.artifacts import write_manifest
from signpost.config import TrackingConfig
from signpost.registry import Registry, RegistryError
from signpost.tracking import NullTracker, start_run, tracking_uri

# MLflow's SQLAlchemy store uses a loader option that SQLAlchemy 2 deprecates; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore::sqlalchemy.exc.SADeprecationWarning")


@pytest.fixture(autouse=True)
def _no_ambient_mlflow(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    """A developer's own MLflow settings must not leak in, and nothing may fall back to MLflow's global default
    store (``sqlite:///mlflow.db`` in the current folder)."""
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL"):
        monkeypatch.delenv(name, raising=False)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    yield
    assert not list(cwd.iterdir()), "something used MLflow's global default store"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One workdir (so one default SQLite store) for the module: creating the schema costs about a second."""
    return tmp_path_factory.mktemp("registry") / "work"


def _client(workdir: Path) -> MlflowClient:
    return MlflowClient(tracking_uri(TrackingConfig(), workdir))


def _fake_model(root: Path, name: str, seed: int) -> Path:
    """A small model artifact folder: weights-like bytes, a model card, a nested file and a manifest."""
    folder = root / name
    (folder / "plots").mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(bytes((seed * 31 + i) % 256 for i in range(4096)))
    card = {"architecture": "tiny", "num_classes": 3, "data_key": f"{seed:02d}" * 32, "data_artifact": "data-x"}
    (folder / "model_card.json").write_text(json.dumps(card), encoding="utf-8")
    (folder / "plots" / "curve.txt").write_text(f"loss curve {seed}\n", encoding="utf-8")
    write_manifest(folder, stage="train", key=f"{seed:064x}", inputs={}, config={"seed": seed}, code="test")
    return folder


def _files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _train_run(workdir: Path, config: TrackingConfig, model: Path, registry: Registry, accuracy: float) -> str:
    with start_run(config, workdir=workdir, experiment="registry", run_name=model.name, system_metrics=False) as run:
        run.log_metrics({"val/accuracy": accuracy}, step=1)
        version = registry.register(run, model)
    return version.version


def test_register_promote_rollback(workdir: Path, tmp_path: Path) -> None:
    config = TrackingConfig(registered_model="lifecycle")
    registry = Registry(config, workdir)
    assert registry.get("champion") is None  # not registered yet

    v1 = _train_run(workdir, config, _fake_model(tmp_path, "model-aaa", 1), registry, 0.80)
    v2 = _train_run(workdir, config, _fake_model(tmp_path, "model-bbb", 2), registry, 0.85)
    challenger = registry.get("challenger")
    assert challenger is not None and challenger.version == v2 != v1
    assert challenger.aliases == ("challenger",)
    assert challenger.metrics == {"val/accuracy": 0.85}
    assert challenger.source == f"runs:/{challenger.run_id}/model"
    assert registry.get("champion") is None

    champion = registry.promote()
    assert champion.version == v2 and champion.aliases == ("champion",)
    assert registry.get("challenger") is None  # promotion decides the challenger
    with pytest.raises(RegistryError, match="no 'challenger' version: nothing to promote"):
        registry.promote()
    with pytest.raises(RegistryError, match="nothing to roll back to"):
        registry.rollback()  # the first champion replaced nobody

    v3 = _train_run(workdir, config, _fake_model(tmp_path, "model-ccc", 3), registry, 0.90)
    assert registry.promote().version == v3
    previous = registry.get("previous-champion")
    assert previous is not None and previous.version == v2

    restored = registry.rollback()
    assert restored.version == v2 and "champion" in restored.aliases
    assert registry.get("previous-champion") is None
    with pytest.raises(RegistryError, match=r"nothing to roll back to: lifecycle has no previous 'champion'"):
        registry.rollback()

    client = _client(workdir)
    tags = client.get_model_version("lifecycle", v3).tags
    assert tags["signpost.artifact"] == "model-ccc"
    assert tags["signpost.data_key"] == "03" * 32
    assert "signpost.rolled_back.champion" in tags
    assert client.get_model_version("lifecycle", v1).aliases == []


def test_download_returns_the_logged_files(workdir: Path, tmp_path: Path) -> None:
    config = TrackingConfig(registered_model="download")
    registry = Registry(config, workdir)
    model = _fake_model(tmp_path, "model-ddd", 4)
    _train_run(workdir, config, model, registry, 0.7)
    registry.promote()

    folder = registry.download("champion", tmp_path / "served")
    assert folder == tmp_path / "served" / "model-ddd"
    assert _files(folder) == _files(model)
    assert registry.download("champion", tmp_path / "served") == folder  # already there: reused

    (folder / "model.safetensors").write_bytes(b"tampered")
    assert _files(registry.download("champion", tmp_path / "served")) == _files(model)  # fetched again
    assert not [p for p in (tmp_path / "served").iterdir() if p.name.startswith(".tmp-")]

    with pytest.raises(RegistryError, match="no 'challenger' version to download"):
        registry.download("challenger", tmp_path / "served")


def test_registry_refuses_what_it_cannot_register(workdir: Path, tmp_path: Path) -> None:
    config = TrackingConfig(registered_model="refusals")
    registry = Registry(config, workdir)
    unfinished = tmp_path / "model-eee"
    unfinished.mkdir()
    (unfinished / "model.safetensors").write_bytes(b"\0")
    with start_run(config, workdir=workdir, experiment="registry", run_name="r", system_metrics=False) as run:
        with pytest.raises(RegistryError, match=r"has no manifest\.json"):
            registry.register(run, unfinished)
        tampered = _fake_model(tmp_path, "model-ggg", 7)
        (tampered / "plots" / "curve.txt").write_text("changed", encoding="utf-8")
        with pytest.raises(RegistryError, match="does not match its manifest"):
            registry.register(run, tampered)
        model = _fake_model(tmp_path, "model-fff", 6)
        with pytest.raises(RegistryError, match="no run id"):
            registry.register(NullTracker(), model)
        elsewhere = NullTracker()
        elsewhere.run_id, elsewhere.uri = run.run_id, "http://127.0.0.1:1"  # type: ignore[attr-defined]
        with pytest.raises(RegistryError, match="use the same tracking config"):
            registry.register(elsewhere, model)
    with pytest.raises(RegistryError, match="'refusals' is not registered"):
        registry.rollback()
    with pytest.raises(RegistryError, match="not registered"):
        registry.promote()
    assert registry.get("challenger") is None


def test_registry_with_backend_none(tmp_path: Path) -> None:
    registry = Registry(TrackingConfig(backend="none"), tmp_path)
    with pytest.raises(RegistryError, match=r"tracking\.backend is none"):
        registry.get("champion")
    with pytest.raises(RegistryError, match=r"tracking\.backend is none"):
        registry.register(NullTracker(), tmp_path)
    with pytest.raises(RegistryError, match=r"tracking\.backend is none"):
        registry.promote()
