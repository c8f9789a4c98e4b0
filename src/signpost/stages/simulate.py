"""simulate: drive a running service with windows of traffic, clean then drifted, and monitor each window.

The images are the prepared data's training source files, whole, as a client would send them: traffic "like the
training data" (the monitor's reference is a sample of the same files; the synthetic test set's image sizes and
lighting differ slightly from its training set's, a real difference the monitor duly reports). After
``clean_windows`` such windows come one window of each drift: ``dark`` (brightness × 0.45), ``blur`` (Gaussian,
radius 2 px) and ``mix`` (three classes only), then one more clean window. After each window the monitor checks
exactly that window of the service's prediction log, with its alerts, so the run shows the alert firing when drift
starts and resolving when it stops. The table says, per window, what was injected and what the monitor saw; the
false-alarm rate is the share of clean windows it flagged.

With ``feedback`` > 0, that many images of each drifted window are stored with their true labels as one labelled
feedback batch, as a reviewer would label a sample of production traffic: the next ``signpost run`` folds them into
a new data version, retrains, and promotes the new model if it beats the champion on the held-out part of them.
"""

from __future__ import annotations

import concurrent.futures
import io
import logging
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter

from signpost.artifacts import read_manifest
from signpost.config import SignpostConfig
from signpost.data.cache import read_sources
from signpost.serve import predlog
from signpost.stages.monitor import monitor, served_model_dir

log = logging.getLogger(__name__)

DRIFTS = ("dark", "blur", "mix")


@dataclass
class Window:
    kind: str  # clean | dark | blur | mix
    sent: int
    failed: int
    retrain: bool
    reasons: list[str]
    alerts: list[str]
    result_dir: Path


def simulate(
    config: SignpostConfig,
    *,
    url: str,
    data_dir: Path,
    per_window: int = 500,
    clean_windows: int = 4,
    drifts: tuple[str, ...] = DRIFTS,
    concurrency: int = 8,
    api_key: str | None = None,
    log_url: str | None = None,
    evaluation_dir: Path | None = None,
    model_dir: Path | None = None,
    feedback: int = 0,
    seed: int = 0,
) -> list[Window]:
    """Send the windows to ``url`` and monitor each; returns what happened in each window.

    ``feedback``: images per drifted window to store, labelled, as a feedback batch (0: none).
    """
    if feedback < 0:
        raise ValueError(f"--feedback {feedback}: the images to store per drifted window cannot be negative")
    unknown = sorted(set(drifts) - set(DRIFTS))
    if unknown:
        raise ValueError(f"unknown drift {unknown}; choose from {', '.join(DRIFTS)}")
    files, labels, weights = _source_files(data_dir)
    log_url = log_url or config.serve.prediction_log or predlog.default_url(config.workdir)
    _wait_ready(url)
    rng = np.random.default_rng(seed)
    windows = []
    reviewed: list[tuple[str, bytes, str]] = []
    # Clean windows, the drifts, then one clean window more: the alerts that fired are resolved.
    for kind in ["clean"] * clean_windows + list(drifts) + ["clean"]:
        bodies, truth = _window(kind, files, labels, weights, per_window, rng)
        if kind != "clean":
            reviewed += [(f"{kind}-{i}{_suffix(bodies[i])}", bodies[i], str(truth[i]))
                         for i in range(min(feedback, len(bodies)))]
        # Counted by experiment: other experiments' servers may write to the same log meanwhile.
        before = predlog.count(log_url, experiment=config.name)
        sent, failed = _send(url, bodies, concurrency, api_key)
        _wait_for_log(log_url, before + sent - failed, config.name)
        if model_dir is None:  # the model the service logs its predictions under
            model_dir = served_model_dir(config, log_url, last=sent - failed)
        checked = monitor(config, data_dir=data_dir, log_url=log_url, last=sent - failed,
                          evaluation_dir=evaluation_dir, model_dir=model_dir)
        verdict = checked.report.verdict
        alerts = [f"{a.incident} {a.status} -> {a.sink}" for a in checked.report.alerts or []]
        windows.append(Window(kind, sent, failed, verdict.retrain, verdict.reasons, alerts, checked.path))
        log.info("window %d (%s): %d sent, %d failed; %s", len(windows), kind, sent, failed,
                 f"drift: {', '.join(verdict.reasons)}" if verdict.retrain else "no drift")
    if reviewed:
        from signpost.stages.feedback import store_feedback

        stored = store_feedback(config, data_dir=data_dir, images=reviewed)
        log.info("stored %d labelled drifted images as feedback in %s", len(reviewed), stored.path)
    return windows


def _wait_ready(url: str, timeout_s: float = 180.0) -> None:
    """Wait for the service's /readyz: traffic sent while it loads its model would only be refused."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(url.rstrip("/") + "/readyz", timeout=5) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        if time.monotonic() > deadline:
            raise ConnectionError(f"{url} is not ready after {timeout_s:.0f} s: is `signpost serve` running there?")
        time.sleep(0.2)


def _wait_for_log(url: str, expected: int, experiment: str, timeout_s: float = 60.0) -> None:
    """The server writes its log in batches, off the request path: wait until this window's records are in."""
    deadline = time.monotonic() + timeout_s
    while (have := predlog.count(url, experiment=experiment)) < expected:
        if time.monotonic() > deadline:
            raise TimeoutError(f"the prediction log at {predlog.redact(url)} holds {have} records of experiment "
                               f"{experiment!r} after {timeout_s:.0f} s, {expected} expected: is the server writing "
                               "to this log, and was it started with this config (its name is the experiment)?")
        time.sleep(0.2)


def _source_files(data_dir: Path) -> tuple[list[Path], np.ndarray, np.ndarray]:
    """The training source files, their labels, and uniform sampling weights (the training class mix)."""
    manifest = read_manifest(data_dir)
    root = Path(manifest.get("inputs", {}).get("root", ""))
    train = [(root / row["path"], int(row["label"])) for row in read_sources(data_dir) if row["origin"] == "train"]
    if not train or not train[0][0].is_file():
        raise FileNotFoundError(f"the source files of {data_dir.name} are not under {root}: simulate sends the "
                                "original files, so it needs the raw dataset that prepare read")
    labels = np.array([label for _, label in train])
    return [path for path, _ in train], labels, np.full(len(labels), 1 / len(labels))


def _window(kind: str, files: list[Path], labels: np.ndarray, weights: np.ndarray, n: int,
            rng: np.random.Generator) -> tuple[list[bytes], list[int]]:
    """``n`` request bodies of one window and the true class of each."""
    if kind == "mix":
        common = np.argsort(-np.bincount(labels))[:3]
        weights = np.where(np.isin(labels, common), 1.0, 0.0)
        weights /= weights.sum()
    picks = rng.choice(len(files), size=n, p=weights)
    bodies = []
    for i in picks:
        data = files[i].read_bytes()
        if kind in ("dark", "blur"):
            image = Image.open(io.BytesIO(data)).convert("RGB")
            image = (ImageEnhance.Brightness(image).enhance(0.45) if kind == "dark"
                     else image.filter(ImageFilter.GaussianBlur(2)))
            buffer = io.BytesIO()
            image.save(buffer, "PNG")
            data = buffer.getvalue()
        bodies.append(data)
    return bodies, [int(labels[i]) for i in picks]


def _suffix(body: bytes) -> str:
    """A file suffix for an image body, by its signature (PNG for drifted images, else the source's format)."""
    signatures = {b"\x89PNG": ".png", b"\xff\xd8": ".jpg", b"P6": ".ppm", b"P3": ".ppm", b"BM": ".bmp"}
    return next((suffix for head, suffix in signatures.items() if body.startswith(head)), ".img")


def _send(url: str, bodies: list[bytes], concurrency: int, api_key: str | None) -> tuple[int, int]:
    endpoint = url.rstrip("/") + "/v1/predict"
    headers = {"Content-Type": "application/octet-stream"} | ({"X-API-Key": api_key} if api_key else {})

    def post(body: bytes) -> bool:
        request = urllib.request.Request(endpoint, data=body, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return response.status == 200
        except (urllib.error.URLError, OSError) as exc:
            log.debug("request failed: %s", exc)
            return False

    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        ok = list(pool.map(post, bodies))
    if not any(ok):
        raise ConnectionError(f"no request to {endpoint} succeeded: is `signpost serve` running there?")
    return len(bodies), ok.count(False)


def summary(windows: list[Window]) -> dict[str, Any]:
    """Detection per injected drift and the false-alarm rate over the clean windows."""
    clean = [w for w in windows if w.kind == "clean"]
    drifted = [w for w in windows if w.kind != "clean"]
    return {
        "false_alarms": sum(w.retrain for w in clean), "clean_windows": len(clean),
        "false_alarm_rate": sum(w.retrain for w in clean) / len(clean) if clean else 0.0,
        "detected": {w.kind: w.retrain for w in drifted},
        "all_detected": all(w.retrain for w in drifted),
    }
