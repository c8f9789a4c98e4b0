"""The checkpoint file format: one atomic, verified file; nothing pickled.

A checkpoint holds the tensors in safetensors and the rest of the training state as JSON in its header, with a
SHA-256 of both; it replaces the previous one only by a rename, so a kill at any moment leaves one whole checkpoint,
never parts of two. A damaged or older checkpoint is refused with an error that names the fix.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save

CHECKPOINT = "checkpoint.safetensors"
# Header metadata keys of a checkpoint: the JSON state, and the SHA-256 of that state and every tensor.
_STATE, _DIGEST = "signpost.checkpoint", "signpost.sha256"


def write_checkpoint(path: Path, tensors: dict[str, torch.Tensor], state: dict[str, Any]) -> None:
    """Write ``tensors`` and the JSON-able ``state`` as one checkpoint file at ``path``, replacing the last one."""
    text = json.dumps(state)
    # Serialized in memory (one more copy of the checkpoint: 2.6 MiB for signnet, 4.8 MiB for traffic_sign_net)
    # so that the file is written by the plain os calls of _write_atomic.
    data = save(tensors, metadata={_STATE: text, _DIGEST: _digest(tensors, text)})
    _write_atomic(data, path)


def read_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """A checkpoint's tensors and JSON state; a ValueError naming the fix unless it is whole and unchanged."""
    fix = f"run without --resume to start over (or delete {path.parent})"
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not iterable)
    except (OSError, SafetensorError) as exc:
        raise ValueError(f"{path} is damaged ({exc}): {fix}") from exc
    if _STATE not in metadata:
        raise ValueError(
            f"{path} has no training state in it: it was written by an older Signpost, whose two-file checkpoints "
            f"cannot be trusted to match; {fix}"
        )
    if metadata.get(_DIGEST) != _digest(tensors, metadata[_STATE]):
        raise ValueError(f"{path} is damaged (its contents do not match the SHA-256 written with them): {fix}")
    return tensors, json.loads(metadata[_STATE])


def flatten_optimizer(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """An optimizer state dict as named tensors (for safetensors) and JSON-able metadata."""
    tensors, scalars = {}, {}
    for index, param_state in state["state"].items():
        for name, value in param_state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{index}.{name}"] = value.detach().to("cpu").contiguous()
            else:
                scalars[f"{index}.{name}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def unflatten_optimizer(
    tensors: dict[str, torch.Tensor], meta: dict[str, Any], device: torch.device
) -> dict[str, Any]:
    """The optimizer state dict that ``flatten_optimizer`` took apart, its tensors on ``device``."""
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value.to(device)
    for key, value in meta["scalars"].items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def _write_atomic(data: bytes, path: Path) -> None:
    """Write ``data`` to ``path`` through a temporary file, fsynced, then renamed over ``path``.

    Until the rename ``path`` holds its old bytes whole, after it the new ones: a kill at any point leaves one or
    the other, never a mix. The folder is fsynced too, so that the rename also survives a power cut. Plain os calls
    (tests/security/test_checkpoint_kill.py interrupts the write at each of them).
    """
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]  # a write may take fewer bytes than asked (at most 2 GiB on Linux)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


def _digest(tensors: dict[str, torch.Tensor], state: str) -> str:
    """Hex SHA-256 of a checkpoint's JSON state and of every tensor's name, dtype, shape and bytes."""
    digest = hashlib.sha256(state.encode("utf-8"))
    for name in sorted(tensors):
        tensor = tensors[name].detach().to("cpu").contiguous()
        digest.update(f"\n{name} {tensor.dtype} {list(tensor.shape)}\n".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()
