"""Fetch a dataset's pinned archives from wherever they live, verify them, and unpack them into one folder.

An archive is named by an fsspec URL and pinned by its content (``data.archives``: ``{url, sha256}``). It is cached
as ``<root>/downloads/<digest[:16]>/<file name>``: keyed on the pin, not the URL, so a mirror's identical file is
the same entry, a changed pin is a new one, and a verified file is never fetched again. ``http(s)://`` goes through
``download_file`` (Range resume, ``.part``, atomic rename); any other scheme (``s3://``, ``gs://``, ``az://``,
``file://``, ``memory://``) through ``fsspec.open``, streamed to ``<dest>.part`` with the digest computed on the way
and renamed only on a match. Credentials are whatever the scheme's fsspec backend reads from the environment.

The archives then unpack, in order, with ``safe_extract`` into ``<root>/extracted/<key of all the pins>/``, which is
renamed into place only when every archive is in: a changed pin unpacks into a new folder, never over old files.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import sys
import urllib.parse
from collections.abc import Sequence
from pathlib import Path

import fsspec
from tqdm import tqdm

from signpost.artifacts import hash_json
from signpost.config import ArchivePin
from signpost.data.download import DownloadError, already_there, download_file, parse_checksum
from signpost.data.extract import ExtractError, safe_extract

log = logging.getLogger(__name__)

_CHUNK = 1 << 20  # bytes per read: 1 MiB
# The package extra (pyproject.toml) that brings each cloud scheme's fsspec backend.
_EXTRAS = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs", "az": "azure", "abfs": "azure", "abfss": "azure",
           "adl": "azure"}


def fetch_archives(
    root: Path, archives: Sequence[ArchivePin], *, base_url: str | None = None, progress: bool = True
) -> Path:
    """Fetch every archive into ``root/downloads`` and unpack them all into one folder under ``root/extracted``;
    returns that folder. Idempotent: a second call with the same pins touches neither the network nor the disk.

    ``base_url`` is a mirror: each archive is fetched from ``<base_url>/<its file name>`` instead of its URL.
    """
    root = Path(root)
    folder = root / "extracted" / hash_json([a.checksum for a in archives])[:16]
    if folder.is_dir():
        log.info("the %d pinned archives are already unpacked in %s", len(archives), folder)
        return folder
    paths = []
    for archive in archives:
        name = file_name(archive.url)
        url = f"{base_url.rstrip('/')}/{urllib.parse.quote(name)}" if base_url else archive.url
        dest = root / "downloads" / archive.checksum.partition(":")[2][:16] / name
        paths.append(fetch(url, dest, archive.checksum, progress=progress))

    tmp = folder.with_name(f".tmp-{folder.name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)  # what a killed run of this process id left
    try:
        for path in paths:
            log.info("extracting %s into %s", path.name, folder)
            safe_extract(path, tmp)
        if not folder.is_dir():  # another process may have finished first: keep theirs
            os.rename(tmp, folder)
    except ExtractError as exc:  # a caller of the fetch catches one error type, whichever step failed
        raise DownloadError(str(exc)) from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("%d archives ready in %s", len(archives), folder)
    return folder


def fetch(url: str, dest: Path, checksum: str, *, progress: bool = True) -> Path:
    """Fetch ``url`` to ``dest`` verified against ``checksum`` (``"sha256:<hex>"`` or ``"md5:<hex>"``); a ``dest``
    that already matches is returned as it is. Nothing is left at ``dest`` unless it matches."""
    dest = Path(dest)
    scheme = url.partition("://")[0].lower()
    if scheme in ("http", "https"):
        return download_file(url, dest, checksum, progress=progress)
    algo, expected = parse_checksum(checksum)
    if already_there(dest, algo, expected):
        return dest
    part = dest.with_name(dest.name + ".part")
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        actual = _stream(url, part, algo, progress)
    except BaseException:
        part.unlink(missing_ok=True)  # no Range resume through fsspec: a partial file is worth nothing
        raise
    if actual != expected:
        part.unlink()
        raise DownloadError(
            f"{url}: checksum mismatch: expected {algo}:{expected}, got {algo}:{actual}; the fetched file was "
            "removed. Check the URL, or if the data changed on purpose, change the pin in the config."
        )
    os.replace(part, dest)
    log.info("fetched %s (%s verified)", dest, algo)
    return dest


def file_name(url: str) -> str:
    """The file name an archive URL ends in (its last path component, no query); a ValueError if there is none."""
    path = url.partition("://")[2].split("?", 1)[0].split("#", 1)[0]
    name = urllib.parse.unquote(path.rstrip("/").rpartition("/")[2])
    if name in ("", ".", "..") or "\\" in name:
        raise ValueError(f"archive URL {url!r} must end in a file name")
    return name


def open_store(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem and path of ``url``; a DownloadError naming the extra to install when the scheme's
    backend (s3fs, gcsfs, adlfs) is missing, or the schemes to use when fsspec knows none by that name."""
    scheme = url.partition("://")[0].lower()
    try:
        return fsspec.core.url_to_fs(url)
    except ImportError as exc:
        extra = _EXTRAS.get(scheme)
        fix = f"pip install 'signpost[{extra}]'" if extra else f"install the fsspec backend for {scheme}://"
        raise DownloadError(f"{url}: {scheme}:// needs a package that is not installed ({exc}): {fix}") from None
    except ValueError as exc:  # "Protocol not known"
        raise DownloadError(f"{url}: {exc}; use https://, s3://, gs://, az://, file:// or another fsspec URL") from None


def _stream(url: str, part: Path, algo: str, progress: bool) -> str:
    """Copy ``url`` through fsspec into ``part``; returns the hex digest of what was written."""
    scheme = url.partition("://")[0].lower()
    digest = hashlib.new(algo)
    fs, path = open_store(url)
    try:
        total = fs.size(path)
        with fs.open(path, "rb") as src, open(part, "wb") as out, tqdm(
            total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=part.name.removesuffix(".part"),
            file=sys.stderr, disable=not progress,
        ) as bar:
            while chunk := src.read(_CHUNK):
                digest.update(chunk)
                out.write(chunk)
                bar.update(len(chunk))
    except FileNotFoundError:
        raise DownloadError(f"{url}: no such file; check the URL in data.archives") from None
    except OSError as exc:  # permissions, network, a full disk: the backend's message says which
        raise DownloadError(f"{url}: {type(exc).__name__}: {exc}; check the URL and the credentials the "
                            f"{scheme}:// backend reads from the environment") from exc
    return digest.hexdigest()
