"""The service through its HTTP interface: predictions, health, metrics, reloads and timeouts (bad input, tampered
models and keys: tests/security/test_serve_attacks.py)."""

from __future__ import annotations

import io
import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from signpost.data.cache import load_split
from signpost.models.artifact import CARD, load_model
from tests.serve.conftest import image_bytes


def _test_images(optimized: dict, n: int) -> tuple[list[bytes], np.ndarray]:
    """``n`` test-split images as PNG files, and their labels."""
    split = load_split(optimized["data_dir"] / "test.safetensors")
    blobs = []
    for image in split.images[:n].numpy():
        buffer = io.BytesIO()
        Image.fromarray(image.transpose(1, 2, 0)).save(buffer, "PNG")
        blobs.append(buffer.getvalue())
    return blobs, split.labels[:n].numpy()


def test_predict_answers_what_the_model_says(make_client, optimized: dict) -> None:
    client = make_client()
    blobs, _ = _test_images(optimized, 4)
    model, card = load_model(optimized["model_dir"])
    split = load_split(optimized["data_dir"] / "test.safetensors")
    mean = torch.tensor(card.mean).view(1, 3, 1, 1)
    std = torch.tensor(card.std).view(1, 3, 1, 1)
    with torch.no_grad():
        expected = torch.softmax(model((split.images[:4].float() / 255 - mean) / std), 1)

    for i, blob in enumerate(blobs):
        answer = client.post("/v1/predict", content=blob, headers={"Content-Type": "image/png"})
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert body["class_id"] == int(expected[i].argmax())
        assert body["class_name"] == card.class_names[body["class_id"]]
        assert body["confidence"] == pytest.approx(float(expected[i].max()), abs=1e-4)
        confidences = [s["confidence"] for s in body["top_k"]]
        assert confidences == sorted(confidences, reverse=True) and len(confidences) == 5
        assert body["top_k"][0]["class_id"] == body["class_id"]
        assert body["model_version"] == optimized["model_dir"].name
        assert body["latency_ms"] > 0 and body["request_id"]


def test_batch_answers_each_image_in_order(make_client, optimized: dict) -> None:
    client = make_client()
    blobs, _ = _test_images(optimized, 6)
    singles = [client.post("/v1/predict", content=b, headers={"Content-Type": "image/png"}).json()["class_id"]
               for b in blobs]
    files = [("images", (f"{i}.png", b, "image/png")) for i, b in enumerate(blobs)]
    answer = client.post("/v1/predict/batch", files=files)
    assert answer.status_code == 200, answer.text
    assert [p["class_id"] for p in answer.json()["predictions"]] == singles
    one = client.post("/v1/predict", files=[("file", ("a.png", blobs[0], "image/png"))])
    assert one.status_code == 200 and one.json()["class_id"] == singles[0]


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "BMP", "PPM", "WEBP", "GIF", "TIFF"])
def test_every_accepted_format_is_classified(make_client, fmt: str) -> None:
    client = make_client()
    answer = client.post("/v1/predict", content=image_bytes(fmt), headers={"Content-Type": "application/octet-stream"})
    assert answer.status_code == 200, answer.text


def test_health_readiness_model_card_metrics_and_docs(make_client, optimized: dict) -> None:
    client = make_client()
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz").json()
    assert ready["ready"] and ready["model_version"] == optimized["model_dir"].name
    info = client.get("/v1/model").json()
    assert info["card"]["num_classes"] == 6 and info["runtime"] == "eager" and "config" not in info["card"]
    for _ in range(3):
        client.post("/v1/predict", content=image_bytes(), headers={"Content-Type": "image/png"})
    client.post("/v1/predict", content=b"junk", headers={"Content-Type": "image/png"})
    metrics = client.get("/metrics").text
    assert 'signpost_requests_total{method="POST",route="/v1/predict",status="200"} 3.0' in metrics
    assert 'signpost_requests_total{method="POST",route="/v1/predict",status="400"} 1.0' in metrics
    assert "signpost_request_duration_seconds_bucket" in metrics and "signpost_batch_size_count" in metrics
    version = optimized["model_dir"].name
    assert f'signpost_model_info{{model_version="{version}",role="main",runtime="eager"}} 1.0' in metrics
    assert "signpost_queue_depth" in metrics
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/v1/predict", "/v1/predict/batch", "/healthz", "/readyz", "/v1/model"} <= set(paths)
    assert client.get("/docs").status_code == 200


def test_an_optimized_variant_is_served_on_onnxruntime_by_default(make_client, optimized: dict) -> None:
    client = make_client(optimized["result"].path / "pruned")
    info = client.get("/v1/model").json()
    assert info["runtime"] == "onnxruntime" and info["version"].endswith("/pruned")
    assert client.post("/v1/predict", content=image_bytes(), headers={"Content-Type": "image/png"}).status_code == 200
    int8 = make_client(optimized["result"].path / "int8")
    assert int8.get("/v1/model").json()["form"] == "program"
    assert int8.post("/v1/predict", content=image_bytes(), headers={"Content-Type": "image/png"}).status_code == 200
    aoti = make_client(optimized["result"].path / "pruned", runtime="aoti")
    assert aoti.get("/v1/model").json()["runtime"] == "aoti"
    same = [c.post("/v1/predict", content=image_bytes(seed=3), headers={"Content-Type": "image/png"}).json()
            for c in (client, aoti)]
    assert same[0]["class_id"] == same[1]["class_id"]
    assert same[0]["confidence"] == pytest.approx(same[1]["confidence"], abs=1e-3)


def test_admin_reload_switches_models_without_a_restart(make_client, optimized: dict) -> None:
    client = make_client(None, admin_key="admin-key")
    before = client.get("/v1/model").json()["version"]
    pruned = str(optimized["result"].path / "pruned")
    assert client.post("/v1/admin/reload", json={"model": pruned}).status_code == 401
    answer = client.post("/v1/admin/reload", json={"model": pruned, "runtime": "eager"},
                         headers={"X-Admin-Key": "admin-key"})
    assert answer.status_code == 200, answer.text
    assert answer.json()["previous_version"] == before
    assert client.get("/v1/model").json()["version"].endswith("/pruned")
    bad = client.post("/v1/admin/reload", json={"model": "/no/such/model"}, headers={"X-Admin-Key": "admin-key"})
    assert bad.status_code == 400 and "still serving" in bad.json()["error"]["message"]
    assert client.get("/v1/model").json()["version"].endswith("/pruned")
    both = client.post("/v1/admin/reload", json={"model": pruned, "alias": "champion"},
                       headers={"X-Admin-Key": "admin-key"})
    assert both.status_code == 400
    assert client.post("/v1/predict", content=image_bytes(), headers={"Content-Type": "image/png"}).status_code == 200
    no_admin = make_client()
    assert no_admin.post("/v1/admin/reload", json={"model": pruned}).status_code == 403


def test_a_slow_forward_pass_times_out_with_504_and_the_server_recovers(make_client) -> None:
    client = make_client(None, "serve.request_timeout_s=0.2")
    state = client.app.state.signpost
    model = state.model
    original = model.predictor.forward

    def slow(x: torch.Tensor) -> torch.Tensor:
        time.sleep(0.5)
        return original(x)

    model.predictor.forward = slow
    answer = client.post("/v1/predict", content=image_bytes(), headers={"Content-Type": "image/png"})
    assert answer.status_code == 504 and answer.json()["error"]["code"] == "timeout"
    model.predictor.forward = original
    time.sleep(0.6)  # the slow batch still holds the worker until it ends; then the next request is answered
    assert client.post("/v1/predict", content=image_bytes(), headers={"Content-Type": "image/png"}).status_code == 200


def test_model_uris_and_folders_are_checked_up_front(optimized: dict, tmp_path: Path) -> None:
    from signpost.serve.model import resolve

    config = optimized["config"]
    with pytest.raises(Exception, match="not a model artifact"):
        resolve(tmp_path, config)
    with pytest.raises(ValueError, match="expected models:/"):
        resolve("models:/no-alias", config)
    with pytest.raises(ValueError, match="holds"):
        resolve("models:/other-model@champion", config)
    card = json.loads((optimized["model_dir"] / CARD).read_text())
    assert resolve(optimized["model_dir"], config).version == optimized["model_dir"].name
    assert card["num_classes"] == 6


def test_serving_and_reloading_by_registry_alias(make_client, optimized: dict, tmp_path: Path) -> None:
    from signpost.registry import CHAMPION, Registry
    from signpost.tracking import start_run

    work = tmp_path / "work0"  # make_client's first workdir: the registry lives there
    config = optimized["config"].model_copy(deep=True)
    config.workdir = work
    config.tracking.backend = "mlflow"
    registry = Registry(config.tracking, work)
    for folder, alias in ((optimized["model_dir"], CHAMPION), (optimized["result"].path / "pruned", "challenger")):
        with start_run(config.tracking, workdir=work, experiment="t", run_name=folder.name,
                       system_metrics=False) as run:
            registry.register(run, folder, alias=alias)
    client = make_client(f"models:/{config.tracking.registered_model}@{CHAMPION}", "tracking.backend=mlflow",
                         admin_key="k")
    assert client.get("/v1/model").json()["version"] == f"{config.tracking.registered_model}/1"
    answer = client.post("/v1/admin/reload", json={"alias": "challenger"}, headers={"X-Admin-Key": "k"})
    assert answer.status_code == 200, answer.text
    assert answer.json()["model_version"] == f"{config.tracking.registered_model}/2"
    assert client.post("/v1/predict", content=image_bytes(), headers={"Content-Type": "image/png"}).status_code == 200
    missing = client.post("/v1/admin/reload", json={"alias": "nope"}, headers={"X-Admin-Key": "k"})
    assert missing.status_code == 400 and "no 'nope' version" in missing.json()["error"]["message"]


def test_failed_prediction_requests_are_logged_for_the_error_rate(optimized: dict, tmp_path: Path) -> None:
    from fastapi.testclient import TestClient

    from signpost.serve.app import create_app
    from signpost.serve.predlog import count, default_url, error_count
    from tests.serve.conftest import serve_config, wait_ready

    config = serve_config(optimized, tmp_path / "work")
    with TestClient(create_app(config, str(optimized["model_dir"]))) as client:
        wait_ready(client)
        for body in (b"", b"junk", image_bytes(), image_bytes(seed=2)):
            client.post("/v1/predict", content=body, headers={"Content-Type": "image/png"})
        client.get("/nowhere")  # not a prediction request: not counted
    url = default_url(config.workdir)
    assert count(url) == 2 and error_count(url, 0, time.time() + 1) == 2


def test_the_prediction_log_url_from_the_environment_overrides_the_config(optimized: dict, tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """A Deployment gives the shared log's URL (credentials in it) from a Secret as SIGNPOST_PREDICTION_LOG."""
    from fastapi.testclient import TestClient

    from signpost.serve.app import create_app
    from signpost.serve.predlog import count, default_url
    from tests.serve.conftest import serve_config, wait_ready

    shared = f"sqlite:///{tmp_path / 'shared.db'}"
    monkeypatch.setenv("SIGNPOST_PREDICTION_LOG", shared)
    config = serve_config(optimized, tmp_path / "work")
    with TestClient(create_app(config, str(optimized["model_dir"]))) as client:
        wait_ready(client)
        answer = client.post("/v1/predict", content=image_bytes(), headers={"Content-Type": "image/png"})
        assert answer.status_code == 200
    assert count(shared) == 1
    assert not Path(default_url(config.workdir).removeprefix("sqlite:///")).exists()
