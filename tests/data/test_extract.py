"""Extraction of archives the tests make: tar in every compression, and a zip merged into an existing folder."""

from __future__ import annotations

import io
import tarfile
import zipfile
from pathlib import Path

import pytest

from signpost.data.extract import safe_extract


def make_zip(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return buf.getvalue()


def make_tar(members: list[tuple[tarfile.TarInfo, bytes]], mode: str = "w") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode) as tf:
        for info, data in members:
            info.size = len(data) if info.isfile() else 0
            tf.addfile(info, io.BytesIO(data) if info.isfile() else None)
    return buf.getvalue()


def tar_entry(name: str, kind: bytes = tarfile.REGTYPE, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    info.mode = 0o755 if kind == tarfile.DIRTYPE else 0o644
    return info


def tree(folder: Path) -> dict[str, bytes | None]:
    """Every path below ``folder`` (links not followed) with file contents; folders map to None."""
    return {
        p.relative_to(folder).as_posix(): (p.read_bytes() if p.is_file() and not p.is_symlink() else None)
        for p in sorted(folder.rglob("*"))
    }


@pytest.mark.parametrize("mode", ["w", "w:gz", "w:bz2", "w:xz"])
def test_safe_extract_tar(mode: str, tmp_path: Path) -> None:
    archive = tmp_path / "a.tar"
    archive.write_bytes(
        make_tar([(tar_entry("top", tarfile.DIRTYPE), b""), (tar_entry("top/sub/f.txt"), b"hello")], mode)
    )
    dest = tmp_path / "dest"

    assert safe_extract(archive, dest) == [dest.resolve() / "top" / "sub" / "f.txt"]
    assert tree(dest) == {"top": None, "top/sub": None, "top/sub/f.txt": b"hello"}


def test_safe_extract_merges_into_an_existing_folder(tmp_path: Path) -> None:
    dest = tmp_path / "dest"
    (dest / "top").mkdir(parents=True)
    (dest / "top" / "mine.txt").write_bytes(b"keep me")
    (dest / "top" / "shared.txt").write_bytes(b"old")
    archive = tmp_path / "a.zip"
    archive.write_bytes(make_zip({"top/shared.txt": b"new", "top/new/f.txt": b"f", "other.txt": b"o"}))

    safe_extract(archive, dest)

    assert tree(dest) == {
        "other.txt": b"o",
        "top": None,
        "top/mine.txt": b"keep me",
        "top/new": None,
        "top/new/f.txt": b"f",
        "top/shared.txt": b"new",
    }
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.zip", "dest"]  # no temporary folder left
