"""train: prepared data → a trained model artifact (safetensors weights + model card), resumable and distributed.

The stage: reuse the model artifact when one exists for these inputs, otherwise train it with the engine
(``signpost.training``: the recipe, its checkpoints, resume and DistributedDataParallel under ``torchrun``) inside a
tracking run that gets the resolved config, every epoch's metrics and the model.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from signpost.artifacts import is_complete, read_manifest
from signpost.config import SignpostConfig, config_to_dict
from signpost.tracking import NullTracker, RunFactory
from signpost.training import EpochCallback, Recipe

STAGE = "train"


@dataclass
class TrainResult:
    """Where the model artifact is, and whether an existing one was reused."""

    path: Path
    reused: bool
    manifest: dict[str, Any]


def train(
    config: SignpostConfig,
    *,
    data_dir: Path,
    resume: bool = False,
    progress: bool = True,
    on_epoch: EpochCallback | None = None,
    tracking: RunFactory | None = None,
) -> TrainResult:
    """Train ``config.train.model`` on the prepared data in ``data_dir``; reuse the artifact when inputs match.

    ``tracking`` makes a tracking run (see ``signpost.tracking.run_factory``); it is called only when training
    actually happens, on rank 0: the run gets the resolved config, per-epoch metrics, system metrics and the model.
    """
    recipe = Recipe(config, data_dir, progress=progress, on_epoch=on_epoch)
    try:
        if is_complete(recipe.path):
            return TrainResult(recipe.path, True, read_manifest(recipe.path))
        tracker = tracking(STAGE) if tracking is not None and recipe.rank == 0 else NullTracker()
        with tracker:
            tracker.log_params(config_to_dict(config))
            tracker.set_tags({"signpost.stage": STAGE, "signpost.data": recipe.data_dir.name})
            recipe.track(tracker)
            manifest = recipe.fit(resume=resume)
            if manifest:
                tracker.log_artifact(recipe.path, "model")
        return TrainResult(recipe.path, False, manifest)
    finally:
        recipe.cleanup()
