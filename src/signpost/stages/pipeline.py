"""run: the whole chain from one config, each stage skipped when its inputs are unchanged.

Stages meet only at artifacts; this module calls them in order and reports why each ran or was skipped. Later
stages (train, evaluate, optimize, bench, package) join the chain as they land.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from signpost.config import SignpostConfig
from signpost.stages.prepare import prepare
from signpost.stages.train import train

log = logging.getLogger(__name__)


@dataclass
class StageOutcome:
    """What one stage of a run did."""

    stage: str
    path: Path
    skipped: bool
    reason: str


def run_pipeline(config: SignpostConfig, *, progress: bool = True) -> list[StageOutcome]:
    """Run every stage for ``config`` in order; return what each did."""
    data = prepare(config, progress=progress)
    model = train(config, data_dir=data.path, progress=progress)
    return [
        StageOutcome("prepare", data.path, data.reused, _why(data.reused, "data, data settings and code")),
        StageOutcome("train", model.path, model.reused, _why(model.reused, "prepared data, train settings and code")),
    ]


def _why(reused: bool, inputs: str) -> str:
    return f"{inputs} unchanged" if reused else f"no artifact for these {inputs} yet"
