"""The training engine's one call for the optimize stage: a stopped derived run continues from its checkpoint and
ends as an uninterrupted one, and a finished one is reused, not trained again."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from signpost.stages.prepare import prepare
from signpost.training import CHECKPOINT, Derived, Recipe, train_derived
from tests.conftest import local_config

# One thread, so that a resumed run can match an uninterrupted one bit for bit (as tests/stages/test_train.py).
TRAIN = ["train.batch_size=16", "train.epochs=2", "train.threads=1", "train.warmup_epochs=0.5",
         "tracking.backend=none"]
DERIVED = Derived("optimize/training", "t-student", {"method": "student", "parent": "test"},
                  architecture_options={"widths": [8, 8, 16, 16]})


@pytest.fixture(scope="module")
def data_dir(synthetic_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("prepared")
    return prepare(local_config(synthetic_root, work, "tracking.backend=none"), progress=False).path


def test_a_stopped_derived_run_continues_from_its_checkpoint_then_is_reused(
    data_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    reference, _ = train_derived(local_config(tmp_path / "unused", tmp_path / "a", *TRAIN), data_dir, DERIVED,
                                 progress=False)

    config = local_config(tmp_path / "unused", tmp_path / "b", *TRAIN)
    stopped = Recipe(config, data_dir, progress=False, derived=DERIVED)  # one epoch, then the process went away
    try:
        stopped.setup(resume=False)
        stopped.train_epoch()
        stopped.end_epoch()
    finally:
        stopped.cleanup()
    assert (stopped.checkpoint_dir / CHECKPOINT).is_file()

    with caplog.at_level(logging.INFO, logger="signpost.training"):
        model, card = train_derived(config, data_dir, DERIVED, progress=False)
    assert "resuming at epoch 2" in caplog.text
    assert card.architecture_options == DERIVED.architecture_options and card.metrics["epochs"] == 2
    expected = reference.state_dict()
    assert all(torch.equal(value, expected[name]) for name, value in model.state_dict().items())
    assert not stopped.checkpoint_dir.exists()  # the finished run removed its checkpoints

    caplog.clear()
    with caplog.at_level(logging.INFO, logger="signpost.training"):
        again, _ = train_derived(config, data_dir, DERIVED, progress=False)
    assert f"reusing {stopped.path}" in caplog.text and "epoch 1:" not in caplog.text
    assert all(torch.equal(value, expected[name]) for name, value in again.state_dict().items())
