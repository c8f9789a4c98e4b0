"""The Open Inference Protocol (KServe v2, Triton's HTTP/REST API) beside Signpost's own routes, so the service runs
as a KServe predictor and Triton clients (``tritonclient.http``) can call it.

Routes: ``GET /v2/health/live``, ``/v2/health/ready`` (ready as ``/readyz`` is), ``/v2`` (server metadata),
``/v2/models/{name}[/versions/{version}]`` (model metadata), ``.../ready``, ``POST .../infer`` and
``POST /v2/repository/index``. Extensions: ``classification`` and ``binary_tensor_data``.

The model's name is the registered model's (``signpost-demo``) when it was loaded from the registry, with the
registry version as its version; otherwise the artifact's (its version with ``/`` as ``-``: ``demo-1a2b3c4d`` or
``demo-1a2b3c4d-int8``), which is its version too. In canary mode the canary is a second version of that name:
``/versions/{version}/infer`` picks the model, plain ``/infer`` splits as ``/v1/predict`` does. After a reload the
name and version follow the model now served.

A request sends exactly one input:

- ``images``: UINT8 ``[n, H, W, 3]`` raw RGB pixels, any size; the server frames and resizes them exactly as it does
  an uploaded image, so the answer equals ``/v1/predict``'s for the same pixels;
- ``input``: FP32 ``[n, 3, S, S]`` (S: the model's input side, in the metadata), already normalized as the model
  expects: ``(pixel / 255 - mean) / std`` per channel with the model card's mean and std (the metadata's
  ``parameters``).

The output is ``probabilities``: FP32 ``[n, classes]``, softmax, in class order; with ``parameters.classification: k``
it is BYTES ``[n, k]`` of ``"score:index:label"`` strings, most probable first (Triton's format). Tensors travel as
JSON ``data`` or, with the ``Inference-Header-Content-Length`` header, as raw little-endian bytes after the JSON
header (``binary_data_size`` per input; ``binary_data: true`` per output, or ``binary_data_output: true`` for all).

An infer request goes through the same path as ``/v1/predict``: the API key, the body's size limit and deadline,
``serve.max_batch_images``, the batcher, the request timeout, the metrics and one prediction-log row per image (the
width and height logged are the tensor's; for FP32 input the image statistics are computed from the pixels the
normalized values stand for). Errors answer the protocol's ``{"error": "<message>"}``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import struct
import time
from collections.abc import Callable, Coroutine
from typing import Any

import numpy as np
from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute

from signpost import __version__
from signpost.serve import uploads
from signpost.serve.errors import ApiError
from signpost.serve.model import REGISTRY_SCHEME, ModelSource, ServedModel
from signpost.serve.predict import Tensors, classify_request, loaded_model
from signpost.serve.routes import require_api_key
from signpost.serve.state import ServerState, State

log = logging.getLogger(__name__)

PIXELS_INPUT = "images"  # UINT8 [n, H, W, 3], raw pixels
NORMALIZED_INPUT = "input"  # FP32 [n, 3, S, S], normalized
OUTPUT = "probabilities"  # FP32 [n, classes]
HEADER_LENGTH = "Inference-Header-Content-Length"  # binary tensor extension: bytes of JSON before the tensors
EXTENSIONS = ["classification", "binary_tensor_data"]
_DATATYPES = {PIXELS_INPUT: ("UINT8", np.dtype("uint8")), NORMALIZED_INPUT: ("FP32", np.dtype("<f4"))}


class _ProtocolRoute(APIRoute):
    """A route answering errors with the protocol's body, ``{"error": "<message>"}`` (what Triton clients read),
    the API key's included; an infer request's error also counts in the prediction log's error rate."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        route = self.path

        async def answer(request: Request) -> Response:
            try:
                return await handler(request)
            except (ApiError, uploads.Refused) as exc:
                state: ServerState = request.app.state.signpost
                if state.log is not None and route.endswith("/infer"):
                    state.log.add_error(route, exc.status, exc.code)
                return JSONResponse({"error": exc.message}, status_code=exc.status, headers=exc.headers)

        return answer


router = APIRouter(route_class=_ProtocolRoute, tags=["inference protocol"])


def identity(source: ModelSource) -> tuple[str, str]:
    """A model's name and version under ``/v2/models/``: the registered model's name and version number when it
    came from the registry, else the artifact's version (``/`` as ``-``: a URL segment) as both."""
    if source.origin.startswith(REGISTRY_SCHEME):
        name, _, number = source.version.rpartition("/")
        return name, number
    plain = source.version.replace("/", "-")
    return plain, plain


@router.get("/v2/health/live")
async def live() -> dict[str, bool]:
    """The process is alive and answering (as ``/healthz``)."""
    return {"live": True}


@router.get("/v2/health/ready")
async def ready(state: State) -> JSONResponse:
    """The model is loaded and warmed up (as ``/readyz``); 503 until then."""
    return JSONResponse({"ready": state.ready()}, status_code=200 if state.ready() else 503)


@router.get("/v2")
async def server_metadata() -> dict[str, Any]:
    """The server's name, version and protocol extensions."""
    return {"name": "signpost", "version": __version__, "extensions": EXTENSIONS}


@router.get("/v2/models/{name}")
@router.get("/v2/models/{name}/versions/{version}")
async def model_metadata(name: str, state: State, version: str | None = None) -> dict[str, Any]:
    """The model's inputs and outputs, and the normalization an FP32 input must already have."""
    model, _ = _model(state, name, version)
    card = model.card
    runtime = model.predictor.runtime
    return {
        "name": name,
        "versions": [identity(m.source)[1] for m in (state.model, state.canary) if m is not None],
        "platform": "onnxruntime_onnx" if runtime == "onnxruntime" else f"pytorch_{runtime}",
        "inputs": [{"name": PIXELS_INPUT, "datatype": "UINT8", "shape": [-1, -1, -1, 3]},
                   {"name": NORMALIZED_INPUT, "datatype": "FP32", "shape": [-1, 3, card.image_size, card.image_size]}],
        "outputs": [{"name": OUTPUT, "datatype": "FP32", "shape": [-1, card.num_classes]}],
        "parameters": {
            "input_note": f"send one input: {PIXELS_INPUT} (raw RGB pixels NHWC, any size, resized by the server) or "
                          f"{NORMALIZED_INPUT} (NCHW, {card.image_size} x {card.image_size}, "
                          "(pixel / 255 - mean) / std per channel)",
            "mean": card.mean, "std": card.std, "image_size": card.image_size, "class_names": card.class_names,
            "max_batch_images": state.config.serve.max_batch_images,
        },
    }


@router.get("/v2/models/{name}/ready")
@router.get("/v2/models/{name}/versions/{version}/ready")
async def model_ready(name: str, state: State, version: str | None = None) -> dict[str, Any]:
    """The model can be called (503 while it loads, 404 for another name or version)."""
    _model(state, name, version)
    return {"name": name, "ready": True}


@router.post("/v2/repository/index")
async def repository_index(request: Request, state: State) -> list[dict[str, str]]:
    """The models this server serves, with their state (``{"ready": true}`` in the body: the ready ones only)."""
    body = await uploads.read_body(request, 4096, timeout_s=state.config.serve.body_timeout_s)
    only_ready = bool(_json_object(body).get("ready", False)) if body.strip() else False
    rows = []
    for source, model in ((state.source, state.model), (state.canary_source, state.canary)):
        if source is None:
            continue
        name, version = identity(model.source if model is not None else source)
        row = {"name": name, "version": version, "state": "READY" if model is not None else "LOADING"}
        if model is None and state.load_error is not None:
            row.update(state="UNAVAILABLE", reason="the model failed to load; see /readyz")
        if row["state"] == "READY" or not only_ready:
            rows.append(row)
    return rows


@router.post("/v2/models/{name}/infer", dependencies=[Depends(require_api_key)])
@router.post("/v2/models/{name}/versions/{version}/infer", dependencies=[Depends(require_api_key)])
async def infer(name: str, request: Request, state: State, version: str | None = None) -> Response:
    """Classify a tensor of images (see the module doc for the inputs, outputs and binary form)."""
    started = time.perf_counter()
    model, canary = _model(state, name, version)
    header, binary = await _read_request(request, state)
    tensors = await asyncio.to_thread(_input, header, binary, model, state)  # JSON data: ~10 ms per MB, off the loop
    outputs = _outputs(header, model)
    answers, result = await classify_request(state, tensors, started, canary=canary)
    assert result.probabilities is not None  # a Tensors request is answered with every class
    # the model that answered (a reload may have swapped it since _model looked)
    served = next((m for m in (state.model, state.canary) if m is not None and m.version == result.model_version),
                  model)
    reply: dict[str, Any] = {"model_name": name, "model_version": identity(served.source)[1],
                             "id": str(header.get("id") or answers[0]["request_id"]),
                             "parameters": {"request_id": answers[0]["request_id"]}, "outputs": []}
    blobs: list[bytes] = []
    for output_name, k, binary_out in outputs:
        if k is None:
            data: np.ndarray = result.probabilities.astype("<f4")
            tensor: dict[str, Any] = {"name": output_name, "datatype": "FP32", "shape": list(data.shape)}
            raw = data.tobytes()
            values: list[Any] = data.ravel().tolist()
        else:
            labels = _classification(result.probabilities, k, result.class_names)
            tensor = {"name": output_name, "datatype": "BYTES", "shape": [len(labels), k]}
            flat = [text for row in labels for text in row]
            raw = b"".join(struct.pack("<I", len(t.encode())) + t.encode() for t in flat)
            values = flat
        if binary_out:
            tensor["parameters"] = {"binary_data_size": len(raw)}
            blobs.append(raw)
        else:
            tensor["data"] = values
        reply["outputs"].append(tensor)
    text = json.dumps(reply, separators=(",", ":")).encode()
    if not blobs:
        return Response(text, media_type="application/json")
    return Response(text + b"".join(blobs), media_type="application/octet-stream",
                    headers={HEADER_LENGTH: str(len(text))})


def _model(state: ServerState, name: str, version: str | None) -> tuple[ServedModel, bool | None]:
    """The model ``name`` (and ``version``) names, and the lane an infer takes: False the main model, True the
    canary, None either (``serve.canary_share``). 404 for another name or version, 503 while loading."""
    main = loaded_model(state)
    main_name, main_version = identity(main.source)
    if name != main_name:
        raise ApiError(404, "unknown_model", f"unknown model {name!r}: this server serves {main_name!r} "
                       "(POST /v2/repository/index lists it)")
    if version is None:
        return main, None
    if version == main_version:
        return main, False
    if state.canary is not None and version == identity(state.canary.source)[1]:
        return state.canary, True
    known = [identity(m.source)[1] for m in (main, state.canary) if m is not None]
    raise ApiError(404, "unknown_version", f"{name} has no version {version!r}; it has {', '.join(known)}")


async def _read_request(request: Request, state: ServerState) -> tuple[dict[str, Any], bytes]:
    """The request's JSON header and the binary tensor data after it (``Inference-Header-Content-Length``), read
    within ``serve.max_upload_bytes`` and ``serve.body_timeout_s``."""
    cfg = state.config.serve
    if request.headers.get("content-encoding", "identity").lower() != "identity":
        raise ApiError(415, "unsupported_encoding", f"Content-Encoding {request.headers['content-encoding']!r} is "
                       "not accepted: send the request uncompressed")
    body = await uploads.read_body(request, cfg.max_upload_bytes, timeout_s=cfg.body_timeout_s,
                                   on_timeout=lambda _: state.metrics.slow_clients.labels("body_timeout").inc())
    declared = request.headers.get(HEADER_LENGTH)
    # A JSON header with the tensors in it is parsed off the event loop (~10 ms per MB).
    if declared is None:
        return await asyncio.to_thread(_json_object, body), b""
    if not declared.isdigit() or int(declared) > len(body):
        raise ApiError(400, "bad_header_length", f"{HEADER_LENGTH} {declared[:40]!r} is not a number of bytes "
                       f"within the {len(body):,}-byte body")
    return await asyncio.to_thread(_json_object, body[:int(declared)]), body[int(declared):]


def _json_object(text: bytes) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise ApiError(400, "invalid_json", f"the request header is not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise ApiError(400, "invalid_json", "the request header must be a JSON object")
    return value


def _input(header: dict[str, Any], binary: bytes, model: ServedModel, state: ServerState) -> Tensors:
    """The request's one input as a checked ``Tensors``: name, datatype, shape, size and values."""
    cfg = state.config.serve
    inputs = header.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise ApiError(400, "one_input_expected", f"send exactly one input, {PIXELS_INPUT!r} (UINT8 [n, H, W, 3]) "
                       f"or {NORMALIZED_INPUT!r} (FP32 [n, 3, S, S])")
    spec = inputs[0]
    name, datatype, shape = spec.get("name"), spec.get("datatype"), spec.get("shape")
    if name not in _DATATYPES:
        raise ApiError(400, "unknown_input", f"unknown input {name!r}: send {PIXELS_INPUT!r} or {NORMALIZED_INPUT!r}")
    expected, dtype = _DATATYPES[name]
    if datatype != expected:
        raise ApiError(400, "wrong_datatype", f"input {name!r} is {expected}, not {datatype!r}")
    if not (isinstance(shape, list) and len(shape) == 4 and all(type(d) is int and d > 0 for d in shape)):
        raise ApiError(400, "wrong_shape", f"input {name!r} has shape {shape!r}: give 4 positive dimensions")
    side = model.card.image_size
    if name == NORMALIZED_INPUT and shape[1:] != [3, side, side]:
        raise ApiError(400, "wrong_shape", f"input {name!r} has shape {shape}; the model takes [n, 3, {side}, "
                       f"{side}]")
    if name == PIXELS_INPUT and shape[3] != 3:
        raise ApiError(400, "wrong_shape", f"input {name!r} has shape {shape}: give RGB pixels [n, H, W, 3]")
    if shape[0] > cfg.max_batch_images:
        raise ApiError(400, "too_many_images", f"{shape[0]} images in one request; the limit is "
                       f"{cfg.max_batch_images} (serve.max_batch_images)")
    if name == PIXELS_INPUT and shape[1] * shape[2] > cfg.max_image_pixels:
        raise ApiError(413, "image_too_large", f"{shape[2]} x {shape[1]} pixels per image; the limit is "
                       f"{cfg.max_image_pixels:,} (serve.max_image_pixels): send them scaled down")
    count = math.prod(shape)
    data = _tensor_data(spec, binary, dtype, count, name)
    if name == NORMALIZED_INPUT and not np.isfinite(data).all():
        raise ApiError(400, "non_finite", f"input {name!r} holds {int((~np.isfinite(data)).sum())} NaN or "
                       "infinite values: send normalized finite floats")
    return Tensors(np.ascontiguousarray(data.reshape(shape)))


def _tensor_data(spec: dict[str, Any], binary: bytes, dtype: np.dtype, count: int, name: str) -> np.ndarray:
    """An input's ``count`` values, from the binary data (``binary_data_size``) or from the JSON ``data``."""
    size = (spec.get("parameters") or {}).get("binary_data_size")
    if size is not None:
        if size != count * dtype.itemsize or len(binary) != size:
            raise ApiError(400, "wrong_size", f"input {name!r}: binary_data_size is {size!r} and {len(binary):,} "
                           f"bytes follow the header; its shape needs {count * dtype.itemsize:,}")
        return np.frombuffer(binary, dtype=dtype).astype(dtype.newbyteorder("="))
    if binary:
        raise ApiError(400, "wrong_size", f"{len(binary):,} bytes follow the header but input {name!r} has no "
                       "binary_data_size")
    try:
        values = np.asarray(spec.get("data")).ravel()
    except ValueError:  # a ragged nested list
        values = np.asarray([], dtype=object)
    if values.dtype.kind not in ("iu" if dtype.kind == "u" else "iuf"):  # not bool, str, None or a mix
        raise ApiError(400, "wrong_data", f"input {name!r}: data must be a list of "
                       f"{'integers' if dtype.kind == 'u' else 'numbers'} (or nested lists of them, by the shape)")
    if values.size != count:
        raise ApiError(400, "wrong_size", f"input {name!r} holds {values.size:,} values; its shape needs {count:,}")
    if dtype.kind == "u" and (values.min() < 0 or values.max() > 255):
        raise ApiError(400, "wrong_data", f"input {name!r}: UINT8 values are 0..255")
    return values.astype(dtype.newbyteorder("="))


def _outputs(header: dict[str, Any], model: ServedModel) -> list[tuple[str, int | None, bool]]:
    """The outputs asked for: (name, classification k or None, binary); all of them when none is named."""
    binary_all = bool((header.get("parameters") or {}).get("binary_data_output", False))
    asked = header.get("outputs")
    if not asked:
        return [(OUTPUT, None, binary_all)]
    if not isinstance(asked, list) or not all(isinstance(o, dict) for o in asked):
        raise ApiError(400, "bad_outputs", "outputs must be a list of objects with a name")
    chosen = []
    for output in asked:
        if output.get("name") != OUTPUT:
            raise ApiError(400, "unknown_output", f"unknown output {output.get('name')!r}: the model has {OUTPUT!r}")
        parameters = output.get("parameters") or {}
        k = parameters.get("classification")
        if k is not None and not (type(k) is int and 1 <= k <= model.card.num_classes):
            raise ApiError(400, "bad_classification", f"classification is {k!r}: ask for 1 to "
                           f"{model.card.num_classes} classes")
        chosen.append((OUTPUT, k, bool(parameters.get("binary_data", binary_all))))
    return chosen


def _classification(probabilities: np.ndarray, k: int, class_names: list[str]) -> list[list[str]]:
    """Triton's classification strings, ``"score:index:label"``, for each row's ``k`` most probable classes."""
    top = np.argsort(-probabilities, axis=1, kind="stable")[:, :k]
    return [[f"{row[c]:f}:{c}:{class_names[c] if c < len(class_names) else c}" for c in ids.tolist()]
            for row, ids in zip(probabilities, top, strict=True)]
