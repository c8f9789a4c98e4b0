"""What the service tells a stranger: no filesystem path in any answer to a client without the admin key (readiness,
the model's facts, error bodies), even when the model failed to load; the full detail with the admin key; and
``serve.protect_metrics`` putting /metrics and the docs behind the API key."""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from signpost.cli import main
from signpost.config import ConfigError
from signpost.models.artifact import WEIGHTS
from signpost.serve.app import create_app
from signpost.serve.routes import API_KEY_ENV
from tests.security.served import make_config, small_model
from tests.serve.conftest import image_bytes

ADMIN = {"X-Admin-Key": "admin-secret"}
# An absolute path under a usual root, wherever it sits in a text (the tests' own folders are checked by name too).
ABSOLUTE = re.compile(r"(?<![\w.-])/(?:tmp|home|root|work|var|usr|srv|opt|etc|private|mnt|Users)/")


@pytest.fixture
def start(tmp_path: Path) -> Iterator[Callable[..., TestClient]]:
    """``start(model, *overrides, workdir=..., **keys)``: a started TestClient (not waited for); closed after."""
    clients: list[TestClient] = []

    def make(model: Path | str, *overrides: str, workdir: Path | str | None = None, **keys: str) -> TestClient:
        config = make_config(Path(workdir or tmp_path / "work"), *overrides)
        client = TestClient(create_app(config, str(model), **keys), raise_server_exceptions=False)
        client.__enter__()
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.__exit__(None, None, None)


def settled(client: TestClient, timeout: float = 60.0) -> None:
    """Wait until the model has loaded or failed to."""
    deadline = time.monotonic() + timeout
    while client.get("/readyz").json()["detail"] in ("loading the model", "loading the canary"):
        if time.monotonic() > deadline:
            raise AssertionError(f"still loading after {timeout} s")
        time.sleep(0.05)


def broken_model(folder: Path) -> Path:
    """A model artifact whose weights no longer match its manifest: loading it fails with a message naming it."""
    small_model(folder)
    with (folder / WEIGHTS).open("ab") as weights:
        weights.write(b"\0")
    return folder


def stranger_answers(client: TestClient) -> dict[str, str]:
    """Every kind of answer a client without keys can get, by what was asked."""
    png = {"content": image_bytes(), "headers": {"Content-Type": "image/png"}}
    return {
        "readyz": client.get("/readyz").text,
        "model": client.get("/v1/model").text,
        "predict": client.post("/v1/predict", **png).text,
        "batch": client.post("/v1/predict/batch", files={"a": ("a.png", image_bytes())}).text,
        "bad request": client.post("/v1/predict", content=b"not an image", headers={"Content-Type": "image/png"}).text,
        "not found": client.get("/no/such/route").text,
        "reload": client.post("/v1/admin/reload", json={"model": "/etc"}).text,
        "metrics": client.get("/metrics").text,
        "openapi": client.get("/openapi.json").text,
    }


def assert_no_paths(answers: dict[str, str], *places: Path | str) -> None:
    for asked, text in answers.items():
        for place in places:
            assert str(place) not in text, f"{asked}: {place} in {text[:400]}"
        assert not ABSOLUTE.search(text), f"{asked}: an absolute path in {text[:400]}"


def test_a_load_failure_is_explained_to_strangers_without_paths(
    start: Callable[..., TestClient], tmp_path: Path
) -> None:
    model = broken_model(tmp_path / "models" / "train" / "small-0123456789ab")
    client = start(model, admin_key=ADMIN["X-Admin-Key"])
    settled(client)
    answers = stranger_answers(client)
    assert_no_paths(answers, tmp_path, tmp_path.resolve(), model)
    readiness = client.get("/readyz")
    assert readiness.status_code == 503
    # What is wrong is still said: which file, and that it does not match its manifest.
    assert "ArtifactError" in readiness.json()["detail"] and "does not match" in readiness.json()["detail"]
    assert "does not match" in client.get("/v1/model").json()["error"]["message"]
    # The admin key shows the whole message, path included.
    assert str(model) in client.get("/readyz", headers=ADMIN).json()["detail"]


def test_relative_paths_given_by_the_user_are_not_told_either(
    start: Callable[..., TestClient], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    broken_model(tmp_path / "artifacts" / "train" / "small-0123456789ab")
    client = start("artifacts/train/small-0123456789ab", workdir="artifacts")
    settled(client)
    assert_no_paths(stranger_answers(client), tmp_path, "artifacts/")
    assert "does not match" in client.get("/readyz").json()["detail"]


def test_the_model_facts_name_no_path_without_the_admin_key(start: Callable[..., TestClient], tmp_path: Path) -> None:
    model = small_model(tmp_path / "models" / "train" / "small-0123456789ab")
    client = start(model, admin_key=ADMIN["X-Admin-Key"])
    settled(client)
    answers = stranger_answers(client)
    assert_no_paths(answers, tmp_path, tmp_path.resolve(), model)
    facts = client.get("/v1/model").json()
    assert facts["origin"] == facts["artifact"] == model.name and facts["version"] == model.name
    assert client.get("/v1/model", headers=ADMIN).json()["origin"] == str(model)


@pytest.mark.parametrize("route", ["/metrics", "/docs", "/redoc", "/openapi.json"])
def test_protect_metrics_puts_metrics_and_docs_behind_the_api_key(
    start: Callable[..., TestClient], tmp_path: Path, route: str
) -> None:
    client = start(small_model(tmp_path / "model"), "serve.protect_metrics=true", api_key="api-secret")
    refused = client.get(route)
    assert refused.status_code == 401 and refused.json()["error"]["code"] == "unauthorized"
    assert client.get(route, headers={"X-API-Key": "wrong"}).status_code == 401
    assert client.get(route, headers={"Authorization": "Bearer api-secret"}).status_code == 200
    allowed = client.get(route, headers={"X-API-Key": "api-secret"})
    assert allowed.status_code == 200
    # With the key, each answers what it did when open.
    expected = {"/metrics": "signpost_requests_total", "/docs": "/openapi.json", "/redoc": "/openapi.json",
                "/openapi.json": '"/v1/predict"'}
    assert expected[route] in allowed.text
    assert client.get("/healthz").status_code == 200 and client.get("/readyz").status_code in (200, 503)  # probes


@pytest.mark.parametrize("route", ["/metrics", "/docs", "/redoc", "/openapi.json"])
def test_without_protect_metrics_they_stay_open(start: Callable[..., TestClient], tmp_path: Path, route: str) -> None:
    client = start(small_model(tmp_path / "model"), api_key="api-secret")
    assert client.get(route).status_code == 200
    assert client.post("/v1/predict", content=image_bytes(), headers={"Content-Type": "image/png"}).status_code == 401


def test_protect_metrics_without_an_api_key_is_refused_at_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv(API_KEY_ENV, raising=False)
    model = small_model(tmp_path / "model")
    with pytest.raises(ConfigError, match=API_KEY_ENV):
        create_app(make_config(tmp_path / "work", "serve.protect_metrics=true"), str(model))
    code = main(["serve", "--model", str(model), f"workdir={tmp_path / 'work'}", "tracking.backend=none",
                 "serve.protect_metrics=true"])
    err = capsys.readouterr().err
    assert code != 0 and err.count("\n") == 1 and API_KEY_ENV in err, err
