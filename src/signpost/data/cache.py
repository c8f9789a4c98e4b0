"""Decode every image once into a compact uint8 tensor cache, and read that cache back.

Decoding runs in worker processes (PIL holds the GIL, so threads do not help): each worker reads a file, hashes its
bytes, decodes, crops the ROI with a margin, converts to RGB and resizes, writing straight into a uint8 array. The
cache of a split is one safetensors file: images ``[N, 3, S, S]`` uint8, labels, track ids, original sizes and
per-image statistics. Nothing is pickled on disk.
"""

from __future__ import annotations

import hashlib
import io
import logging
import multiprocessing as mp
import os
import re
import sys
import warnings
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from signpost.data.layouts import Roi, Sample

log = logging.getLogger(__name__)

# Decompression-bomb guard: GTSRB images are at most 250x250; a photo dataset may be larger, but not this large.
MAX_PIXELS = 50_000_000
_CHUNK = 256  # images per task: large enough to amortise IPC, small enough to balance two workers
_PPM_HEADER = re.compile(rb"P6\s+(\d+)\s+(\d+)\s+255\s")


class CorruptImageError(ValueError):
    """An image file that cannot be decoded."""


@dataclass
class DecodedImages:
    """The result of decoding a list of samples; rows of failed images are left zero and listed in ``failures``."""

    images: np.ndarray  # uint8 [N, S, S, 3]
    sizes: np.ndarray  # int32 [N, 2]: original width, height
    digests: list[str]  # sha256 of each file's bytes ("" when unreadable)
    file_stats: np.ndarray  # int64 [N, 2]: file size (bytes) and modification time (ns) when it was read
    failures: dict[int, str]  # sample index -> reason


def open_image(data: bytes) -> Image.Image:
    """Decode image bytes to an RGB PIL image, refusing empty, truncated, unknown or oversized input."""
    if not data:
        raise CorruptImageError("empty file")
    fast = _PPM_HEADER.match(data)
    if fast is not None:
        # GTSRB is 50,000 small binary PPMs: reading the header here skips PIL's format probing (~20 µs/image).
        width, height = int(fast[1]), int(fast[2])
        start, need = fast.end(), int(fast[1]) * int(fast[2]) * 3
        if width * height > MAX_PIXELS:
            raise CorruptImageError(f"image too large ({width}x{height} pixels)")
        if width > 0 and height > 0 and len(data) - start >= need:
            return Image.frombuffer("RGB", (width, height), data[start : start + need], "raw", "RGB", 0, 1)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            if width * height > MAX_PIXELS:
                raise CorruptImageError(f"image too large ({width}x{height} pixels)")
            image.load()
    except CorruptImageError:
        raise
    except Image.UnidentifiedImageError:
        raise CorruptImageError("not an image format Pillow can read") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise CorruptImageError(f"cannot decode: {exc}") from None
    return _to_rgb(image)


def _to_rgb(image: Image.Image) -> Image.Image:
    """RGB with 8 bits per channel: 16-bit grey scaled down, transparency composited on black, grey replicated."""
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        # PIL's convert() clips 16-bit values at 255 (a mid-grey 16-bit PNG would turn white): scale instead.
        values = np.asarray(image, dtype=np.float32)
        scale = 257.0 if image.mode != "F" and values.max(initial=0) > 255 else 1.0
        image = Image.fromarray(np.clip(values / scale + 0.5, 0, 255).astype(np.uint8), "L")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, (0, 0, 0, 255)), rgba)
    return image if image.mode == "RGB" else image.convert("RGB")


def preprocess(image: Image.Image, size: int, roi: Roi | None = None, margin: float = 0.0) -> np.ndarray:
    """Crop ``roi`` grown by ``margin`` (a fraction of its size, clipped to the image) and resize to ``size``².

    Training data and served requests both go through this function, so a model sees the same pixels in both.
    Returns uint8 ``[size, size, 3]``.
    """
    width, height = image.size
    if roi is None:
        box = (0.0, 0.0, float(width), float(height))
    else:
        x1, y1, x2, y2 = roi
        # GTSRB ROIs are inclusive pixel coordinates: the box ends one past x2, y2.
        pad_x, pad_y = margin * (x2 + 1 - x1), margin * (y2 + 1 - y1)
        box = (
            max(0.0, x1 - pad_x),
            max(0.0, y1 - pad_y),
            min(float(width), x2 + 1 + pad_x),
            min(float(height), y2 + 1 + pad_y),
        )
        if box[2] - box[0] < 1 or box[3] - box[1] < 1:
            box = (0.0, 0.0, float(width), float(height))  # an ROI outside the image: keep the whole image
    resized = image.resize((size, size), Image.Resampling.BILINEAR, box=box)
    return np.frombuffer(resized.tobytes(), dtype=np.uint8).reshape(size, size, 3)


def decode_samples(
    samples: Sequence[Sample],
    size: int,
    margin: float = 0.0,
    *,
    workers: int = 0,
    progress: bool = False,
) -> DecodedImages:
    """Hash and decode every sample once, in ``workers`` processes (0: one per CPU core)."""
    n = len(samples)
    images = np.zeros((n, size, size, 3), dtype=np.uint8)
    sizes = np.zeros((n, 2), dtype=np.int32)
    file_stats = np.zeros((n, 2), dtype=np.int64)
    digests = [""] * n
    failures: dict[int, str] = {}
    tasks = [
        ([(s.file, s.roi) for s in samples[i : i + _CHUNK]], i, size, margin) for i in range(0, n, _CHUNK)
    ]
    workers = workers or os.cpu_count() or 1
    bar = tqdm(total=n, desc="decode", unit="img", disable=not progress, file=sys.stderr)
    with bar:
        if workers == 1 or len(tasks) <= 1:
            results = map(_decode_chunk, tasks)
            for result in results:
                _store(result, images, sizes, file_stats, digests, failures)
                bar.update(len(result[2]))
        else:
            with ProcessPoolExecutor(workers, mp_context=_mp_context()) as pool:
                for result in pool.map(_decode_chunk, tasks):
                    _store(result, images, sizes, file_stats, digests, failures)
                    bar.update(len(result[2]))
    return DecodedImages(images, sizes, digests, file_stats, failures)


def _mp_context() -> mp.context.BaseContext:
    # fork starts workers in milliseconds; the workers use only PIL and numpy, never torch's thread pools.
    return mp.get_context("fork" if sys.platform == "linux" else "spawn")


_ChunkResult = tuple[int, np.ndarray, list[str], np.ndarray, np.ndarray, dict[int, str]]


def _decode_chunk(task: tuple[list[tuple[str, Roi | None]], int, int, float]) -> _ChunkResult:
    items, start, size, margin = task
    out = np.zeros((len(items), size, size, 3), dtype=np.uint8)
    sizes = np.zeros((len(items), 2), dtype=np.int32)
    file_stats = np.zeros((len(items), 2), dtype=np.int64)
    digests = [""] * len(items)
    failures: dict[int, str] = {}
    for i, (path, roi) in enumerate(items):
        try:
            with open(path, "rb") as fh:
                st = os.fstat(fh.fileno())  # for the hash index: saves a second stat() pass over every file
                data = fh.read()
        except OSError as exc:
            failures[start + i] = f"unreadable: {exc.strerror or exc}"
            continue
        digests[i] = hashlib.sha256(data).hexdigest()
        file_stats[i] = (st.st_size, st.st_mtime_ns)
        try:
            image = open_image(data)
            out[i] = preprocess(image, size, roi, margin)
        except CorruptImageError as exc:
            failures[start + i] = str(exc)
            continue
        sizes[i] = image.size
    return start, out, digests, sizes, file_stats, failures


def _store(
    result: _ChunkResult,
    images: np.ndarray,
    sizes: np.ndarray,
    file_stats: np.ndarray,
    digests: list[str],
    failures: dict[int, str],
) -> None:
    start, out, chunk_digests, chunk_sizes, chunk_file_stats, chunk_failures = result
    images[start : start + len(out)] = out
    sizes[start : start + len(out)] = chunk_sizes
    file_stats[start : start + len(out)] = chunk_file_stats
    digests[start : start + len(out)] = chunk_digests
    failures.update(chunk_failures)


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
