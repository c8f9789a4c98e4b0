"""Decode an image file or upload into the model's pixels, the one way prepare, serve and monitor all do it.

``open_header`` reads and checks an image's header before any pixel is decoded (empty, unknown, unsupported and
oversized input is refused there, and a large JPEG is set to decode at reduced scale); ``decode_image`` decodes it,
8-bit RGB and upright by its EXIF orientation; ``frame_pixels`` resizes a whole image to the model's input side,
as the server does an upload and prepare every dataset image; ``preprocess`` crops a region (ROI) and resizes.
The errors are ``CorruptImageError`` and its kinds, each a ``ValueError`` with a one-line message.
"""

from __future__ import annotations

import io
import re
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps

from signpost.data.layouts import Roi

# Decompression-bomb guard: GTSRB images are at most 250x250; a photo dataset may be larger, but not this large.
MAX_PIXELS = 50_000_000
_PPM_HEADER = re.compile(rb"P6\s+(\d+)\s+(\d+)\s+255\s")
# The EXIF Orientation tag: 1 is upright as stored; 2-8 mirror and/or rotate (3: 180°, 6: 90° clockwise, 8: 90°
# anticlockwise; 5-8 swap width and height). Cameras and phones store pixels as the sensor read them and set this.
EXIF_ORIENTATION = 0x0112
FULL_SCALE_SIDE = 256  # pixels: full_scale_side's floor, so GTSRB-sized images (at most 250 x 250) are never reduced


class CorruptImageError(ValueError):
    """An image file that cannot be decoded."""


class ImageTooLargeError(CorruptImageError):
    """An image whose declared size is over the pixel limit (a decompression bomb, or just too big)."""


class NotAnImageError(CorruptImageError):
    """Bytes that are not an image in any format Pillow reads."""


class UnsupportedImageError(CorruptImageError):
    """An image in a format outside the accepted ``formats``."""


@dataclass
class PendingImage:
    """An image whose header has been read and checked, nothing decoded yet: ``decode_image`` decodes it."""

    image: Image.Image  # opened lazily; a JPEG larger than needed is already set to decode at reduced scale
    size: tuple[int, int]  # width, height as stored in the file, before any reduction
    pixels: int  # width x height that decoding it will produce


@dataclass
class DecodedImage:
    """A decoded image, upright, and what it was before."""

    image: Image.Image  # 8-bit RGB, turned upright by its EXIF orientation
    size: tuple[int, int]  # width, height of the image as sent, upright (before any reduced-scale decoding)
    orientation: int  # the EXIF orientation applied: 1 (none, or no EXIF) to 8


def open_image(data: bytes, *, max_pixels: int = MAX_PIXELS, formats: frozenset[str] | None = None) -> Image.Image:
    """Decode image bytes to an upright RGB PIL image, refusing empty, truncated, unknown or oversized input.

    The size is checked from the header, before any pixel is decoded. ``formats``: Pillow format names to accept
    (e.g. ``{"PNG", "JPEG"}``); None accepts any format Pillow reads.
    """
    return decode_image(open_header(data, max_pixels=max_pixels, formats=formats)).image


def open_header(
    data: bytes, *, max_pixels: int = MAX_PIXELS, formats: frozenset[str] | None = None, min_side: int | None = None
) -> PendingImage:
    """Read and check an image's header, decoding no pixel: empty, unknown, unsupported (``formats``: Pillow format
    names, None: any) and oversized input is refused here, at the cost of a few microseconds.

    ``min_side``: a JPEG larger than that on both sides is set to decode at 1/2, 1/4 or 1/8 scale (Pillow's draft
    mode: the scaling happens in the inverse DCT, so it skips most of a full decode's work), never below ``min_side``
    pixels on either side. ``max_pixels`` bounds what will be decoded, after that reduction.
    """
    if not data:
        raise CorruptImageError("empty file")
    fast = _PPM_HEADER.match(data)
    if fast is not None and (formats is None or "PPM" in formats):
        # GTSRB is 50,000 small binary PPMs: reading the header here skips PIL's format probing (~20 µs/image).
        width, height = int(fast[1]), int(fast[2])
        start, need = fast.end(), int(fast[1]) * int(fast[2]) * 3
        if width * height > max_pixels:
            raise ImageTooLargeError(f"image too large ({width}x{height} pixels, limit {max_pixels:,})")
        if width > 0 and height > 0 and len(data) - start >= need:
            image = Image.frombuffer("RGB", (width, height), data[start : start + need], "raw", "RGB", 0, 1)
            return PendingImage(image, (width, height), width * height)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
        if formats is not None and image.format not in formats:
            raise UnsupportedImageError(
                f"unsupported image format {image.format}; accepted: {', '.join(sorted(formats))}"
            )
        size = image.size
        if min_side is not None:
            image.draft(None, (min_side, min_side))  # JPEG (and its MPO kin) only; other formats ignore it
        width, height = image.size
        if width * height > max_pixels:
            reduced = f", {width}x{height} at the smallest scale a JPEG decodes to" if image.size != size else ""
            raise ImageTooLargeError(f"image too large ({size[0]}x{size[1]} pixels{reduced}; limit {max_pixels:,})")
    except CorruptImageError:
        raise
    except Image.UnidentifiedImageError:
        raise NotAnImageError("not an image in any format Pillow reads") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageTooLargeError(
            f"image too large (its header declares over {Image.MAX_IMAGE_PIXELS:,} pixels; limit {max_pixels:,})"
        ) from None
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        raise CorruptImageError(f"cannot decode (corrupt or truncated): {exc}") from None
    return PendingImage(image, size, width * height)


def decode_image(pending: PendingImage) -> DecodedImage:
    """Decode an image ``open_header`` checked: 8-bit RGB, turned upright by its EXIF orientation
    (``ImageOps.exif_transpose``), so that a photo taken sideways is seen as it is shown, at prepare time and when
    served alike."""
    image = pending.image
    try:
        image.load()  # the size was checked from the header (open_header)
    except Image.DecompressionBombError as exc:
        raise ImageTooLargeError(f"image too large: {exc}") from None
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        raise CorruptImageError(f"cannot decode (corrupt or truncated): {exc}") from None
    orientation = _orientation(image)  # after load: a PNG's eXIf chunk may follow its pixels
    if orientation != 1:
        try:
            image = ImageOps.exif_transpose(image)
        except Exception as exc:  # it rewrites the EXIF block too, and a hostile one can fail in many ways
            raise CorruptImageError(f"cannot apply its EXIF orientation {orientation}: {type(exc).__name__}") from None
    width, height = pending.size
    if orientation >= 5:  # orientations 5-8 turn the image a quarter: width and height swap
        width, height = height, width
    return DecodedImage(_to_rgb(image), (width, height), orientation)


def _orientation(image: Image.Image) -> int:
    """The image's EXIF orientation, 1-8; 1 when it has none (or made from raw pixels: no metadata at all)."""
    if image.format is None:
        return 1
    try:
        value = image.getexif().get(EXIF_ORIENTATION, 1)
    except Exception:  # a malformed EXIF block, in any of the ways Pillow reports it: the pixels are still good
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


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


def full_scale_side(size: int) -> int:
    """The side, in pixels, below which an image for a model of input side ``size`` is never reduced before it is
    resized (``frame_pixels``), and to which ``open_header`` may draft-decode a large JPEG."""
    return max(FULL_SCALE_SIDE, 2 * size)


def frame_pixels(decoded: DecodedImage, size: int) -> np.ndarray:
    """What a model of input side ``size`` is given for a whole image: uint8 ``[size, size, 3]``.

    This is the server's decode of an upload (``signpost.serve.uploads``) and prepare's of every dataset image alike,
    so the val and test splits hold the very pixels a client's file is classified from. An image whose shorter side
    is at least twice ``full_scale_side`` is box-averaged by an integer factor first (an antialiased resize from
    megapixels costs ~10x more); GTSRB-sized images are resized whole, as they are.
    """
    image = decoded.image
    factor = min(image.size) // full_scale_side(size)
    if factor >= 2:
        image = image.reduce(factor)
    return preprocess(image, size)

