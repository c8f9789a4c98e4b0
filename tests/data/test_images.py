"""Image decoding (``signpost.data.images``): every colour mode a dataset holds comes out 8-bit RGB, 16-bit grey
keeps its brightness, transparency is composited on black. Hostile and sideways images are
``tests/security/test_decoding``'s.
"""

from __future__ import annotations

import io

import layout_writers as lw
import numpy as np
import pytest
from PIL import Image

from signpost.data.images import open_image


def assert_close(actual: np.ndarray, colour: tuple[int, int, int], tol: float, what: str) -> None:
    diff = np.abs(actual.astype(np.int64) - np.asarray(colour, dtype=np.int64)).max()
    assert diff <= tol, f"{what}: {actual.tolist()} is not {colour} (off by {diff}, allowed {tol})"


@pytest.mark.parametrize(("suffix", "mode"), lw.IMAGEFOLDER_FORMATS)
def test_every_mode_decodes_to_rgb(suffix: str, mode: str) -> None:
    inside, outside = (220, 40, 90), (10, 20, 5)
    data = lw.encode(lw.draw((64, 48), (10, 8, 53, 39), inside, outside), suffix, mode)
    with Image.open(io.BytesIO(data)) as stored:
        assert stored.mode == mode or suffix.lower() in (".gif", ".jpg", ".jpeg", ".webp")
    image = open_image(data)
    assert image.mode == "RGB"
    pixels = np.asarray(image)
    assert pixels.shape == (48, 64, 3)
    tol = 16 if suffix.lower() in lw.LOSSY_SUFFIXES else 0
    assert_close(pixels[24, 32], lw.through_mode(inside, mode), tol, f"{suffix} {mode} inside")
    assert_close(pixels[2, 2], lw.through_mode(outside, mode), tol, f"{suffix} {mode} outside")


def test_16_bit_grayscale_png_keeps_its_brightness() -> None:
    pixels = np.full((24, 30), 30000, dtype=np.uint16)  # 30000 / 65535 ≈ 117 / 255
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    image = open_image(out.getvalue())
    assert image.mode == "RGB"
    assert_close(np.asarray(image)[5, 5], (117, 117, 117), 2, "16-bit grey")


def test_transparent_pixels_are_composited_on_black() -> None:
    pixels = np.zeros((8, 8, 4), dtype=np.uint8)
    pixels[..., :3] = (200, 100, 50)
    pixels[:4, ..., 3] = 255  # top half opaque, bottom half fully transparent
    out = io.BytesIO()
    Image.fromarray(pixels, "RGBA").save(out, format="PNG")
    decoded = np.asarray(open_image(out.getvalue()))
    assert_close(decoded[1, 1], (200, 100, 50), 0, "opaque")
    assert_close(decoded[6, 6], (0, 0, 0), 0, "transparent")
