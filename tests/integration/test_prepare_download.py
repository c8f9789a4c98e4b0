"""`signpost prepare --download` end to end: a dataset pinned in its config (three archives in the official GTSRB
layout, pinned by sha256), served on loopback, fetched, verified, extracted and prepared through the CLI, exactly as
a user or a CI job with network access would run it; and the same pins fetched from a mirror."""

from __future__ import annotations

import hashlib
import io
import json
import threading
import zipfile
from collections.abc import Iterator
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from signpost.cli import main


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def archive_server(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """An HTTP server on 127.0.0.1 serving files from a folder; yields (base URL, folder)."""
    folder = tmp_path / "served"
    folder.mkdir()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), partial(_QuietHandler, directory=str(folder)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", folder
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


def _zip(root: Path, members: list[Path]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        for path in members:
            zf.write(path, path.relative_to(root).as_posix())
    return buffer.getvalue()


def _official_archives(dataset: Path) -> dict[str, bytes]:
    """Split a GTSRB-layout folder into the three official archives, as the publishers ship them."""
    files = sorted(p for p in dataset.rglob("*") if p.is_file())
    return {
        "GTSRB_Final_Training_Images.zip": _zip(dataset, [p for p in files if "Final_Training" in p.parts]),
        "GTSRB_Final_Test_Images.zip": _zip(dataset, [p for p in files if "Final_Test" in p.parts]),
        "GTSRB_Final_Test_GT.zip": _zip(dataset, [dataset / "GT-final_test.csv"]),
    }


def _publish(dataset: Path, served: Path, corrupt: bool = False) -> dict[str, bytes]:
    """Serve the dataset as the three official archives; returns what the pins are made from."""
    archives = _official_archives(dataset)
    for name, data in archives.items():
        # A corrupted copy has the right size and the wrong bytes, as after a transfer error.
        (served / name).write_bytes(data[:-100] + b"\0" * 100 if corrupt else data)
    return archives


def _pinned_config(path: Path, base: str, archives: dict[str, bytes]) -> Path:
    """An experiment config that names its dataset by URL and pins it by sha256, as a team would commit it."""
    pins = [{"url": f"{base}/{name}", "sha256": hashlib.sha256(data).hexdigest()} for name, data in archives.items()]
    path.write_text(json.dumps({"name": "dl", "data": {"source": "download", "archives": pins}}))  # JSON is YAML
    return path


def test_prepare_download_fetches_verifies_extracts_and_prepares(
    synthetic_root: Path,
    archive_server: tuple[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
) -> None:
    base_url, served = archive_server
    archives = _publish(synthetic_root, served)
    root = tmp_path / "gtsrb"
    config = _pinned_config(tmp_path / "pinned.yaml", base_url, archives)
    args = ["prepare", "--config", str(config), "--no-progress", f"data.root={root}", f"workdir={tmp_path / 'work'}"]

    assert main(args) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "prepare: wrote" in out and "gtsrb layout, 6 classes" in out
    (unpacked,) = (root / "extracted").iterdir()
    assert (unpacked / "GTSRB" / "Final_Training" / "Images" / "00000" / "GT-00000.csv").is_file()
    assert (unpacked / "GT-final_test.csv").is_file()
    assert sorted(p.name for p in (root / "downloads").glob("*/*.zip")) == sorted(archives)
    manifest = json.loads(next((tmp_path / "work" / "data").glob("dl-*/manifest.json")).read_text())
    assert [a["checksum"] for a in manifest["inputs"]["archives"]] == [
        f"sha256:{hashlib.sha256(data).hexdigest()}" for data in archives.values()
    ]

    # A second run downloads nothing (the archives are removed from the server) and reuses the cache.
    for name in archives:
        (served / name).unlink()
    assert main(args) == 0, capsys.readouterr().err
    assert "prepare: reused" in capsys.readouterr().out


def test_a_corrupted_mirror_fails_cleanly(
    synthetic_root: Path,
    archive_server: tuple[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
) -> None:
    """The config names the archives where they officially live; `data.base_url` fetches them from a mirror (what CI
    does with a loopback one), whose corrupted copies fail the pins."""
    base_url, served = archive_server
    archives = _official_archives(synthetic_root)
    _publish(synthetic_root, served, corrupt=True)
    root = tmp_path / "gtsrb"
    config = _pinned_config(tmp_path / "pinned.yaml", "https://data.example.org/gtsrb", archives)
    code = main(["prepare", "--config", str(config), "--download", "--no-progress", f"data.root={root}",
                 f"data.base_url={base_url}", f"workdir={tmp_path / 'work'}"])  # fmt: skip
    assert code == 1
    err = capsys.readouterr().err
    assert "checksum mismatch" in err and f"{base_url}/GTSRB_Final_Training_Images.zip" in err
    assert not (root / "extracted").exists()
    assert not list((root / "downloads").rglob("*.part")) and not list((root / "downloads").rglob("*.zip"))
    assert not (tmp_path / "work" / "data").exists() or not any((tmp_path / "work" / "data").glob("experiment-*"))
