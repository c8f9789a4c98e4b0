"""Attacks on the service through its HTTP interface: every bad upload and every multipart abuse is a named 4xx
and the service keeps serving; a tampered model is refused and a pickled one never unpickled; the API key guards
the prediction routes."""

from __future__ import annotations

import io
import pickle
import shutil
import struct
import zlib
from pathlib import Path

import pytest
from PIL import Image

from signpost.artifacts import write_manifest
from signpost.models.artifact import CARD, WEIGHTS
from tests.serve.conftest import image_bytes


def _png_declaring(width: int, height: int) -> bytes:
    """A PNG whose header declares ``width`` x ``height`` (a decompression bomb's signature), with a tiny body."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(
        b"IEND", b"")


def _flipped(data: bytes) -> bytes:
    """``data`` with bytes in the middle inverted: a valid header over a broken body."""
    middle = len(data) // 2
    return data[:middle] + bytes(255 - b for b in data[middle : middle + 64]) + data[middle + 64 :]


def _ico() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 0, 0)).save(buffer, "ICO")
    return buffer.getvalue()


BAD_INPUTS = {
    # name: (body, content type, status, error code)
    "empty body": (b"", "image/png", 400, "empty_body"),
    "not an image": (b"hello, this is text and not a picture", "image/png", 400, "not_an_image"),
    "truncated image": (image_bytes("PNG", (64, 64))[:300], "image/png", 400, "corrupt_image"),
    "corrupt image": (_flipped(image_bytes("PNG", (64, 64))), "image/png", 400, "corrupt_image"),
    "unsupported format": (_ico(), "image/x-icon", 415, "unsupported_image"),
    "decompression bomb": (_png_declaring(100_000, 100_000), "image/png", 413, "image_too_large"),
    "over the size limit": (b"\0" * (200 * 1024), "image/png", 413, "payload_too_large"),
    "wrong content type": (image_bytes(), "application/json", 415, "unsupported_media_type"),
    "no content type": (image_bytes(), "", 415, "unsupported_media_type"),
    "malformed multipart": (b"--x\r\nnot a part", "multipart/form-data; boundary=x", 400, None),
}


@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_bad_input_is_a_named_4xx_and_the_service_keeps_serving(make_client, name: str) -> None:
    client = make_client(None, "serve.max_upload_bytes=102400")
    body, kind, status, code = BAD_INPUTS[name]
    headers = {"Content-Type": kind} if kind else {}
    answer = client.post("/v1/predict", content=body, headers=headers)
    assert answer.status_code == status, answer.text
    error = answer.json()["error"]
    assert error["message"] and "Traceback" not in answer.text
    if code:
        assert error["code"] == code
    good = client.post("/v1/predict", content=image_bytes(), headers={"Content-Type": "image/png"})
    assert good.status_code == 200


def test_batches_over_the_limit_and_bad_images_in_a_batch_are_4xx(make_client) -> None:
    client = make_client(None, "serve.max_batch_images=2")
    files = [("f", (f"{i}.png", image_bytes(seed=i), "image/png")) for i in range(3)]
    answer = client.post("/v1/predict/batch", files=files)
    assert answer.status_code == 413 and answer.json()["error"]["code"] == "too_many_images"
    files = [("f", ("good.png", image_bytes(), "image/png")), ("f", ("bad.png", b"junk", "image/png"))]
    answer = client.post("/v1/predict/batch", files=files)
    assert answer.status_code == 400 and "image 1" in answer.json()["error"]["message"]
    answer = client.post("/v1/predict/batch", content=image_bytes(), headers={"Content-Type": "image/png"})
    assert answer.status_code == 415
    two = [("f", ("a.png", image_bytes(), "image/png")), ("g", ("b.png", image_bytes(seed=1), "image/png"))]
    assert client.post("/v1/predict", files=two).json()["error"]["code"] == "one_image_expected"
    assert client.get("/v1/predict").status_code == 405
    assert client.get("/nowhere").json()["error"]["code"] == "not_found"


def test_a_tampered_model_is_refused_and_not_ready(make_client, optimized: dict, tmp_path: Path) -> None:
    folder = Path(shutil.copytree(optimized["model_dir"], tmp_path / "tampered"))
    with open(folder / WEIGHTS, "r+b") as fh:
        fh.seek(-4, 2)
        fh.write(b"\1\2\3\4")
    client = make_client(folder, ready=False)
    for _ in range(200):
        ready = client.get("/readyz")
        if "does not match its manifest" in ready.json()["detail"]:
            break
        client.get("/healthz")
    assert ready.status_code == 503 and "does not match its manifest" in ready.json()["detail"]
    answer = client.post("/v1/predict", content=image_bytes(), headers={"Content-Type": "image/png"})
    assert answer.status_code == 503 and answer.json()["error"]["code"] == "not_ready"
    assert client.get("/healthz").status_code == 200


class _Payload:
    """Unpickling this would create a file: the proof that something was unpickled."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple:
        return (Path.touch, (self.path,))


def test_a_pickled_model_is_never_unpickled(make_client, optimized: dict, tmp_path: Path) -> None:
    folder = tmp_path / "pickled"
    folder.mkdir()
    marker = tmp_path / "unpickled"
    (folder / WEIGHTS).write_bytes(pickle.dumps({"weight": _Payload(marker)}))
    shutil.copy(optimized["model_dir"] / CARD, folder / CARD)
    write_manifest(folder, stage="train", key="forged", inputs={}, config={}, code="x")  # a forger rehashes too
    client = make_client(folder, ready=False)
    for _ in range(200):
        detail = client.get("/readyz").json()["detail"]
        if detail != "loading the model":
            break
    assert "not a safetensors file" in detail, detail
    assert not marker.exists()


def test_api_key_guards_prediction_routes_only(make_client) -> None:
    client = make_client(None, api_key="s3cret-key")
    image = image_bytes()
    png = {"Content-Type": "image/png"}
    assert client.post("/v1/predict", content=image, headers=png).status_code == 401
    wrong = client.post("/v1/predict", content=image, headers=png | {"X-API-Key": "s3cret-kez"})
    assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "unauthorized"
    assert client.post("/v1/predict", content=image, headers=png | {"X-API-Key": "s3cret-key"}).status_code == 200
    bearer = png | {"Authorization": "Bearer s3cret-key"}
    assert client.post("/v1/predict", content=image, headers=bearer).status_code == 200
    assert client.get("/healthz").status_code == 200 and client.get("/readyz").status_code == 200
