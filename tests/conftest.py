"""Shared fixtures: a small synthetic dataset in the official GTSRB layout, made once per test session."""

from __future__ import annotations

import shutil
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
