"""feedback: labelled images from production (reviewed samples, corrections) as a versioned artifact.

``signpost feedback add`` takes image files with one label, or a CSV of ``path,label`` rows (a label is a class id
or a class name), checks that every image decodes and every label is a class of the data, and writes
``feedback/<name>-<hash>/``: the images under content-addressed names, ``labels.csv`` (file, class id, where it came
from) and a manifest. With ``data.feedback.url`` set, the batch folder is also copied to that store, where
``prepare`` on another machine (the retrain job) finds it. The monitor scores the served model on every feedback
batch (live accuracy, overall and per class, against the evaluation's).
"""

from __future__ import annotations

import csv
import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from signpost.artifacts import (
    artifact_path,
    atomic_dir,
    code_version,
    hash_json,
    is_complete,
    read_manifest,
    write_manifest,
)
from signpost.config import SignpostConfig
from signpost.data.images import CorruptImageError, open_image
from signpost.monitoring.feedback import LABELS, STAGE, push_batch

log = logging.getLogger(__name__)



class FeedbackError(ValueError):
    """Feedback that cannot be accepted; the message lists what is wrong."""


@dataclass
class FeedbackResult:
    path: Path
    reused: bool
    manifest: dict[str, Any]


def add_feedback(config: SignpostConfig, *, data_dir: Path, items: list[tuple[Path, str]]) -> FeedbackResult:
    """Store ``items`` (image path, label as class id or name) as a feedback batch; the same batch twice is one."""
    if not items:
        raise FeedbackError("no feedback given: pass --images FILE ... --label CLASS, or --csv FILE")
    images, unreadable = [], []
    for path, label in items:
        try:
            images.append((str(path), Path(path).read_bytes(), label))
        except OSError as exc:
            unreadable.append(f"{path}: {exc.strerror or exc}")
    return store_feedback(config, data_dir=data_dir, images=images, problems=unreadable)


def store_feedback(
    config: SignpostConfig, *, data_dir: Path, images: list[tuple[str, bytes, str]], problems: list[str] | None = None
) -> FeedbackResult:
    """Store ``images`` (where each came from, its bytes, its label) as a feedback batch, all or nothing."""
    class_names = read_manifest(data_dir)["dataset"]["class_names"]
    by_name = {name.lower(): i for i, name in enumerate(class_names)}
    problems = list(problems or [])
    total = len(images) + len(problems)
    if not total:
        raise FeedbackError("no feedback images given: nothing to store")
    accepted: list[tuple[str, bytes, int, str]] = []
    for source, data, label in images:
        text = str(label).strip()
        class_id = int(text) if text.isdigit() else by_name.get(text.lower())
        if class_id is None or not 0 <= class_id < len(class_names):
            problems.append(f"{source}: label {text!r} is not a class id (0-{len(class_names) - 1}) or a class name")
            continue
        try:
            open_image(data)
        except CorruptImageError as exc:
            problems.append(f"{source}: {exc}")
            continue
        digest = hashlib.sha256(data).hexdigest()
        accepted.append((f"{digest[:16]}{Path(source).suffix.lower() or '.img'}", data, class_id, source))
    if problems:
        shown = "\n  ".join(problems[:20]) + (f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else "")
        raise FeedbackError(f"{len(problems)} of {total} feedback items cannot be used (nothing was stored):"
                            f"\n  {shown}")
    key = hash_json({"items": sorted((name, class_id) for name, _, class_id, _ in accepted),
                     "data": read_manifest(data_dir)["key"]})
    path = artifact_path(config.workdir, STAGE, config.name, key)
    if is_complete(path):
        _share(config, path)  # a batch stored before, whose copy to the store may have failed then
        return FeedbackResult(path, True, read_manifest(path))
    with atomic_dir(path) as tmp:
        (tmp / "images").mkdir()
        with open(tmp / LABELS, "w", newline="", encoding="utf-8") as fh:
            writer = csv.writer(fh)
            writer.writerow(["file", "label", "source"])
            for name, data, class_id, source in accepted:
                (tmp / "images" / name).write_bytes(data)
                writer.writerow([f"images/{name}", class_id, source])
        counts = {class_names[c]: sum(1 for _, _, k, _ in accepted if k == c) for c in sorted({a[2] for a in accepted})}
        manifest = write_manifest(tmp, stage=STAGE, key=key, experiment=config.name, inputs={"data": data_dir.name},
                                  config={}, code=code_version(__name__), metrics={"images": len(accepted)},
                                  extra={"classes": counts})
    log.info("stored %d feedback images in %s", len(accepted), path)
    _share(config, path)
    return FeedbackResult(path, False, manifest)


def _share(config: SignpostConfig, batch: Path) -> None:
    """Copy the batch to the team's feedback store (``data.feedback.url``), when there is one."""
    if config.data.feedback.url:
        push_batch(batch, config.data.feedback.url)


def read_items(csv_path: Path) -> list[tuple[Path, str]]:
    """The rows of a CSV whose header row names the columns ``path`` and ``label`` (others are ignored), as
    (image path, label); paths are relative to the CSV's folder. A missing or different header is refused, naming
    the columns found: a first row taken for data, or columns taken in the wrong order, would store wrong labels.
    """
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise FeedbackError(f"{csv_path} {'is a folder' if csv_path.is_dir() else 'does not exist'}: give --csv a "
                            "CSV file with a path,label header row")
    try:
        text = csv_path.read_text(encoding="utf-8-sig")  # -sig: a spreadsheet's byte-order mark is no column name
        reader = csv.reader(text.splitlines())
        rows = [(reader.line_num, row) for row in reader if any(cell.strip() for cell in row)]
    except (UnicodeDecodeError, csv.Error) as exc:
        raise FeedbackError(f"{csv_path} is not a readable text CSV ({exc}): give a UTF-8 CSV with a path,label "
                            "header row") from None
    if not rows:
        raise FeedbackError(f"{csv_path} is empty: expected a header row path,label, then one row per image")
    found = [cell.strip().lower() for cell in rows[0][1]]
    if "path" not in found or "label" not in found:
        raise FeedbackError(f"{csv_path}: the header row must name the columns path,label; found "
                            f"{','.join(cell.strip() for cell in rows[0][1])!r}")
    at_path, at_label = found.index("path"), found.index("label")
    items = []
    for line, row in rows[1:]:
        if len(row) <= max(at_path, at_label) or not row[at_path].strip() or not row[at_label].strip():
            raise FeedbackError(f"{csv_path}, line {line}: expected a path and a label; got {row}")
        file = Path(row[at_path].strip())
        items.append((file if file.is_absolute() else csv_path.parent / file, row[at_label]))
    if not items:
        raise FeedbackError(f"{csv_path} has a header but no rows: add one path,label row per image")
    return items
