"""Hostile archives: ``safe_extract`` refuses path traversal, links, special files, bombs and corrupt or truncated
archives, and leaves nothing behind, neither in the destination nor beside it, nor anywhere outside it."""

from __future__ import annotations

import io
import stat
import tarfile
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest

from signpost.data import extract
from signpost.data.extract import ExtractError, safe_extract
from tests.data.test_extract import make_tar, make_zip, tar_entry, tree
from tests.data.test_fetch import FAKE_GTSRB


def test_safe_extract_does_not_follow_a_symlink_in_dest(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "top").symlink_to(outside, target_is_directory=True)
    archive = tmp_path / "a.zip"
    archive.write_bytes(make_zip({"top/f.txt": b"f"}))

    with pytest.raises(ExtractError, match="symbolic link"):
        safe_extract(archive, dest)

    assert list(outside.iterdir()) == []
    assert (dest / "top").is_symlink()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.zip", "dest", "outside"]


def zip_with_symlink() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("ok.txt", b"fine")
        info = zipfile.ZipInfo("link")
        info.create_system = 3  # Unix, so the mode bits in external_attr count
        info.external_attr = (stat.S_IFLNK | 0o777) << 16
        zf.writestr(info, "../outside")
    return buf.getvalue()


OK = (tar_entry("ok.txt"), b"fine")

# name -> (archive bytes given the test's tmp_path, why it must be refused)
MALICIOUS: dict[str, tuple[Callable[[Path], bytes], str]] = {
    "zip-dotdot": (lambda tmp: make_zip({"ok.txt": b"fine", "../evil.txt": b"evil"}), "'..'"),
    "zip-absolute": (lambda tmp: make_zip({"ok.txt": b"fine", f"{tmp}/evil.txt": b"evil"}), "absolute path"),
    "zip-drive": (lambda tmp: make_zip({"ok.txt": b"fine", "C:/evil.txt": b"evil"}), "absolute path"),
    "zip-backslash-dotdot": (lambda tmp: make_zip({"ok.txt": b"fine", "a\\..\\..\\evil.txt": b"e"}), "'..'"),
    "zip-symlink": (lambda tmp: zip_with_symlink(), "symbolic link"),
    "tar-dotdot": (lambda tmp: make_tar([OK, (tar_entry("a/../../evil.txt"), b"x")]), "'..'"),
    "tar-absolute": (lambda tmp: make_tar([OK, (tar_entry(f"{tmp}/evil.txt"), b"x")]), "absolute path"),
    "tar-symlink": (
        lambda tmp: make_tar([OK, (tar_entry("s", tarfile.SYMTYPE, str(tmp)), b"")]),
        "symbolic link",
    ),
    "tar-hardlink": (
        lambda tmp: make_tar([OK, (tar_entry("h", tarfile.LNKTYPE, f"{tmp}/evil.txt"), b"")]),
        "hard link",
    ),
    "tar-fifo": (lambda tmp: make_tar([OK, (tar_entry("pipe", tarfile.FIFOTYPE), b"")]), "fifo"),
    "tar-device": (lambda tmp: make_tar([OK, (tar_entry("dev", tarfile.CHRTYPE), b"")]), "device"),
}


@pytest.mark.parametrize("dest_exists", [False, True], ids=["new-dest", "existing-dest"])
@pytest.mark.parametrize("name", sorted(MALICIOUS))
def test_malicious_archive_is_refused_and_leaves_nothing(
    name: str, dest_exists: bool, tmp_path: Path
) -> None:
    make, reason = MALICIOUS[name]
    work = tmp_path / "work"
    work.mkdir()
    archive = work / "archive.bin"
    archive.write_bytes(make(tmp_path))
    dest = work / "dest"
    if dest_exists:
        dest.mkdir()
        (dest / "keep.txt").write_bytes(b"keep")
    before = tree(tmp_path)

    with pytest.raises(ExtractError, match="refusing entry") as info:
        safe_extract(archive, dest)

    assert reason in str(info.value)
    # dest untouched (or never created), no temporary folder left, and no evil.txt written anywhere
    assert tree(tmp_path) == before
    assert not (tmp_path / "evil.txt").exists() and not (work / "evil.txt").exists()


def test_zip_bomb_guard(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    archive = tmp_path / "bomb.zip"
    archive.write_bytes(make_zip({"a.bin": bytes(2 << 20)}))  # 2 MiB of zeros: ratio ~1000:1
    dest = tmp_path / "dest"

    with pytest.raises(ExtractError, match="compression ratio"):
        monkeypatch.setattr(extract, "_MAX_RATIO", 100)
        safe_extract(archive, dest)
    monkeypatch.setattr(extract, "_MAX_TOTAL_BYTES", 1 << 20)
    monkeypatch.setattr(extract, "_MAX_RATIO", 10_000)
    with pytest.raises(ExtractError, match="GiB"):
        safe_extract(archive, dest)
    assert not dest.exists()


def test_truncated_zip_is_refused(tmp_path: Path) -> None:
    data = make_zip(FAKE_GTSRB["GTSRB_Final_Training_Images.zip"])
    archive = tmp_path / "cut.zip"
    archive.write_bytes(data[: len(data) // 2])

    with pytest.raises(ExtractError, match="corrupt"):
        safe_extract(archive, tmp_path / "dest")

    assert sorted(p.name for p in tmp_path.iterdir()) == ["cut.zip"]


def test_zip_with_a_bad_crc_is_refused_and_leaves_nothing(tmp_path: Path) -> None:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("first.txt", b"A" * 1000)
        zf.writestr("second.txt", b"B" * 1000)
    data = bytearray(buf.getvalue())
    at = data.index(b"B" * 1000) + 500
    data[at] ^= 0xFF  # still a valid zip, but second.txt's bytes no longer match its CRC
    archive = tmp_path / "bad.zip"
    archive.write_bytes(bytes(data))

    with pytest.raises(ExtractError, match="corrupt"):
        safe_extract(archive, tmp_path / "new" / "dest")

    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.zip"]  # not even the parent folder is left


def test_truncated_tar_gz_is_refused(tmp_path: Path) -> None:
    data = make_tar([(tar_entry(f"f{i}.bin"), bytes(range(256)) * 64) for i in range(8)], "w:gz")
    archive = tmp_path / "cut.tar.gz"
    archive.write_bytes(data[: len(data) // 2])

    with pytest.raises(ExtractError, match="corrupt"):
        safe_extract(archive, tmp_path / "dest")

    assert sorted(p.name for p in tmp_path.iterdir()) == ["cut.tar.gz"]


def test_plain_file_is_not_an_archive(tmp_path: Path) -> None:
    archive = tmp_path / "notes.zip"
    archive.write_text("this is not an archive\n" * 100)

    with pytest.raises(ExtractError, match="not a zip or tar archive"):
        safe_extract(archive, tmp_path / "dest")

    assert not (tmp_path / "dest").exists()
