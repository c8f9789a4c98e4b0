"""A tampered ``model.safetensors`` is refused by ``load_model`` with an ArtifactError naming the file, and nothing
in it is executed: headers that claim huge sizes, truncated data, a header that is not JSON, a pickle in its place.

The forger rewrote the manifest's hash to match each time, so the hash check passes and the weights file itself is
read (signatures, the next line of defence, are tested in test_signing.py). safetensors checks the header against
the file's length before it allocates or reads a tensor: no claimed size can exhaust memory or take the process
down, which a child process that loads every tampered folder shows.
"""

from __future__ import annotations

import json
import pickle
import struct
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from signpost.artifacts import ArtifactError, write_manifest
from signpost.models import build_model
from signpost.models.artifact import WEIGHTS, ModelCard, load_model, save_model

CLASSES = ["stop", "yield", "priority road"]
MARKER = "unpickled"  # created in the test's folder by the pickle's payload, were it ever unpickled


class _Payload:
    """Unpickling this creates a file: the proof that something was unpickled."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple:
        return (Path.touch, (self.path,))


def _header(tensors: dict, body: bytes) -> bytes:
    """A safetensors file: little-endian u64 header length, the JSON header, then ``body``."""
    raw = json.dumps(tensors).encode()
    return struct.pack("<Q", len(raw)) + raw + body


def _header_length(good: bytes) -> int:
    return struct.unpack("<Q", good[:8])[0]


def _other_tensors(good: bytes, tmp: Path) -> bytes:
    """A well-formed safetensors file whose tensors are not the model's."""
    save_file({"conv.weight": torch.zeros(2, 2)}, str(tmp / "other.safetensors"))
    return (tmp / "other.safetensors").read_bytes()


BAD = "not a safetensors file"
# name -> (the tampered file from the good one and the test's folder, what the refusal says)
TAMPERED: dict[str, tuple[Callable[[bytes, Path], bytes], str]] = {
    "header length 2**63": (lambda good, tmp: struct.pack("<Q", 2**63) + good[8:], BAD),
    "header length past the end": (lambda good, tmp: struct.pack("<Q", len(good) * 1000) + good[8:], BAD),
    "tensor of 4 TiB": (
        lambda good, tmp: _header({"w": {"dtype": "F32", "shape": [2**40], "data_offsets": [0, 2**42]}}, bytes(64)),
        BAD,
    ),
    "shape overflowing 64 bits": (
        lambda good, tmp: _header({"w": {"dtype": "F32", "shape": [2**62, 2**62], "data_offsets": [0, 64]}},
                                  bytes(64)),
        BAD,
    ),
    "negative offset": (
        lambda good, tmp: _header({"w": {"dtype": "F32", "shape": [4], "data_offsets": [-1, 15]}}, bytes(64)),
        BAD,
    ),
    "data truncated": (lambda good, tmp: good[: len(good) - 100], BAD),
    "header truncated": (lambda good, tmp: good[: 8 + _header_length(good) // 2], BAD),
    "header not JSON": (lambda good, tmp: good[:8] + b"{" * _header_length(good) + good[8 + _header_length(good):],
                        BAD),
    "header not UTF-8": (lambda good, tmp: good[:8] + b"\xff" * _header_length(good) + good[8 + _header_length(good):],
                         BAD),
    "empty file": (lambda good, tmp: b"", BAD),
    "a pickle instead": (lambda good, tmp: pickle.dumps({"conv.weight": _Payload(tmp / MARKER)}), BAD),
    "other tensors": (_other_tensors, "do not fit"),
}


def _tampered_model(folder: Path, name: str, tmp: Path) -> Path:
    """An untrained signnet's artifact folder with its weights file replaced by ``TAMPERED[name]`` and the manifest
    written after the replacement, so that its hash matches."""
    card = ModelCard(architecture="signnet", num_classes=len(CLASSES), class_names=CLASSES, image_size=32,
                     mean=[0.5, 0.5, 0.5], std=[0.25, 0.25, 0.25], data_artifact="data-0123456789ab",
                     data_key="0" * 64)
    folder.mkdir(parents=True)
    save_model(folder, build_model("signnet", len(CLASSES), 32), card)
    make, _ = TAMPERED[name]
    (folder / WEIGHTS).write_bytes(make((folder / WEIGHTS).read_bytes(), tmp))
    write_manifest(folder, stage="train", key="forged", inputs={}, config={}, code="test")
    return folder


def _contents(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("name", list(TAMPERED))
def test_a_tampered_weights_file_is_refused(name: str, tmp_path: Path) -> None:
    folder = _tampered_model(tmp_path / "model", name, tmp_path)
    before = _contents(folder)

    with pytest.raises(ArtifactError) as info:
        load_model(folder)

    message = str(info.value)
    assert message.startswith(f"{folder / WEIGHTS}: ") and TAMPERED[name][1] in message, message
    assert not (tmp_path / MARKER).exists()  # nothing was unpickled
    assert _contents(folder) == before  # and nothing in the folder was written or removed


# Loads each folder named on the command line and says, per folder, whether it was refused or loaded.
_CHILD = """
import sys
from pathlib import Path

from signpost.artifacts import ArtifactError
from signpost.models.artifact import load_model

for folder in sys.argv[1:]:
    try:
        load_model(Path(folder))
    except ArtifactError:
        print("refused", folder)
    else:
        print("loaded", folder)
"""


def test_no_tampered_weights_file_takes_the_process_down(tmp_path: Path) -> None:
    folders = [str(_tampered_model(tmp_path / f"model{i}", name, tmp_path)) for i, name in enumerate(TAMPERED)]

    child = subprocess.run([sys.executable, "-c", _CHILD, *folders], capture_output=True, text=True, timeout=300)

    # A crash (a signal, an abort on a huge allocation) or an exception other than ArtifactError ends the child
    # with a non-zero status before every folder is reported.
    assert child.returncode == 0, child.stderr[-2000:]
    assert child.stdout.splitlines() == [f"refused {folder}" for folder in folders]
    assert not (tmp_path / MARKER).exists()
