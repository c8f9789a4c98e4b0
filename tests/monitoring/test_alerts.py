"""Alerts against a receiver on 127.0.0.1: one signed alert per incident and sink, then one resolved message."""

from __future__ import annotations

import http.server
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar

import pytest

from signpost.config import AlertSinkConfig
from signpost.monitoring.alerts import SIGNATURE_HEADER, AlertManager, Incident, sign


class _Receiver(http.server.BaseHTTPRequestHandler):
    received: ClassVar[list[dict]] = []

    def _handle(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.received.append({"method": self.command, "path": self.path, "headers": dict(self.headers),
                              "body": body})
        reply = json.dumps({"number": 7}).encode() if self.path.endswith("/issues") else b"{}"
        self.send_response(201 if self.command == "POST" else 200)
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    do_POST = do_PATCH = _handle

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def receiver() -> Iterator[tuple[str, list[dict]]]:
    _Receiver.received = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Receiver)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", _Receiver.received
    server.shutdown()


def _manager(url: str, tmp_path: Path, cooldown_s: float = 3600) -> AlertManager:
    sinks = [AlertSinkConfig(kind="log"), AlertSinkConfig(kind="webhook", url=f"{url}/hook"),
             AlertSinkConfig(kind="slack", url=f"{url}/slack"),
             AlertSinkConfig(kind="github", repository="acme/signs", api_url=url)]
    return AlertManager(sinks, tmp_path / "alerts.json", cooldown_s)


DRIFT = Incident("input-drift", "brightness drifted", {"features": ["brightness"]})


def test_one_incident_is_one_signed_alert_per_sink_then_one_resolved(receiver, tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    url, received = receiver
    monkeypatch.setenv("SIGNPOST_WEBHOOK_SECRET", "hook-secret")
    monkeypatch.setenv("GITHUB_TOKEN", "gh-token")
    sent = _manager(url, tmp_path).update([DRIFT], source="test", now=1000.0)
    assert [(s["sink"], s["status"], s["ok"]) for s in sent] == [
        ("log", "firing", True), ("webhook", "firing", True), ("slack", "firing", True), ("github", "firing", True)]
    hook = next(r for r in received if r["path"] == "/hook")
    assert hook["headers"][SIGNATURE_HEADER] == sign(b"hook-secret", hook["body"])
    assert json.loads(hook["body"])["incident"] == "input-drift"
    assert "brightness drifted" in json.loads(next(r for r in received if r["path"] == "/slack")["body"])["text"]
    issue = next(r for r in received if r["path"] == "/repos/acme/signs/issues")
    assert issue["headers"]["Authorization"] == "Bearer gh-token"

    # Still drifting an hour later: the same incident, no new message (a new manager reads the state file).
    assert _manager(url, tmp_path).update([DRIFT], source="test", now=4600.0) == []
    count = len(received)
    resolved = _manager(url, tmp_path).update([], source="test", now=5000.0)
    assert {(s["sink"], s["status"]) for s in resolved} == {("log", "resolved"), ("webhook", "resolved"),
                                                            ("slack", "resolved"), ("github", "resolved")}
    paths = [(r["method"], r["path"]) for r in received[count:]]
    assert ("POST", "/repos/acme/signs/issues/7/comments") in paths and ("PATCH", "/repos/acme/signs/issues/7") in paths
    assert json.loads(next(r for r in received[count:] if r["method"] == "PATCH")["body"]) == {"state": "closed"}


def test_a_flapping_condition_within_the_cooldown_stays_one_incident(receiver, tmp_path: Path) -> None:
    url, _ = receiver
    manager = _manager(url, tmp_path, cooldown_s=600)
    manager.sinks = manager.sinks[:2]
    assert len(manager.update([DRIFT], source="t", now=0.0)) == 2
    assert len(manager.update([], source="t", now=60.0)) == 2  # resolved
    assert manager.update([DRIFT], source="t", now=120.0) == []  # back within 10 minutes: suppressed
    assert manager.update([], source="t", now=180.0) == []  # and its clearing is silent too
    assert len(manager.update([DRIFT], source="t", now=1000.0)) == 2  # after the cool-down: a new incident


def test_a_failing_sink_is_reported_and_does_not_stop_the_others(receiver, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    url, _ = receiver
    monkeypatch.delenv("GITHUB_TOKEN", raising=False)
    sinks = [AlertSinkConfig(kind="webhook", url="http://127.0.0.1:9/closed"),
             AlertSinkConfig(kind="github", repository="acme/signs", api_url=url),
             AlertSinkConfig(kind="slack", url=f"{url}/slack")]
    sent = AlertManager(sinks, tmp_path / "a.json", 0).update([DRIFT], source="t")
    assert [s["ok"] for s in sent] == [False, False, True]
    assert "GITHUB_TOKEN is not set" in sent[1]["error"]


def test_sinks_are_checked_when_the_config_is_read() -> None:
    with pytest.raises(ValueError, match="needs a url"):
        AlertSinkConfig(kind="webhook")
    with pytest.raises(ValueError, match="repository"):
        AlertSinkConfig(kind="github")
