"""Reading labelled feedback batches (written by `signpost feedback add`): the monitor scores the model on them."""

from __future__ import annotations

import csv
from pathlib import Path

from signpost.artifacts import is_complete, verify_artifact

STAGE = "feedback"
LABELS = "labels.csv"


def feedback_batches(workdir: Path, name: str) -> list[Path]:
    """Every finished feedback batch of the experiment ``name``."""
    return sorted(p for p in (Path(workdir) / STAGE).glob(f"{name}-*") if is_complete(p))


def load_batch(path: Path) -> list[tuple[bytes, int]]:
    """A feedback batch's images (bytes) and class ids, checked against its manifest first."""
    verify_artifact(path)
    rows = list(csv.DictReader((Path(path) / LABELS).read_text(encoding="utf-8").splitlines()))
    return [((Path(path) / row["file"]).read_bytes(), int(row["label"])) for row in rows]
