"""``signpost edge update``: fetch a bundle, verify it, swap it in atomically, self-test it, roll back on failure.

A device's home folder holds ``bundles/<name>/`` (unpacked, verified bundles), ``current`` (a relative symlink to
the one the agent runs) and ``previous`` (the one before). An update holds an exclusive lock on H (a second one is
refused) and:

1. downloads the tarball (a path, or an http(s) URL with an optional bearer key) into ``H/.incoming-*/``, bounded
   in size;
2. unpacks it there (safe extraction: ``bundle.unpack``) and opens it: signature and every hash are checked before
   any file of it is parsed; a refusal removes the incoming folder and leaves H as it was;
3. moves it to ``bundles/<name>``, points ``previous`` at the old bundle and ``current`` at the new one, each by
   renaming a new symlink over the old (atomic on POSIX);
4. runs the self-test in a fresh process that opens ``current`` as the agent would; when it fails, ``current`` is
   pointed back at the old bundle and the new one moved to ``rejected/``; when it passes, bundles neither
   ``current`` nor ``previous`` points at are removed.

``current`` only ever points at a complete bundle whose signature and hashes were checked, whenever the process is
killed; an update killed between the switch and the end of its self-test is rolled back by the next update (the
``.update-pending`` file says from what). The self-test's entry point: ``python -m signpost.edge.update --self-test
BUNDLE``.
"""

from __future__ import annotations

import fcntl
import http.client
import json
import logging
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from signpost import signing
from signpost.edge.bundle import BundleError, fsync_dir, open_bundle, self_test, unpack

log = logging.getLogger(__name__)

BUNDLES, CURRENT, PREVIOUS, REJECTED = "bundles", "current", "previous", "rejected"
PENDING = ".update-pending"  # JSON: the bundles current and previous pointed at before a switch, and the new one
MAX_DOWNLOAD_BYTES = 256 << 20  # 256 MiB compressed: the demo's bundle is well under 1 MiB
DOWNLOAD_TIMEOUT_S = 60.0  # per socket operation
DOWNLOAD_DEADLINE_S = 1800.0  # the whole download: 256 MiB at 150 KiB/s; a server that trickles is cut off
SELF_TEST_TIMEOUT_S = 300.0  # loading an ExecuTorch program and classifying a few images takes seconds
SELF_TEST_FLAG = "--self-test"


class UpdateError(RuntimeError):
    """An update that was refused or rolled back; the message says why. The home folder's ``current`` is as it
    was before the update."""


@dataclass(frozen=True)
class UpdateResult:
    """What an update did: ``installed``, ``already current``."""

    outcome: str
    bundle: Path  # the bundle ``current`` points at now
    model_version: str
    previous: Path | None = None


def update(home: Path, source: str, *, key: str | None = None, max_bytes: int = MAX_DOWNLOAD_BYTES,
           self_test_timeout: float = SELF_TEST_TIMEOUT_S) -> UpdateResult:
    """Install the bundle at ``source`` (a tarball path or an http(s) URL) as ``home/current`` (see the module doc).

    The signature policy is this process's (``signing.current()``); the self-test's process is given the same.
    Raises ``UpdateError`` (refused, or rolled back) with ``current`` unchanged. One update at a time per home: a
    second one while another runs is refused and changes nothing.
    """
    # Resolved once: the links' targets are compared with paths made from home, and a relative home or one
    # reached through a symlink would make the live bundle look like a leftover to delete.
    home = Path(home).resolve()
    for link in (CURRENT, PREVIOUS):
        if (home / link).exists() and not (home / link).is_symlink():
            raise UpdateError(f"{home / link} is not a symlink; move it away (updates keep {link} a link to a bundle)")
    (home / BUNDLES).mkdir(parents=True, exist_ok=True)
    lock = _lock(home)
    try:
        return _update_locked(home, source, key=key, max_bytes=max_bytes, self_test_timeout=self_test_timeout)
    finally:
        os.close(lock)  # releases the lock


def _lock(home: Path) -> int:
    """An exclusive lock on the home folder itself, held for the whole update (released when its fd is closed,
    also when the process dies). The folder, not a lock file: nothing is left behind in home."""
    fd = os.open(home, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise UpdateError(f"{home}: another update is running; wait for it to finish, then try again") from None
    return fd


def _update_locked(home: Path, source: str, *, key: str | None, max_bytes: int,
                   self_test_timeout: float) -> UpdateResult:
    _clean_leftovers(home)
    incoming = home / f".incoming-{uuid.uuid4().hex[:8]}"
    incoming.mkdir()
    try:
        tarball = _fetch(source, incoming / "bundle.tar.gz", key=key, max_bytes=max_bytes)
        try:
            bundle = open_bundle(unpack(tarball, incoming / "unpacked"))
        except BundleError as exc:
            raise UpdateError(f"refused {source}: {exc}") from None
        old = _target(home, CURRENT)
        if old is not None and old.name == bundle.root.name and _same(old, bundle.root):
            log.info("%s is already the current bundle", old)
            return UpdateResult("already current", old, bundle.model_version, _target(home, PREVIOUS))
        final = home / BUNDLES / bundle.root.name
        if _linked(final, old, _target(home, PREVIOUS)):  # the same name repackaged: never touch what a link
            final = final.with_name(f"{final.name}-{uuid.uuid4().hex[:6]}")  # points at
        elif final.exists():  # a copy left by an update killed before its swap: the verified one replaces it
            shutil.rmtree(final)
        os.rename(bundle.root, final)
        fsync_dir(final.parent)
    finally:
        shutil.rmtree(incoming, ignore_errors=True)
    old_previous = _target(home, PREVIOUS)
    # Written before the switch, removed once the self-test decided: an update killed in between is rolled back
    # by the next one (``_clean_leftovers``), so a bundle that never passed its self-test does not stay current.
    _write_atomic(home / PENDING, json.dumps({"old": old and str(old), "previous": old_previous and str(old_previous),
                                              "new": str(final)}))
    if old is not None:
        _point(home, PREVIOUS, old)
    _point(home, CURRENT, final)  # the switch: the agent picks it up at its next batch
    log.info("current -> %s; self-testing it in a fresh process", final.name)
    failure = _self_test_process(home / CURRENT, self_test_timeout)
    if failure is None:
        (home / PENDING).unlink()
        fsync_dir(home)  # a pending file back after a power cut would roll back an update that passed
        _prune(home, keep={final.name, old.name if old is not None else ""})
        return UpdateResult("installed", final, bundle.model_version, old)
    _roll_back(home, old, old_previous, final)
    (home / PENDING).unlink()
    fsync_dir(home)
    now = f"current is {old.name} again" if old is not None else "no bundle is current"
    raise UpdateError(f"{final.name} failed its self-test and was rolled back ({now}): {failure}")


def _linked(path: Path, *targets: Path | None) -> bool:
    """Whether ``path`` is (the same folder as) one of the links' targets: never removed or replaced."""
    for target in targets:
        try:
            if target is not None and path.exists() and path.samefile(target):
                return True
        except OSError:
            continue
    return False


def _same(a: Path, b: Path) -> bool:
    """Two verified bundles with byte-identical signed manifests are the same bundle."""
    try:
        return (a / "manifest.json").read_bytes() == (b / "manifest.json").read_bytes()
    except OSError:
        return False


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    """A redirect is refused, not followed: urllib would send the bearer key on to wherever it points."""

    def redirect_request(self, req: urllib.request.Request, fp: Any, code: int, msg: str, headers: Any,
                         newurl: str) -> None:
        raise urllib.error.HTTPError(req.full_url, code, f"redirected to {newurl}, which is refused (the key is "
                                     "sent to the URL given only): give the final URL", headers, fp)


def _fetch(source: str, dest: Path, *, key: str | None, max_bytes: int) -> Path:
    """Copy or download ``source`` to ``dest``, refusing more than ``max_bytes``."""
    scheme = urllib.parse.urlsplit(source).scheme.lower()
    if scheme in ("http", "https"):
        if key is not None and not (key.isascii() and key.isprintable()):
            # checked here: http.client would refuse the header with the key itself in its message
            raise UpdateError("the key is not one line of printable ASCII; check --key-file (one line, the key only)")
        request = urllib.request.Request(source, headers={"Authorization": f"Bearer {key}"} if key else {})
        try:
            # ProxyHandler({}): no http_proxy from the environment, which would see the key and the bundle
            opener = urllib.request.build_opener(urllib.request.ProxyHandler({}), _NoRedirects)
            with opener.open(request, timeout=DOWNLOAD_TIMEOUT_S) as response:  # http(s) only, checked above
                declared = response.headers.get("Content-Length")
                if declared and declared.isascii() and declared.isdigit() and int(declared) > max_bytes:
                    raise UpdateError(f"{source}: more than {max_bytes:,} bytes ({int(declared):,}); refused")
                # read1: what has arrived, so that the deadline is checked while a server trickles
                _copy_bounded(response.read1, dest, source, max_bytes, time.monotonic() + DOWNLOAD_DEADLINE_S)
        except urllib.error.HTTPError as exc:
            hint = "; check --key-file" if exc.code in (401, 403) else ""
            raise UpdateError(f"{source}: HTTP {exc.code} {exc.reason}{hint}") from None
        except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
            raise UpdateError(f"{source}: cannot download ({getattr(exc, 'reason', exc)})") from None
        return dest
    if scheme not in ("", "file") and len(scheme) > 1:  # one letter: a Windows drive
        raise UpdateError(f"{source}: unsupported source; give a tarball path or an http(s) URL")
    path = Path(urllib.parse.urlsplit(source).path if scheme == "file" else source)
    try:
        with open(path, "rb") as fh:
            _copy_bounded(fh.read, dest, source, max_bytes, time.monotonic() + DOWNLOAD_DEADLINE_S)
    except OSError as exc:
        raise UpdateError(f"{source}: cannot read ({exc.strerror or exc})") from None
    return dest


def _copy_bounded(read: Callable[[int], bytes], dest: Path, source: str, max_bytes: int, deadline: float) -> None:
    """Copy ``read``'s chunks to ``dest``: at most ``max_bytes``, and no later than ``deadline``
    (``time.monotonic()``, s): a source that trickles a byte at a time is cut off."""
    total = 0
    with open(dest, "wb") as out:
        while chunk := read(1 << 20):
            total += len(chunk)
            if total > max_bytes:
                raise UpdateError(f"{source}: more than {max_bytes:,} bytes; refused")
            if time.monotonic() > deadline:
                raise UpdateError(f"{source}: not downloaded within {DOWNLOAD_DEADLINE_S:.0f} s ({total:,} bytes "
                                  "so far); refused")
            out.write(chunk)


def _target(home: Path, link: str) -> Path | None:
    """The bundle folder ``home/link`` points at, or None."""
    path = home / link
    if not path.is_symlink():
        return None
    target = path.resolve()
    return target if target.is_dir() else None


def _point(home: Path, link: str, target: Path) -> None:
    """Make ``home/link`` a relative symlink to ``target`` by renaming a new link over it: atomic on POSIX, so a
    reader sees the old target or the new one, never no link."""
    tmp = home / f".{link}-{uuid.uuid4().hex[:8]}"
    os.symlink(os.path.relpath(target, home), tmp)
    try:
        os.replace(tmp, home / link)
    except OSError:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(home)  # the switch survives a power cut


def _roll_back(home: Path, old: Path | None, old_previous: Path | None, bad: Path | None) -> None:
    """``current`` back to ``old`` first (what the agent reads), then ``previous``; the bad bundle to rejected/."""
    if old is not None:
        _point(home, CURRENT, old)
    else:
        (home / CURRENT).unlink(missing_ok=True)
    if old_previous is not None:
        _point(home, PREVIOUS, old_previous)
    elif old is not None:
        (home / PREVIOUS).unlink(missing_ok=True)
    if bad is None:
        return
    rejected = home / REJECTED / bad.name
    if rejected.exists():
        shutil.rmtree(rejected)
    rejected.parent.mkdir(exist_ok=True)
    os.rename(bad, rejected)  # kept for a person to look at; never pointed at again
    fsync_dir(rejected.parent)
    log.warning("rolled back: %s moved to %s", bad.name, rejected)


def _clean_leftovers(home: Path) -> None:
    """What an update that was killed left: incoming folders and temporary links (never pointed at, removed), and
    a switch whose self-test never finished (rolled back: the old bundle is current again)."""
    home = home.resolve()  # as in update: the pending file's paths are resolved ones
    for path in home.iterdir():
        if path.name.startswith(".incoming-"):
            shutil.rmtree(path, ignore_errors=True)
        elif path.name.startswith((".tmp-", f".{CURRENT}-", f".{PREVIOUS}-")) and (path.is_symlink() or path.is_file()):
            path.unlink(missing_ok=True)  # a temporary link or pending file
    if not (home / PENDING).is_file():
        return
    try:
        pending = json.loads((home / PENDING).read_text(encoding="utf-8"))
        old, previous, new = (pending[k] and Path(pending[k]) for k in ("old", "previous", "new"))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UpdateError(f"{home / PENDING}: unreadable ({exc}); point {home / CURRENT} at a bundle by hand and "
                          "remove it") from None
    log.warning("an update to %s was interrupted before its self-test finished: rolling it back", new.name)
    _roll_back(home, old if old and old.is_dir() else None, previous if previous and previous.is_dir() else None,
               new if new.is_dir() else None)
    (home / PENDING).unlink()
    fsync_dir(home)


def _prune(home: Path, keep: set[str]) -> None:
    """Remove the bundles neither ``current`` nor ``previous`` points at: a device's disk holds two. An agent still
    running an older one keeps running it (its program was read into memory when it was opened)."""
    for path in (home / BUNDLES).iterdir():
        if path.name not in keep and path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
            log.info("removed %s: neither current nor previous", path.name)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".tmp-{path.name}-{uuid.uuid4().hex[:8]}")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())  # the content on disk before the name: never an empty file after a power cut
    os.replace(tmp, path)
    fsync_dir(path.parent)


def _self_test_process(link: Path, timeout: float) -> str | None:
    """Run the self-test of the bundle at ``link`` in a fresh Python, trusting what this process trusts; None when
    it passed, else the reason (its last line)."""
    policy = signing.current()
    env = {k: v for k, v in os.environ.items() if k != signing.SIGNING_KEY_ENV}  # it verifies only
    if policy.trusted:
        env[signing.PUBLIC_KEYS_ENV] = signing.public_pem(policy.trusted)
    else:
        env.pop(signing.PUBLIC_KEYS_ENV, None)
    # -P (3.11+) and cwd=home: the working directory is not put first on sys.path, so a signpost/ or torch.py
    # lying there is not what the self-test imports
    safe_path = ["-P"] if sys.version_info >= (3, 11) else []
    command = [sys.executable, *safe_path, "-m", "signpost.edge.update", SELF_TEST_FLAG, str(link)]
    if policy.allow_unsigned:
        command.append("--allow-unsigned")
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env,
                              cwd=link.parent)
    except subprocess.TimeoutExpired:
        return f"the self-test took more than {timeout:.0f} s"
    if done.returncode == 0:
        return None
    lines = (done.stderr or done.stdout).strip().splitlines()
    return lines[-1] if lines else f"the self-test exited {done.returncode}"


def _self_test_main(argv: list[str]) -> int:
    """``python -m signpost.edge.update --self-test LINK [--allow-unsigned]``: open and self-test as the agent would;
    exit 0 when every sample comes out as recorded, else 1 with the reason on the last line of stderr."""
    if len(argv) < 2 or argv[0] != SELF_TEST_FLAG:
        print(f"usage: python -m signpost.edge.update {SELF_TEST_FLAG} BUNDLE [--allow-unsigned]", file=sys.stderr)
        return 2
    signing.configure(signing.policy_from(allow_unsigned="--allow-unsigned" in argv[2:]))
    try:
        bundle = open_bundle(Path(argv[1]))
        self_test(bundle)
    except BundleError as exc:
        print(str(exc), file=sys.stderr)
        return 1
    print(f"self-test passed: {len(bundle.samples)} samples of {bundle.model_version}")
    return 0


if __name__ == "__main__":
    sys.exit(_self_test_main(sys.argv[1:]))
