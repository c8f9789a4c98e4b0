"""`signpost prepare --download` end to end: the three official archives, served on loopback, fetched, verified,
extracted and prepared through the CLI, exactly as a user with network access would run it."""

from __future__ import annotations

import hashlib
import io
import threading
import zipfile
from collections.abc import Iterator
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from signpost.cli import main
from signpost.data import download
from signpost.data.download import RemoteArchive


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


def _publish(dataset: Path, served: Path, monkeypatch: pytest.MonkeyPatch, corrupt: bool = False) -> dict[str, bytes]:
    """Serve the dataset as the three official archives, with their checksums as the official ones."""
    archives = _official_archives(dataset)
    monkeypatch.setattr(
        download,
        "GTSRB_ARCHIVES",
        tuple(RemoteArchive(name, f"md5:{hashlib.md5(data).hexdigest()}") for name, data in archives.items()),
    )
    for name, data in archives.items():
        # A corrupted copy has the right size and the wrong bytes, as after a transfer error.
        (served / name).write_bytes(data[:-100] + b"\0" * 100 if corrupt else data)
    return archives


def test_prepare_download_fetches_verifies_extracts_and_prepares(
    synthetic_root: Path,
    archive_server: tuple[str, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
) -> None:
    base_url, served = archive_server
    archives = _publish(synthetic_root, served, monkeypatch)
    root = tmp_path / "gtsrb"
    args = ["prepare", "--download", "--no-progress", f"data.root={root}", f"data.base_url={base_url}",
            f"workdir={tmp_path / 'work'}", "name=dl"]  # fmt: skip

    assert main(args) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "prepare: wrote" in out and "gtsrb layout, 6 classes" in out
    assert (root / "GTSRB" / "Final_Training" / "Images" / "00000" / "GT-00000.csv").is_file()
    assert (root / "GT-final_test.csv").is_file()
    assert sorted(p.name for p in (root / "downloads").glob("*.zip")) == sorted(archives)

    # A second run downloads nothing (the archives are removed from the server) and reuses the cache.
    for name in archives:
        (served / name).unlink()
    assert main(args) == 0, capsys.readouterr().err
    assert "prepare: reused" in capsys.readouterr().out


def test_a_corrupted_download_fails_cleanly(
    synthetic_root: Path,
    archive_server: tuple[str, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
) -> None:
    base_url, served = archive_server
    _publish(synthetic_root, served, monkeypatch, corrupt=True)
    root = tmp_path / "gtsrb"
    code = main(["prepare", "--download", "--no-progress", f"data.root={root}", f"data.base_url={base_url}",
                 f"workdir={tmp_path / 'work'}"])  # fmt: skip
    assert code == 1
    assert "checksum" in capsys.readouterr().err
    assert not (root / "GTSRB").exists()
    assert not list((root / "downloads").glob("*.part")) and not list((root / "downloads").glob("*.zip"))
    assert not (tmp_path / "work" / "data").exists() or not any((tmp_path / "work" / "data").glob("experiment-*"))
