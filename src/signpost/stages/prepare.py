"""prepare: raw dataset files → a versioned, content-hashed uint8 tensor cache.

Read top to bottom: find the raw data (local folder, download, or synthetic), list its samples and this
experiment's labelled feedback batches (``signpost feedback add``), look up content hashes, reuse the cache when its
key is unchanged, otherwise decode every image once, split train/val by track, compute the reference statistics
later drift checks compare against, and write the artifact atomically.

Every image is cached as the whole frame, decoded and resized exactly as the server decodes an upload
(``signpost.data.images.frame_pixels``): what a client sends is what the model is trained, validated and tested on,
and ``signpost evaluate --served`` finds the server's answers on the test files equal to evaluate's. With
``data.roi_crops`` the train split also holds each training image's sign region (ROI, from the dataset's CSV files)
grown by ``data.roi_margin``: tighter views of the same signs, as augmentation. ``sources.tsv`` names the split each
file's frame is in.

Feedback makes a new data version: its manifest's ``lineage`` names the version the raw data alone makes and every
feedback batch folded in. A share of the feedback images (``data.feedback.holdout``, chosen by content hash so an
image once held out stays held out) is never trained on: it is the ``feedback`` split on which ``signpost run``
compares a retrained challenger with the champion. The rest joins the train split ``data.feedback.repeat`` times.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from signpost.artifacts import (
    ArtifactError,
    artifact_path,
    atomic_dir,
    code_version,
    hash_json,
    is_complete,
    read_manifest,
    verify_artifact,
    write_manifest,
)
from signpost.config import SignpostConfig, config_to_dict
from signpost.data.cache import SOURCE_COLUMNS, SOURCES, CachedSplit, DecodedImages, decode_samples, save_split
from signpost.data.fetch import fetch_archives
from signpost.data.hash_index import HashIndex
from signpost.data.layouts import RawDataset, Sample, read_dataset
from signpost.data.split import split_by_track
from signpost.data.stats import STAT_NAMES, image_stats, reference_summary
from signpost.data.synthetic import generate_gtsrb
from signpost.monitoring.feedback import LABELS, feedback_batches, pull_batches
from signpost.report.preview import preview_sheet

log = logging.getLogger(__name__)

STAGE = "data"
# The code whose hash keys the cache: what hashes, decodes, splits and measures the files, and draws preview.png.
_CODE = ("signpost.data.cache", "signpost.data.hash_index", "signpost.data.images", "signpost.data.layouts",
         "signpost.data.split", "signpost.data.stats", "signpost.report.preview", __name__)
_SYNTHETIC_CODE = ("signpost.data.synthetic", "signpost.data.sign_art")  # what draws and writes synthetic raw data
FEEDBACK = "feedback"  # the origin of a feedback image that joins the train split
HOLDOUT = "feedback-holdout"  # the origin of one kept out of training: the `feedback` split
# Where the raw files come from and how fast they are decoded: the files' content hashes stand for them.
_WHERE_FROM = {"source", "root", "workers", "archives", "base_url", "synthetic"}


class PrepareError(RuntimeError):
    """The raw data cannot be turned into a cache; the message says why and what to change."""


@dataclass
class PrepareResult:
    """Where the prepared data is, and whether an existing cache was reused."""

    path: Path
    reused: bool
    manifest: dict[str, Any]


def prepare(config: SignpostConfig, *, progress: bool = True) -> PrepareResult:
    """Run the prepare stage for ``config``; reuse the cache when nothing that goes into it has changed."""
    data = config.data
    root = _raw_root(config, progress)
    started = time.perf_counter()
    raw = read_dataset(root, data.layout)
    if not raw.train + raw.test:
        raise PrepareError(f"{raw.root}: the dataset lists no images")
    log.info("%s layout at %s: %d training and %d test images", raw.layout, raw.root, len(raw.train), len(raw.test))
    feedback = _read_feedback(config, raw.num_classes) if data.feedback.enabled else _Feedback([], [], [], [])
    samples = raw.train + raw.test + feedback.samples

    # Relative paths, computed once: per-sample pathlib calls would cost seconds on GTSRB's 51,839 files.
    cut = len(str(raw.root)) + 1
    files = [s.file for s in samples]
    rels = [f[cut:].replace(os.sep, "/") for f in files[: len(files) - len(feedback.samples)]] + feedback.rels
    origins = ["train"] * len(raw.train) + ["test"] * len(raw.test) + feedback.origins

    index = HashIndex(config.workdir / STAGE / ".index", raw.root)
    digests = index.lookup(files, rels)
    if digests is not None:
        key = _cache_key(config, _sources_hash(samples, rels, origins, digests), bool(feedback.samples))
        path = artifact_path(config.workdir, STAGE, config.name, key)
        if is_complete(path):
            return PrepareResult(path, True, read_manifest(path))

    margin = data.roi_margin if data.roi_crops else None  # None: frames only, no ROI crops decoded
    decoded = decode_samples(samples, data.image_size, margin, workers=data.workers, progress=progress)
    index.update(rels, decoded.digests, decoded.file_stats)
    sources = _sources_hash(samples, rels, origins, decoded.digests)
    key = _cache_key(config, sources, bool(feedback.samples))
    path = artifact_path(config.workdir, STAGE, config.name, key)
    if is_complete(path):
        return PrepareResult(path, True, read_manifest(path))
    _check_failures(rels, decoded, data.max_bad_fraction)

    splits, track_names, split_of, crops = _make_splits(config, raw, samples, decoded, origins)
    n_raw = len(samples) - len(feedback.samples)
    base = _sources_hash(samples[:n_raw], rels[:n_raw], origins[:n_raw], decoded.digests[:n_raw])
    lineage = {
        "raw": {"layout": raw.layout, "root": str(raw.root), "files": n_raw, "sources_sha256": base},
        # The version the raw data alone makes: this one is it plus the feedback below.
        "base": artifact_path(config.workdir, STAGE, config.name, _cache_key(config, base, False)).name,
        "feedback": feedback.batches,
        "feedback_settings": config_to_dict(data.feedback) if feedback.batches else None,
    }
    with atomic_dir(path) as tmp:
        for name, split in splits.items():
            save_split(split, tmp / f"{name}.safetensors")
        _write_sources(tmp / SOURCES, samples, rels, origins, split_of, decoded)
        (tmp / "tracks.json").write_text(json.dumps(track_names), encoding="utf-8")
        preview_sheet(splits["train"].images, splits["train"].labels, len(raw.class_names)).save(tmp / "preview.png")
        manifest = write_manifest(
            tmp,
            stage=STAGE,
            key=key,
            experiment=config.name,
            inputs={"layout": raw.layout, "source": data.source, "root": str(raw.root), "files": len(samples),
                    "sources_sha256": sources, "feedback": [batch["batch"] for batch in feedback.batches]}
            | ({"archives": [{"url": a.url, "checksum": a.checksum} for a in data.archives],
                "base_url": data.base_url} if data.source == "download" else {}),
            config=data_settings(config),
            code=code_version(*_CODE),
            metrics=_counts(splits),
            extra=_describe(raw, splits, crops, rels, decoded)
            | {"lineage": lineage, "timing": _timing(len(samples), started)},
        )
    if feedback.batches:
        log.info("folded %d feedback images from %d batches into %s (%d held out)", len(feedback.samples),
                 len(feedback.batches), path.name, feedback.origins.count(HOLDOUT))
    return PrepareResult(path, False, manifest)


# --- labelled feedback ------------------------------------------------------------------------------------------


@dataclass
class _Feedback:
    """The feedback images to fold in, as samples with their paths (relative to the workdir) and origins."""

    samples: list[Sample]
    rels: list[str]
    origins: list[str]
    batches: list[dict[str, Any]]  # the lineage: one entry per batch folded in


def _read_feedback(config: SignpostConfig, num_classes: int) -> _Feedback:
    """Every finished feedback batch of this experiment, checked against its manifest, as samples; with a store
    (``data.feedback.url``), the batches there that the workdir lacks are copied in first."""
    workdir = config.workdir.resolve()
    holdout = config.data.feedback.holdout
    if config.data.feedback.url:
        pull_batches(config.data.feedback.url, workdir, config.name)
    found = _Feedback([], [], [], [])
    for batch in feedback_batches(workdir, config.name):
        try:
            manifest = verify_artifact(batch)
        except ArtifactError as exc:
            raise PrepareError(f"feedback batch {batch} is damaged ({exc}); delete it or add the images again") from exc
        rows = list(csv.DictReader((batch / LABELS).read_text(encoding="utf-8").splitlines()))
        held = 0
        for row in rows:
            label = int(row["label"])
            if not 0 <= label < num_classes:
                raise PrepareError(f"feedback batch {batch.name}: {row['file']} has label {label}, but the dataset "
                                   f"has {num_classes} classes; was it added for another dataset?")
            file = batch / row["file"]
            # The file name starts with the image's sha256, so the hold-out choice never changes for an image.
            out = int(file.name[:8], 16) / 16**8 < holdout
            held += out
            found.samples.append(Sample(str(file), label, f"feedback/{file.name}"))
            found.rels.append(file.relative_to(workdir).as_posix())
            found.origins.append(HOLDOUT if out else FEEDBACK)
        found.batches.append({"batch": batch.name, "key": manifest["key"], "images": len(rows), "holdout": held,
                              "created": manifest.get("created")})
    return found


# --- where the raw data comes from ------------------------------------------------------------------------------


def _raw_root(config: SignpostConfig, progress: bool) -> Path:
    data = config.data
    if data.source == "download":
        return fetch_archives(data.root, data.archives, base_url=data.base_url, progress=progress)
    if data.source == "synthetic":
        key = hash_json({"synthetic": config_to_dict(data.synthetic), "code": code_version(*_SYNTHETIC_CODE)})
        folder = artifact_path(config.workdir, "raw", "synthetic", key)
        if not is_complete(folder):
            log.info("generating synthetic GTSRB-layout data in %s", folder)
            with atomic_dir(folder) as tmp:
                summary = generate_gtsrb(tmp, data.synthetic, progress=progress)
                write_manifest(
                    tmp,
                    stage="raw",
                    key=key,
                    experiment="synthetic",  # shared by every experiment that generates these settings
                    inputs={},
                    config=config_to_dict(data.synthetic),
                    code=code_version(*_SYNTHETIC_CODE),
                    metrics={"train_images": summary.train_images, "test_images": summary.test_images},
                )
        return folder
    if not data.root.exists():
        raise PrepareError(
            f"data.root {data.root} does not exist: point data.root at a GTSRB copy, or set data.source=download "
            "(or pass --download) to fetch data.archives (default: the official GTSRB archives), or "
            "data.source=synthetic for generated data"
        )
    return data.root


# --- content hashes and the cache key ---------------------------------------------------------------------------


def _sources_hash(samples: list[Sample], rels: list[str], origins: list[str], digests: list[str]) -> str:
    """One hash over every file's relative path, split of origin, label, ROI and content."""
    lines = (
        f"{rel}\t{origin}\t{s.label}\t{s.roi}\t{content}\n"
        for s, rel, origin, content in zip(samples, rels, origins, digests, strict=True)
    )
    return hashlib.sha256("".join(lines).encode()).hexdigest()


def _cache_key(config: SignpostConfig, sources: str, with_feedback: bool) -> str:
    """The hash that names the cache: the sources, the settings that shape the cache, and the code that makes it.

    The feedback settings shape it only when there is feedback to fold in.
    """
    data = config.data
    # Where the feedback store is shapes nothing either: the batches' content is in the sources.
    ignored = dict.fromkeys(_WHERE_FROM, True) | ({"feedback": {"url"}} if with_feedback else {"feedback": True})
    return hash_json(
        {
            "sources": sources,
            "settings": data.model_dump(mode="json", exclude=ignored),
            "seed": config.seed,
            "code": code_version(*_CODE),
        }
    )


def data_settings(config: SignpostConfig) -> dict[str, Any]:
    """The settings that make a data version this experiment's: recorded (and hashed) in its manifest, and what
    ``train`` matches before it uses the newest prepared data.

    Where the raw files come from is not among them (``prepare --data-root DIR`` then ``train`` is one experiment;
    the files' content is in the cache key), nor the feedback settings: a version with feedback folded in is the
    same experiment's newer data.
    """
    return config.data.model_dump(mode="json", exclude=_WHERE_FROM | {"feedback"}) | {"seed": config.seed}


# --- decode results → splits ------------------------------------------------------------------------------------


def _check_failures(rels: list[str], decoded: DecodedImages, limit: float) -> None:
    if not decoded.failures:
        return
    share = len(decoded.failures) / len(rels)
    for i, reason in list(decoded.failures.items())[:10]:
        log.warning("skipped %s: %s", rels[i], reason)
    if share > limit:
        examples = "; ".join(f"{rels[i]}: {reason}" for i, reason in list(decoded.failures.items())[:5])
        raise PrepareError(
            f"{len(decoded.failures)} of {len(rels)} images ({share:.1%}) could not be read, more than "
            f"data.max_bad_fraction={limit}. First ones: {examples}"
        )


def _make_splits(
    config: SignpostConfig, raw: RawDataset, samples: list[Sample], decoded: DecodedImages, origins: list[str]
) -> tuple[dict[str, CachedSplit], list[str], list[str], int]:
    """train / val / test (and ``feedback``, the held-out feedback, when there is some) for the samples in order:
    the raw dataset's training and test images, then the feedback images. Also the track names, each sample's split
    ("" when it was skipped) and how many ROI crops end the train split (``data.roi_crops``; after the frames)."""
    data = config.data
    n_train = len(raw.train)
    origin = np.array(origins)
    ok = np.ones(len(samples), dtype=bool)
    ok[list(decoded.failures)] = False
    labels = np.array([s.label for s in samples], dtype=np.int64)
    names, tracks = np.unique(np.array([s.track for s in samples]), return_inverse=True)
    track_names = names.tolist()

    in_test = origin == "test"
    if not raw.test:
        log.info("the %s layout has no labelled test split: holding out %.0f%% by track", raw.layout,
                 100 * data.test_fraction)
        in_test[:n_train] = split_by_track(labels[:n_train], tracks[:n_train], data.test_fraction, config.seed + 1)
    pool = np.flatnonzero(~in_test & (origin == "train"))  # validation comes from the raw training images only
    in_val = np.zeros(len(samples), dtype=bool)
    in_val[pool] = split_by_track(labels[pool], tracks[pool], data.val_fraction, config.seed)

    trained_feedback = np.flatnonzero((origin == FEEDBACK) & ok)
    rows = {
        "train": np.concatenate([np.flatnonzero((origin != HOLDOUT) & ~in_test & ~in_val & ok),
                                 np.tile(trained_feedback, data.feedback.repeat - 1)]),
        "val": np.flatnonzero(in_val & ok),
        "test": np.flatnonzero(in_test & ok),
    }
    if (held := np.flatnonzero((origin == HOLDOUT) & ok)).size:
        rows["feedback"] = held
    split_of = np.full(len(samples), "", dtype=object)
    for name, chosen in rows.items():
        split_of[chosen] = name
    images = torch.from_numpy(decoded.images)
    stats = torch.from_numpy(decoded.stats)
    splits = {}
    for name, chosen in rows.items():
        idx = torch.from_numpy(np.sort(chosen) if name != "train" else chosen)
        splits[name] = CachedSplit(
            images=images[idx],
            labels=torch.from_numpy(labels)[idx],
            tracks=torch.from_numpy(tracks.astype(np.int64))[idx],
            sizes=torch.from_numpy(decoded.sizes)[idx],
            stats=stats[idx],
        )
    crops = 0
    if decoded.crops is not None:
        # The raw training images that have a ROI, once more as their sign region: appended after the frames.
        with_roi = np.array([s.roi is not None for s in samples], dtype=bool)
        chosen = np.flatnonzero((origin == "train") & (split_of == "train") & with_roi)
        crops = len(chosen)
        extra = decoded.crops[chosen]
        idx = torch.from_numpy(chosen)
        train = splits["train"]
        splits["train"] = CachedSplit(
            images=torch.cat([train.images, torch.from_numpy(extra)]),
            labels=torch.cat([train.labels, torch.from_numpy(labels)[idx]]),
            tracks=torch.cat([train.tracks, torch.from_numpy(tracks.astype(np.int64))[idx]]),
            sizes=torch.cat([train.sizes, torch.from_numpy(decoded.sizes)[idx]]),
            stats=torch.cat([train.stats, torch.from_numpy(image_stats(extra))]),
        )
    return splits, track_names, split_of.tolist(), crops


def _timing(images: int, started: float) -> dict[str, float]:
    """Wall time from listing the files to the finished splits (hashing and decoding included)."""
    seconds = time.perf_counter() - started
    return {"images": images, "seconds": round(seconds, 3), "images_per_s": round(images / seconds, 1)}


def _counts(splits: dict[str, CachedSplit]) -> dict[str, int]:
    return {f"{name}_images": len(split) for name, split in splits.items()}


def _describe(
    raw: RawDataset, splits: dict[str, CachedSplit], crops: int, rels: list[str], decoded: DecodedImages
) -> dict[str, Any]:
    """What later stages and people need to know about the data, recorded in the manifest. The reference statistics
    are the training frames', what the server will see; the ROI crops (``crops`` rows at the end) are left out."""
    train = splits["train"]
    mean, std = _channel_mean_std(train.images)
    frames = len(train) - crops
    size_stats = np.concatenate([train.stats[:frames].numpy(), train.sizes[:frames].numpy()], axis=1)
    return {
        "dataset": {
            "layout": raw.layout,
            "num_classes": raw.num_classes,
            "class_names": raw.class_names,
            "image_size": int(train.images.shape[-1]),
            "mean": mean,
            "std": std,
            "class_histogram": {
                name: torch.bincount(split.labels, minlength=raw.num_classes).tolist()
                for name, split in splits.items()
            },
            "tracks": {name: int(split.tracks.unique().numel()) for name, split in splits.items()},
            # Every split holds whole frames decoded as the server decodes uploads; train also ROI crops, if any.
            "input": "frame",
            "train_roi_crops": crops,
        },
        "reference_stats": reference_summary(size_stats, (*STAT_NAMES, "width", "height")),
        "skipped": [
            {"path": rels[i], "reason": reason}
            for i, reason in sorted(decoded.failures.items())
        ],
    }


def _channel_mean_std(images: torch.Tensor) -> tuple[list[float], list[float]]:
    """Exact per-channel mean and std (0..1 units) from a histogram of the uint8 values: no float copy of the set."""
    values = torch.arange(256, dtype=torch.float64) / 255.0
    mean, std = [], []
    for channel in range(images.shape[1]):
        counts = torch.bincount(images[:, channel].reshape(-1), minlength=256).double()
        m = float((counts * values).sum() / counts.sum())
        mean.append(m)
        std.append(float(((counts * (values - m) ** 2).sum() / counts.sum()).sqrt()))
    return mean, std


def _write_sources(
    path: Path, samples: list[Sample], rels: list[str], origins: list[str], split_of: list[str],
    decoded: DecodedImages,
) -> None:
    """One tab-separated line per source file: path, sha256, label, track, ROI (x1,y1,x2,y2), the cached split its
    frame is in ("" when skipped) and the split of origin."""
    lines = (
        f"{rel}\t{digest}\t{s.label}\t{s.track}\t{','.join(map(str, s.roi)) if s.roi else ''}\t{split}\t{origin}\n"
        for s, rel, origin, split, digest in zip(samples, rels, origins, split_of, decoded.digests, strict=True)
    )
    path.write_text("\t".join(SOURCE_COLUMNS) + "\n" + "".join(lines), encoding="utf-8")
