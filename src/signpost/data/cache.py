"""Decode every image once into a compact uint8 tensor cache, and read that cache back.

Decoding runs in worker processes (PIL holds the GIL, so threads do not help): each worker reads a file, hashes its
bytes, and decodes and resizes the whole frame exactly as the server does an upload (``signpost.data.images``:
upright by its EXIF orientation, RGB, ``frame_pixels``), writing straight into a uint8 array; when asked, it also
crops the sign's region (ROI) with a margin, for training crops beside the frames. The cache of a split is one
safetensors file: images ``[N, 3, S, S]`` uint8, labels, track ids, original sizes and per-image statistics.
Nothing is pickled on disk.
"""

from __future__ import annotations

import hashlib
import logging
import multiprocessing as mp
import os
import sys
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from signpost.data.images import (
    CorruptImageError,
    decode_image,
    frame_pixels,
    full_scale_side,
    open_header,
    open_image,
    preprocess,
)
from signpost.data.layouts import Roi, Sample
from signpost.data.stats import STAT_NAMES, image_stats

log = logging.getLogger(__name__)

_CHUNK = 256  # images per task: large enough to amortise IPC, small enough to balance two workers


@dataclass
class DecodedImages:
    """Decoded samples, row for row; rows of failed images are left zero and listed in ``failures``."""

    images: np.ndarray  # uint8 [N, 3, S, S]: each whole frame, exactly as the server gives it to the model
    sizes: np.ndarray  # int32 [N, 2]: original width, height
    digests: list[str]  # sha256 of each file's bytes ("" when unreadable)
    file_stats: np.ndarray  # int64 [N, 2]: file size (bytes) and modification time (ns) when it was read
    stats: np.ndarray  # float32 [N, K]: statistics of ``images``, columns as in signpost.data.stats.STAT_NAMES
    failures: dict[int, str]  # row -> reason
    # uint8 [N, 3, S, S]: each sample's ROI grown by the margin (the whole image when it has none), when asked
    crops: np.ndarray | None = None

    @classmethod
    def empty(cls, n: int, size: int, crops: bool = False) -> DecodedImages:
        return cls(
            images=np.zeros((n, 3, size, size), dtype=np.uint8),
            sizes=np.zeros((n, 2), dtype=np.int32),
            digests=[""] * n,
            file_stats=np.zeros((n, 2), dtype=np.int64),
            stats=np.zeros((n, len(STAT_NAMES)), dtype=np.float32),
            failures={},
            crops=np.zeros((n, 3, size, size), dtype=np.uint8) if crops else None,
        )

    def put(self, start: int, chunk: DecodedImages) -> None:
        """Copy a chunk decoded elsewhere into rows ``start ...``."""
        end = start + len(chunk.digests)
        self.images[start:end] = chunk.images
        self.sizes[start:end] = chunk.sizes
        self.digests[start:end] = chunk.digests
        self.file_stats[start:end] = chunk.file_stats
        self.stats[start:end] = chunk.stats
        if self.crops is not None and chunk.crops is not None:
            self.crops[start:end] = chunk.crops
        self.failures.update({start + i: reason for i, reason in chunk.failures.items()})


def decode_samples(
    samples: Sequence[Sample],
    size: int,
    margin: float | None = None,
    *,
    workers: int = 0,
    progress: bool = False,
) -> DecodedImages:
    """Read, hash, decode, resize and measure every sample once, in ``workers`` processes (0: one per core).

    ``images`` are the whole frames, decoded as the server decodes an upload (``frame_pixels``). With ``margin``
    (a fraction of the ROI's size), ``crops`` holds each sample's ROI grown by it too (the whole image for a sample
    without ROI). An image with an EXIF orientation is turned upright before its ROI is cropped: ROIs are read as
    coordinates in the image as a viewer shows it (GTSRB's own images carry no EXIF)."""
    decoded = DecodedImages.empty(len(samples), size, crops=margin is not None)
    tasks = [
        ([(s.file, s.roi) for s in samples[i : i + _CHUNK]], i, size, margin)
        for i in range(0, len(samples), _CHUNK)
    ]
    workers = workers or os.cpu_count() or 1
    with tqdm(total=len(samples), desc="decode", unit="img", disable=not progress, file=sys.stderr) as bar:
        if workers == 1 or len(tasks) <= 1:
            for start, chunk in map(_decode_chunk, tasks):
                decoded.put(start, chunk)
                bar.update(len(chunk.digests))
        else:
            with ProcessPoolExecutor(workers, mp_context=_mp_context()) as pool:
                for start, chunk in pool.map(_decode_chunk, tasks):
                    decoded.put(start, chunk)
                    bar.update(len(chunk.digests))
    return decoded


def _mp_context() -> mp.context.BaseContext:
    # fork starts workers in milliseconds; the workers use only PIL and numpy, never torch's thread pools.
    return mp.get_context("fork" if sys.platform == "linux" else "spawn")


def _decode_chunk(
    task: tuple[list[tuple[str, Roi | None]], int, int, float | None],
) -> tuple[int, DecodedImages]:
    items, start, size, margin = task
    chunk = DecodedImages.empty(len(items), size, crops=margin is not None)
    for i, (path, roi) in enumerate(items):
        try:
            data, stat = _read(path)
        except OSError as exc:
            chunk.failures[i] = f"unreadable: {exc.strerror or exc}"
            continue
        chunk.digests[i] = hashlib.sha256(data).hexdigest()
        chunk.file_stats[i] = (stat.st_size, stat.st_mtime_ns)
        try:
            # The server's decode: a large JPEG draft-decoded at reduced scale, as open_request sets it.
            decoded = decode_image(open_header(data, min_side=full_scale_side(size)))
            chunk.images[i] = frame_pixels(decoded, size).transpose(2, 0, 1)
            if chunk.crops is not None:
                # The ROI is in full-resolution coordinates: decode again at full scale if the draft reduced it.
                image = decoded.image if decoded.image.size == decoded.size else open_image(data)
                chunk.crops[i] = preprocess(image, size, roi, margin).transpose(2, 0, 1)
        except CorruptImageError as exc:
            chunk.failures[i] = str(exc)
            continue
        chunk.sizes[i] = decoded.size
    chunk.stats[:] = image_stats(chunk.images)  # rows of failed images are dropped later with the images
    return start, chunk


def _read(path: str) -> tuple[bytes, os.stat_result]:
    """A file's bytes and its stat at the time they were read (the hash index keys on size and mtime)."""
    fd = os.open(path, os.O_RDONLY)  # os-level calls: ~3 µs less per file than open(), on 51,839 files
    try:
        stat = os.fstat(fd)
        return os.read(fd, stat.st_size), stat
    finally:
        os.close(fd)


# --- the cache on disk ------------------------------------------------------------------------------------------


@dataclass
class CachedSplit:
    """One split of the prepared data, in memory."""

    images: torch.Tensor  # uint8 [N, 3, S, S]
    labels: torch.Tensor  # int64 [N]
    tracks: torch.Tensor  # int64 [N]: index into the split's track list
    sizes: torch.Tensor  # int32 [N, 2]: original width, height
    stats: torch.Tensor  # float32 [N, K]: per-image statistics, columns as in signpost.data.stats.STAT_NAMES

    def __len__(self) -> int:
        return int(self.labels.shape[0])


def save_split(split: CachedSplit, path: Path) -> None:
    """Write a split as one safetensors file."""
    save_file(
        {
            "images": split.images.contiguous(),
            "labels": split.labels.contiguous(),
            "tracks": split.tracks.contiguous(),
            "sizes": split.sizes.contiguous(),
            "stats": split.stats.contiguous(),
        },
        str(path),
    )


def load_split(path: Path) -> CachedSplit:
    """Read a split written by ``save_split`` (safetensors: no code runs on load)."""
    tensors = load_file(str(path))
    return CachedSplit(**{k: tensors[k] for k in ("images", "labels", "tracks", "sizes", "stats")})


SOURCES = "sources.tsv"  # in a prepared data folder: one line per source file, tab-separated, with a header
# split: the cached split the file's frame is in (train, val, test, feedback), "" for a file that was skipped; the
# rows of one split are in the order of its images. Older caches lack the column.
SOURCE_COLUMNS = ("path", "sha256", "label", "track", "roi", "split", "origin")


def read_sources(data_dir: Path) -> list[dict[str, str]]:
    """The rows of a prepared data folder's ``sources.tsv``, by the column names of its header (``SOURCE_COLUMNS``;
    a cache made before ``split`` lacks that one). ``path`` is relative to the raw root (``inputs.root`` of the
    manifest), or to the workdir for origin ``feedback*``."""
    header, *lines = (Path(data_dir) / SOURCES).read_text(encoding="utf-8").splitlines()
    columns = header.split("\t")
    return [dict(zip(columns, line.split("\t"), strict=True)) for line in lines]
