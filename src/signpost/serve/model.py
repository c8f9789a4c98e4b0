"""The served model: where it comes from, how it is loaded, and one forward pass over a batch of decoded images.

A model is named by a path or a registry URI:

- a model artifact folder (``train/...`` or one variant of ``optimize/...``: it holds ``model_card.json``);
- a bench folder (``bench/...``): its ``candidate.json`` names the variant and the runtime to serve, and, when
  another runtime answered small batches faster in the bench (ONNX Runtime, usually), that one too: batches smaller
  than its ``below`` run on it (``runtime: auto`` only);
- ``models:/<registered model>@<alias>``: the MLflow registry version behind the alias, downloaded into the workdir.

Loading goes through ``signpost.runtime.load_predictor``, which checks every file against the manifest's hashes
and unpickles nothing, then warms the model up on every batch size it will see, so the first request is not slow.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from signpost.artifacts import ArtifactError, read_manifest
from signpost.config import SignpostConfig
from signpost.contracts import CANDIDATE, candidate_variant, read_candidate
from signpost.data.stats import embedding_summary
from signpost.models.artifact import CARD, ModelCard
from signpost.runtime import FORMS, Predictor, load_predictor

log = logging.getLogger(__name__)

REGISTRY_SCHEME = "models:/"


@dataclass(frozen=True)
class ModelSource:
    """A resolved model: the artifact folder, the runtime to load it with, and the version to report."""

    folder: Path
    runtime: str  # "auto" until loaded
    version: str  # what responses and the prediction log call this model
    bf16: bool = False
    origin: str = ""  # what the user asked for (path or models:/ URI)
    small_runtime: str | None = None  # the runtime for batches smaller than small_below (from the bench)
    small_bf16: bool = False
    small_below: int = 0


@dataclass(frozen=True)
class Outputs:
    """What one forward pass gives for each image of its batch, row for row."""

    top_ids: np.ndarray  # int64 [B, k], most probable class first
    top_probs: np.ndarray  # float32 [B, k]
    entropy: np.ndarray  # float32 [B], nats
    embeddings: np.ndarray  # float32 [B, EMBEDDING_DIMS]

    def rows(self, start: int, end: int) -> Outputs:
        return Outputs(self.top_ids[start:end], self.top_probs[start:end], self.entropy[start:end],
                       self.embeddings[start:end])


@dataclass
class ServedModel:
    """A loaded, warmed-up model and what clients are told about it."""

    source: ModelSource
    predictor: Predictor
    card: ModelCard
    loaded_at: float = field(default_factory=time.time)
    small: Predictor | None = None  # runs batches smaller than source.small_below, when the bench found one faster
    key: str = ""  # the artifact's manifest key: with card.data_key, the lineage each prediction record names

    @property
    def version(self) -> str:
        return self.source.version

    def forward(self, images: np.ndarray, top_k: int = 5) -> Outputs:
        """Top-k classes, entropy and embedding summaries for uint8 images ``[B, H, W, 3]`` (as decoding makes
        them), all computed here on the whole batch, so the request handlers only pick their rows.

        The predictor normalizes them: inside its compiled graph for the compile runtime, in one multiply-add on
        a permuted view (no copy for a channels-last predictor) for the others.
        """
        logits = self.predictor_for(len(images)).from_images(torch.from_numpy(images)).float()
        log_probs = torch.log_softmax(logits, dim=1)
        entropy = -(log_probs.exp() * log_probs).sum(dim=1)
        top = torch.topk(log_probs, min(top_k, logits.shape[1]), dim=1)
        return Outputs(top.indices.numpy(), top.values.exp().numpy(), entropy.numpy(),
                       embedding_summary(logits.numpy()))

    def predictor_for(self, batch: int) -> Predictor:
        """The predictor that runs a batch of this size."""
        return self.small if self.small is not None and batch < self.source.small_below else self.predictor

    def describe(self) -> dict[str, Any]:
        """The model card and serving facts, for ``GET /v1/model``."""
        card = self.card.model_dump(mode="json", exclude={"config"})
        small = None if self.small is None else {"runtime": self.small.runtime, "form": self.small.form,
                                                  "below": self.source.small_below}
        return {
            "version": self.version,
            "origin": self.source.origin,
            "artifact": self.source.folder.name,
            "runtime": self.predictor.runtime,
            "form": self.predictor.form,
            "small_batches": small,
            "loaded_at": self.loaded_at,
            "card": card,
        }


def resolve(spec: str | Path, config: SignpostConfig, runtime: str = "auto") -> ModelSource:
    """Turn a path or ``models:/name@alias`` into a model artifact folder and a runtime (see the module doc)."""
    text = str(spec)
    if text.startswith(REGISTRY_SCHEME):
        return _from_registry(text, config, runtime)
    folder = Path(text)
    if (folder / CANDIDATE).is_file():
        candidate = read_candidate(folder)
        variant = candidate_variant(folder, candidate, config.workdir)
        chosen = candidate.runtime if runtime == "auto" else runtime
        small = candidate.small_batch if runtime == "auto" else None
        return ModelSource(variant, chosen, _version(variant), bf16=candidate.math == "bf16", origin=text,
                           small_runtime=small.runtime if small else None,
                           small_bf16=small is not None and small.math == "bf16",
                           small_below=small.below if small else 0)
    if not (folder / CARD).is_file():
        raise ArtifactError(
            f"{folder}: not a model artifact (no {CARD}) nor a bench folder (no {CANDIDATE}); pass a folder from "
            f"train/, optimize/<name>/<variant>/ or bench/, or {REGISTRY_SCHEME}<registered model>@<alias>"
        )
    return ModelSource(folder, runtime, _version(folder), origin=text)


def load(source: ModelSource, *, threads: int | None, max_batch: int) -> ServedModel:
    """Load and warm up ``source``: the files are hash-checked, and every batch-size regime runs once."""
    runtime = source.runtime
    if runtime == "auto":
        # ONNX Runtime when the artifact has the file: on the bench it is the fastest runtime at batch 1 and
        # starts in a second; otherwise the module itself.
        runtime = "onnxruntime" if (source.folder / FORMS["onnx"]).is_file() else "eager"
    started = time.perf_counter()
    warm = tuple(sorted({1, min(2, max_batch), min(16, max_batch)}))
    predictor = load_predictor(source.folder, runtime, bf16=source.bf16, threads=threads, warmup=warm, images=True)
    small = None
    if source.small_runtime is not None and source.small_below > 1:
        small = load_predictor(source.folder, source.small_runtime, bf16=source.small_bf16, threads=threads,
                               warmup=(1,), images=True)
    # load_predictor has checked the files against this manifest; only its key is read here
    model = ServedModel(source, predictor, predictor.card, small=small,
                        key=str(read_manifest(source.folder).get("key", "")))
    size = predictor.card.image_size
    for batch in (1, max_batch):  # the first call of each runtime allocates its buffers: pay that now
        model.forward(np.zeros((batch, size, size, 3), dtype=np.uint8))
    log.info("loaded %s (%s, %s form%s) in %.1f s", source.version, runtime, predictor.form,
             f"; batches under {source.small_below} on {small.runtime}" if small else "",
             time.perf_counter() - started)
    return model


def _from_registry(uri: str, config: SignpostConfig, runtime: str) -> ModelSource:
    from signpost.registry import Registry

    name, sep, alias = uri[len(REGISTRY_SCHEME):].partition("@")
    if not sep or not name or not alias:
        raise ValueError(f"{uri!r}: expected {REGISTRY_SCHEME}<registered model>@<alias>, e.g. "
                         f"{REGISTRY_SCHEME}{config.tracking.registered_model}@champion")
    if name != config.tracking.registered_model:
        raise ValueError(f"{uri!r}: this config's registry holds {config.tracking.registered_model!r} "
                         f"(signpost-<config name> unless tracking.registered_model is set), not {name!r}; pass the "
                         "config the model was registered with")
    registry = Registry(config.tracking, config.workdir)
    version = registry.get(alias)
    if version is None:
        raise ArtifactError(f"{name} has no {alias!r} version in the registry at {registry.uri}")
    folder = registry.download(alias)
    return ModelSource(folder, runtime, f"{name}/{version.version}", origin=uri)


def _version(folder: Path) -> str:
    """A model artifact's version: its folder name (derived from the hash of its inputs), with the optimize run's
    name in front for a variant (``demo-1a2b3c4d/int8``)."""
    read_manifest(folder, signed=True)  # a missing, unfinished or unsigned folder is a clear error here
    folder = folder.resolve()
    return f"{folder.parent.name}/{folder.name}" if folder.parent.parent.name == "optimize" else folder.name
