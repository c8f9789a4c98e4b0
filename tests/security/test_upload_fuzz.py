"""Hypothesis throws random and mutated bodies at the service: every answer is a 4xx or a 200, never a 5xx."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.serve.conftest import image_bytes

SEEDS = [image_bytes(fmt, (40, 32)) for fmt in ("PNG", "JPEG", "BMP", "PPM", "GIF", "TIFF", "WEBP")]
CONTENT_TYPES = ["image/png", "image/jpeg", "application/octet-stream", "image/x-anything", "text/plain",
                 "multipart/form-data; boundary=zz", "multipart/form-data", "", "image/png; charset=utf-8"]


@st.composite
def bodies(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["random", "mutated", "truncated", "spliced", "multipart"]))
    if kind == "random":
        return draw(st.binary(max_size=4096))
    seed = draw(st.sampled_from(SEEDS))
    if kind == "truncated":
        return seed[: draw(st.integers(0, len(seed)))]
    if kind == "spliced":
        at = draw(st.integers(0, len(seed)))
        return seed[:at] + draw(st.binary(max_size=256)) + seed[at:]
    if kind == "multipart":
        part = seed if draw(st.booleans()) else draw(st.binary(max_size=512))
        return (b"--zz\r\nContent-Disposition: form-data; name=\"f\"; filename=\"x\"\r\n\r\n" + part
                + draw(st.sampled_from([b"\r\n--zz--\r\n", b"", b"\r\n--zz\r\n"])))
    data = bytearray(seed)
    for _ in range(draw(st.integers(1, 12))):
        data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    return bytes(data)


@pytest.fixture(scope="module")
def fuzz_client(optimized: dict, tmp_path_factory: pytest.TempPathFactory):
    from fastapi.testclient import TestClient

    from signpost.serve.app import create_app
    from tests.serve.conftest import serve_config, wait_ready

    config = serve_config(optimized, tmp_path_factory.mktemp("fuzz"), "serve.max_upload_bytes=65536")
    with TestClient(create_app(config, str(optimized["model_dir"])), raise_server_exceptions=False) as client:
        wait_ready(client)
        yield client


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                   HealthCheck.too_slow])
@given(body=bodies(), content_type=st.sampled_from(CONTENT_TYPES),
       route=st.sampled_from(["/v1/predict", "/v1/predict/batch"]))
def test_no_body_makes_a_5xx(fuzz_client, body: bytes, content_type: str, route: str) -> None:
    headers = {"Content-Type": content_type} if content_type else {}
    answer = fuzz_client.post(route, content=body, headers=headers)
    assert answer.status_code < 500, (answer.status_code, answer.text[:300])
    if answer.status_code != 200:
        assert answer.json()["error"]["code"] and "Traceback" not in answer.text


def test_the_service_is_still_up_after_the_fuzzing(fuzz_client) -> None:
    assert fuzz_client.get("/healthz").status_code == 200
    good = fuzz_client.post("/v1/predict", content=SEEDS[0], headers={"Content-Type": "image/png"})
    assert good.status_code == 200
