"""Reading labelled feedback batches (written by `signpost feedback add`): the monitor scores the model on them."""

from __future__ import annotations

import csv
from pathlib import Path

from signpost.artifacts import is_complete, read_manifest, verify_artifact

STAGE = "feedback"
LABELS = "labels.csv"


def feedback_batches(workdir: Path, name: str) -> list[Path]:
    """Every finished feedback batch of the experiment ``name``, as its manifest names it.

    Never by a folder-name prefix (``gtsrb-*`` would fold ``gtsrb-kaggle``'s labels into ``gtsrb``'s data). A batch
    stored by an older Signpost names no experiment; its folder name, ``<name>-<hash>``, still says whose it is, and
    its labels are a person's work, so it keeps counting for exactly that name.
    """
    batches = []
    for path in sorted((Path(workdir) / STAGE).glob("*")):
        if not is_complete(path):
            continue
        owner = read_manifest(path).get("experiment")
        if (owner["name"] if isinstance(owner, dict) else path.name.rpartition("-")[0]) == name:
            batches.append(path)
    return batches


def load_batch(path: Path) -> list[tuple[bytes, int]]:
    """A feedback batch's images (bytes) and class ids, checked against its manifest first."""
    verify_artifact(path)
    rows = list(csv.DictReader((Path(path) / LABELS).read_text(encoding="utf-8").splitlines()))
    return [((Path(path) / row["file"]).read_bytes(), int(row["label"])) for row in rows]
