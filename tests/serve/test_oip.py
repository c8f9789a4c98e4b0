"""The Open Inference Protocol (KServe v2 / Triton REST) routes, called with the real Triton client
(``tritonclient.http``) against a uvicorn server on loopback: metadata, JSON and binary tensors, the classification
extension, the API key, bad requests, metrics and the prediction log."""

from __future__ import annotations

import contextlib
import io
import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image
from sqlalchemy import select

from signpost.data.cache import load_split
from signpost.models.artifact import read_card
from signpost.serve.app import create_app
from signpost.serve.predict import Tensors, processor
from signpost.serve.predlog import default_url, error_count, make_engine, predictions
from tests.serve.conftest import LoopbackServer, serve_config

try:
    import tritonclient.http as triton
    from tritonclient.utils import InferenceServerException
except ImportError as exc:  # a failure that names the fix, never a skip
    raise ImportError("tests/serve/test_oip.py needs the Triton client: .venv/bin/pip install -c constraints.txt "
                      "'tritonclient[http]' (it is in the dev extra)") from exc

KEY = "oip-test-key"


def _auth() -> dict[str, str]:
    """The key's header, in a dict of its own each call: tritonclient adds its own headers to the dict it is given."""
    return {"X-API-Key": KEY}


@contextlib.contextmanager
def _serve(optimized: dict, workdir: Path, *overrides: str, **keys: str) -> Iterator[tuple[LoopbackServer, object]]:
    """A real server on 127.0.0.1 and a Triton client of it, once the model is ready."""
    app = create_app(serve_config(optimized, workdir, *overrides), str(optimized["model_dir"]), **keys)
    with LoopbackServer(app) as server:
        client = triton.InferenceServerClient(url=f"127.0.0.1:{server.port}", network_timeout=60)
        deadline = time.monotonic() + 120
        while not client.is_server_ready():
            assert time.monotonic() < deadline, "the server did not become ready in 120 s"
            time.sleep(0.05)
        try:
            yield server, client
        finally:
            client.close()


@pytest.fixture(scope="module")
def served(optimized: dict, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LoopbackServer, object]]:
    """One server for the module's read-only checks: API key set, at most 4 images a request."""
    with _serve(optimized, tmp_path_factory.mktemp("oip"), "serve.max_batch_images=4", api_key=KEY) as pair:
        yield pair


def _images(optimized: dict, n: int) -> np.ndarray:
    """``n`` test-split images, uint8 [n, S, S, 3]."""
    return load_split(optimized["data_dir"] / "test.safetensors").images[:n].numpy().transpose(0, 2, 3, 1).copy()


def _png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


def _v1(server: LoopbackServer, pixels: np.ndarray) -> dict:
    answer = httpx.post(f"{server.url}/v1/predict", content=_png(pixels),
                        headers={"Content-Type": "image/png", **_auth()})
    assert answer.status_code == 200, answer.text
    return answer.json()


def _normalized(pixels: np.ndarray, card: object) -> np.ndarray:
    """What the metadata tells a client to send as FP32: NCHW, (pixel / 255 - mean) / std."""
    mean = np.asarray(card.mean, dtype=np.float32).reshape(1, 3, 1, 1)
    std = np.asarray(card.std, dtype=np.float32).reshape(1, 3, 1, 1)
    return ((pixels.transpose(0, 3, 1, 2).astype(np.float32) / 255 - mean) / std).astype(np.float32)


def _input(name: str, data: np.ndarray, binary: bool) -> object:
    tensor = triton.InferInput(name, list(data.shape), "UINT8" if data.dtype == np.uint8 else "FP32")
    tensor.set_data_from_numpy(data, binary_data=binary)
    return tensor


def _model_name(client: object) -> tuple[str, str]:
    index = client.get_model_repository_index(headers=_auth())
    return index[0]["name"], index[0]["version"]


def test_health_server_and_model_metadata_and_the_repository_index(served, optimized: dict) -> None:
    server, client = served
    name = optimized["model_dir"].name  # a model served from its folder is named by its artifact
    card = read_card(optimized["model_dir"])
    assert client.is_server_live() and client.is_server_ready()
    meta = client.get_server_metadata()
    assert meta["name"] == "signpost" and {"classification", "binary_tensor_data"} <= set(meta["extensions"])
    assert client.get_model_repository_index() == [{"name": name, "version": name, "state": "READY"}]
    assert client.is_model_ready(name) and client.is_model_ready(name, name)
    model = client.get_model_metadata(name)
    assert model["name"] == name and model["versions"] == [name] and model["platform"] == "pytorch_eager"
    side = card.image_size
    assert {(i["name"], i["datatype"], tuple(i["shape"])) for i in model["inputs"]} == {
        ("images", "UINT8", (-1, -1, -1, 3)), ("input", "FP32", (-1, 3, side, side))}
    assert model["outputs"] == [{"name": "probabilities", "datatype": "FP32", "shape": [-1, card.num_classes]}]
    assert model["parameters"]["mean"] == card.mean and model["parameters"]["std"] == card.std
    assert model["parameters"]["class_names"] == card.class_names
    with pytest.raises(InferenceServerException, match="unknown model 'no-such-model'") as caught:
        client.get_model_metadata("no-such-model")
    assert caught.value.status() == "404"
    with pytest.raises(InferenceServerException, match="has no version '7'") as caught:
        client.get_model_metadata(name, "7")
    assert caught.value.status() == "404"
    assert not client.is_model_ready("no-such-model") and not client.is_model_ready(name, "7")
    plain = httpx.get(f"{server.url}/v2/models/no-such-model")
    assert plain.status_code == 404 and isinstance(plain.json()["error"], str)  # the protocol's error body


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
@pytest.mark.parametrize("datatype", ["UINT8", "FP32"])
def test_infer_answers_what_v1_predict_answers(served, optimized: dict, binary: bool, datatype: str) -> None:
    server, client = served
    name, version = _model_name(client)
    card = read_card(optimized["model_dir"])
    pixels = _images(optimized, 4)
    expected = [_v1(server, p) for p in pixels]
    if datatype == "UINT8":
        tensor = _input("images", pixels, binary)
    else:
        tensor = _input("input", _normalized(pixels, card), binary)
    result = client.infer(name, [tensor], outputs=[triton.InferRequestedOutput("probabilities", binary_data=binary)],
                          headers=_auth())
    probabilities = result.as_numpy("probabilities")
    assert probabilities.shape == (4, card.num_classes) and probabilities.dtype == np.float32
    assert np.allclose(probabilities.sum(axis=1), 1, atol=1e-5)
    assert [int(c) for c in probabilities.argmax(axis=1)] == [e["class_id"] for e in expected]
    tolerance = 1e-5 if datatype == "UINT8" else 1e-3  # FP32: the client's normalization rounds differently
    assert probabilities.max(axis=1) == pytest.approx([e["confidence"] for e in expected], abs=tolerance)
    assert result.get_response()["model_name"] == name and result.get_response()["model_version"] == version
    versioned = client.infer(name, [tensor], model_version=version, headers=_auth())  # no outputs named: all, binary
    assert np.array_equal(versioned.as_numpy("probabilities"), probabilities)


def test_raw_pixels_of_any_size_are_resized_as_uploads_are(served, optimized: dict) -> None:
    server, client = served
    name, _ = _model_name(client)
    pixels = np.random.default_rng(3).integers(0, 256, (2, 40, 48, 3), dtype=np.uint8)
    result = client.infer(name, [_input("images", pixels, True)], headers=_auth()).as_numpy("probabilities")
    for row, image in zip(result, pixels, strict=True):
        expected = _v1(server, image)
        assert int(row.argmax()) == expected["class_id"]
        assert float(row.max()) == pytest.approx(expected["confidence"], abs=1e-5)


def test_uploads_and_tensors_share_a_batch_and_uploads_keep_top_k(make_client, optimized: dict) -> None:
    client = make_client()
    state = client.app.state.signpost
    card = read_card(optimized["model_dir"])
    pixels = _images(optimized, 2)
    batch = [[_png(pixels[0])], Tensors(pixels[:2]), Tensors(_normalized(pixels[:1], card))]
    upload, raw, normalized = processor(state, lambda: state.model)(batch)
    top_k = state.config.serve.top_k
    assert top_k < card.num_classes  # so the batch's all-class forward pass must be cut back for the upload
    assert upload.probabilities is None and upload.outputs.top_ids.shape == (1, top_k)
    assert raw.outputs.top_ids.shape == (2, top_k) and raw.probabilities.shape == (2, card.num_classes)
    assert np.array_equal(raw.outputs.top_ids[:1], upload.outputs.top_ids)
    assert raw.probabilities[0, upload.outputs.top_ids[0]] == pytest.approx(upload.outputs.top_probs[0], abs=1e-6)
    assert int(normalized.probabilities[0].argmax()) == int(upload.outputs.top_ids[0, 0])
    assert normalized.probabilities[0].max() == pytest.approx(float(upload.outputs.top_probs[0, 0]), abs=1e-3)


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_the_classification_extension_gives_the_top_k_as_triton_does(served, optimized: dict, binary: bool) -> None:
    _, client = served
    name, _ = _model_name(client)
    card = read_card(optimized["model_dir"])
    pixels = _images(optimized, 3)
    full = client.infer(name, [_input("images", pixels, binary)], headers=_auth()).as_numpy("probabilities")
    asked = triton.InferRequestedOutput("probabilities", binary_data=binary, class_count=3)
    result = client.infer(name, [_input("images", pixels, binary)], outputs=[asked], headers=_auth())
    labels = result.as_numpy("probabilities")
    assert labels.shape == (3, 3)
    for row, probabilities in zip(labels, full, strict=True):
        entries = [(e.decode() if isinstance(e, bytes) else e).split(":") for e in row]
        assert [int(index) for _, index, _ in entries] == list(np.argsort(-probabilities)[:3])
        assert [label for _, _, label in entries] == [card.class_names[int(i)] for _, i, _ in entries]
        assert [float(score) for score, _, _ in entries] == pytest.approx(sorted(probabilities)[::-1][:3], abs=1e-6)


def test_infer_needs_the_api_key_when_the_server_has_one(served, optimized: dict) -> None:
    _, client = served
    name, _ = _model_name(client)
    tensor = _input("images", _images(optimized, 1), True)
    for headers in (None, {"X-API-Key": "wrong"}):
        with pytest.raises(InferenceServerException, match="missing or wrong API key") as caught:
            client.infer(name, [tensor], headers=headers)
        assert caught.value.status() == "401"
    bearer = client.infer(name, [tensor], headers={"Authorization": f"Bearer {KEY}"})
    assert bearer.as_numpy("probabilities").shape[0] == 1


def test_bad_requests_get_400_naming_the_problem(served, optimized: dict) -> None:
    server, client = served
    name, _ = _model_name(client)
    card = read_card(optimized["model_dir"])
    side = card.image_size
    floats = _normalized(_images(optimized, 1), card)
    nan = floats.copy()
    nan[0, 0, 0, 0] = np.nan
    cases = {
        "is UINT8, not 'FP32'": [_input("images", floats.transpose(0, 2, 3, 1).copy(), True)],
        f"the model takes [n, 3, {side}, {side}]": [_input("input", np.zeros((1, 3, side + 1, side), np.float32),
                                                           True)],
        "serve.max_batch_images": [_input("images", np.zeros((5, side, side, 3), np.uint8), True)],
        "NaN or infinite": [_input("input", nan, True)],
        "unknown input 'pixels'": [triton.InferInput("pixels", [1, side, side, 3], "UINT8")],
        "send exactly one input": [_input("images", np.zeros((1, side, side, 3), np.uint8), True),
                                   _input("input", floats, True)],
    }
    cases["unknown input 'pixels'"][0].set_data_from_numpy(np.zeros((1, side, side, 3), np.uint8))
    for message, inputs in cases.items():
        with pytest.raises(InferenceServerException, match=message.replace("[", r"\[").replace("]", r"\]")) as caught:
            client.infer(name, inputs, headers=_auth())
        assert caught.value.status() == "400", message
    with pytest.raises(InferenceServerException, match="unknown output 'logits'"):
        client.infer(name, [_input("input", floats, True)], outputs=[triton.InferRequestedOutput("logits")],
                     headers=_auth())
    with pytest.raises(InferenceServerException, match="has no version 'nope'") as caught:
        client.infer(name, [_input("input", floats, True)], model_version="nope", headers=_auth())
    assert caught.value.status() == "404"
    # What the client library would not send: a data list that does not fill the shape, bytes past the tensor.
    url = f"{server.url}/v2/models/{name}/infer"
    short = {"inputs": [{"name": "images", "datatype": "UINT8", "shape": [1, 2, 2, 3], "data": [1, 2, 3]}]}
    answer = httpx.post(url, json=short, headers=_auth())
    assert answer.status_code == 400 and answer.json() == {
        "error": "input 'images' holds 3 values; its shape needs 12"}
    words = {"inputs": [{**short["inputs"][0], "data": ["a"] * 12}]}
    answer = httpx.post(url, json=words, headers=_auth())
    assert answer.status_code == 400 and "data must be a list of integers" in answer.json()["error"]
    nested = {"inputs": [{**short["inputs"][0], "data": np.zeros((1, 2, 2, 3), int).tolist()}]}
    assert httpx.post(url, json=nested, headers=_auth()).status_code == 200  # nested by the shape, as the spec allows
    header = json.dumps({"inputs": [{"name": "images", "datatype": "UINT8", "shape": [1, 2, 2, 3],
                                     "parameters": {"binary_data_size": 12}}]}).encode()
    answer = httpx.post(url, content=header + bytes(13),
                        headers={"Inference-Header-Content-Length": str(len(header)), **_auth()})
    assert answer.status_code == 400 and "binary_data_size is 12 and 13 bytes" in answer.json()["error"]
    assert httpx.post(url, content=b"{", headers=_auth()).json()["error"].startswith("the request header is not JSON")


def test_every_image_is_a_prediction_log_row_and_counts_in_the_metrics(optimized: dict, tmp_path: Path) -> None:
    card = read_card(optimized["model_dir"])
    pixels = np.random.default_rng(5).integers(0, 256, (3, 40, 48, 3), dtype=np.uint8)
    floats = _normalized(_images(optimized, 2), card)
    with _serve(optimized, tmp_path) as (server, client):
        name, version = _model_name(client)
        raw = client.infer(name, [_input("images", pixels, True)]).as_numpy("probabilities")
        normalized = client.infer(name, [_input("input", floats, False)]).as_numpy("probabilities")
        with pytest.raises(InferenceServerException):
            client.infer(name, [_input("input", floats[:, :, :2], True)])
        metrics = httpx.get(f"{server.url}/metrics").text
    assert f'signpost_predictions_total{{model_version="{version}"}} 5.0' in metrics
    assert 'signpost_requests_total{method="POST",route="/v2/models/{name}/infer",status="200"} 2.0' in metrics
    assert 'signpost_requests_total{method="POST",route="/v2/models/{name}/infer",status="400"} 1.0' in metrics
    url = default_url(tmp_path)
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(select(predictions).order_by(predictions.c.id)).mappings().all()
    finally:
        engine.dispose()
    assert len(rows) == 5
    assert [(r["width"], r["height"]) for r in rows] == [(48, 40)] * 3 + [(card.image_size, card.image_size)] * 2
    classes = [int(c) for c in np.concatenate([raw, normalized]).argmax(axis=1)]
    assert [r["class_id"] for r in rows] == classes
    assert all(r["model_version"] == optimized["model_dir"].name and r["orientation"] == 1 for r in rows)
    assert [len(json.loads(r["top_k"])) for r in rows] == [5] * 5  # serve.top_k, as /v1/predict rows
    assert all(r["brightness"] > 0 for r in rows[3:])  # statistics of the pixels the normalized floats stand for
    assert error_count(url, 0, time.time() + 1) == 1  # the bad request counts in the monitor's error rate
