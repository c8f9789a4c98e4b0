"""Decoding uploads within a budget, apart from inference.

A 73 KB PNG can declare 25 megapixels: decoding it holds a core for a quarter of a second to two seconds, and done in
the batcher's worker it held up every request queued behind it. So the server decodes in two steps:

1. ``open_request`` reads each image's header and decodes nothing (microseconds): the format must be one a client
   sends, a JPEG larger than the model needs is set to decode at 1/2, 1/4 or 1/8 scale (Pillow's draft mode), and
   what is left to decode must fit ``serve.max_image_pixels``, else 413 naming the setting.
2. A request with at most ``INLINE_PIXELS`` to decode is decoded there and then, in the batcher's worker beside the
   forward pass, as before: GTSRB's images are at most 250 x 250 (~0.1 ms each). A larger one goes back to its
   request handler as ``Large``; the handler has it decoded in the ``DecodePool`` (``serve.decode_workers`` threads
   of its own; Pillow releases the GIL while it decodes and resizes) and sends the pixels through the batcher again.
   At most ``serve.max_decode_queue`` large requests wait or decode there; the next one is refused at once (503 with
   Retry-After). A flood of large images thus takes at most ``decode_workers`` cores and queues behind itself, never
   in front of a small request.

An image whose shorter side is under twice ``min_side`` (512 pixels for a 32-pixel model) is decoded and resized
exactly as ``prepare`` does, so the model sees the pixels it was trained on; a larger one is reduced first (draft,
then ``Image.reduce``, both averaging), which changes what an antialiased resize alone would give by a level or so.
Every image is turned upright by its EXIF orientation (``signpost.data.cache.decode_image``), as at prepare time,
and the orientation is logged with the prediction.
"""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from signpost.data.cache import (
    CorruptImageError,
    ImageTooLargeError,
    NotAnImageError,
    PendingImage,
    UnsupportedImageError,
    decode_image,
    open_header,
    preprocess,
)

# Formats a camera or a client library sends; others (PSD, ICO, EPS, ...) are refused by name.
IMAGE_FORMATS = frozenset({"JPEG", "PNG", "PPM", "BMP", "WEBP", "GIF", "TIFF"})
# A request with more pixels to decode than this (512 x 512: ~3 ms on a 2-core EPYC, ~25 ms for 1024 x 1024 there)
# goes to the DecodePool; 64 GTSRB-sized images (~50 x 50 on average) stay beside the forward pass.
INLINE_PIXELS = 512 * 512
FULL_SCALE_SIDE = 256  # pixels: min_side's floor, so GTSRB-sized images (at most 250 x 250) are never reduced


class Refused(Exception):
    """An upload the server will not classify: the HTTP status, error code and message to answer with."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


class DecoderBusy(RuntimeError):
    """The decode pool holds its maximum number of large requests."""


@dataclass(frozen=True)
class Decoded:
    """One request's images, decoded: what the model is given and the prediction log is told."""

    images: np.ndarray  # uint8 [n, S, S, 3], as the model sees them
    sizes: np.ndarray  # int64 [n, 2]: width, height of each image as sent, upright
    orientations: np.ndarray  # int64 [n]: the EXIF orientation each was turned upright by (1: none)


@dataclass(frozen=True)
class Large:
    """A request with too much to decode beside the forward pass: its checked headers, for the ``DecodePool``."""

    images: list[PendingImage]
    size: int  # the model's input side when the headers were read


def min_side(size: int) -> int:
    """The side, in pixels, below which an image for a model of input side ``size`` is never reduced."""
    return max(FULL_SCALE_SIDE, 2 * size)


def open_request(blobs: list[bytes], *, size: int, max_pixels: int) -> list[PendingImage]:
    """Every image's header, checked (``Refused`` names the first bad image); a large JPEG set to decode at reduced
    scale. Nothing is decoded."""
    pending: list[PendingImage] = []
    try:
        for data in blobs:
            pending.append(open_header(data, max_pixels=max_pixels, formats=IMAGE_FORMATS, min_side=min_side(size)))
    except Exception as exc:
        raise _refusal(exc, len(pending), len(blobs)) from None
    return pending


def is_large(pending: list[PendingImage]) -> bool:
    """Whether a request has too much to decode beside the forward pass."""
    return sum(p.pixels for p in pending) > INLINE_PIXELS


def decode(pending: list[PendingImage], size: int) -> Decoded:
    """Decode, turn upright and resize a request's checked images to ``size`` x ``size``; ``Refused`` names the first
    that fails."""
    images = np.empty((len(pending), size, size, 3), dtype=np.uint8)
    sizes = np.empty((len(pending), 2), dtype=np.int64)
    orientations = np.empty(len(pending), dtype=np.int64)
    smallest = min_side(size)
    i = 0
    try:
        for i, item in enumerate(pending):
            decoded = decode_image(item)
            image = decoded.image
            factor = min(image.size) // smallest
            if factor >= 2:  # a box average first: an antialiased resize from megapixels costs ~10x more
                image = image.reduce(factor)
            images[i] = preprocess(image, size)
            sizes[i] = decoded.size
            orientations[i] = decoded.orientation
    except Exception as exc:
        raise _refusal(exc, i, len(pending)) from None
    return Decoded(images, sizes, orientations)


def _refusal(exc: Exception, index: int, count: int) -> Refused:
    """The answer to a client whose image ``index`` (of ``count``) failed to decode with ``exc``."""
    which = f"image {index}: " if count > 1 else ""
    if isinstance(exc, ImageTooLargeError):
        return Refused(413, "image_too_large", f"{which}{exc} (serve.max_image_pixels): send it scaled down, or as "
                       "a JPEG, which is decoded at up to 1/8 scale")
    if isinstance(exc, UnsupportedImageError):
        return Refused(415, "unsupported_image", f"{which}{exc}")
    if isinstance(exc, NotAnImageError):
        return Refused(400, "not_an_image", f"{which}{exc}")
    if isinstance(exc, CorruptImageError):
        return Refused(400, "corrupt_image", f"{which}{exc}")
    # Pillow raises more kinds than it documents on hostile input
    return Refused(400, "corrupt_image", f"{which}cannot decode: {type(exc).__name__}")


class DecodePool:
    """Decodes large requests in ``workers`` threads of its own, at most ``max_queue`` requests at a time (waiting
    or decoding); past that, ``decode`` raises ``DecoderBusy`` at once instead of letting the queue grow."""

    def __init__(self, workers: int, max_queue: int) -> None:
        self.max_queue = max_queue
        self.queued = 0  # requests taken and not finished: one whose client gave up counts until its decode ends
        self._lock = threading.Lock()  # queued is counted up on the event loop and down in the decode threads
        self._executor = ThreadPoolExecutor(workers, thread_name_prefix="signpost-decode")

    async def decode(self, large: Large) -> Decoded:
        """Decode ``large`` in the pool (``Refused`` for a bad image, ``DecoderBusy`` when the pool is full)."""
        with self._lock:
            if self.queued >= self.max_queue:
                raise DecoderBusy(f"{self.queued} large uploads are being decoded or waiting "
                                  f"(serve.max_decode_queue={self.max_queue})")
            self.queued += 1
        future = self._executor.submit(decode, large.images, large.size)
        future.add_done_callback(self._finished)
        # Cancelled (the request timed out): a decode not started yet is dropped, one under way runs to its end.
        return await asyncio.wrap_future(future)

    def _finished(self, _future: Future) -> None:
        with self._lock:
            self.queued -= 1

    def close(self) -> None:
        """Drop the waiting decodes; those under way finish in their threads."""
        self._executor.shutdown(wait=False, cancel_futures=True)

