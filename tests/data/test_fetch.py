"""Pinned archives: fetched over https (the loopback ``server``) or any other fsspec scheme (``memory://``,
``file://``, fsspec's own implementations), verified against the pin, cached on the pin, unpacked into one folder."""

from __future__ import annotations

import hashlib
import importlib.util
import uuid
from collections.abc import Iterator
from pathlib import Path

import fsspec
import pytest

from signpost.config import ArchivePin, ConfigError, load_config
from signpost.data.download import DownloadError
from signpost.data.fetch import fetch, fetch_archives, file_name
from tests.data.conftest import FileServer
from tests.data.test_extract import make_zip, tree

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
BLOB = bytes(range(256)) * 400  # 100 KiB: several of the server's writes, so a cut leaves a real partial file


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def serve_fake_gtsrb(server: FileServer) -> list[ArchivePin]:
    """The three archives on the loopback server, pinned by sha256."""
    archives = []
    for name, files in FAKE_GTSRB.items():
        data = make_zip(files)
        server.put(name, data)
        archives.append(ArchivePin(url=f"{server.url}/{name}", sha256=sha256(data)))
    return archives


def expected_gtsrb_tree() -> dict[str, bytes]:
    return {name: data for files in FAKE_GTSRB.values() for name, data in files.items()}


@pytest.fixture
def memory_store() -> Iterator[str]:
    """A folder of its own in fsspec's in-memory filesystem (one per process, shared by every test): its URL."""
    url = f"memory://signpost-test-{uuid.uuid4().hex}"
    yield url
    fs = fsspec.filesystem("memory")
    if fs.exists(url):
        fs.rm(url, recursive=True)


def test_pinned_https_archives_are_fetched_unpacked_into_one_folder_and_never_fetched_again(
    server: FileServer, tmp_path: Path
) -> None:
    archives = serve_fake_gtsrb(server)
    root = tmp_path / "gtsrb"

    folder = fetch_archives(root, archives, progress=False)

    assert folder.parent == root / "extracted"
    assert {k: v for k, v in tree(folder).items() if v is not None} == expected_gtsrb_tree()
    for archive in archives:  # cached under the pin, not the URL
        assert (root / "downloads" / archive.sha256[:16] / file_name(archive.url)).is_file()
    assert not list(root.rglob("*.part")) and not list((root / "extracted").glob(".tmp-*"))
    assert [r.path for r in server.requests] == [f"/{file_name(a.url)}" for a in archives]

    # Same pins: nothing fetched or unpacked again, whatever the URLs now say (port 9 on loopback has no listener).
    moved = [ArchivePin(url=f"http://127.0.0.1:9/{file_name(a.url)}", sha256=a.sha256) for a in archives]
    assert fetch_archives(root, moved, progress=False) == folder
    assert len(server.requests) == 3


def test_a_cut_connection_is_resumed_with_a_range_request(server: FileServer, tmp_path: Path) -> None:
    server.put("blob.zip", BLOB)
    server.behaviour.drop_after["/blob.zip"] = 30_000
    dest = tmp_path / "blob.zip"

    assert fetch(f"{server.url}/blob.zip", dest, f"sha256:{sha256(BLOB)}", progress=False) == dest

    assert dest.read_bytes() == BLOB
    assert [r.range for r in server.requests] == [None, "bytes=30000-"]


def test_a_wrong_pin_is_refused_naming_url_and_both_digests_and_nothing_is_kept(
    server: FileServer, tmp_path: Path
) -> None:
    archives = serve_fake_gtsrb(server)
    wrong = "0" * 64
    archives[1] = ArchivePin(url=archives[1].url, sha256=wrong)
    root = tmp_path / "gtsrb"

    with pytest.raises(DownloadError, match="checksum mismatch") as info:
        fetch_archives(root, archives, progress=False)

    served = (server.behaviour.root / file_name(archives[1].url)).read_bytes()
    assert archives[1].url in str(info.value)
    assert f"sha256:{wrong}" in str(info.value) and f"sha256:{sha256(served)}" in str(info.value)
    assert not (root / "downloads" / wrong[:16]).exists() or not any((root / "downloads" / wrong[:16]).iterdir())
    assert not (root / "extracted").exists()  # the first archive is cached, but nothing is unpacked


def test_a_changed_pin_is_a_new_cache_entry_and_a_new_folder(server: FileServer, tmp_path: Path) -> None:
    old = make_zip({"data/a.txt": b"version 1"})
    server.put("data.zip", old)
    root = tmp_path / "mine"
    first = fetch_archives(root, [ArchivePin(url=f"{server.url}/data.zip", sha256=sha256(old))], progress=False)

    new = make_zip({"data/b.txt": b"version 2"})
    server.put("data.zip", new)
    second = fetch_archives(root, [ArchivePin(url=f"{server.url}/data.zip", sha256=sha256(new))], progress=False)

    assert second != first
    assert tree(first) == {"data": None, "data/a.txt": b"version 1"}  # the old version is untouched
    assert tree(second) == {"data": None, "data/b.txt": b"version 2"}  # and none of it leaks into the new one
    assert (root / "downloads" / sha256(old)[:16] / "data.zip").read_bytes() == old
    assert (root / "downloads" / sha256(new)[:16] / "data.zip").read_bytes() == new


def test_a_mirror_serves_the_pinned_files_under_their_names(server: FileServer, tmp_path: Path) -> None:
    data = make_zip({"x/y.txt": b"y"})
    server.put("archive.zip", data)
    pin = ArchivePin(url="https://data.example.org/releases/v3/archive.zip", sha256=sha256(data))

    folder = fetch_archives(tmp_path / "root", [pin], base_url=server.url + "/", progress=False)

    assert tree(folder) == {"x": None, "x/y.txt": b"y"}
    assert [r.path for r in server.requests] == ["/archive.zip"]


def test_memory_urls_are_fetched_through_fsspec_and_verified(memory_store: str, tmp_path: Path) -> None:
    data = make_zip({"cls/0.txt": b"zero"})
    fs = fsspec.filesystem("memory")
    fs.pipe(f"{memory_store}/set.zip", data)

    folder = fetch_archives(tmp_path, [ArchivePin(url=f"{memory_store}/set.zip", sha256=sha256(data))],
                            progress=False)
    assert tree(folder) == {"cls": None, "cls/0.txt": b"zero"}

    dest = tmp_path / "again" / "set.zip"
    with pytest.raises(DownloadError, match="checksum mismatch") as info:
        fetch(f"{memory_store}/set.zip", dest, "sha256:" + "1" * 64, progress=False)
    assert f"{memory_store}/set.zip" in str(info.value) and f"sha256:{sha256(data)}" in str(info.value)
    assert list((tmp_path / "again").iterdir()) == []  # neither the file nor a .part


def test_file_urls_are_fetched_through_fsspec(tmp_path: Path) -> None:
    source = tmp_path / "share" / "set.bin"
    source.parent.mkdir()
    source.write_bytes(BLOB)
    dest = tmp_path / "cache" / "set.bin"

    assert fetch(source.as_uri(), dest, f"sha256:{sha256(BLOB)}", progress=False) == dest
    assert dest.read_bytes() == BLOB
    source.unlink()  # a verified file is not fetched again
    assert fetch(source.as_uri(), dest, f"sha256:{sha256(BLOB)}", progress=False) == dest

    with pytest.raises(DownloadError, match="no such file"):
        fetch(source.as_uri(), tmp_path / "cache" / "other.bin", f"sha256:{sha256(b'')}", progress=False)
    assert not (tmp_path / "cache" / "other.bin.part").exists()


def test_a_missing_backend_names_the_extra_to_install(tmp_path: Path) -> None:
    schemes = {"s3": ("s3fs", "s3"), "gs": ("gcsfs", "gcs"), "az": ("adlfs", "azure")}
    absent = {scheme: extra for scheme, (module, extra) in schemes.items() if importlib.util.find_spec(module) is None}
    assert absent, "every cloud backend is installed here: this test needs one that is not"
    for scheme, extra in absent.items():
        url = f"{scheme}://bucket/data/set.zip"
        with pytest.raises(DownloadError) as info:
            fetch(url, tmp_path / scheme / "set.zip", "sha256:" + "0" * 64, progress=False)
        message = str(info.value)
        assert url in message and f"pip install 'signpost[{extra}]'" in message and "\n" not in message
    with pytest.raises(DownloadError, match="Protocol not known"):
        fetch("nosuchscheme://x/set.zip", tmp_path / "x.zip", "sha256:" + "0" * 64, progress=False)


@pytest.mark.parametrize(
    ("archive", "problem"),
    [
        ("{url: 'https://h/a.zip'}", "exactly one of sha256"),
        ("{url: 'https://h/a.zip', sha256: '" + "0" * 64 + "', md5: '" + "0" * 32 + "'}", "exactly one of sha256"),
        ("{url: 'https://h/a.zip', sha256: 'abc'}", "sha256"),
        ("{url: 'data/a.zip', sha256: '" + "0" * 64 + "'}", "not a URL"),
        ("{url: 's3://KEY:SECRET@bucket/a.zip', sha256: '" + "0" * 64 + "'}", "credentials"),
    ],
)
def test_a_bad_pin_is_a_config_error_naming_the_key(archive: str, problem: str) -> None:
    with pytest.raises(ConfigError, match=problem) as info:
        load_config(None, [f"data.archives=[{archive}]"])
    assert "data.archives.0" in str(info.value)


def test_a_container_at_an_account_is_no_credential() -> None:
    url = "abfs://datasets@teamaccount.dfs.core.windows.net/gtsrb/v3.zip"
    assert load_config(None, [f"data.archives=[{{url: '{url}', sha256: '{'0' * 64}'}}]"]).data.archives[0].url == url


def test_the_shipped_gtsrb_config_pins_the_official_archives() -> None:
    archives = load_config(Path(__file__).parents[2] / "configs" / "gtsrb.yaml").data.archives
    assert [file_name(a.url) for a in archives] == list(FAKE_GTSRB)
    assert all(a.url.startswith("https://") and a.md5 for a in archives)
