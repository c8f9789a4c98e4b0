"""Artifacts are the contract between stages: a folder of files plus a ``manifest.json`` that records what made it.

A folder's name is derived from the hash of everything that went into it (inputs, resolved config, code version),
so the same inputs give the same folder and a stage can skip safely. A folder is built under a temporary name and
renamed into place only when complete, with the manifest written last: a folder that has a manifest is whole.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import importlib.metadata
import json
import logging
import os
import platform
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import signpost
from signpost import signing

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
SCHEMA_VERSION = 1
_CHUNK = 1 << 20


class ArtifactError(RuntimeError):
    """An artifact folder that is missing, incomplete or does not match its manifest."""


def hash_file(path: Path, algo: str = "sha256") -> str:
    """Hex digest of a file's bytes: SHA-256, or another ``hashlib`` algorithm such as md5 for a published checksum."""
    digest = hashlib.new(algo)
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def hash_json(obj: Any) -> str:
    """Hex SHA-256 of a JSON-able object in canonical form (sorted keys, no whitespace)."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def code_version(*modules: str) -> str:
    """Hash of the source files of the given modules (packages include every ``.py`` below them).

    A stage keys its artifacts on the version of the code that makes them, so a change to that code makes a new
    artifact instead of silently reusing one built by the old code.
    """
    digest = hashlib.sha256()
    for name in sorted(modules):
        spec = __import__(name, fromlist=["__file__"])
        origin = Path(spec.__file__)
        files = sorted(origin.parent.rglob("*.py")) if origin.name == "__init__.py" else [origin]
        for file in files:
            digest.update(file.name.encode())
            digest.update(file.read_bytes())
    return digest.hexdigest()[:16]


def git_revision() -> str | None:
    """The git commit of the working tree Signpost runs from, or None outside a checkout."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(signpost.__file__).parent,
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def library_versions() -> dict[str, str]:
    """Versions of the libraries that decide what an artifact contains."""
    versions = {"python": platform.python_version(), "signpost": signpost.__version__}
    for dist in ("torch", "numpy", "pillow", "safetensors", "pydantic", "torchao", "onnxruntime", "onnx"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            versions[dist] = importlib.metadata.version(dist)
    return versions


def artifact_path(workdir: Path, stage: str, name: str, key: str) -> Path:
    """Where the artifact of ``stage`` with input hash ``key`` lives: ``workdir/stage/name-key[:12]``."""
    return Path(workdir) / stage / f"{name}-{key[:12]}"


def latest_artifact(
    workdir: Path, stage: str, name: str, settings: dict[str, Any] | None = None
) -> Path | None:
    """The most recently finished artifact of ``stage`` made for the experiment ``name``, or None.

    With ``settings``, only one made with exactly those settings counts (``find_artifact``).
    """
    return find_artifact(workdir, stage, name, settings)[0]


def find_artifact(
    workdir: Path, stage: str, name: str, settings: dict[str, Any] | None = None
) -> tuple[Path | None, list[str]]:
    """The newest finished artifact of ``stage`` whose manifest names the experiment ``name`` (and, given
    ``settings``, the hash of those settings), and why each newer one that may look like it was passed over.

    The experiment is read from the manifest, never from the folder's name: a prefix would let ``gtsrb`` pick up
    ``gtsrb-kaggle-…``. Passed over, newest first, one line each: an artifact of this experiment made with other
    settings, and one of an older Signpost whose manifest names no experiment (its folder name says ``name``).
    Another experiment's artifacts are neither picked nor listed.
    """
    wanted = None if settings is None else hash_json(settings)
    passed_over: list[str] = []
    for folder, manifest in _finished(Path(workdir) / stage):
        owner = manifest.get("experiment")
        if not isinstance(owner, dict):
            if folder.name.rpartition("-")[0] == name:
                passed_over.append(f"{folder} (made by an older Signpost: its manifest names no experiment)")
            continue
        if owner.get("name") != name:
            continue
        if wanted is None or owner.get("config_sha256") == wanted:
            return folder, passed_over
        passed_over.append(f"{folder} (made with other settings: {_differences(manifest.get('config'), settings)})")
    return None, passed_over


def _finished(folder: Path) -> list[tuple[Path, dict[str, Any]]]:
    """Every finished artifact directly in ``folder`` with its manifest, the most recently finished first."""
    found = []
    for path in folder.iterdir() if folder.is_dir() else ():
        try:
            found.append(((path / MANIFEST).stat().st_mtime_ns, path, read_manifest(path)))
        except (OSError, ArtifactError):
            continue  # not an artifact, or not a finished one (temporary folders, an interrupted write)
    return [(path, manifest) for _, path, manifest in sorted(found, key=lambda f: (f[0], f[1].name), reverse=True)]


def _differences(recorded: Any, settings: dict[str, Any] | None) -> str:
    """``image_size 48 there, 32 here; ...``: the settings an artifact was made with that differ from ``settings``."""
    recorded = recorded if isinstance(recorded, dict) else {}
    settings = settings or {}

    def show(values: dict[str, Any], key: str) -> str:
        return json.dumps(values[key], default=str) if key in values else "unset"

    changed = [
        f"{key} {show(recorded, key)} there, {show(settings, key)} here"
        for key in sorted(set(recorded) | set(settings))
        if key not in recorded or key not in settings or hash_json(recorded[key]) != hash_json(settings[key])
    ]
    return "; ".join(changed) or "the same values, hashed differently"


def is_complete(folder: Path) -> bool:
    """True when ``folder`` holds a finished artifact (its manifest is written last)."""
    return (Path(folder) / MANIFEST).is_file()


@contextlib.contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a temporary folder beside ``final``; rename it to ``final`` when the block succeeds.

    On any exception (KeyboardInterrupt included) the temporary folder is removed and ``final`` is untouched.
    If another process finished ``final`` first, ours is discarded and theirs kept.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".tmp-{final.name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        if final.exists() and not is_complete(final):
            shutil.rmtree(final)  # leftovers of a crash that predates atomic writes
        try:
            os.rename(tmp, final)
        except OSError:
            if not is_complete(final):
                raise
            log.info("%s was completed by another process; keeping that one", final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def write_manifest(
    folder: Path,
    *,
    stage: str,
    key: str,
    experiment: str | None = None,
    inputs: dict[str, Any],
    config: dict[str, Any],
    code: str,
    metrics: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Hash every file in ``folder`` and write the manifest last. Returns the manifest.

    ``experiment``: the config's ``name``. With the hash of ``config`` (the settings that decide this artifact) it
    is recorded as the artifact's ``experiment``, which is how later stages find their inputs (``find_artifact``).
    Every stage passes it; a manifest without it (hand-made, or an older Signpost's) is never picked as an input.
    """
    folder = Path(folder)
    files = {
        p.relative_to(folder).as_posix(): hash_file(p)
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.relative_to(folder).as_posix() not in (MANIFEST, signing.SIGNATURE)
    }
    manifest: dict[str, Any] = {
        "schema": SCHEMA_VERSION,
        "stage": stage,
        "key": key,
        **({"experiment": {"name": experiment, "config_sha256": hash_json(config)}} if experiment else {}),
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "inputs": inputs,
        "config": config,
        "code": {"version": code, "git": git_revision(), "signpost": signpost.__version__},
        "libraries": library_versions(),
        "files": files,
        "metrics": metrics or {},
    }
    if extra:
        manifest.update(extra)
    text = json.dumps(manifest, indent=2, sort_keys=False) + "\n"
    (folder / MANIFEST).write_text(text, encoding="utf-8")
    signing.sign(folder, text.encode("utf-8"))  # when this process has a signing key
    return manifest


def read_manifest(folder: Path, *, signed: bool = False) -> dict[str, Any]:
    """Read an artifact's manifest; a missing or unreadable one is an ``ArtifactError``.

    ``signed``: the folder is about to be loaded as a model (or names one): its signature is checked against the
    manifest's bytes first, under this process's policy (``signpost.signing``), before anything is parsed.
    """
    path = Path(folder) / MANIFEST
    if not Path(folder).is_dir():
        raise ArtifactError(f"artifact folder not found: {folder}")
    if not path.is_file():
        raise ArtifactError(f"{folder} is not a finished artifact: it has no {MANIFEST}")
    try:
        raw = path.read_bytes()
        if signed:
            signing.check(folder, raw)
        manifest = json.loads(raw.decode("utf-8"))
    except signing.SignatureError as exc:
        raise ArtifactError(str(exc)) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"{path}: unreadable manifest: {exc}") from exc
    if not isinstance(manifest, dict) or "files" not in manifest:
        raise ArtifactError(f"{path}: not a Signpost manifest")
    return manifest


def verify_artifact(folder: Path, names: list[str] | None = None, *, signed: bool = False) -> dict[str, Any]:
    """Check files of an artifact (all, or ``names``) against the manifest's hashes. Returns the manifest.

    ``signed``: check the manifest's signature first (``read_manifest``): for a folder about to be loaded as a model.
    """
    manifest = read_manifest(folder, signed=signed)
    recorded: dict[str, str] = manifest["files"]
    for name in names if names is not None else list(recorded):
        if name not in recorded:
            raise ArtifactError(f"{folder}: {name} is not listed in the manifest")
        path = Path(folder) / name
        if not path.is_file():
            raise ArtifactError(f"{folder}: {name} is listed in the manifest but missing")
        actual = hash_file(path)
        if actual != recorded[name]:
            raise ArtifactError(
                f"{folder}: {name} does not match its manifest (sha256 {actual[:12]}…, expected "
                f"{recorded[name][:12]}…); the artifact was modified or corrupted"
            )
    return manifest
