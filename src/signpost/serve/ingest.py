"""The fleet's way into the prediction log: ``POST /v1/predictions/ingest``, where a device ships its prediction
records in batches.

A device signs each request with its own API key (``X-API-Key`` or ``Authorization: Bearer``); the server knows only
the key's SHA-256 (``serve.device_keys``, ``serve.device_keys_file``), finds the device by it with constant-time
comparisons, and answers 401 to an unknown key and 403 to a key of one device posting as another. The body is an
``IngestBatch`` (``signpost.monitoring.records``): the device's id, its own batch id and the records, each the row
the server itself logs per prediction. Every record is validated (400 naming the record and the field); a body
over ``serve.max_ingest_bytes`` or a batch over ``serve.max_ingest_records`` is refused with 413.

A batch is stored with its id in one transaction (``PredictionLog.store_batch``): a device that sends it again (its
answer was lost, the server restarted) is answered ``{"stored": 0, "duplicate": true}`` and nothing is stored
twice, however many tries race. Stored rows name the device and this server's experiment.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import threading
from pathlib import Path
from typing import Any

import yaml
from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import TypeAdapter, ValidationError

from signpost.config import ConfigError, DeviceId, KeyHash, ServeConfig, SignpostConfig
from signpost.monitoring.records import IngestBatch, PredictionRecord
from signpost.serve import uploads
from signpost.serve.errors import ERROR_RESPONSES, ApiError, error_body
from signpost.serve.schemas import ErrorResponse, IngestResponse
from signpost.serve.state import State

log = logging.getLogger(__name__)

ROUTE = "/v1/predictions/ingest"
_KEYS = TypeAdapter(dict[DeviceId, KeyHash])


class DeviceKeys:
    """The devices allowed to ship records, by the SHA-256 of their keys: ``serve.device_keys`` and the file
    ``serve.device_keys_file``, read again whenever it changes (a device added or a key rotated without a restart).

    A bad file at start-up is a ConfigError naming it; a file that turns bad later (half-written) keeps the keys read
    before, with an error in the log.
    """

    def __init__(self, cfg: ServeConfig) -> None:
        self._inline = dict(cfg.device_keys)
        self._file = cfg.device_keys_file
        self._seen: tuple[int, int] | None = None  # (mtime ns, size) of the file when last read
        self._keys = dict(self._inline)
        self._lock = threading.Lock()
        _one_key_each(self._inline, "serve.device_keys")
        if self._file is not None:
            self._reload(self._file.stat() if self._file.is_file() else None, at_start=True)

    def enabled(self) -> bool:
        return bool(self._inline) or self._file is not None

    def device_of(self, key: str) -> str | None:
        """The device whose key ``key`` is, or None. Every device's hash is compared, each in constant time: how
        long this takes says nothing about which device, or how much of a hash, matched."""
        if self._file is not None:
            try:
                stat = self._file.stat()
            except OSError:
                stat = None
            if stat is None or (stat.st_mtime_ns, stat.st_size) != self._seen:
                self._reload(stat, at_start=False)
        sent = hashlib.sha256(key.encode()).hexdigest().encode()
        found = None
        for device, digest in self._keys.items():
            if hmac.compare_digest(sent, digest.encode()):
                found = device
        return found

    def _reload(self, stat: Any, *, at_start: bool) -> None:
        with self._lock:
            try:
                if stat is None:
                    raise ConfigError(f"serve.device_keys_file {self._file}: no such file; give a YAML or JSON file "
                                      "of device id: sha256 hex of its key")
                from_file = _read_keys(Path(self._file))
            except ConfigError as exc:
                if at_start:
                    raise
                if self._seen is not None:  # said once per change of the file, not once per request
                    log.error("%s; keeping the %d device keys read before", exc, len(self._keys))
                self._seen = None if stat is None else (stat.st_mtime_ns, stat.st_size)
                return
            both = sorted(set(from_file) & set(self._inline))
            try:
                _one_key_each({**from_file, **self._inline}, f"serve.device_keys_file {self._file} with "
                              "serve.device_keys")
                message = None
            except ConfigError as exc:
                message = str(exc)
            if both:
                message = (f"serve.device_keys_file {self._file} and serve.device_keys both name device(s) "
                           f"{', '.join(both)}: keep each device in one place")
            if message is not None:
                if at_start:
                    raise ConfigError(message)
                log.error("%s; keeping the %d device keys read before", message, len(self._keys))
            else:
                self._keys = {**from_file, **self._inline}
                log.info("device keys: %d from %s, %d from the config", len(from_file), self._file, len(self._inline))
            self._seen = (stat.st_mtime_ns, stat.st_size)


def _one_key_each(keys: dict[str, str], where: str) -> None:
    """Refuse one key shared by several devices: each could then send records as the others."""
    by_hash: dict[str, list[str]] = {}
    for device, digest in keys.items():
        by_hash.setdefault(digest, []).append(device)
    shared = [sorted(devices) for devices in by_hash.values() if len(devices) > 1]
    if shared:
        raise ConfigError(f"{where}: devices {', '.join(shared[0])} have the same key; give each device its own")


def _read_keys(path: Path) -> dict[str, str]:
    """A file of device id -> sha256 hex of its key, validated (ConfigError naming the file and the entry)."""
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"serve.device_keys_file {path}: cannot read it ({' '.join(str(exc).split())})") from None
    try:
        return _KEYS.validate_python(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "(top level)"
        raise ConfigError(f"serve.device_keys_file {path}: {where}: {first['msg']}; each entry is device-id: "
                          "<sha256 hex of its key> (never the key itself)") from None


def include(app: FastAPI, config: SignpostConfig) -> None:
    """Add the ingest route to ``app`` with ``config``'s device keys (a bad keys file fails here, at start-up)."""
    app.state.device_keys = DeviceKeys(config.serve)
    app.state.device_dropped = {}  # device id -> the dropped count its latest batch reported
    app.include_router(router)


def _body_schema() -> dict[str, Any]:
    """``IngestBatch``'s JSON schema with the record's inlined, for the OpenAPI docs (the route reads the body
    itself, within its limits, so FastAPI does not document it)."""
    schema = IngestBatch.model_json_schema()
    schema["properties"]["records"]["items"] = schema.pop("$defs")["PredictionRecord"]
    return schema


router = APIRouter()


@router.post(ROUTE, response_model=IngestResponse, tags=["fleet"],
             responses={**ERROR_RESPONSES, 403: {"model": ErrorResponse}},
             openapi_extra={"requestBody": {"required": True,
                                            "content": {"application/json": {"schema": _body_schema()}}}})
async def ingest(request: Request, state: State) -> JSONResponse:
    """Store a device's batch of prediction records (see the module doc): ``{"stored": n}``, or
    ``{"stored": 0, "duplicate": true}`` for a batch id this device has sent before."""
    # Refusals are answered here rather than by the app's ApiError handler, which counts errors on /v1/predict*
    # routes toward the monitor's error rate: a device's refused batch is no failed prediction.
    try:
        return await _ingest(request, state)
    except ApiError as exc:
        return JSONResponse(error_body(exc.code, exc.message), status_code=exc.status, headers=exc.headers)


async def _ingest(request: Request, state: State) -> JSONResponse:
    cfg = state.config.serve
    keys: DeviceKeys = request.app.state.device_keys
    if not keys.enabled():
        raise ApiError(403, "ingest_disabled", "no device may ship records here: give each device a key and set "
                       "serve.device_keys (or serve.device_keys_file) to device id: sha256 hex of its key")
    key = _sent_key(request)
    device = None if key is None else keys.device_of(key)
    if device is None:  # before the body is read: an unknown client cannot make the server read megabytes
        raise ApiError(401, "unauthorized", "missing or unknown device key: send the device's key as X-API-Key or "
                       "Authorization: Bearer <key>", {"WWW-Authenticate": "Bearer"})
    if uploads.content_type(request) != "application/json":
        raise ApiError(415, "unsupported_media_type", "send the batch as application/json")
    batch = _parse(await _read_body(request, cfg), cfg.max_ingest_records)
    if batch.device_id != device:
        raise ApiError(403, "wrong_device", f"this key is device {device!r}'s; it cannot send records as "
                       f"{batch.device_id!r}")
    if state.log is None:
        raise ApiError(503, "not_ready", "the prediction log is not open yet; try again", {"Retry-After": "1"})
    counts: dict[str, int] = request.app.state.device_dropped
    if batch.dropped > counts.get(device, 0):  # the count only grows: said each time it does
        log.warning("device %s has dropped %d records past its local buffer bound (its server was away too long)",
                    device, batch.dropped)
    counts[device] = batch.dropped
    state.metrics.device_dropped.labels(device=device).set(batch.dropped)
    rows = [_row(record, batch.device_id, state.config.name) for record in batch.records]
    stored = await asyncio.to_thread(state.log.store_batch, batch.device_id, batch.batch_id, rows)
    if stored is None:
        log.info("device %s sent batch %s again: already stored", batch.device_id, batch.batch_id)
        return JSONResponse({"stored": 0, "duplicate": True})
    return JSONResponse({"stored": stored})


def _sent_key(request: Request) -> str | None:
    sent = request.headers.get("x-api-key")
    if sent is None:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        sent = token.strip() if scheme.lower() == "bearer" else None
    return sent or None


async def _read_body(request: Request, cfg: ServeConfig) -> bytes:
    try:
        return await uploads.read_body(request, cfg.max_ingest_bytes, timeout_s=cfg.body_timeout_s)
    except uploads.Refused as exc:
        if exc.status == 413:  # uploads names the image limit; this route has its own
            raise ApiError(413, "payload_too_large", f"the body is over the limit of {cfg.max_ingest_bytes:,} bytes "
                           "(serve.max_ingest_bytes): send fewer records per batch") from None
        raise ApiError(exc.status, exc.code, exc.message, exc.headers) from None


def _parse(body: bytes, max_records: int) -> IngestBatch:
    """The batch, validated: 413 over ``max_records`` records (counted before any record is checked), 400 naming
    the record and the field that is wrong."""
    try:
        payload = json.loads(body)
    except ValueError as exc:  # also UnicodeDecodeError
        raise ApiError(400, "invalid_json", f"the body is not JSON ({exc}): send an IngestBatch object") from None
    if not isinstance(payload, dict):
        raise ApiError(400, "invalid_batch", "the body must be a JSON object: {device_id, batch_id, records}")
    records = payload.get("records")
    if isinstance(records, list) and len(records) > max_records:
        raise ApiError(413, "too_many_records", f"{len(records):,} records in one batch; the limit is "
                       f"{max_records:,} (serve.max_ingest_records): send smaller batches")
    try:
        return IngestBatch.model_validate(payload)
    except ValidationError as exc:
        first = exc.errors()[0]
        raise ApiError(400, "invalid_record" if first["loc"][:1] == ("records",) else "invalid_batch",
                       f"{_where(first['loc'])}: {first['msg']}"
                       + (f" ({exc.error_count() - 1} more problems)" if exc.error_count() > 1 else "")) from None


def _where(loc: tuple[Any, ...]) -> str:
    """('records', 3, 'confidence') -> records[3].confidence."""
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else f".{part}" if text else str(part)
    return text or "the body"


def _row(record: PredictionRecord, device_id: str, experiment: str) -> dict[str, Any]:
    """A record as a row of the prediction log, naming its device and this server's experiment."""
    row = record.model_dump()
    row["top_k"] = json.dumps(row["top_k"])  # as the server's own rows keep it: JSON [[class_id, probability], ...]
    return row | {"device_id": device_id, "experiment": experiment}
