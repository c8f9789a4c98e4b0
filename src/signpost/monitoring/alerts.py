"""Alerts: one message per incident and sink, a resolved message when it clears, signed where the sink allows.

An incident is a named condition (``prediction-drift``, ``input-drift``, ``latency``, ...) that a monitor run finds
active or not. ``AlertManager.update`` compares the run's incidents with the state file kept between runs:

- newly active -> a "firing" alert to every sink (unless the same incident fired within the cool-down: a condition
  that flaps around its threshold is still one incident);
- still active -> nothing (one incident is one alert);
- no longer active -> a "resolved" message to every sink that was told it fired.

Sinks: ``log``; ``webhook`` (JSON body, ``X-Signpost-Signature: sha256=<HMAC-SHA256 of the body>`` with the key
from the variable ``secret_env``); ``slack`` (an incoming-webhook ``{"text": ...}``); ``github`` (an issue opened on
firing, commented on and closed when resolved, through the REST API with the token from ``token_env``). A sink that
fails is logged and retried on the next run; it never stops the others.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from signpost.config import AlertSinkConfig

log = logging.getLogger(__name__)

SIGNATURE_HEADER = "X-Signpost-Signature"
TIMEOUT_S = 10


@dataclass(frozen=True)
class Incident:
    kind: str
    summary: str  # one line: what crossed which threshold
    details: dict[str, Any]


class AlertManager:
    """Alert state across monitor runs, kept in a JSON file; see the module doc."""

    def __init__(self, sinks: list[AlertSinkConfig], state_path: Path, cooldown_s: float) -> None:
        self.sinks = sinks
        self.state_path = Path(state_path)
        self.cooldown_s = cooldown_s
        self.state: dict[str, Any] = (json.loads(self.state_path.read_text(encoding="utf-8"))
                                      if self.state_path.is_file() else {"open": {}, "last_fired": {}})

    def update(self, active: list[Incident], *, source: str, now: float | None = None) -> list[dict[str, Any]]:
        """Send what changed since the last run; returns one record per message sent (or failed)."""
        now = time.time() if now is None else now
        sent: list[dict[str, Any]] = []
        active_kinds = {incident.kind for incident in active}
        for incident in active:
            if incident.kind in self.state["open"]:
                continue
            last = self.state["last_fired"].get(incident.kind)
            entry: dict[str, Any] = {"since": now, "summary": incident.summary, "sinks": {}}
            self.state["open"][incident.kind] = entry
            if last is not None and now - last < self.cooldown_s:
                log.info("%s is active again within the cool-down: no new alert", incident.kind)
                entry["suppressed"] = True
                continue
            self.state["last_fired"][incident.kind] = now
            for i, sink in enumerate(self.sinks):
                sent.append(self._send(sink, i, "firing", incident.kind, incident.summary, incident.details, source,
                                       entry))
        for kind in [k for k in self.state["open"] if k not in active_kinds]:
            entry = self.state["open"].pop(kind)
            if entry.get("suppressed"):
                continue
            summary = f"{kind} has cleared (it fired: {entry['summary']})"
            for i, sink in enumerate(self.sinks):
                if str(i) in entry["sinks"]:
                    sent.append(self._send(sink, i, "resolved", kind, summary, {}, source, entry))
        self._save()
        return sent

    def _send(self, sink: AlertSinkConfig, index: int, status: str, kind: str, summary: str,
              details: dict[str, Any], source: str, entry: dict[str, Any]) -> dict[str, Any]:
        record = {"sink": sink.kind, "status": status, "incident": kind, "ok": True}
        try:
            reference = _SENDERS[sink.kind](sink, status, kind, summary, details, source, entry["sinks"].get(
                str(index)))
            entry["sinks"][str(index)] = reference
        except Exception as exc:  # one failing sink must not silence the others
            record |= {"ok": False, "error": str(exc)}
            log.error("alert to %s sink failed: %s", sink.kind, exc)
        return record

    def _save(self) -> None:
        self.state_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.state, indent=1) + "\n", encoding="utf-8")
        tmp.replace(self.state_path)


def sign(secret: bytes, body: bytes) -> str:
    """The signature header value a receiver recomputes to trust a webhook: ``sha256=<hex HMAC-SHA256>``."""
    return "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()


def _payload(status: str, kind: str, summary: str, details: dict[str, Any], source: str) -> dict[str, Any]:
    return {"status": status, "incident": kind, "summary": summary, "details": details, "source": source,
            "sent_at": time.time()}


def _log_sink(sink: AlertSinkConfig, status: str, kind: str, summary: str, details: dict[str, Any], source: str,
              reference: Any) -> Any:
    (log.warning if status == "firing" else log.info)("ALERT %s %s: %s (%s)", status, kind, summary, source)
    return True


def _webhook_sink(sink: AlertSinkConfig, status: str, kind: str, summary: str, details: dict[str, Any], source: str,
                  reference: Any) -> Any:
    body = json.dumps(_payload(status, kind, summary, details, source), sort_keys=True).encode()
    headers = {"Content-Type": "application/json"}
    secret = os.environ.get(sink.secret_env)
    if secret:
        headers[SIGNATURE_HEADER] = sign(secret.encode(), body)
    else:
        log.warning("%s is not set: the webhook alert is sent unsigned", sink.secret_env)
    _post(str(sink.url), body, headers)
    return True


def _slack_sink(sink: AlertSinkConfig, status: str, kind: str, summary: str, details: dict[str, Any], source: str,
                reference: Any) -> Any:
    icon = ":rotating_light:" if status == "firing" else ":white_check_mark:"
    text = f"{icon} *Signpost {kind}* {status}: {summary} ({source})"
    _post(str(sink.url), json.dumps({"text": text}).encode(), {"Content-Type": "application/json"})
    return True


def _github_sink(sink: AlertSinkConfig, status: str, kind: str, summary: str, details: dict[str, Any], source: str,
                 reference: Any) -> Any:
    token = os.environ.get(sink.token_env)
    if not token:
        raise RuntimeError(f"{sink.token_env} is not set: cannot open a GitHub issue")
    headers = {"Authorization": f"Bearer {token}", "Accept": "application/vnd.github+json",
               "Content-Type": "application/json", "X-GitHub-Api-Version": "2022-11-28"}
    base = f"{sink.api_url.rstrip('/')}/repos/{sink.repository}/issues"
    if status == "firing":
        body = (f"Signpost's monitor found **{kind}**: {summary}\n\nSource: {source}\n\n```json\n"
                f"{json.dumps(details, indent=1)[:60000]}\n```\n")
        created = _post(base, json.dumps({"title": f"Signpost: {kind}", "body": body,
                                          "labels": ["signpost", "monitoring"]}).encode(), headers)
        return json.loads(created)["number"]
    if reference is None:
        return None
    _post(f"{base}/{reference}/comments", json.dumps({"body": f"Resolved: {summary}"}).encode(), headers)
    _post(f"{base}/{reference}", json.dumps({"state": "closed"}).encode(), headers, method="PATCH")
    return reference


_SENDERS = {"log": _log_sink, "webhook": _webhook_sink, "slack": _slack_sink, "github": _github_sink}


def _post(url: str, body: bytes, headers: dict[str, str], method: str = "POST") -> bytes:
    request = urllib.request.Request(url, data=body, headers=headers, method=method)
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:
            return response.read()
    except urllib.error.HTTPError as exc:
        raise RuntimeError(f"{method} {url}: HTTP {exc.code}") from None
    except (urllib.error.URLError, OSError) as exc:
        raise RuntimeError(f"{method} {url}: {exc}") from None
