"""Uploads, from the request to the pixels: the body read within its size limit and deadline, multipart forms
parsed, images decoded within a budget, apart from inference. Nothing here knows the app: every limit is an argument,
and every refusal is a ``Refused`` naming the HTTP status, an error code and the setting to change.

Reading (``read_images``): the Content-Type must be an image, ``application/octet-stream`` or a multipart form (else
415); a body declared or streamed past ``serve.max_upload_bytes`` is refused with 413 as soon as that is known; the
whole body must arrive within ``serve.body_timeout_s`` (else 408, and the connection is closed); a client that leaves
before the end is ``ClientAborted``, not an error to answer. A form's files are its images, at most
``serve.max_batch_images`` of them.

Decoding: a 73 KB PNG can declare 25 megapixels: decoding it holds a core for a quarter of a second to two seconds,
and done in the batcher's worker it held up every request queued behind it. So the server decodes in two steps:

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

Decoding and resizing are ``signpost.data.images``' own (``decode_image`` then ``frame_pixels``), which ``prepare``
uses for every dataset image too: the val and test splits hold exactly the pixels an upload of the same file is
classified from, so ``signpost evaluate --served`` finds served and evaluated answers equal. An image whose shorter
side is at least twice ``full_scale_side`` (512 pixels for a 32-pixel model) is reduced first (draft, then
``Image.reduce``, both averaging). Every image is turned upright by its EXIF orientation, as at prepare time, and
the orientation is logged with the prediction.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, MutableMapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect, Request

from signpost.data.images import (
    CorruptImageError,
    ImageTooLargeError,
    NotAnImageError,
    PendingImage,
    UnsupportedImageError,
    decode_image,
    frame_pixels,
    full_scale_side,
    open_header,
)

RAW_TYPES = ("image/", "application/octet-stream")  # a raw body of these media types is one image
# Formats a camera or a client library sends; others (PSD, ICO, EPS, ...) are refused by name.
IMAGE_FORMATS = frozenset({"JPEG", "PNG", "PPM", "BMP", "WEBP", "GIF", "TIFF"})
# A request with more pixels to decode than this (512 x 512: ~3 ms on a 2-core EPYC, ~25 ms for 1024 x 1024 there)
# goes to the DecodePool; 64 GTSRB-sized images (~50 x 50 on average) stay beside the forward pass.
INLINE_PIXELS = 512 * 512


class Refused(Exception):
    """An upload the server will not classify: the HTTP status, error code, message and headers to answer with."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers


class ClientAborted(Exception):
    """The client closed its connection before its request was read whole: nothing to answer, not a server error."""

    def __init__(self, received: int) -> None:
        super().__init__(f"closed the connection after {received:,} bytes of the body")
        self.received = received  # bytes of the body that had arrived


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


def content_type(request: Request) -> str:
    """The request's media type, lower case, without parameters (``multipart/form-data``, ``image/png``, ...)."""
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


async def read_images(
    request: Request, *, limit: int, max_images: int, timeout_s: float,
    on_timeout: Callable[[int], None] = lambda received: None,
) -> list[bytes]:
    """The uploaded image bytes: the raw body, or the files of a multipart form (at most ``max_images``). The body
    is read by ``read_body`` (``limit`` bytes, ``timeout_s`` seconds); ``Refused`` says what was wrong."""
    kind = content_type(request)
    if not kind.startswith("multipart/form-data") and not kind.startswith(RAW_TYPES):
        raise Refused(415, "unsupported_media_type", f"Content-Type {kind or '(none)'!r} is not accepted: send an "
                      "image (image/jpeg, image/png, ... or application/octet-stream) or multipart/form-data")
    body = await read_body(request, limit, timeout_s=timeout_s, on_timeout=on_timeout)
    if not body:
        raise Refused(400, "empty_body", "the request has no body: send the image bytes")
    if not kind.startswith("multipart/form-data"):
        return [body]
    form = await _parse_form(request, body, limit, max_images)
    files = [value for _, value in form.multi_items() if isinstance(value, UploadFile)]
    if not files:
        raise Refused(400, "no_files", "the multipart form holds no files: attach the image(s) as file fields")
    if len(files) > max_images:
        raise Refused(413, "too_many_images", f"{len(files)} images in one request; the limit is {max_images} "
                      "(serve.max_batch_images)")
    return [await f.read() for f in files]


async def read_body(
    request: Request, limit: int, *, timeout_s: float, on_timeout: Callable[[int], None] = lambda received: None
) -> bytes:
    """The body, refused with 413 as soon as it is known to be over ``limit`` bytes (declared or streamed), and
    with 408 when it has not arrived whole within ``timeout_s`` seconds (``serve.body_timeout_s``; ``on_timeout`` is
    told how many bytes had arrived). A client that leaves before the end is ``ClientAborted``."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise Refused(400, "bad_content_length", f"Content-Length {declared[:40]!r} is not a number")
        if int(declared) > limit:
            raise Refused(413, "payload_too_large", f"the body is {int(declared):,} bytes; the limit is {limit:,} "
                          "(serve.max_upload_bytes)")
    chunks: list[bytes] = []
    total = 0

    async def read() -> None:
        nonlocal total
        async for chunk in request.stream():
            total += len(chunk)
            if total > limit:
                raise Refused(413, "payload_too_large", f"the body is over the limit of {limit:,} bytes "
                              "(serve.max_upload_bytes)")
            chunks.append(chunk)

    try:
        # One deadline for the whole body: a client sending a byte now and then never trips a per-read timeout.
        await asyncio.wait_for(read(), timeout_s)
    except asyncio.TimeoutError:
        on_timeout(total)
        raise Refused(408, "body_timeout", f"the body did not arrive within {timeout_s:g} s "
                      "(serve.body_timeout_s): send it in one go, or a smaller image", {"Connection": "close"}) \
            from None
    except ClientDisconnect:
        raise ClientAborted(total) from None
    return b"".join(chunks)


async def _parse_form(request: Request, body: bytes, limit: int, max_images: int) -> Any:
    sent = False

    async def replay() -> MutableMapping[str, Any]:  # the body was already read (and capped): hand it over again
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        return await Request(request.scope, replay).form(max_files=max_images + 1, max_fields=max_images + 16,
                                                          max_part_size=limit)
    except StarletteHTTPException as exc:  # the parser's own 400s (too many files, a malformed form)
        raise Refused(400, "bad_multipart", f"malformed multipart form: {exc.detail}") from None
    except Exception as exc:
        raise Refused(400, "bad_multipart", f"malformed multipart form: {exc}") from None


def open_request(blobs: list[bytes], *, size: int, max_pixels: int) -> list[PendingImage]:
    """Every image's header, checked (``Refused`` names the first bad image); a large JPEG set to decode at reduced
    scale. Nothing is decoded."""
    pending: list[PendingImage] = []
    try:
        for data in blobs:
            pending.append(open_header(data, max_pixels=max_pixels, formats=IMAGE_FORMATS,
                                       min_side=full_scale_side(size)))
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
    i = 0
    try:
        for i, item in enumerate(pending):
            decoded = decode_image(item)
            images[i] = frame_pixels(decoded, size)
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

