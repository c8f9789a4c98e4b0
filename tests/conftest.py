"""Shared fixtures: a small synthetic dataset in the official GTSRB layout, made once per test session."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from signpost.config import SignpostConfig, SyntheticConfig, load_config
from signpost.data.synthetic import generate_gtsrb

SMALL_SYNTHETIC = SyntheticConfig(
    num_classes=6, min_tracks=2, max_tracks=4, frames_per_track=5, test_tracks=1, max_size=120, seed=0
)


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A read-only small synthetic GTSRB dataset; copy it (``gtsrb_copy``) before changing files."""
    root = tmp_path_factory.mktemp("synthetic") / "raw"
    generate_gtsrb(root, SMALL_SYNTHETIC)
    return root


@pytest.fixture
def gtsrb_copy(synthetic_root: Path, tmp_path: Path) -> Path:
    """A private copy of the small synthetic dataset that a test may modify."""
    return Path(shutil.copytree(synthetic_root, tmp_path / "raw"))


def local_config(root: Path, workdir: Path, *overrides: str) -> SignpostConfig:
    """A config that reads ``root`` as it is and writes artifacts under ``workdir``."""
    return load_config(None, ["data.source=local", f"data.root={root}", f"workdir={workdir}", "name=t", *overrides])


@pytest.fixture(scope="session")
def optimized(synthetic_root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A model trained briefly on the small dataset and its optimized variants (int8, pruned, students, exports).

    Session-wide: making the variants compiles AOTInductor packages, the slowest step of the optimize tests.
    """
    from signpost.stages.optimize import optimize
    from signpost.stages.prepare import prepare
    from signpost.stages.train import train

    work = tmp_path_factory.mktemp("optimized")
    config = local_config(
        synthetic_root, work, "train.epochs=4", "train.batch_size=16", "train.warmup_epochs=0.5",
        "optimize.prune.finetune_epochs=1", "optimize.distill.epochs=2", "optimize.calibration_batches=2",
        "optimize.calibration_batch_size=16", "optimize.accuracy_budget=1.0", "tracking.backend=none",
    )
    data = prepare(config, progress=False)
    model = train(config, data_dir=data.path, progress=False)
    result = optimize(config, model_dir=model.path, data_dir=data.path, progress=False)
    return {"config": config, "data_dir": data.path, "model_dir": model.path, "result": result}


@pytest.fixture(autouse=True)
def _no_signing_keys(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Every test starts without signing or public keys (whatever the shell has), and leaves none configured:
    the signing policy is per process, and the CLI sets it from each config it reads."""
    from signpost import signing

    monkeypatch.delenv(signing.SIGNING_KEY_ENV, raising=False)
    monkeypatch.delenv(signing.PUBLIC_KEYS_ENV, raising=False)
    signing.configure(signing.Policy())
    yield
    signing.configure(signing.Policy())
