"""Downloads over HTTP against a local HTTP server on 127.0.0.1 (``tests/data/conftest.py``'s ``server``): resumed,
retried, verified, atomic."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from signpost.data.download import DownloadError, download_file
from tests.data.conftest import FileServer

PAYLOAD = bytes(range(256)) * 400  # 100 KiB, several read chunks' worth of distinct bytes


def md5(data: bytes) -> str:
    return "md5:" + hashlib.md5(data).hexdigest()


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
