"""`signpost edge update`: a verified bundle is swapped in atomically and self-tested in a fresh process; a bad one
is rolled back with `current` on the old bundle, a wrong signature changes nothing, and the source may be a loopback
HTTP server behind a bearer key."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from signpost import signing
from signpost.artifacts import hash_file
from signpost.edge.bundle import BUNDLE_JSON, SAMPLES_JSON, open_bundle, write_tarball
from signpost.edge.update import UpdateError, update


def _variant(edge_bundle, edge_keys, tmp_path: Path, suffix: str, *, version: str | None = None,
             wrong_samples: bool = False, signer: Path | None = None, same_name: bool = False) -> Path:
    """The session's bundle as another bundle (``<name>-<suffix>``, or ``<name>`` when ``same_name``: repackaged),
    edited and validly signed again by ``signer`` (default: the trusted key); returns its tarball."""
    name = edge_bundle.path.name if same_name else f"{edge_bundle.path.name}-{suffix}"
    folder = Path(shutil.copytree(edge_bundle.path, tmp_path / "made" / name))
    info = json.loads((folder / BUNDLE_JSON).read_text())
    info["model_version"] = version or f"{info['model_version']}-{suffix}"
    (folder / BUNDLE_JSON).write_text(json.dumps(info))
    if wrong_samples:  # every sample claims a class its program does not give it
        samples = json.loads((folder / SAMPLES_JSON).read_text())
        classes = len(info["class_names"])
        (folder / SAMPLES_JSON).write_text(json.dumps({k: (v + 1) % classes for k, v in samples.items()}))
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["files"] = {name: hash_file(folder / name) for name in manifest["files"]}
    manifest["key"] = hashlib.sha256(json.dumps(manifest["files"], sort_keys=True).encode()).hexdigest()
    text = json.dumps(manifest, indent=2) + "\n"
    (folder / "manifest.json").write_text(text)
    before = signing.current()
    edge_keys.sign_with(signer)
    signing.sign(folder, text.encode())
    signing.configure(before)
    return write_tarball(folder, tmp_path / "made" / f"{folder.name}.tar.gz")


def _snapshot(home: Path) -> list[tuple[str, str]]:
    """Every path under ``home`` with what it is: a link's target, a file's hash, or a folder."""
    out = []
    for path in sorted(home.rglob("*")):
        name = path.relative_to(home).as_posix()
        out.append((name, "-> " + os.readlink(path) if path.is_symlink()
                    else hash_file(path) if path.is_file() else "dir"))
    return out


@pytest.fixture
def home(edge_bundle, edge_keys, tmp_path: Path) -> Path:
    """A device home with the session's bundle installed and current."""
    edge_keys.trust()
    home = tmp_path / "home"
    result = update(home, str(edge_bundle.tarball))
    assert result.outcome == "installed"
    return home


def test_install_then_the_same_bundle_again_is_already_current(home: Path, edge_bundle) -> None:
    current = home / "current"
    assert current.is_symlink() and os.readlink(current) == f"bundles/{edge_bundle.path.name}"
    assert not (home / "previous").exists()
    assert open_bundle(current).model_version == open_bundle(edge_bundle.path).model_version
    before = _snapshot(home)
    assert update(home, str(edge_bundle.tarball)).outcome == "already current"
    assert _snapshot(home) == before


def test_an_update_swaps_current_and_keeps_the_old_one_as_previous(home: Path, edge_bundle, edge_keys,
                                                                   tmp_path: Path) -> None:
    tarball = _variant(edge_bundle, edge_keys, tmp_path, "v2")
    result = update(home, str(tarball))
    assert result.outcome == "installed" and result.model_version.endswith("-v2")
    assert os.readlink(home / "current") == f"bundles/{edge_bundle.path.name}-v2"
    assert os.readlink(home / "previous") == f"bundles/{edge_bundle.path.name}"
    assert not [p for p in home.iterdir() if p.name.startswith(".")]  # no temporary folder or link left
    update(home, str(_variant(edge_bundle, edge_keys, tmp_path, "v3")))
    kept = sorted(p.name for p in (home / "bundles").iterdir())
    assert kept == [f"{edge_bundle.path.name}-v2", f"{edge_bundle.path.name}-v3"]  # current and previous only


def test_a_bundle_that_fails_its_self_test_is_rolled_back(home: Path, edge_bundle, edge_keys,
                                                          tmp_path: Path) -> None:
    tarball = _variant(edge_bundle, edge_keys, tmp_path, "bad", wrong_samples=True)
    with pytest.raises(UpdateError, match=r"failed its self-test and was rolled back \(current is .* again\): "
                                          r"self-test failed: samples/\d+\.png came out as class"):
        update(home, str(tarball))
    assert os.readlink(home / "current") == f"bundles/{edge_bundle.path.name}"
    assert not (home / "previous").exists()
    assert not (home / "bundles" / f"{edge_bundle.path.name}-bad").exists()
    assert (home / "rejected" / f"{edge_bundle.path.name}-bad").is_dir()  # kept out of the way, for a person


@pytest.mark.parametrize("how", ["another key", "changed after signing"])
def test_a_wrong_signature_is_refused_and_changes_nothing(home: Path, edge_bundle, edge_keys, tmp_path: Path,
                                                          how: str) -> None:
    if how == "another key":
        tarball = _variant(edge_bundle, edge_keys, tmp_path, "evil", signer=edge_keys.other_private)
        why = "which is not trusted here"
    else:
        tarball = _variant(edge_bundle, edge_keys, tmp_path, "evil")
        folder = tmp_path / "made" / f"{edge_bundle.path.name}-evil"
        (folder / "model.pte").write_bytes((folder / "model.pte").read_bytes() + b"\0")
        tarball = write_tarball(folder, tarball)
        why = "model.pte does not match its manifest"
    before = _snapshot(home)
    with pytest.raises(UpdateError, match=why):
        update(home, str(tarball))
    assert _snapshot(home) == before


@pytest.fixture
def bundle_server(edge_bundle, edge_keys, tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A loopback HTTP server that serves ``made/*.tar.gz`` to a request with ``Authorization: Bearer sekrit``."""
    served = tmp_path / "made"
    served.mkdir(exist_ok=True)

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.headers.get("Authorization") != "Bearer sekrit":
                self.send_error(401)
                return
            if self.path.startswith("/moved/"):  # a redirect to elsewhere: the key must not follow it
                self.send_response(302)
                self.send_header("Location", f"http://127.0.0.1:{self.server.server_address[1]}/{self.path[7:]}")
                self.end_headers()
                return
            path = served / self.path.lstrip("/")
            if "/" in self.path.lstrip("/") or not path.is_file():
                self.send_error(404)
                return
            data = path.read_bytes()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.1,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", served
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def test_update_from_a_loopback_server_with_a_bearer_key(home: Path, edge_bundle, edge_keys, tmp_path: Path,
                                                         bundle_server: tuple[str, Path]) -> None:
    url, _ = bundle_server
    tarball = _variant(edge_bundle, edge_keys, tmp_path, "v3")
    before = _snapshot(home)
    with pytest.raises(UpdateError, match=r"HTTP 401 .*check --key-file"):
        update(home, f"{url}/{tarball.name}", key="wrong")
    refused = r"HTTP 302 redirected to http://127\.0\.0\.1:\d+/\S+-v3\.tar\.gz, which is refused"
    with pytest.raises(UpdateError, match=refused):
        update(home, f"{url}/moved/{tarball.name}", key="sekrit")
    with pytest.raises(UpdateError, match="more than 1,000 bytes"):
        update(home, f"{url}/{tarball.name}", key="sekrit", max_bytes=1000)
    assert _snapshot(home) == before
    assert update(home, f"{url}/{tarball.name}", key="sekrit").outcome == "installed"
    assert os.readlink(home / "current") == f"bundles/{tarball.name.removesuffix('.tar.gz')}"


def test_cli_edge_update_exit_codes(home: Path, edge_bundle, edge_keys, tmp_path: Path,
                                    capsys: pytest.CaptureFixture) -> None:
    from signpost.cli import main

    base = ["edge", "update", "--home", str(home), "--public-key", str(edge_keys.public)]
    assert main([*base, "--source", str(edge_bundle.tarball)]) == 0
    assert "is already current" in capsys.readouterr().out
    evil = _variant(edge_bundle, edge_keys, tmp_path, "evil", signer=edge_keys.other_private)
    before = _snapshot(home)
    assert main([*base, "--source", str(evil)]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "not trusted here" in err
    assert _snapshot(home) == before
    assert main(["edge", "update", "--home", str(tmp_path / "new"), "--source", str(edge_bundle.tarball)]) == 1
    assert "no public key is trusted" in capsys.readouterr().err


def test_an_agent_on_current_keeps_its_version_through_a_bad_update(home: Path, edge_bundle, edge_keys,
                                                                    tmp_path: Path) -> None:
    from signpost.edge.agent import Model

    model = Model(home / "current", threads=1)  # what `signpost edge run --bundle H/current` runs
    old = model.bundle.model_version
    image = model.bundle.samples[0][0].read_bytes()
    before = model.classify(image).record.class_id
    bad = _variant(edge_bundle, edge_keys, tmp_path, "bad", wrong_samples=True)
    stop, versions, errors = threading.Event(), [], []

    def agent() -> None:  # the agent's loop: re-resolve the link between images, classify
        while not stop.is_set() and len(versions) < 100_000:
            model.refresh()
            try:
                versions.append(model.classify(image).record.model_version)
            except Exception as exc:  # any failure to classify fails the test below
                errors.append(exc)
                return

    thread = threading.Thread(target=agent)
    thread.start()
    try:
        with pytest.raises(UpdateError, match="rolled back"):
            update(home, str(bad))
    finally:
        stop.set()
        thread.join(timeout=60)
    model.refresh()
    # Not one answer from the bad bundle, even while it was `current` for its self-test: the agent waits while an
    # update is pending.
    assert not errors and versions and set(versions) == {old}
    answer = model.classify(image)
    assert model.bundle.model_version == old and answer.record.model_version == old
    assert answer.record.class_id == before


@pytest.mark.slow
def test_an_update_killed_at_any_moment_leaves_current_on_a_verified_bundle(home: Path, edge_bundle, edge_keys,
                                                                           tmp_path: Path) -> None:
    tarball = _variant(edge_bundle, edge_keys, tmp_path, "v4")
    old, new = os.readlink(home / "current"), f"bundles/{edge_bundle.path.name}-v4"
    env = {**os.environ, signing.PUBLIC_KEYS_ENV: edge_keys.public.read_text()}
    command = [sys.executable, "-m", "signpost.cli", "edge", "update", "--home", str(home), "--source", str(tarball)]
    for delay in (0.5, 2.0, 4.0, 6.0, 8.0, 10.0):  # s: in the imports, the download, the switch, the self-test
        process = subprocess.Popen(command, env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL)
        try:
            process.wait(timeout=delay)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)  # the update and its self-test process, as a power cut would
            process.wait(timeout=30)
        assert os.readlink(home / "current") in (old, new)
        open_bundle(home / "current")  # complete, signature and hashes good
    result = update(home, str(tarball))  # the next update finishes the job, whatever the kill left
    assert result.outcome in ("installed", "already current")
    assert os.readlink(home / "current") == new
    assert not [p for p in home.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("how", ["relative", "through a symlink"])
def test_a_home_given_relative_or_through_a_symlink_keeps_the_live_bundle(home: Path, edge_bundle, edge_keys,
                                                                          tmp_path: Path, how: str,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    # The same folder name repackaged (another version): the installed one must not be deleted to make room.
    tarball = _variant(edge_bundle, edge_keys, tmp_path, "repack", same_name=True)
    old_version = open_bundle(home / "current").model_version
    if how == "relative":
        monkeypatch.chdir(home.parent)
        given = Path(home.name)
    else:
        given = tmp_path / "home-link"
        given.symlink_to(home)
    result = update(given, str(tarball))
    assert result.outcome == "installed" and result.model_version.endswith("-repack")
    assert open_bundle(home / "current").model_version.endswith("-repack")
    assert open_bundle(home / "previous").model_version == old_version  # still there, whole and verified
    assert not (home / "current").samefile(home / "previous")


def test_a_second_update_while_one_runs_is_refused_and_changes_nothing(home: Path, edge_bundle, edge_keys,
                                                                       tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    import signpost.edge.update as edge_update

    first, second = (_variant(edge_bundle, edge_keys, tmp_path, name) for name in ("first", "second"))
    real, seen = edge_update._self_test_process, []

    def self_test_during_which_another_update_starts(link: Path, timeout: float) -> str | None:
        before = _snapshot(home)
        with pytest.raises(UpdateError, match="another update is running; wait for it to finish"):
            update(home, str(second))
        seen.append(_snapshot(home) == before)  # not even the first one's incoming files touched
        return real(link, timeout)

    monkeypatch.setattr(edge_update, "_self_test_process", self_test_during_which_another_update_starts)
    assert update(home, str(first)).model_version.endswith("-first")
    assert seen == [True]
    assert os.readlink(home / "current") == f"bundles/{edge_bundle.path.name}-first"
    monkeypatch.setattr(edge_update, "_self_test_process", real)
    assert update(home, str(second)).outcome == "installed"  # the lock was released


def test_an_update_syncs_what_it_writes_before_it_counts(home: Path, edge_bundle, edge_keys, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    tarball = _variant(edge_bundle, edge_keys, tmp_path, "v2")
    synced, real_fsync = [], os.fsync

    def fsync(fd: int) -> None:  # the path of each fd synced, as the kernel names it (Linux)
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    update(home, str(tarball))
    names = [Path(p).name for p in synced]
    assert {"model.pte", "manifest.json", "samples"} <= set(names)  # the unpacked files and folders
    assert str(home / "bundles") in synced  # the move into bundles/
    assert any(name.startswith(".tmp-.update-pending") for name in names)  # the pending file's content
    assert synced.count(str(home)) >= 4  # pending written, previous and current switched, pending removed


def test_a_key_of_more_than_one_line_is_refused_without_showing_it(home: Path, edge_bundle, edge_keys,
                                                                   tmp_path: Path, bundle_server: tuple[str, Path],
                                                                   capsys: pytest.CaptureFixture) -> None:
    from signpost.cli import main

    url, _ = bundle_server
    tarball = _variant(edge_bundle, edge_keys, tmp_path, "v2")
    key_file = tmp_path / "device.key"
    key_file.write_text("sekrit\nsekrit-two\n")
    before = _snapshot(home)
    assert main(["edge", "update", "--home", str(home), "--source", f"{url}/{tarball.name}", "--key-file",
                 str(key_file), "--public-key", str(edge_keys.public)]) == 2
    err = capsys.readouterr().err
    assert "expected the key on one line" in err and "sekrit" not in err
    for key in ("sekrit\r\nX-Evil: 1", "sekrit\x00"):  # the library refuses too, naming the fix, not the key
        with pytest.raises(UpdateError, match="not one line of printable ASCII; check --key-file") as caught:
            update(home, f"{url}/{tarball.name}", key=key)
        assert "sekrit" not in str(caught.value)
    assert _snapshot(home) == before


def test_the_download_ignores_proxy_settings(home: Path, edge_bundle, edge_keys, tmp_path: Path,
                                             bundle_server: tuple[str, Path],
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    url, _ = bundle_server
    tarball = _variant(edge_bundle, edge_keys, tmp_path, "v2")
    for name in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY"):
        monkeypatch.setenv(name, "http://127.0.0.1:9")  # nothing listens there: a proxy used is a failure
    for name in ("no_proxy", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
    assert update(home, f"{url}/{tarball.name}", key="sekrit").outcome == "installed"


def test_a_download_that_trickles_past_its_deadline_is_cut_off(tmp_path: Path) -> None:
    import time

    from signpost.edge.update import _copy_bounded

    calls = []

    def trickle(size: int) -> bytes:  # a byte per read, for ever (bounded here so that a failure ends)
        calls.append(size)
        return b"x" if len(calls) < 100_000 else b""

    with pytest.raises(UpdateError, match=r"http://h/b\.tar\.gz: not downloaded within \d+ s \(1 bytes so far\)"):
        _copy_bounded(trickle, tmp_path / "out", "http://h/b.tar.gz", 1 << 20, time.monotonic() - 1.0)
    assert len(calls) == 1


def test_the_self_test_does_not_import_from_the_working_directory(home: Path, edge_bundle, edge_keys,
                                                                  tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    tarball = _variant(edge_bundle, edge_keys, tmp_path, "v2")
    cwd = tmp_path / "cwd"
    (cwd / "signpost").mkdir(parents=True)
    marker = tmp_path / "shadow-imported"
    (cwd / "signpost" / "__init__.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    monkeypatch.chdir(cwd)
    assert update(home, str(tarball)).outcome == "installed"
    assert not marker.exists()
