"""Unpack a downloaded archive safely: every entry checked before anything is written, all or nothing.

A .zip or .tar(.gz/.bz2/.xz) archive whose entries could land outside the destination (absolute paths, drive
letters, ``..``), that holds links, devices or implausible sizes (a zip bomb), or that is corrupt is refused with an
``ExtractError`` naming the archive and the entry. The archive unpacks into a temporary folder beside the
destination and is moved in only when the whole archive has unpacked cleanly.
"""

from __future__ import annotations

import contextlib
import logging
import lzma
import os
import re
import shutil
import stat
import tarfile
import uuid
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

_CHUNK = 1 << 20  # bytes per copy: 1 MiB
# Zip-bomb guards. GTSRB unpacks to well under 1 GiB; refuse anything that declares more than this in total.
_MAX_TOTAL_BYTES = 20 * 1024**3
# Deflate tops out near 1032:1, so a larger ratio on a sizeable entry means some other (bomb-friendly) method.
_MAX_RATIO = 1000
_RATIO_MIN_BYTES = 1 << 20
_DRIVE = re.compile(r"^[A-Za-z]:")
# What reading a damaged archive raises, besides OSError.
_CORRUPT = (zipfile.BadZipFile, zipfile.LargeZipFile, tarfile.TarError, EOFError, zlib.error, lzma.LZMAError)


class ExtractError(RuntimeError):
    """An archive that cannot be extracted safely; the message names the archive or entry and what to do."""


@dataclass(frozen=True)
class _Entry:
    parts: tuple[str, ...]  # path components below dest, never empty, never "." or ".."
    is_dir: bool
    member: zipfile.ZipInfo | tarfile.TarInfo


def safe_extract(archive: Path, dest: Path) -> list[Path]:
    """Extract a .zip or .tar(.gz/.bz2/.xz) archive into dest, refusing unsafe entries; all or nothing.

    Every entry is checked before anything is written: absolute paths, drive letters, ``..``, links, devices
    and implausible sizes are refused. The archive unpacks into a temporary folder beside ``dest`` and is then
    merged into ``dest``, which may already hold other archives' files (same-named files are replaced).
    Returns the paths of the extracted files.
    """
    archive = Path(archive)
    dest = Path(dest).resolve()
    if not archive.is_file():
        raise ExtractError(f"{archive}: archive not found")
    if dest.exists() and not dest.is_dir():
        raise ExtractError(f"cannot extract {archive} into {dest}: it exists and is not a folder")
    try:
        with _open_archive(archive, _archive_kind(archive)) as handle:
            entries = _check_entries(archive, handle)
            created = _missing_ancestors(dest.parent)
            dest.parent.mkdir(parents=True, exist_ok=True)
            tmp = dest.parent / f".{dest.name}.extract-{uuid.uuid4().hex[:8]}"
            try:
                tmp.mkdir()
                files = _extract_entries(handle, entries, tmp)
                _check_merge(tmp, dest, archive)
                dest.mkdir(exist_ok=True)
                _merge(tmp, dest)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                for folder in created:  # deepest first; only folders this call made and left empty
                    with contextlib.suppress(OSError):
                        folder.rmdir()
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except ExtractError:
        raise
    except _CORRUPT as exc:
        raise ExtractError(f"{archive}: corrupt archive ({exc}); delete it and download it again") from exc
    except OSError as exc:
        raise ExtractError(f"cannot extract {archive} into {dest}: {exc}") from exc
    log.info("extracted %d files from %s into %s", len(files), archive, dest)
    return [dest.joinpath(*parts) for parts in files]


def _archive_kind(archive: Path) -> str:
    with open(archive, "rb") as fh:
        magic = fh.read(4)
    is_zip = zipfile.is_zipfile(archive)
    if magic in (b"PK\x03\x04", b"PK\x05\x06"):
        if not is_zip:
            raise ExtractError(f"{archive}: corrupt zip (truncated?); delete it and download it again")
        return "zip"
    try:
        is_tar = tarfile.is_tarfile(archive)
    except (OSError, EOFError, zlib.error, lzma.LZMAError):
        is_tar = False
    if is_tar:
        return "tar"
    if is_zip:
        return "zip"
    raise ExtractError(f"{archive}: not a zip or tar archive; delete it and download it again")


@contextlib.contextmanager
def _open_archive(archive: Path, kind: str) -> Iterator[zipfile.ZipFile | tarfile.TarFile]:
    if kind == "zip":
        with zipfile.ZipFile(archive) as zf:
            yield zf
    else:
        with tarfile.open(archive) as tf:
            yield tf


def _entry_parts(archive: Path, name: str) -> tuple[str, ...]:
    """The components of an entry's path, or a ExtractError if it could land outside the destination."""
    if not name or "\x00" in name:
        raise ExtractError(f"{archive}: refusing entry with an empty or NUL-containing name {name!r}")
    if name.startswith(("/", "\\")) or _DRIVE.match(name):
        raise ExtractError(f"{archive}: refusing entry {name!r}: absolute path")
    parts = tuple(p for p in re.split(r"[/\\]", name) if p not in ("", "."))
    if ".." in parts:
        raise ExtractError(f"{archive}: refusing entry {name!r}: '..' would leave the destination")
    return parts


def _check_entries(archive: Path, handle: zipfile.ZipFile | tarfile.TarFile) -> list[_Entry]:
    """Validate every entry before anything is written; returns what to extract."""
    entries: list[_Entry] = []
    total = 0
    if isinstance(handle, zipfile.ZipFile):
        for info in handle.infolist():
            name = info.filename
            parts = _entry_parts(archive, name)
            mode = info.external_attr >> 16
            if stat.S_ISLNK(mode):
                raise ExtractError(f"{archive}: refusing entry {name!r}: symbolic link")
            if stat.S_IFMT(mode) and not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
                raise ExtractError(f"{archive}: refusing entry {name!r}: not a regular file or folder")
            ratio = info.file_size / max(info.compress_size, 1)
            if info.file_size > _RATIO_MIN_BYTES and ratio > _MAX_RATIO:
                raise ExtractError(f"{archive}: refusing entry {name!r}: compression ratio {ratio:.0f}:1")
            total += info.file_size
            if parts:
                entries.append(_Entry(parts, info.is_dir(), info))
    else:
        for member in handle.getmembers():
            name = member.name
            parts = _entry_parts(archive, name)
            if member.issym() or member.islnk():
                kind = "symbolic" if member.issym() else "hard"
                raise ExtractError(f"{archive}: refusing entry {name!r}: {kind} link to {member.linkname!r}")
            if not (member.isfile() or member.isdir()):
                raise ExtractError(f"{archive}: refusing entry {name!r}: device, fifo or other special file")
            total += member.size
            if parts:
                entries.append(_Entry(parts, member.isdir(), member))
    if total > _MAX_TOTAL_BYTES:
        raise ExtractError(
            f"{archive}: refusing to extract {total / 2**30:.1f} GiB "
            f"(limit {_MAX_TOTAL_BYTES / 2**30:.0f} GiB); not a GTSRB archive?"
        )
    # A path used both as a file and as a folder cannot be extracted; say so now rather than half-way.
    files = {e.parts for e in entries if not e.is_dir}
    for entry in entries:
        for i in range(1, len(entry.parts)):
            if entry.parts[:i] in files:
                below, above = "/".join(entry.parts), "/".join(entry.parts[:i])
                raise ExtractError(f"{archive}: entry {below!r} lies below {above!r}, a file")
    return entries


def _extract_entries(
    handle: zipfile.ZipFile | tarfile.TarFile, entries: list[_Entry], tmp: Path
) -> list[tuple[str, ...]]:
    """Write checked entries below ``tmp`` (a fresh folder: nothing in it is a link). Returns file parts."""
    files: dict[tuple[str, ...], None] = {}
    root = tmp.resolve()
    for entry in entries:
        target = tmp.joinpath(*entry.parts)
        if not target.resolve().is_relative_to(root):  # belt and braces: the names were checked already
            raise ExtractError(f"refusing entry {'/'.join(entry.parts)!r}: it resolves outside {tmp}")
        if entry.is_dir:
            target.mkdir(parents=True, exist_ok=True)
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(handle, zipfile.ZipFile):
            assert isinstance(entry.member, zipfile.ZipInfo)
            source = handle.open(entry.member)  # raises BadZipFile on a bad CRC when read to the end
        else:
            assert isinstance(entry.member, tarfile.TarInfo)
            source = handle.extractfile(entry.member)
            if source is None:
                raise ExtractError(f"cannot read entry {entry.member.name!r}")
        with source, open(target, "wb") as out:
            shutil.copyfileobj(source, out, _CHUNK)
        files[entry.parts] = None
    return list(files)


def _missing_ancestors(folder: Path) -> list[Path]:
    """``folder`` and its parents that do not exist yet, deepest first."""
    missing = []
    while not folder.exists() and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    return missing


def _check_merge(src: Path, dest: Path, archive: Path) -> None:
    """Refuse, before moving anything, what cannot merge into ``dest``: links there, file/folder clashes."""
    for child in src.iterdir():
        target = dest / child.name
        if target.is_symlink():
            raise ExtractError(
                f"cannot extract {archive}: {target} is a symbolic link, which extraction does not follow or "
                f"replace; remove it or extract somewhere else"
            )
        if not target.exists():
            continue
        if child.is_dir() and target.is_dir():
            _check_merge(child, target, archive)
        elif child.is_dir() or target.is_dir():
            raise ExtractError(
                f"cannot extract {archive}: {target} is a {'folder' if target.is_dir() else 'file'} in the "
                f"way of a {'folder' if child.is_dir() else 'file'} from the archive; remove it and run again"
            )


def _merge(src: Path, dest: Path) -> None:
    """Move the contents of ``src`` into ``dest``: new paths by one rename, existing folders recursively."""
    for child in src.iterdir():
        target = dest / child.name
        if child.is_dir() and target.is_dir():
            _merge(child, target)
        else:
            os.replace(child, target)
