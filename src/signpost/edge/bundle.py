"""The edge bundle: what ``signpost package --target edge`` writes and what a device opens (README "On devices").

A bundle is a folder that is itself a signed artifact folder (``artifacts.write_manifest`` + ``signing.sign``):

- ``model.pte``: the ExecuTorch program, XNNPACK delegate (the kernels are picked at run time, so one file serves
  x86-64 and Arm64);
- ``model_card.json``: class names, image size and normalization, all the runtime needs beside the program;
- ``bundle.json``: format, model version, class names, image size, when it was made, the source model's key;
- ``samples/``: a few PNG images of the test split and ``samples.json`` (file -> the class the model gave it when
  it was packaged), which the device's self-test classifies again;
- ``manifest.json`` and ``manifest.sig``: every file's SHA-256, signed.

``<bundle>.tar.gz`` beside the folder is what a device downloads. ``open_bundle`` checks the signature and every
hash before any file of the bundle is parsed; ``unpack`` extracts a tarball refusing anything but plain files and
folders below one top folder. A device refuses an unsigned bundle unless told otherwise (``allow_unsigned``), loudly.
"""

from __future__ import annotations

import datetime as dt
import io
import json
import logging
import os
import shutil
import tarfile
import uuid
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from signpost import signing
from signpost.artifacts import MANIFEST, ArtifactError, verify_artifact

if TYPE_CHECKING:
    import torch

    from signpost.runtime import Predictor

log = logging.getLogger(__name__)

FORMAT = 1
BUNDLE_JSON = "bundle.json"
SAMPLES = "samples"
SAMPLES_JSON = f"{SAMPLES}/samples.json"
PTE = "model.pte"  # runtime.PTE, named here so that opening a bundle does not import torch
CARD = "model_card.json"  # models.artifact.CARD
TARBALL_SUFFIX = ".tar.gz"
MAX_BUNDLE_BYTES = 512 << 20  # 512 MiB unpacked: a bundle is a small CNN and a few images (~1 MiB for the demo)
MAX_MEMBERS = 256  # files and folders in a tarball
MAX_HEADER_BYTES = 64 << 10  # 64 KiB: a pax or GNU long-name header of a bundle holds a path or two
_MAX_JSON_BYTES = 1 << 20  # bundle.json and samples.json are a few hundred bytes


class BundleError(RuntimeError):
    """A bundle that is not signed, not valid or not loadable; the message names the bundle and why."""


@dataclass(frozen=True)
class Bundle:
    """A verified bundle folder: its signature and every file's hash were checked when it was opened."""

    root: Path
    model_version: str
    class_names: list[str]
    image_size: int
    samples: list[tuple[Path, int]]  # self-test images and the class each must get
    key: str = ""  # the bundle manifest's key: two bundles with the same key are the same bundle

    def predictor(self, threads: int | None = None) -> Predictor:
        """The ExecuTorch predictor; ``load_predictor`` checks the program's bytes against the signed manifest."""
        from signpost.runtime import load_predictor

        try:
            return load_predictor(self.root, "executorch", threads=threads, warmup=(1,))
        except (ArtifactError, RuntimeError) as exc:
            raise BundleError(f"{self.root}: cannot load its program: {exc}") from exc


def open_bundle(path: Path, *, allow_unsigned: bool | None = None) -> Bundle:
    """Open the bundle folder at ``path`` (or a ``current`` symlink to one): the signature under this process's
    policy (``signing.current()``) and every file's hash are checked first, and a file the manifest does not list
    is refused. Without any trusted public key a bundle is refused unless ``allow_unsigned`` (default: the
    policy's); with one, an unsigned bundle is refused unless the policy allows it (``signing.check``)."""
    root = Path(path).resolve()
    if not root.is_dir():
        raise BundleError(f"{path}: no bundle folder there")
    policy = signing.current()
    allow = policy.allow_unsigned if allow_unsigned is None else allow_unsigned
    if not policy.enforced:
        if not allow:
            raise BundleError(f"{root}: no public key is trusted, so its signature cannot be checked; pass "
                              "--public-key PEM (or set SIGNPOST_PUBLIC_KEYS), or --allow-unsigned for a local test")
        log.warning("NO PUBLIC KEY: %s is opened WITHOUT checking who made it (--allow-unsigned)", root)
    try:
        manifest = verify_artifact(root, signed=True)
    except ArtifactError as exc:
        raise BundleError(f"refused bundle: {exc}") from None
    listed = set(manifest["files"]) | {MANIFEST, signing.SIGNATURE}
    extra = sorted(p.relative_to(root).as_posix() for p in root.rglob("*")
                   if not p.is_dir() and p.relative_to(root).as_posix() not in listed)
    if extra:
        raise BundleError(f"refused bundle {root}: {', '.join(extra[:3])} not listed in its manifest")
    for name in (PTE, CARD, BUNDLE_JSON, SAMPLES_JSON):
        if name not in manifest["files"]:
            raise BundleError(f"{root}: not an edge bundle ({name} missing); make one with "
                              "`signpost package --target edge`")
    info = _read_json(root, BUNDLE_JSON)
    if info.get("format") != FORMAT:
        raise BundleError(f"{root}/{BUNDLE_JSON}: format {info.get('format')!r}, this Signpost reads {FORMAT}; "
                          "update Signpost on the device or package the bundle again")
    try:
        class_names = [str(name) for name in info["class_names"]]
        bundle = Bundle(root, str(info["model_version"]), class_names, int(info["image_size"]),
                        _samples(root, manifest, len(class_names)), str(manifest.get("key", "")))
    except (KeyError, TypeError, ValueError) as exc:
        raise BundleError(f"{root}/{BUNDLE_JSON}: missing or bad field {exc}") from None
    return bundle


def _read_json(root: Path, name: str) -> dict[str, Any]:
    path = root / name
    try:
        if path.stat().st_size > _MAX_JSON_BYTES:
            raise ValueError("too large")
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise BundleError(f"{path}: unreadable ({exc})") from None
    if not isinstance(data, dict):
        raise BundleError(f"{path}: not a JSON object")
    return data


def _samples(root: Path, manifest: dict[str, Any], classes: int) -> list[tuple[Path, int]]:
    samples = []
    for name, label in _read_json(root, SAMPLES_JSON).items():
        relative = f"{SAMPLES}/{name}"
        if "/" in name or name.startswith(".") or relative not in manifest["files"]:
            raise BundleError(f"{root}/{SAMPLES_JSON}: sample {name!r} is not a file of the bundle")
        if not isinstance(label, int) or not 0 <= label < classes:
            raise BundleError(f"{root}/{SAMPLES_JSON}: sample {name!r} has class {label!r}, not one of "
                              f"0..{classes - 1}")
        samples.append((root / relative, label))
    if not samples:
        raise BundleError(f"{root}/{SAMPLES_JSON}: no samples; the self-test needs at least one")
    return samples


def read_image(path: Path, size: int) -> torch.Tensor:
    """A sample PNG as uint8 ``[H, W, 3]``; it must be ``size`` pixels square (as packaged)."""
    import numpy as np
    import torch
    from PIL import Image

    with Image.open(path) as image:
        if image.size != (size, size):
            raise BundleError(f"{path}: {image.size[0]}x{image.size[1]} pixels, the model takes {size}x{size}")
        pixels = np.array(image.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(pixels)


def self_test(bundle: Bundle, threads: int | None = None) -> None:
    """Classify every sample image with the bundle's program; a ``BundleError`` names the first that comes out
    other than recorded at package time."""
    predictor = bundle.predictor(threads)
    for path, expected in bundle.samples:
        image = read_image(path, bundle.image_size)
        got = int(predictor.from_images(image.unsqueeze(0)).argmax(1)[0])
        if got != expected:
            raise BundleError(
                f"self-test failed: {path.relative_to(bundle.root).as_posix()} came out as class {got} "
                f"({_name(bundle, got)}), the bundle records {expected} ({_name(bundle, expected)})")


def _name(bundle: Bundle, index: int) -> str:
    return bundle.class_names[index] if 0 <= index < len(bundle.class_names) else "?"


def bundle_info(*, model_version: str, class_names: list[str], image_size: int, source_key: str,
                mean: list[float], std: list[float]) -> dict[str, Any]:
    """The contents of ``bundle.json``."""
    return {"format": FORMAT, "model_version": model_version, "class_names": class_names, "image_size": image_size,
            "mean": mean, "std": std, "source_key": source_key,
            "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}


def write_samples(folder: Path, images: list[Any], labels: list[int]) -> None:
    """``samples/NN.png`` from uint8 ``[H, W, 3]`` images and ``samples.json`` with the class of each."""
    from PIL import Image

    (folder / SAMPLES).mkdir()
    record = {}
    for index, (image, label) in enumerate(zip(images, labels, strict=True)):
        name = f"{index:02d}.png"
        Image.fromarray(image.numpy() if hasattr(image, "numpy") else image).save(folder / SAMPLES / name)
        record[name] = int(label)
    (folder / SAMPLES_JSON).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")


def write_tarball(folder: Path, out: Path) -> Path:
    """``out``: a gzip tarball of ``folder`` as one top folder of its name, written atomically, plain files only."""
    folder, out = Path(folder), Path(out)
    tmp = out.with_name(f".tmp-{out.name}-{uuid.uuid4().hex[:8]}")

    def clean(info: tarfile.TarInfo) -> tarfile.TarInfo:
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        return info

    try:
        with tarfile.open(tmp, "w:gz") as tar:
            tar.add(folder, arcname=folder.name, filter=clean)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def unpack(tarball: Path, dest: Path, *, max_bytes: int = MAX_BUNDLE_BYTES) -> Path:
    """Extract the one top folder of ``tarball`` into ``dest`` and return it (``dest/<top>``).

    Safe extraction: a member with an absolute path or ``..``, a link, a device or anything but a plain file or
    folder is refused, as are more than ``MAX_MEMBERS`` members or ``max_bytes`` in all; the folder is filled under
    a temporary name and renamed when whole. An existing ``dest/<top>`` is refused (never overwritten).
    """
    try:
        with tarfile.open(tarball, "r:*", tarinfo=_BoundedTarInfo) as tar:
            return _extract(tar, Path(tarball), Path(dest), max_bytes)
    except (OSError, tarfile.TarError, EOFError, MemoryError, OverflowError) as exc:
        # MemoryError, OverflowError: tarfile reads a header's declared size in one go; _BoundedTarInfo refuses a
        # large one first, these are the last line for what it may miss
        raise BundleError(f"{tarball}: not a readable tarball ({exc or type(exc).__name__})") from None


class _BoundedTarInfo(tarfile.TarInfo):
    """A member header whose pax or GNU long-name extension declares more than ``MAX_HEADER_BYTES`` is refused
    before it is read: tarfile reads such an extension whole into memory, so a forged size of a few GiB (or 2**70)
    would exhaust memory, before any signature could be checked."""

    def _proc_member(self, tarfile_: tarfile.TarFile) -> tarfile.TarInfo:
        extension = (tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK, tarfile.XHDTYPE, tarfile.XGLTYPE,
                     tarfile.SOLARIS_XHDTYPE)
        if self.type in extension and self.size > MAX_HEADER_BYTES:
            # a TarError that is not a ReadError: tarfile.open does not swallow it while it tries the compressions
            raise tarfile.TarError(f"a header extension declares {self.size:,} bytes, more than "
                                   f"{MAX_HEADER_BYTES:,}; not a bundle, refused")
        return super()._proc_member(tarfile_)


def _extract(tar: tarfile.TarFile, tarball: Path, dest: Path, max_bytes: int) -> Path:
    """Check every member, then fill ``dest/<top>`` under a temporary name (see ``unpack``)."""
    members, top = _checked_members(tar, tarball, max_bytes)
    final = dest / top
    if final.exists() or final.is_symlink():
        raise BundleError(f"{final} exists already; refusing to unpack over it")
    dest.mkdir(parents=True, exist_ok=True)
    tmp = dest / f".unpack-{top}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        written = 0
        for member in members:
            parts = PurePosixPath(member.name).parts[1:]
            target = tmp.joinpath(*parts) if parts else tmp
            if member.isdir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            source = tar.extractfile(member)
            if source is None:
                raise BundleError(f"{tarball}: {member.name} cannot be read")
            with source, open(target, "xb") as sink:
                # counted as read, not as declared: a member longer than its header is cut off at the bound
                while chunk := source.read(1 << 20):
                    written += len(chunk)
                    if written > max_bytes:
                        raise BundleError(f"{tarball}: more than {max_bytes:,} bytes unpacked; refused")
                    sink.write(chunk)
                sink.flush()
                os.fsync(sink.fileno())  # on disk before the rename below makes the folder look whole
        for folder in sorted({p.parent for p in tmp.rglob("*")} | {tmp}, reverse=True):
            fsync_dir(folder)  # the folders' entries too: a power cut must not leave a renamed folder half empty
        os.rename(tmp, final)
        fsync_dir(dest)
    except (OSError, tarfile.TarError, EOFError) as exc:
        raise BundleError(f"{tarball}: cannot unpack ({exc})") from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def fsync_dir(path: Path) -> None:
    """Flush ``path``'s entries (files created, renamed or removed in it) to disk: a rename is durable only once
    its folder is synced."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _checked_members(tar: tarfile.TarFile, tarball: Path, max_bytes: int) -> tuple[list[tarfile.TarInfo], str]:
    """Every member, refused unless it is a plain file or folder below one top folder, within the bounds."""
    members: list[tarfile.TarInfo] = []
    tops: set[str] = set()
    declared = 0
    try:
        for member in tar:
            if len(members) >= MAX_MEMBERS:
                raise BundleError(f"{tarball}: more than {MAX_MEMBERS} members; not a bundle")
            name = PurePosixPath(member.name)
            if name.is_absolute() or member.name.startswith(("/", "\\")) or ".." in name.parts or not name.parts:
                raise BundleError(f"{tarball}: member {member.name!r} points outside the bundle; refused")
            if not (member.isfile() or member.isdir()):
                raise BundleError(f"{tarball}: member {member.name!r} is a link or a special file; refused")
            if "\\" in member.name or any(part.startswith(".") and part != "." for part in name.parts[:1]):
                raise BundleError(f"{tarball}: member {member.name!r} has an unexpected name; refused")
            declared += member.size
            if declared > max_bytes:
                raise BundleError(f"{tarball}: more than {max_bytes:,} bytes unpacked; refused")
            tops.add(name.parts[0])
            members.append(member)
    except (tarfile.TarError, EOFError, OSError, io.UnsupportedOperation, MemoryError, OverflowError) as exc:
        raise BundleError(f"{tarball}: not a readable tarball ({exc or type(exc).__name__})") from None
    if len(tops) != 1:
        raise BundleError(f"{tarball}: expected one top folder (the bundle), found {len(tops)}")
    return members, tops.pop()
