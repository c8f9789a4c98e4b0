"""A prediction request's way through the service, once its image bytes are read: decoded, classified in one
forward pass with other requests' images, answered and logged.

``classify`` is what the prediction routes call. It hands the bytes to the model's ``Batcher`` (or, with
``serve.batching: false``, runs one forward pass for the request in a thread); the batch's ``processor`` decodes
small uploads beside the forward pass and hands large ones back to be decoded in the decode pool first
(``signpost.serve.uploads``). Every request is bounded by ``serve.request_timeout_s`` (504), and a full queue or
decode pool is a 503 with Retry-After.

Canary mode: each request goes to the canary with probability ``serve.canary_share``, else to the main model, each
with its own batcher; answers and log records name the model version that made them, so ``signpost monitor``
compares the two on live traffic.
"""

from __future__ import annotations

import asyncio
import itertools
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from signpost.data.images import DecodedImage, frame_pixels
from signpost.data.stats import embedding_summary
from signpost.serve import predlog_writer, uploads
from signpost.serve.batching import QueueFull
from signpost.serve.errors import ApiError, public_error
from signpost.serve.model import Outputs, ServedModel
from signpost.serve.state import ServerState

RETRY_AFTER_S = 1  # what a 503 tells the client to wait before trying again, s


@dataclass(frozen=True)
class Classified:
    """One request's images, classified: what the handler answers and logs."""

    model_version: str
    class_names: list[str]  # of the model that classified them (a reload may have swapped models since)
    outputs: Outputs
    images: np.ndarray  # uint8 [n, S, S, 3], as the model saw them
    sizes: np.ndarray  # [n, 2] original width, height (upright)
    orientations: np.ndarray  # [n] the EXIF orientation each image was turned upright by (1: none)
    lineage: tuple[str, str] = ("", "")  # the model's data key (its card's) and artifact key (its manifest's)
    probabilities: np.ndarray | None = None  # float32 [n, classes], for a Tensors request only


@dataclass(frozen=True)
class Tensors:
    """An inference-protocol request's images as one tensor (``signpost.serve.oip``), its shape and values already
    checked: uint8 raw pixels ``[n, H, W, 3]``, resized here exactly as uploads are, or float32 ``[n, 3, S, S]``
    already normalized with the model card's mean and std. Its answer carries every class's probability."""

    data: np.ndarray

    def __len__(self) -> int:
        return len(self.data)


Payload = list[bytes] | uploads.Decoded | Tensors  # what a request hands the batcher


def processor(
    state: ServerState, current: Callable[[], ServedModel | None]
) -> Callable[[list[Payload]], list[Classified | ApiError | uploads.Large]]:
    """Decode and classify the requests of one batch (in a worker thread) on the model ``current()`` gives; a
    request with a bad image gets its ApiError back, the others are classified together in one forward pass. A
    request is its image bytes, or its images already decoded by the decode pool; one with too much to decode here
    gets ``uploads.Large`` back, for the pool (``signpost.serve.uploads``). An inference-protocol request
    (``Tensors``) of raw pixels joins that forward pass; one of normalized floats has a second one of its own."""
    cfg = state.config.serve

    def process(requests: list[Payload]) -> list[Classified | ApiError | uploads.Large]:
        model = current()  # read once: a reload swaps it between batches, never inside one
        if model is None:
            raise ApiError(503, "not_ready", "the model is not loaded", {"Retry-After": str(RETRY_AFTER_S)})
        size = model.card.image_size
        results: list[Any] = [None] * len(requests)  # each becomes a Classified, an ApiError or a Large
        decoded: list[tuple[int, uploads.Decoded]] = []
        tensors: set[int] = set()  # the requests answered with every class's probability
        normalized: list[tuple[int, np.ndarray]] = []
        for i, payload in enumerate(requests):
            if isinstance(payload, Tensors):
                tensors.add(i)
                if payload.data.dtype == np.uint8:
                    decoded.append((i, _resized(payload.data, size)))
                elif payload.data.shape[2:] != (size, size):  # a reload to a model of another input size
                    results[i] = ApiError(400, "wrong_shape", f"the model now takes {size} x {size} images, not "
                                          f"{payload.data.shape[2]} x {payload.data.shape[3]}: read its metadata again")
                else:
                    normalized.append((i, payload.data))
                continue
            if isinstance(payload, uploads.Decoded):
                if payload.images.shape[1] != size:  # a reload to a model of another input size came in between
                    results[i] = ApiError(503, "model_changed", "the model changed while the images were decoded; "
                                          "send them again", {"Retry-After": str(RETRY_AFTER_S)})
                else:
                    decoded.append((i, payload))
                continue
            try:
                pending = uploads.open_request(payload, size=size, max_pixels=cfg.max_image_pixels)
                if uploads.is_large(pending):
                    results[i] = uploads.Large(pending, size)
                    continue
                decoded.append((i, uploads.decode(pending, size)))
            except uploads.Refused as exc:
                results[i] = ApiError(exc.status, exc.code, exc.message)
        if decoded:
            parts = [d.images for _, d in decoded]
            # Every class when a Tensors request is in the batch: its answer has them all; others keep top_k.
            top_k = model.card.num_classes if tensors else cfg.top_k
            outputs = model.forward(parts[0] if len(parts) == 1 else np.concatenate(parts), top_k)
            start = 0
            for i, d in decoded:
                end = start + len(d.images)
                results[i] = _classified(model, outputs.rows(start, end), d, cfg.top_k, full=i in tensors)
                start = end
        if normalized:
            parts = [x for _, x in normalized]
            outputs = _forward_normalized(model, parts[0] if len(parts) == 1 else np.concatenate(parts))
            start = 0
            for i, x in normalized:
                end = start + len(x)
                results[i] = _classified(model, outputs.rows(start, end), _denormalized(x, model), cfg.top_k,
                                         full=True)
                start = end
        return results

    return process


def _classified(model: ServedModel, outputs: Outputs, images: uploads.Decoded, top_k: int, *,
                full: bool) -> Classified:
    """One request's rows of a forward pass: its answer keeps ``top_k`` classes, and (``full``) every class's
    probability, put back in class order."""
    probabilities = None
    if full:
        probabilities = np.zeros((len(outputs.top_ids), model.card.num_classes), dtype=np.float32)
        np.put_along_axis(probabilities, outputs.top_ids, outputs.top_probs, axis=1)
    if outputs.top_ids.shape[1] > top_k:
        outputs = Outputs(outputs.top_ids[:, :top_k], outputs.top_probs[:, :top_k], outputs.entropy,
                          outputs.embeddings)
    return Classified(model.version, model.card.class_names, outputs, images.images, images.sizes,
                      images.orientations, (model.card.data_key, model.key), probabilities)


def _resized(pixels: np.ndarray, size: int) -> uploads.Decoded:
    """Raw uint8 pixels ``[n, H, W, 3]`` framed and resized for the model exactly as a decoded upload is."""
    height, width = pixels.shape[1:3]
    images = np.stack([frame_pixels(DecodedImage(Image.fromarray(p), (width, height), 1), size) for p in pixels])
    return uploads.Decoded(images, np.tile([width, height], (len(pixels), 1)), np.ones(len(pixels), dtype=np.int64))


def _denormalized(x: np.ndarray, model: ServedModel) -> uploads.Decoded:
    """Normalized float images ``[n, 3, S, S]`` back as the uint8 pixels ``[n, S, S, 3]`` they stand for: the
    prediction log's image statistics are computed from them, as from an upload's."""
    mean = np.asarray(model.card.mean, dtype=np.float32).reshape(1, 3, 1, 1)
    std = np.asarray(model.card.std, dtype=np.float32).reshape(1, 3, 1, 1)
    pixels = np.clip(np.rint((x * std + mean) * 255), 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)
    side = x.shape[2]
    return uploads.Decoded(np.ascontiguousarray(pixels), np.tile([side, side], (len(x), 1)),
                           np.ones(len(x), dtype=np.int64))


def _forward_normalized(model: ServedModel, x: np.ndarray) -> Outputs:
    """``ServedModel.forward`` for normalized float images ``[B, 3, S, S]``: every class, most probable first."""
    logits = model.predictor_for(len(x)).forward(torch.from_numpy(x)).float()
    log_probs = torch.log_softmax(logits, dim=1)
    entropy = -(log_probs.exp() * log_probs).sum(dim=1)
    top = torch.topk(log_probs, logits.shape[1], dim=1)
    return Outputs(top.indices.numpy(), top.values.exp().numpy(), entropy.numpy(), embedding_summary(logits.numpy()))


async def classify(state: ServerState, blobs: list[bytes], started: float) -> list[dict[str, Any]]:
    """Decode, predict and log ``blobs``; the answers as plain dicts shaped like ``Prediction``."""
    return (await classify_request(state, blobs, started))[0]


async def classify_request(
    state: ServerState, blobs: list[bytes] | Tensors, started: float, *, canary: bool | None = None
) -> tuple[list[dict[str, Any]], Classified]:
    """``classify`` for image bytes or a ``Tensors`` request: the answers, and what the model gave for them.
    ``canary``: the lane to take (None: the canary with probability ``serve.canary_share``)."""
    loaded_model(state)
    cfg = state.config.serve
    if canary is None:
        canary = state.canary is not None and state.router.random() < state.canary_share
    batcher = state.canary_batcher if canary else state.batcher
    current = (lambda: state.canary) if canary else (lambda: state.model)

    async def through_model(payload: Payload) -> Any:
        if batcher is not None:
            return await batcher.submit(payload, len(blobs))
        # one forward pass per request, concurrently in threads: the reference server's way
        state.metrics.batch_size.observe(len(blobs))
        return (await asyncio.to_thread(processor(state, current), [payload]))[0]

    async def decode_and_classify() -> Any:
        result = await through_model(blobs)
        if isinstance(result, uploads.Large):  # too much to decode beside the forward pass: the pool does it first
            result = await through_model(await state.decode_pool.decode(result))
        return result

    try:
        result = await asyncio.wait_for(decode_and_classify(), cfg.request_timeout_s)
    except (QueueFull, uploads.DecoderBusy) as exc:
        raise ApiError(503, "overloaded", f"the server is at capacity: {exc}; retry shortly",
                       {"Retry-After": str(RETRY_AFTER_S)}) from None
    except uploads.Refused as exc:  # an image the decode pool found bad
        raise ApiError(exc.status, exc.code, exc.message) from None
    except asyncio.TimeoutError:
        raise ApiError(504, "timeout", f"no answer within {cfg.request_timeout_s:g} s (serve.request_timeout_s)") \
            from None
    if isinstance(result, ApiError):
        raise result
    latency_ms = (time.perf_counter() - started) * 1000
    answers = _answers(result, latency_ms, _request_id())
    state.metrics.predictions.labels(result.model_version).inc(len(answers))
    state.metrics.count_classes(result.model_version, [answer["class_name"] for answer in answers])
    if state.log is not None:
        _log_records(state.log, answers, result)
    return answers, result


def loaded_model(state: ServerState) -> ServedModel:
    """The main model, or a 503 saying why there is none yet."""
    if not state.ready():
        raise ApiError(503, "not_ready", f"the model is not loaded yet ({public_error(state) or 'loading'}); "
                       "retry when /readyz says ready", {"Retry-After": str(RETRY_AFTER_S)})
    return state.model


_ID_PREFIX = secrets.token_hex(6)  # this process's; with a counter, request ids are unique without a syscall each
_ID_COUNTER = itertools.count()


def _request_id() -> str:
    return f"{_ID_PREFIX}-{next(_ID_COUNTER):x}"


def _answers(result: Classified, latency_ms: float, request_id: str) -> list[dict[str, Any]]:
    names = result.class_names
    answers = []
    for ids, probs in zip(result.outputs.top_ids.tolist(), result.outputs.top_probs.tolist(), strict=True):
        scores = [{"class_id": c, "class_name": names[c] if c < len(names) else str(c), "confidence": p}
                  for c, p in zip(ids, probs, strict=True)]
        answers.append({**scores[0], "top_k": scores, "model_version": result.model_version,
                        "latency_ms": latency_ms, "request_id": request_id})
    return answers


def _log_records(log_: predlog_writer.PredictionLog, answers: list[dict[str, Any]], result: Classified) -> None:
    """Hand one record per image to the log; the image statistics are computed by its writer, in batches."""
    now = time.time()
    entropy = result.outputs.entropy.tolist()
    for i, answer in enumerate(answers):
        log_.add({
            "ts": now, "request_id": answer["request_id"], "model_version": answer["model_version"],
            "class_id": answer["class_id"], "class_name": answer["class_name"], "confidence": answer["confidence"],
            "entropy": entropy[i], "top_k": [[s["class_id"], round(s["confidence"], 6)] for s in answer["top_k"]],
            "latency_ms": answer["latency_ms"], "width": int(result.sizes[i, 0]), "height": int(result.sizes[i, 1]),
            "orientation": int(result.orientations[i]),
            "data_key": result.lineage[0], "model_key": result.lineage[1],
            "embedding": result.outputs.embeddings[i], "image": result.images[i],
        })
