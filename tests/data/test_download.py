"""Downloads (and ``download_gtsrb``'s extraction) against a local HTTP server on 127.0.0.1 that serves archives made
by the tests."""

from __future__ import annotations

import hashlib
import socket
import struct
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest

from signpost.data import download
from signpost.data.download import (
    GTSRB_ARCHIVES,
    DownloadError,
    RemoteArchive,
    download_file,
    download_gtsrb,
)
from tests.data.test_extract import make_zip, tree

PAYLOAD = bytes(range(256)) * 400  # 100 KiB, several read chunks' worth of distinct bytes


@dataclass
class Seen:
    path: str
    range: str | None
    user_agent: str | None


@dataclass
class Behaviour:
    """What the server does; the one-shot misbehaviours apply to the first request for a path, then clear."""

    root: Path
    drop_after: dict[str, int] = field(default_factory=dict)  # path -> body bytes sent before closing
    reset: bool = False  # drop with a TCP reset instead of a clean close
    fail_once: set[str] = field(default_factory=set)  # paths answered 500 once
    fail_always: set[str] = field(default_factory=set)  # paths answered 500 every time
    ignore_range: bool = False  # answer Range requests with 200 and the whole body
    requests: list[Seen] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


class FileHandler(BaseHTTPRequestHandler):
    """Serves files under ``Behaviour.root``, with byte ranges, and misbehaves on request."""

    server: FileServer

    def do_GET(self) -> None:
        state = self.server.behaviour
        path = unquote(urlsplit(self.path).path)
        requested_range = self.headers.get("Range")
        with state.lock:
            state.requests.append(Seen(path, requested_range, self.headers.get("User-Agent")))
            fail = path in state.fail_always or path in state.fail_once
            state.fail_once.discard(path)
            drop = state.drop_after.pop(path, None)
        file = state.root / path.lstrip("/")
        if not path.lstrip("/") or not file.is_file():
            self.send_error(404, "Not Found")
            return
        if fail:
            self.send_error(500, "Internal Server Error")
            return
        body = file.read_bytes()
        start = 0
        if requested_range and not state.ignore_range:
            digits = requested_range.removeprefix("bytes=").removesuffix("-")
            if not digits.isdigit():  # the client only ever asks for "bytes=N-"
                self.send_error(400, f"unexpected Range {requested_range!r}")
                return
            start = int(digits)
            if start >= len(body):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(body)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(body) - start))
        self.send_header("Content-Type", "application/octet-stream")
        self.end_headers()
        if drop is None:
            self.wfile.write(body[start:])
            return
        self.wfile.write(body[start : start + drop])
        self.wfile.flush()
        self.close_connection = True
        if state.reset:  # with SO_LINGER 0, close() sends a TCP reset instead of an orderly FIN
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.connection.close()
        else:
            self.connection.shutdown(socket.SHUT_WR)

    def log_message(self, format: str, *args: object) -> None:  # keep test output quiet
        pass


class FileServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, behaviour: Behaviour) -> None:
        super().__init__(("127.0.0.1", 0), FileHandler)
        self.behaviour = behaviour

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    @property
    def requests(self) -> list[Seen]:
        with self.behaviour.lock:
            return list(self.behaviour.requests)

    def put(self, name: str, data: bytes) -> str:
        """Serve ``data`` as ``/name``; returns its sha256 checksum string."""
        (self.behaviour.root / name).write_bytes(data)
        return "sha256:" + hashlib.sha256(data).hexdigest()


@pytest.fixture
def server(tmp_path: Path) -> Iterator[FileServer]:
    served = tmp_path / "served"
    served.mkdir()
    httpd = FileServer(Behaviour(root=served))
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield httpd
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


@pytest.fixture(autouse=True)
def no_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(download, "_BACKOFF_S", 0.0)


def md5(data: bytes) -> str:
    return "md5:" + hashlib.md5(data).hexdigest()


# A tiny GTSRB in the official archives' layout: training, test images, and the test ground truth.
FAKE_GTSRB = {
    "GTSRB_Final_Training_Images.zip": {
        "GTSRB/Readme-Images.txt": b"training readme",
        "GTSRB/Final_Training/Images/00000/GT-00000.csv": b"Filename;ClassId\n00000_00000.ppm;0\n",
        "GTSRB/Final_Training/Images/00000/00000_00000.ppm": b"P6 3 3 255\n" + bytes(27),
        "GTSRB/Final_Training/Images/00001/00000_00000.ppm": b"P6 3 3 255\n" + bytes(range(27)),
    },
    "GTSRB_Final_Test_Images.zip": {
        "GTSRB/Readme-Images-Final-test.txt": b"test readme",
        "GTSRB/Final_Test/Images/00000.ppm": b"P6 3 3 255\n" + bytes([7] * 27),
    },
    "GTSRB_Final_Test_GT.zip": {
        "GT-final_test.csv": b"Filename;Width;Height;ClassId\n00000.ppm;3;3;14\n",
    },
}


def serve_fake_gtsrb(server: FileServer) -> list[RemoteArchive]:
    archives = []
    for name, files in FAKE_GTSRB.items():
        data = make_zip(files)
        server.put(name, data)
        archives.append(RemoteArchive(name, md5(data)))
    return archives


def expected_gtsrb_tree() -> dict[str, bytes]:
    return {name: data for files in FAKE_GTSRB.values() for name, data in files.items()}


def test_official_archive_list() -> None:
    assert [a.filename for a in GTSRB_ARCHIVES] == [
        "GTSRB_Final_Training_Images.zip",
        "GTSRB_Final_Test_Images.zip",
        "GTSRB_Final_Test_GT.zip",
    ]
    for archive in GTSRB_ARCHIVES:
        download._parse_checksum(archive.checksum)


def test_download_gtsrb_merges_three_archives_and_is_idempotent(server: FileServer, tmp_path: Path) -> None:
    archives = serve_fake_gtsrb(server)
    root = tmp_path / "gtsrb"

    assert download_gtsrb(root, server.url + "/", archives, progress=False) == root

    files = {k: v for k, v in tree(root).items() if v is not None and not k.startswith("downloads/")}
    assert files == expected_gtsrb_tree()
    for archive in archives:
        assert (root / "downloads" / archive.filename).is_file()
        marker = root / "downloads" / f"{archive.filename}.extracted"
        assert marker.read_text().strip() == archive.checksum
    assert not list(root.rglob("*.part")) and not list(tmp_path.glob(".*extract*"))
    assert [r.path for r in server.requests] == [f"/{a.filename}" for a in archives]
    assert all(r.user_agent and r.user_agent.startswith("signpost/") for r in server.requests)

    # The markers record finished work: with the archives gone, a second run has nothing to fetch or extract.
    for archive in archives:
        (root / "downloads" / archive.filename).unlink()
    (root / "GT-final_test.csv").write_bytes(b"edited")
    before = tree(root)
    download_gtsrb(root, server.url, archives, progress=False)
    assert len(server.requests) == 3
    assert tree(root) == before


def test_download_gtsrb_resumes_after_an_interrupted_run(server: FileServer, tmp_path: Path) -> None:
    archives = serve_fake_gtsrb(server)
    root = tmp_path / "gtsrb"
    missing = server.behaviour.root / archives[1].filename
    data = missing.read_bytes()
    missing.unlink()

    with pytest.raises(DownloadError, match="404"):
        download_gtsrb(root, server.url, archives, progress=False)
    assert (root / "downloads" / f"{archives[0].filename}.extracted").is_file()
    assert not (root / "downloads" / f"{archives[1].filename}.extracted").exists()

    missing.write_bytes(data)
    download_gtsrb(root, server.url, archives, progress=False)
    assert [r.path for r in server.requests] == [f"/{archives[i].filename}" for i in (0, 1, 1, 2)]
    files = {k: v for k, v in tree(root).items() if v is not None and not k.startswith("downloads/")}
    assert files == expected_gtsrb_tree()


def test_checksum_mismatch_removes_download_and_extracts_nothing(server: FileServer, tmp_path: Path) -> None:
    archives = serve_fake_gtsrb(server)
    served = server.behaviour.root / archives[0].filename
    corrupted = bytearray(served.read_bytes())
    corrupted[100:110] = bytes(b ^ 0xFF for b in corrupted[100:110])
    served.write_bytes(bytes(corrupted))
    root = tmp_path / "gtsrb"

    with pytest.raises(DownloadError, match="checksum mismatch") as info:
        download_gtsrb(root, server.url, archives, progress=False)

    assert archives[0].checksum.split(":")[1] in str(info.value)
    assert "removed" in str(info.value)
    assert tree(root) == {"downloads": None}  # no archive, no .part, nothing extracted


def test_download_resumes_after_a_dropped_connection(server: FileServer, tmp_path: Path) -> None:
    checksum = server.put("blob.bin", PAYLOAD)
    server.behaviour.drop_after["/blob.bin"] = 30_000
    dest = tmp_path / "out" / "blob.bin"

    assert download_file(f"{server.url}/blob.bin", dest, checksum, progress=False, timeout=5) == dest

    assert dest.read_bytes() == PAYLOAD
    assert not dest.with_name("blob.bin.part").exists()
    assert [r.range for r in server.requests] == [None, "bytes=30000-"]


def test_download_recovers_from_a_connection_reset(server: FileServer, tmp_path: Path) -> None:
    checksum = server.put("blob.bin", PAYLOAD)
    server.behaviour.drop_after["/blob.bin"] = 30_000
    server.behaviour.reset = True
    dest = tmp_path / "blob.bin"

    download_file(f"{server.url}/blob.bin", dest, checksum, progress=False, timeout=5)

    # How much arrived before the reset depends on timing; only that the second request finished it does not.
    assert dest.read_bytes() == PAYLOAD
    assert len(server.requests) == 2


def test_existing_part_is_resumed_with_a_range_request(server: FileServer, tmp_path: Path) -> None:
    checksum = server.put("blob.bin", PAYLOAD)
    dest = tmp_path / "blob.bin"
    dest.with_name("blob.bin.part").write_bytes(PAYLOAD[:12_345])

    download_file(f"{server.url}/blob.bin", dest, checksum, progress=False, timeout=5)

    assert dest.read_bytes() == PAYLOAD
    assert [r.range for r in server.requests] == ["bytes=12345-"]


def test_server_that_ignores_range_gets_a_fresh_download(server: FileServer, tmp_path: Path) -> None:
    checksum = server.put("blob.bin", PAYLOAD)
    server.behaviour.ignore_range = True
    dest = tmp_path / "blob.bin"
    dest.with_name("blob.bin.part").write_bytes(b"stale bytes that must not be kept")

    download_file(f"{server.url}/blob.bin", dest, checksum, progress=False, timeout=5)

    assert dest.read_bytes() == PAYLOAD
    assert [r.range for r in server.requests] == ["bytes=33-"]


def test_complete_part_is_finished_without_a_body(server: FileServer, tmp_path: Path) -> None:
    checksum = server.put("blob.bin", PAYLOAD)
    dest = tmp_path / "blob.bin"
    dest.with_name("blob.bin.part").write_bytes(PAYLOAD)

    download_file(f"{server.url}/blob.bin", dest, checksum, progress=False, timeout=5)

    assert dest.read_bytes() == PAYLOAD
    assert [r.range for r in server.requests] == [f"bytes={len(PAYLOAD)}-"]  # answered 416


def test_server_error_is_retried(server: FileServer, tmp_path: Path) -> None:
    checksum = server.put("blob.bin", PAYLOAD)
    server.behaviour.fail_once.add("/blob.bin")
    dest = tmp_path / "blob.bin"

    download_file(f"{server.url}/blob.bin", dest, checksum, progress=False, timeout=5)

    assert dest.read_bytes() == PAYLOAD
    assert len(server.requests) == 2


def test_persistent_server_error_gives_up_after_the_retries(server: FileServer, tmp_path: Path) -> None:
    checksum = server.put("blob.bin", PAYLOAD)
    server.behaviour.fail_always.add("/blob.bin")
    dest = tmp_path / "blob.bin"

    with pytest.raises(DownloadError, match=r"blob\.bin: download failed after 3 attempts \(HTTP 500"):
        download_file(f"{server.url}/blob.bin", dest, checksum, progress=False, timeout=5, retries=2)

    assert len(server.requests) == 3
    assert not dest.exists()


def test_not_found_fails_at_once_and_leaves_nothing(server: FileServer, tmp_path: Path) -> None:
    dest = tmp_path / "out" / "missing.zip"
    url = f"{server.url}/missing.zip"

    with pytest.raises(DownloadError, match="404") as info:
        download_file(url, dest, "md5:" + "0" * 32, progress=False, timeout=5)

    assert url in str(info.value)
    assert len(server.requests) == 1
    assert list((tmp_path / "out").iterdir()) == []


def test_existing_file_with_the_right_checksum_is_not_downloaded(tmp_path: Path) -> None:
    dest = tmp_path / "blob.bin"
    dest.write_bytes(PAYLOAD)
    # Port 9 on loopback has no listener: any request would fail.
    assert download_file("http://127.0.0.1:9/blob.bin", dest, md5(PAYLOAD), progress=False) == dest


def test_existing_file_with_a_wrong_checksum_is_replaced(server: FileServer, tmp_path: Path) -> None:
    checksum = server.put("blob.bin", PAYLOAD)
    dest = tmp_path / "blob.bin"
    dest.write_bytes(b"old")

    download_file(f"{server.url}/blob.bin", dest, checksum, progress=False, timeout=5)

    assert dest.read_bytes() == PAYLOAD


@pytest.mark.parametrize(
    "checksum",
    ["", "abc", "md5", "md5:", "crc32:00000000", "md5:" + "0" * 31, "sha256:" + "0" * 32, "md5:" + "g" * 32],
)
def test_malformed_checksum_is_a_value_error(checksum: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="checksum"):
        download_file("http://127.0.0.1:9/x", tmp_path / "x", checksum, progress=False)


def test_unsupported_url_scheme(tmp_path: Path) -> None:
    with pytest.raises(DownloadError, match="http"):
        download_file("ftp://127.0.0.1/x", tmp_path / "x", "md5:" + "0" * 32, progress=False)
