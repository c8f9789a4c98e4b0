"""The model artifact: weights in safetensors plus a JSON model card, in an artifact folder with a manifest.

Loading checks both files against the manifest's hashes before reading them, and reads the weights with
safetensors: nothing is unpickled, so a tampered or foreign file is refused instead of run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from signpost.artifacts import ArtifactError, verify_artifact
from signpost.models import build_model

WEIGHTS = "model.safetensors"
CARD = "model_card.json"


class ModelCard(BaseModel):
    """What a model is and how to feed it: everything a server needs besides the weights."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    schema_version: int = 1
    architecture: str
    architecture_options: dict[str, Any] = Field(
        default_factory=dict, description="build options beyond the name, e.g. a pruned signnet's widths"
    )
    num_classes: int = Field(ge=2)
    class_names: list[str]
    image_size: int = Field(ge=8)
    mean: list[float] = Field(min_length=3, max_length=3, description="per-channel, 0..1 units")
    std: list[float] = Field(min_length=3, max_length=3)
    metrics: dict[str, float] = Field(default_factory=dict)
    data_artifact: str = Field(description="folder name of the prepared data, which is derived from its hash")
    data_key: str = Field(description="full content hash of the prepared data")
    config: dict[str, Any] = Field(default_factory=dict, description="the resolved config the model was made with")
    code_version: str = ""
    git_revision: str | None = None
    libraries: dict[str, str] = Field(default_factory=dict)


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module under DistributedDataParallel and torch.compile wrappers (their state-dict keys differ)."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def save_model(folder: Path, model: nn.Module, card: ModelCard) -> None:
    """Write ``model``'s weights and ``card`` into ``folder`` (the caller writes the manifest last)."""
    state = {name: tensor.detach().to("cpu").contiguous() for name, tensor in unwrap(model).state_dict().items()}
    save_file(state, str(Path(folder) / WEIGHTS), metadata={"architecture": card.architecture})
    (Path(folder) / CARD).write_text(card.model_dump_json(indent=2) + "\n", encoding="utf-8")


def read_card(folder: Path, *, verify: bool = True) -> ModelCard:
    """The model card in ``folder`` (checked against the manifest first), without reading the weights."""
    folder = Path(folder)
    if verify:
        verify_artifact(folder, [CARD], signed=True)
    try:
        return ModelCard.model_validate_json((folder / CARD).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ArtifactError(f"{folder / CARD}: not a valid model card: {exc}") from exc


def load_model(folder: Path, *, device: str | torch.device = "cpu", verify: bool = True) -> tuple[nn.Module, ModelCard]:
    """The model in ``folder`` in eval mode, and its card. Files are checked against the manifest first."""
    folder = Path(folder)
    if verify:
        verify_artifact(folder, [WEIGHTS, CARD], signed=True)
    card = read_card(folder, verify=False)
    try:
        model = build_model(card.architecture, card.num_classes, card.image_size, **card.architecture_options)
    except (TypeError, ValueError) as exc:
        raise ArtifactError(f"{folder / CARD}: cannot build its {card.architecture}: {exc}") from exc
    try:
        state = load_file(str(folder / WEIGHTS), device=str(device))
    except (OSError, SafetensorError) as exc:
        raise ArtifactError(f"{folder / WEIGHTS}: not a safetensors file ({exc}); refusing to read it otherwise") \
            from exc
    try:
        model.load_state_dict(state, strict=True)
    except (RuntimeError, ValueError) as exc:
        raise ArtifactError(f"{folder / WEIGHTS}: weights do not fit a {card.architecture}: {exc}") from exc
    return model.to(device).eval(), card
