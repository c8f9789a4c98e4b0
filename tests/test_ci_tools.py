"""tools/ci/: the scripts the mlops workflow runs beside the signpost command (image metadata, the image probe)."""

from __future__ import annotations

import importlib.util
import io
import json
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import ModuleType

import pytest
import torch
from PIL import Image

from signpost.data.cache import CachedSplit, save_split

TOOLS = Path(__file__).resolve().parents[1] / "tools" / "ci"


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"ci_{name}", TOOLS / f"{name}.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_image_meta_reads_the_newest_package_and_labels_the_architecture(tmp_path: Path) -> None:
    folder = tmp_path / "package" / "abc123"
    folder.mkdir(parents=True)
    labels = {"io.signpost.model.version": "v7", "io.signpost.model.runtime": "onnxruntime"}
    manifest = {"inputs": {"model": "int8"},
                "image": {"tags": ["v7", "0123456789ab"], "runtime": "compile", "labels": labels}}
    (folder / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
    meta = _load("image_meta").image_meta(tmp_path / "package", "arm64")
    assert meta["context"] == str(folder / "context") and meta["version"] == "v7"
    assert meta["tags"] == "v7 0123456789ab"
    assert meta["labels"].splitlines()[:3] == [
        "io.signpost.variant=int8", "io.signpost.model.runtime=compile", "io.signpost.platform=linux/arm64"]


def test_image_meta_names_the_missing_package(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="run `signpost package` first"):
        _load("image_meta").image_meta(tmp_path, "amd64")


@pytest.fixture
def prepared(tmp_path: Path) -> Path:
    """A prepared data folder whose five test images are plain grey levels 0, 40, ..., 160 with labels 0..4."""
    n = 5
    images = torch.stack([torch.full((3, 8, 8), 40 * i, dtype=torch.uint8) for i in range(n)])
    split = CachedSplit(images=images, labels=torch.arange(n), tracks=torch.zeros(n, dtype=torch.int64),
                        sizes=torch.full((n, 2), 8, dtype=torch.int32), stats=torch.zeros(n, 1))
    save_split(split, tmp_path / "test.safetensors")
    return tmp_path


@contextmanager
def _serve(answer: Callable[[int], dict]) -> Iterator[str]:
    """A stand-in for the image on 127.0.0.1: ready for model v7, answering each PNG with answer(its grey level)."""

    class Handler(BaseHTTPRequestHandler):
        def _json(self, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            self._json({"status": "ready", "model_version": "v7"})

        def do_POST(self) -> None:
            png = self.rfile.read(int(self.headers["Content-Length"]))
            self._json(answer(Image.open(io.BytesIO(png)).getpixel((0, 0))[0]))

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_probe_passes_an_image_that_serves_its_model(prepared: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with _serve(lambda grey: {"class_id": grey // 40, "model_version": "v7"}) as url:
        assert _load("probe").main([url, "--version", "v7", "--data", str(prepared), "--timeout", "10"]) == 0
    assert "classified 5 of 5 test images correctly" in capsys.readouterr().out


def test_probe_fails_an_image_that_answers_wrong_classes(prepared: Path) -> None:
    wrong = _serve(lambda grey: {"class_id": 4 - grey // 40, "model_version": "v7"})
    with wrong as url, pytest.raises(SystemExit, match="4 of 5 test images misclassified"):
        _load("probe").main([url, "--version", "v7", "--data", str(prepared), "--timeout", "10"])


def test_probe_fails_an_image_labelled_with_another_model(prepared: Path) -> None:
    right = _serve(lambda grey: {"class_id": grey // 40, "model_version": "v7"})
    with right as url, pytest.raises(SystemExit, match="the image's label says 'v8'"):
        _load("probe").main([url, "--version", "v8", "--data", str(prepared), "--timeout", "10"])
