"""Reading labelled feedback batches (written by `signpost feedback add`): the monitor scores the model on them.

A team shares batches through a store, ``data.feedback.url`` (any fsspec URL of a folder): ``push_batch`` copies a
batch folder there as it is, manifest last; ``pull_batches`` copies in an experiment's batches a workdir lacks,
each checked against its manifest before it counts.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import shutil
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from signpost.artifacts import MANIFEST, ArtifactError, is_complete, read_manifest, verify_artifact
from signpost.data.fetch import open_store

if TYPE_CHECKING:
    from fsspec import AbstractFileSystem

log = logging.getLogger(__name__)

STAGE = "feedback"
LABELS = "labels.csv"


class FeedbackStoreError(RuntimeError):
    """A batch that cannot be copied to or from the feedback store; the message names the batch and the store."""


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


def push_batch(batch: Path, url: str) -> bool:
    """Copy the finished batch folder ``batch`` to ``<url>/<its name>/``, its manifest last (a reader trusts a batch
    only once the manifest is there). False when the store already has it."""
    fs, base = open_store(url)
    remote = f"{base.rstrip('/')}/{batch.name}"
    if fs.exists(f"{remote}/{MANIFEST}"):
        return False
    files = [*sorted(p for p in batch.rglob("*") if p.is_file() and p.name != MANIFEST), batch / MANIFEST]
    try:
        for file in files:
            target = f"{remote}/{file.relative_to(batch).as_posix()}"
            fs.makedirs(target.rpartition("/")[0], exist_ok=True)
            fs.put_file(str(file), target)
    except OSError as exc:
        raise FeedbackStoreError(f"cannot copy feedback batch {batch.name} to {url} ({exc}); it is kept in {batch}: "
                                 "run the same `feedback add` again to copy it") from exc
    log.info("copied feedback batch %s to %s", batch.name, url)
    return True


def pull_batches(url: str, workdir: Path, name: str) -> list[Path]:
    """Copy the experiment ``name``'s batches in the store at ``url`` that ``workdir`` lacks into
    ``workdir/feedback``; each is checked against its manifest before it is renamed into place. Returns them."""
    fs, base = open_store(url)
    local = Path(workdir) / STAGE
    try:
        entries = sorted(fs.ls(base, detail=False))
    except FileNotFoundError:  # nothing pushed yet
        return []
    pulled = []
    for remote in entries:
        batch = remote.rstrip("/").rpartition("/")[2]
        # Folder names are <experiment>-<hash>; the manifest, read next, says for certain.
        if batch.rpartition("-")[0] != name or is_complete(local / batch) or not fs.exists(f"{remote}/{MANIFEST}"):
            continue
        try:
            manifest = json.loads(fs.cat_file(f"{remote}/{MANIFEST}"))
            owner = manifest.get("experiment")
            if isinstance(owner, dict) and owner.get("name") != name:
                continue
            pulled.append(_pull_one(fs, remote, manifest, local / batch))
        except (OSError, ValueError, ArtifactError) as exc:
            raise FeedbackStoreError(f"feedback batch {batch} in {url} cannot be used ({exc}); nothing of it was "
                                     "kept: push it again from a workdir that has it whole, or delete it "
                                     "there") from exc
    if pulled:
        log.info("copied %d feedback batches from %s", len(pulled), url)
    return pulled


def _pull_one(fs: AbstractFileSystem, remote: str, manifest: dict[str, Any], final: Path) -> Path:
    """The files the manifest lists, then the manifest, into a temporary folder; checked, then renamed to final."""
    tmp = final.with_name(f".tmp-{final.name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        for name in [*manifest["files"], MANIFEST]:
            parts = PurePosixPath(name).parts
            if not parts or PurePosixPath(name).is_absolute() or ".." in parts:
                raise ValueError(f"the manifest lists a file outside the batch: {name!r}")
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            fs.get_file(f"{remote}/{name}", str(tmp / name))
        verify_artifact(tmp)
        os.rename(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final
