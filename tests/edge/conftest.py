"""Edge fixtures: key pairs, and a real signed bundle made by `signpost package --target edge` from a tiny model
trained and exported to ExecuTorch once per session (fp32 only: no int8, pruning, distillation or other exports)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from signpost import signing
from tests.conftest import local_config


@dataclass(frozen=True)
class EdgeKeys:
    """The key pair bundles are signed with, and another whose signatures no device trusts."""

    private: Path
    public: Path
    other_private: Path
    other_public: Path

    def trust(self) -> signing.Policy:
        """Make this process a device that trusts ``public`` only (what `--public-key` does)."""
        return signing.configure(signing.policy_from(None, [self.public]))

    def sign_with(self, private: Path | None = None) -> signing.Policy:
        """Make this process a packager that signs with ``private`` (default: the trusted key)."""
        return signing.configure(signing.policy_from(private or self.private))


@pytest.fixture(scope="session")
def edge_keys(tmp_path_factory: pytest.TempPathFactory) -> EdgeKeys:
    """Two Ed25519 key pairs as PEM files."""
    folder = tmp_path_factory.mktemp("edge-keys")
    private, public = signing.generate(folder, "signer")
    other_private, other_public = signing.generate(folder, "other")
    return EdgeKeys(private, public, other_private, other_public)


@dataclass(frozen=True)
class EdgeBundle:
    """A signed bundle folder, its tarball, the model it was made from and the config that made it."""

    path: Path
    tarball: Path
    model_dir: Path
    config: object  # SignpostConfig (workdir: where package_edge writes)


@pytest.fixture(scope="session")
def edge_bundle(synthetic_root: Path, tmp_path_factory: pytest.TempPathFactory,
                edge_keys: EdgeKeys) -> Iterator[EdgeBundle]:
    """A real bundle, signed with ``edge_keys.private``, of a briefly trained model's fp32 ExecuTorch program.

    Read-only: a test that changes a bundle copies it (``shutil.copytree``) or unpacks the tarball first.
    """
    from signpost.stages.optimize import optimize
    from signpost.stages.package import package_edge
    from signpost.stages.prepare import prepare
    from signpost.stages.train import train

    work = tmp_path_factory.mktemp("edge-model")
    config = local_config(
        synthetic_root, work, "train.epochs=3", "train.batch_size=16", "train.warmup_epochs=0.5",
        "optimize.int8=false", "optimize.dynamic_int8=false", "optimize.prune.enabled=false",
        "optimize.distill.enabled=false", "optimize.export_aoti=false", "optimize.aoti_bf16=false",
        "optimize.export_onnx=false", "optimize.export_openvino=false", "optimize.accuracy_budget=1.0",
        "tracking.backend=none",
    )
    before = signing.current()
    edge_keys.sign_with()
    try:
        data = prepare(config, progress=False)
        model = train(config, data_dir=data.path, progress=False)
        optimized = optimize(config, model_dir=model.path, data_dir=data.path, progress=False)
        model_dir = optimized.path / "fp32"
        result = package_edge(config, model=model_dir)
    finally:
        signing.configure(before)
    yield EdgeBundle(result.path, result.tarball, model_dir, config)
