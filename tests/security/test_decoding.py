"""Image decoding under attack and from cameras (issue 13, items 5 and 6).

A 25-megapixel image that compresses to ~80 KB must not hold up the requests behind it: it is refused by the pixel
limit, or decoded at reduced scale, or decoded in a pool of its own while small requests are answered. A photo
stored sideways with an EXIF orientation must be seen upright when served, prepared and folded in as feedback.
"""

from __future__ import annotations

import glob
import io
import sqlite3
import struct
import threading
import zlib
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import ExifTags, Image, ImageFile, ImageOps

from signpost.data.cache import decode_samples, load_split
from signpost.data.images import open_image
from signpost.data.layouts import Sample
from signpost.serve import predlog, predlog_writer
from signpost.serve.app import create_app
from signpost.stages.feedback import store_feedback
from signpost.stages.prepare import prepare
from tests.conftest import local_config
from tests.security.served import Served, make_config, small_model
from tests.serve.conftest import image_bytes

BIG = 5000  # pixels a side: 25 megapixels
HELD_PIXELS = 20_000_000  # the held_decodes fixture holds the decoding of images at least this large


@pytest.fixture(scope="module")
def big_png() -> bytes:
    """A flat 5000 x 5000 PNG: ~80 KB that decode to 75 MB of pixels."""
    buffer = io.BytesIO()
    Image.new("RGB", (BIG, BIG), (180, 40, 40)).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    torch.manual_seed(0)  # the same untrained weights every run: its classes are the same every run
    return small_model(tmp_path / "model")


class HeldDecodes:
    """Decoding of any image of ``HELD_PIXELS`` or more starts, then waits until the test lets it go: such an image
    is 'being decoded' for as long as the test needs, on a fast machine as on a slow one."""

    def __init__(self) -> None:
        self.started = threading.Semaphore(0)
        self.go = threading.Event()

    def wait_started(self, timeout: float = 60.0) -> None:
        assert self.started.acquire(timeout=timeout), "no large image started decoding"


@pytest.fixture
def held_decodes(monkeypatch: pytest.MonkeyPatch) -> Iterator[HeldDecodes]:
    held = HeldDecodes()
    load = ImageFile.ImageFile.load

    def held_load(image: ImageFile.ImageFile) -> object:
        if image.size[0] * image.size[1] >= HELD_PIXELS and not getattr(image, "_held", False):
            image._held = True  # type: ignore[attr-defined]
            held.started.release()
            held.go.wait(60)
        return load(image)

    monkeypatch.setattr(ImageFile.ImageFile, "load", held_load)
    yield held
    held.go.set()


def _post(url: str, body: bytes, kind: str = "image/png", timeout: float = 60.0) -> httpx.Response:
    return httpx.post(f"{url}/v1/predict", content=body, headers={"Content-Type": kind}, timeout=timeout)


def _in_background(url: str, body: bytes) -> tuple[threading.Thread, list[httpx.Response]]:
    answers: list[httpx.Response] = []
    thread = threading.Thread(target=lambda: answers.append(_post(url, body)), daemon=True)
    thread.start()
    return thread, answers


def test_small_requests_are_answered_while_large_images_are_being_decoded(
    tmp_path: Path, model_dir: Path, big_png: bytes, held_decodes: HeldDecodes
) -> None:
    # A limit high enough to take the 25-megapixel PNG: it has to be decoded, not refused.
    config = make_config(tmp_path / "work", "serve.max_image_pixels=30000000", "serve.request_timeout_s=60")
    with Served(create_app(config, str(model_dir)), config) as served:
        served.wait_ready()
        large = [_in_background(served.url, big_png) for _ in range(2)]
        held_decodes.wait_started()  # one of them is being decoded now, and stays so until released
        try:
            clean = _post(served.url, image_bytes("PNG", (64, 64)), timeout=15)
        except httpx.TimeoutException:
            pytest.fail("a small image was not answered while a large one was being decoded")
        assert clean.status_code == 200, clean.text
        assert all(thread.is_alive() for thread, _ in large)  # the large ones are still waiting for their pixels
        held_decodes.go.set()
        for thread, answers in large:
            thread.join(60)
            assert answers and answers[0].status_code == 200, answers and answers[0].text


def test_large_images_past_the_decode_queue_get_503_with_retry_after(
    tmp_path: Path, model_dir: Path, big_png: bytes, held_decodes: HeldDecodes
) -> None:
    config = make_config(tmp_path / "work", "serve.max_image_pixels=30000000", "serve.decode_workers=1",
                         "serve.max_decode_queue=1")
    with Served(create_app(config, str(model_dir)), config) as served:
        served.wait_ready()
        thread, answers = _in_background(served.url, big_png)
        held_decodes.wait_started()
        refused = _post(served.url, big_png, timeout=15)
        assert refused.status_code == 503, refused.text
        assert refused.headers["Retry-After"].isdigit()
        assert "serve.max_decode_queue=1" in refused.json()["error"]["message"]
        assert _post(served.url, image_bytes("PNG", (64, 64)), timeout=15).status_code == 200
        held_decodes.go.set()
        thread.join(60)
        assert answers and answers[0].status_code == 200


def test_a_25_megapixel_png_and_a_bomb_are_refused_naming_the_limit_and_a_jpeg_is_decoded_reduced(
    tmp_path: Path, model_dir: Path, big_png: bytes
) -> None:
    big_jpeg = io.BytesIO()
    Image.new("RGB", (BIG, BIG), (180, 40, 40)).save(big_jpeg, "JPEG")
    config = make_config(tmp_path / "work")
    with Served(create_app(config, str(model_dir)), config) as served:
        served.wait_ready()
        limit = f"{config.serve.max_image_pixels:,}"
        for body, declared in ((big_png, f"{BIG}x{BIG}"), (_png_declaring(8000, 8000), "8000x8000"),
                               (_png_declaring(100_000, 100_000), "")):
            answer = _post(served.url, body)
            assert answer.status_code == 413, answer.text
            error = answer.json()["error"]
            assert error["code"] == "image_too_large"
            assert limit in error["message"] and "serve.max_image_pixels" in error["message"]
            assert declared in error["message"]
        # A JPEG this large is decoded at 1/8 scale (625 x 625): within the limit, and cheap.
        answer = _post(served.url, big_jpeg.getvalue(), "image/jpeg")
        assert answer.status_code == 200, answer.text
    logged = _logged(config.workdir / "serve" / "predictions.db")
    assert [(row["width"], row["height"]) for row in logged] == [(BIG, BIG)]


def _png_declaring(width: int, height: int) -> bytes:
    """A PNG whose header declares ``width`` x ``height`` (a decompression bomb's signature), with a tiny body."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(
        b"IEND", b"")


# --- EXIF orientation ---------------------------------------------------------------------------------------------


def _sign(synthetic_root: Path) -> Image.Image:
    """A synthetic traffic sign photo, upright, 96 x 80 (multiples of 16: JPEG blocks line up either way round)."""
    first = sorted(glob.glob(str(synthetic_root / "GTSRB" / "Final_Test" / "Images" / "*.ppm")))[0]
    return Image.open(first).convert("RGB").resize((96, 80))


def _encode(image: Image.Image, fmt: str, orientation: int = 1) -> bytes:
    """``image`` as a camera held sideways stores it: for orientation 6, the pixels a quarter turn anticlockwise and
    the EXIF tag saying "turn a quarter clockwise to show"."""
    stored = image.transpose(Image.Transpose.ROTATE_90) if orientation == 6 else image
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = orientation
    options = {"quality": 100, "subsampling": 0} if fmt == "JPEG" else {}  # JPEG: as close to lossless as it goes
    buffer = io.BytesIO()
    stored.save(buffer, fmt, exif=exif.tobytes(), **options)
    return buffer.getvalue()


def _logged(path: Path) -> list[dict]:
    """The rows of the SQLite prediction log at ``path``."""
    with sqlite3.connect(path) as conn:
        conn.row_factory = sqlite3.Row
        return [dict(row) for row in conn.execute("SELECT * FROM predictions ORDER BY id")]


@pytest.mark.parametrize("orientation", range(2, 9))
def test_every_exif_orientation_is_applied_as_pillow_applies_it(orientation: int) -> None:
    pixels = np.random.default_rng(orientation).integers(0, 256, (40, 64, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = orientation
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG", exif=exif.tobytes())
    expected = ImageOps.exif_transpose(Image.open(io.BytesIO(buffer.getvalue())))
    assert np.array_equal(np.asarray(open_image(buffer.getvalue())), np.asarray(expected))


def test_a_sideways_photo_is_served_as_the_upright_one_and_its_orientation_is_logged(
    tmp_path: Path, model_dir: Path, synthetic_root: Path
) -> None:
    sign = _sign(synthetic_root)
    config = make_config(tmp_path / "work")
    with Served(create_app(config, str(model_dir)), config) as served:
        served.wait_ready()
        answers = {(fmt, o): _post(served.url, _encode(sign, fmt, o), "application/octet-stream").json()
                   for fmt in ("PNG", "JPEG") for o in (1, 6)}
    # PNG is lossless: the same pixels, so the very same scores.
    upright, sideways = answers["PNG", 1], answers["PNG", 6]
    assert [s["class_id"] for s in sideways["top_k"]] == [s["class_id"] for s in upright["top_k"]]
    assert [s["confidence"] for s in sideways["top_k"]] == pytest.approx([s["confidence"] for s in upright["top_k"]],
                                                                         abs=1e-6)
    assert answers["JPEG", 6]["class_id"] == answers["JPEG", 1]["class_id"]
    logged = _logged(config.workdir / "serve" / "predictions.db")
    assert [row["orientation"] for row in logged] == [1, 6, 1, 6]
    assert {(row["width"], row["height"]) for row in logged} == {sign.size}  # upright, as sent


def test_prepare_decodes_a_sideways_photo_upright(tmp_path: Path, synthetic_root: Path) -> None:
    sign = _sign(synthetic_root)
    files = []
    for fmt, suffix in (("PNG", "png"), ("JPEG", "jpg")):
        for o in (1, 6):
            files.append(tmp_path / f"sign-{o}.{suffix}")
            files[-1].write_bytes(_encode(sign, fmt, o))
    decoded = decode_samples([Sample(str(f), 0, "t") for f in files], 32, workers=1)
    assert not decoded.failures
    png_up, png_side, jpeg_up, jpeg_side = decoded.images.astype(np.int16)
    assert np.array_equal(png_side, png_up)
    assert np.abs(jpeg_side - jpeg_up).max() <= 3  # JPEG at quality 100 rounds a little differently either way round
    assert decoded.sizes.tolist() == [list(sign.size)] * 4


def test_feedback_photographed_sideways_is_folded_in_upright(tmp_path: Path, synthetic_root: Path) -> None:
    config = local_config(synthetic_root, tmp_path / "work", "tracking.backend=none")
    data = prepare(config, progress=False)
    sign = _sign(synthetic_root)
    store_feedback(config, data_dir=data.path, images=[("sideways.png", _encode(sign, "PNG", 6), "1")])
    folded = prepare(config, progress=False)
    assert folded.path != data.path
    upright = tmp_path / "upright.png"
    upright.write_bytes(_encode(sign, "PNG", 1))
    expected = decode_samples([Sample(str(upright), 1, "t")], config.data.image_size, workers=1).images[0]
    rows = np.concatenate([load_split(f).images.numpy() for f in sorted(folded.path.glob("*.safetensors"))])
    assert any(np.array_equal(row, expected) for row in rows)


def test_a_prediction_log_made_before_orientation_gains_the_column(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'predictions.db'}"
    predlog.make_engine(url).dispose()
    with sqlite3.connect(tmp_path / "predictions.db") as conn:  # as an older Signpost made it: no migrations yet
        conn.execute("ALTER TABLE predictions DROP COLUMN orientation")
        conn.execute(f"DROP TABLE {predlog.VERSION_TABLE}")
    log = predlog_writer.PredictionLog(url, interval_s=0.05)
    log.add({"ts": 1.0, "request_id": "r", "model_version": "m", "class_id": 0, "class_name": "c", "confidence": 0.9,
             "entropy": 0.1, "top_k": [[0, 0.9]], "latency_ms": 1.0, "width": 8, "height": 8, "orientation": 6,
             "embedding": np.zeros(predlog.EMBEDDING_DIMS), "image": np.zeros((8, 8, 3), np.uint8)})
    log.close()
    assert log.written == 1
    assert [row["orientation"] for row in _logged(tmp_path / "predictions.db")] == [6]
