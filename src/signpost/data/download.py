"""Download a file over HTTP(S): resumable, checksum-verified, atomic.

A download goes to ``<dest>.part`` and is renamed into place only once its checksum matches, so a file at
``dest`` is always whole. An interrupted download resumes with an HTTP ``Range`` request. ``signpost.data.fetch``
uses it for a dataset's ``http(s)://`` archives.
"""

from __future__ import annotations

import http.client
import logging
import os
import re
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from tqdm import tqdm

import signpost
from signpost.artifacts import hash_file

log = logging.getLogger(__name__)

_CHUNK = 1 << 20  # bytes per read: 1 MiB
_USER_AGENT = f"signpost/{signpost.__version__} Python-urllib"
_BACKOFF_S = 1.0  # first retry waits this long, then doubles; tests set it to 0
_MAX_BACKOFF_S = 30.0
_HEX_LENGTHS = {"md5": 32, "sha256": 64}
_CONTENT_RANGE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+|\*)")


class DownloadError(RuntimeError):
    """A download (or, from ``signpost.data.fetch``, a fetch or an extraction) that failed; the message names the URL
    or file and what to do."""


class _TransientError(Exception):
    """A failure worth retrying: dropped connection, short read, timeout, 5xx."""


def parse_checksum(checksum: str) -> tuple[str, str]:
    """Split ``"md5:<hex>"`` / ``"sha256:<hex>"`` into (algorithm, lower-case hex); else a ValueError."""
    algo, sep, digest = checksum.partition(":")
    algo, digest = algo.strip().lower(), digest.strip().lower()
    if not sep or algo not in _HEX_LENGTHS:
        raise ValueError(f"checksum {checksum!r} must look like 'md5:<hex>' or 'sha256:<hex>'")
    if len(digest) != _HEX_LENGTHS[algo] or not re.fullmatch(r"[0-9a-f]+", digest):
        raise ValueError(f"checksum {checksum!r}: a {algo} digest is {_HEX_LENGTHS[algo]} hex digits")
    return algo, digest


def already_there(dest: Path, algo: str, expected: str) -> bool:
    """Whether ``dest`` holds the file with this digest already; a file that does not match is logged, to be fetched
    again."""
    if not dest.is_file():
        return False
    if hash_file(dest, algo) == expected:
        log.info("%s is already fetched and its %s matches", dest, algo)
        return True
    log.warning("%s exists but its %s does not match %s; fetching it again", dest, algo, expected)
    return False


def download_file(
    url: str,
    dest: Path,
    checksum: str,
    *,
    progress: bool = True,
    timeout: float = 60.0,
    retries: int = 3,
) -> Path:
    """Download url to dest, resuming a partial download, verifying the checksum, renaming into place.

    ``checksum`` is ``"md5:<hex>"`` or ``"sha256:<hex>"``. A ``dest`` that already matches it is returned
    without touching the network. ``timeout`` is per socket operation, in seconds; transient failures are
    retried ``retries`` times, each retry resuming where the last one stopped.
    """
    dest = Path(dest)
    algo, expected = parse_checksum(checksum)
    if urllib.parse.urlsplit(url).scheme not in ("http", "https"):
        raise DownloadError(f"{url}: only http:// and https:// URLs are supported")
    if already_there(dest, algo, expected):
        return dest
    part = dest.with_name(dest.name + ".part")
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DownloadError(f"cannot create {dest.parent} to download {url} into: {exc}") from exc

    failures = 0
    while True:
        try:
            complete = _fetch(url, part, progress=progress, timeout=timeout)
        except _TransientError as exc:
            failures += 1
            if failures > retries:
                raise DownloadError(
                    f"{url}: download failed after {failures} attempts ({exc}); the {_size(part)} received "
                    f"are kept in {part}, run again to resume"
                ) from exc
            delay = min(_BACKOFF_S * 2 ** (failures - 1), _MAX_BACKOFF_S)
            log.warning("%s: %s; retry %d of %d in %.1f s", url, exc, failures, retries, delay)
            time.sleep(delay)
            continue
        if complete:
            break
        # The server says the .part already covers the whole file (416); if it is wrong, start from scratch.
        if hash_file(part, algo) == expected:
            break
        log.warning("%s does not match the file at %s; downloading it again from the start", part, url)
        part.unlink()

    actual = hash_file(part, algo)
    if actual != expected:
        part.unlink(missing_ok=True)
        raise DownloadError(
            f"{url}: checksum mismatch: expected {algo}:{expected}, got {algo}:{actual}; the downloaded file "
            f"was removed. Check the URL (a proxy or error page?) and run again."
        )
    os.replace(part, dest)
    log.info("downloaded %s (%s, %s verified)", dest, _size(dest), algo)
    return dest


def _size(path: Path) -> str:
    n = path.stat().st_size if path.exists() else 0
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n} bytes"


def _fetch(url: str, part: Path, *, progress: bool, timeout: float) -> bool:
    """One attempt: append the rest of ``url`` to ``part``. False when the server says none is left (416)."""
    offset = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": _USER_AGENT, "Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
        log.info("resuming %s from byte %d", url, offset)
    else:
        log.info("downloading %s", url)
    request = urllib.request.Request(url, headers=headers)
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as exc:
        exc.close()
        if exc.code == 416 and offset:
            return False
        if exc.code >= 500 or exc.code in (408, 429):
            raise _TransientError(f"HTTP {exc.code} {exc.reason}") from exc
        raise DownloadError(
            f"{url}: HTTP {exc.code} {exc.reason}; check the URL (data.archives, data.base_url) and that the file "
            "is there"
        ) from exc
    except (OSError, http.client.HTTPException) as exc:  # URLError, refused, reset, timeout, bad status line
        raise _TransientError(f"{type(exc).__name__}: {getattr(exc, 'reason', exc)}") from exc

    with response:
        length = response.headers.get("Content-Length")
        expected_body = int(length) if length and length.isdigit() else None
        if response.status == 206:
            match = _CONTENT_RANGE.fullmatch(response.headers.get("Content-Range", "").strip())
            if match is None or int(match.group(1)) != offset:
                part.unlink(missing_ok=True)
                raise _TransientError(
                    f"server answered Range bytes={offset}- with Content-Range "
                    f"{response.headers.get('Content-Range')!r}; starting over"
                )
            total = int(match.group(3)) if match.group(3) != "*" else None
            mode = "ab"
        elif response.status == 200:
            if offset:
                log.info("%s ignores Range requests; downloading from the start", url)
                offset = 0
            total = expected_body
            mode = "wb"
        else:
            raise DownloadError(f"{url}: unexpected HTTP {response.status} {response.reason}")
        if total is None and expected_body is not None:
            total = offset + expected_body
        _copy_body(response, part, mode, offset, total, expected_body, progress)
    return True


def _copy_body(
    response: http.client.HTTPResponse,
    part: Path,
    mode: str,
    offset: int,
    total: int | None,
    expected_body: int | None,
    progress: bool,
) -> None:
    received = 0
    bar = tqdm(
        total=total,
        initial=offset,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        desc=part.name.removesuffix(".part"),
        file=sys.stderr,
        disable=not progress,
    )
    try:
        fh = open(part, mode)  # noqa: SIM115 - closed below, with write errors told apart from network errors
    except OSError as exc:
        bar.close()
        raise DownloadError(f"cannot write {part}: {exc}") from exc
    with bar, fh:
        while True:
            try:
                chunk = response.read(_CHUNK)
            except (OSError, http.client.HTTPException) as exc:  # reset, timeout, IncompleteRead (chunked)
                raise _TransientError(f"{type(exc).__name__} after {offset + received} bytes: {exc}") from exc
            if not chunk:
                break
            try:
                fh.write(chunk)
            except OSError as exc:
                raise DownloadError(f"cannot write {part}: {exc}") from exc
            received += len(chunk)
            bar.update(len(chunk))
    # http.client returns b"" at a premature end of a Content-Length body instead of raising, so count.
    if expected_body is not None and received < expected_body:
        got, want = offset + received, offset + expected_body
        raise _TransientError(f"connection closed after {got} of {want} bytes")

