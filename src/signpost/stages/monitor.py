"""monitor: fold a window of the prediction log, have it judged against the reference, write the result, alert.

Reads the newest ``monitor.window`` predictions of this experiment (or those since a time) a chunk at a time,
folding each chunk into running histograms, counts and a bounded uniform sample, so a million rows take bounded
memory. A log shared by several experiments' servers is fine: each record names the experiment (the server's config
name) and the model's lineage, the monitor reads only its config's records, and it reports how many of the others
(and of an older log's, which name none) it skipped.

The window is compared with (the checks and the verdict are ``signpost.monitoring.verdict``):

- the training images as the server sees uploads: a sample of the training source files decoded whole with the
  server's code (the validation split's ROI crops when the files are gone), for the class mix and image statistics;
- the evaluation's confidence histogram and top-1;
- with the model at hand (``served_model_dir`` finds the one the log names), its own class mix, confidences and
  output summaries on those images; with two models in the window (a canary, a reload) only the main model's
  records are compared on output summaries, as these differ from model to model;
- the labelled feedback (``signpost feedback add``) the model was not trained on (prepare folds feedback into later
  data versions), scored with the model;
- the failed prediction requests the server logs beside the predictions.

With ``by_device`` (``signpost monitor --by device``), each device's records of the window are also judged alone
(drift, confidence, latency), beside the fleet's: the devices ship their records to the server's ingest route, and
the log names the device of each (the server's own records are the device "", reported as ``(server)``).

It writes ``result.json`` (from the typed ``signpost.monitoring.result``), a drift chart and ``report.html``
(``signpost.report.monitor_html``) under ``monitor/<name>-<time>/``, sends alerts for incidents that started or
cleared (``signpost.monitoring.alerts``), and says whether retraining is needed (the CLI exits 5 then).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from signpost.artifacts import ArtifactError, is_complete, verify_artifact
from signpost.config import MonitorConfig, SignpostConfig
from signpost.contracts import read_evaluation
from signpost.data.cache import SOURCES, load_split, read_sources
from signpost.data.stats import STAT_NAMES
from signpost.monitoring.alerts import AlertManager
from signpost.monitoring.drift import histogram
from signpost.monitoring.feedback import feedback_batches, load_batch
from signpost.monitoring.result import SERVER, AlertSent, Canary, Devices, MonitorReport, Quality, Skipped
from signpost.monitoring.verdict import (
    EMBEDDINGS,
    INPUTS,
    LATENCY_EDGES,
    ModelWindow,
    Reference,
    Window,
    compare_models,
    device_stats,
    evaluate_window,
    feedback_quality,
    incidents,
)
from signpost.report.monitor_html import drift_chart, monitor_html
from signpost.serve import predlog
from signpost.serve.model import Outputs, ServedModel

log = logging.getLogger(__name__)

STAGE = "monitor"
COLUMNS = ["ts", "class_id", "confidence", "latency_ms", *INPUTS, *EMBEDDINGS]
SAMPLE = 5000  # values per feature kept for KS / Wasserstein (a uniform sample of the window)
REFERENCE_FILES = 2000  # training source files measured for the input reference
_BATCH = 256  # images per forward pass over reference and feedback images
CONFIDENCE_BINS = 10  # equal-width bins of top-1 confidence, unless the evaluation's calibration has others


@dataclass
class MonitorResult:
    """One monitor run: its folder and what it found, typed."""

    path: Path
    report: MonitorReport

    @property
    def result(self) -> dict[str, Any]:
        """The content of ``result.json``."""
        return self.report.to_dict()

    @property
    def retrain(self) -> bool:
        return self.report.retrain


def monitor(
    config: SignpostConfig,
    *,
    data_dir: Path,
    log_url: str | None = None,
    last: int | None = None,
    since: float | None = None,
    evaluation_dir: Path | None = None,
    model_dir: Path | None = None,
    alerts: bool = True,
    by_device: bool = False,
) -> MonitorResult:
    """Check the prediction log's window against the reference (and each device's records of it, with
    ``by_device``); see the module doc."""
    cfg = config.monitor
    url = log_url or config.serve.prediction_log or predlog.default_url(config.workdir)
    # Loaded once (hash-checked, warmed up): it describes the reference and scores the feedback.
    model = None if model_dir is None else _load_model(model_dir)
    reference = load_reference(Path(data_dir), evaluation_dir, model, cache_dir=config.workdir / STAGE)
    last = None if since is not None else (last or cfg.window)
    # The log may be shared with other experiments' servers: only this experiment's records are read, and the
    # window's ``last`` counts only them.
    experiment = config.name
    window = _read(url, last=last, since=since, reference=reference, experiment=experiment)
    versions = predlog.model_versions(url, last=last, since=since, experiment=experiment)
    if len(versions) > 1 and EMBEDDINGS[0] in reference.edges:
        own = _read(url, last=last, since=since, reference=reference, model_version=max(versions, key=versions.get),
                    experiment=experiment)
        for name in EMBEDDINGS:
            window.hist[name], window.sample[name] = own.hist[name], own.sample[name]
    report = evaluate_window(window, reference, cfg)
    trained = _trained_feedback(config.workdir, model)
    report.quality = quality(feedback_batches(config.workdir, config.name), model, reference, cfg, trained)
    if report.quality.dropped:
        report.verdict.retrain = True
        report.verdict.reasons = [*report.verdict.reasons, "accuracy drop on feedback"]
    report.models = _compare_models(url, versions, last=last, since=since, reference=reference, cfg=cfg,
                                    experiment=experiment)
    if by_device:
        report.devices = _by_device(url, report, last=last, since=since, reference=reference, cfg=cfg,
                                    experiment=experiment)
    report.log = predlog.redact(url)
    report.experiment = Skipped(**skipped_records(url, experiment, last=last, since=since))
    if report.experiment.skipped_total:
        log.warning("%s", report.experiment.note)
    report.reference = reference.name
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%d-%H%M%S-%f")[:-3]  # ms: two runs, two folders
    path = config.workdir / STAGE / f"{config.name}-{stamp}"
    path.mkdir(parents=True, exist_ok=True)
    if window.rows:
        drift_chart(window, reference, report, path / "drift.png")
    if alerts:
        manager = AlertManager(cfg.alerts, config.workdir / STAGE / "alerts.json", cfg.cooldown_minutes * 60)
        sent = manager.update(incidents(report), source=f"signpost monitor ({config.name}, {stamp})")
        report.alerts = [AlertSent(**record) for record in sent]
    (path / "result.json").write_text(json.dumps(report.to_dict(), indent=1, default=float) + "\n", encoding="utf-8")
    (path / "report.html").write_text(monitor_html(report, config.name), encoding="utf-8")
    return MonitorResult(path, report)


def load_reference(data_dir: Path, evaluation_dir: Path | None, model: ServedModel | None,
                   cache_dir: Path | None = None) -> Reference:
    """What "normal" looks like: the training images as the server sees them and, with a model, what the model
    says about them (its predicted class mix, confidences and output summaries); without a model, the training
    label mix and the evaluation's confidence histogram.

    The server measures whole uploaded images, while the prepared splits are crops around each sign's ROI, so the
    reference images are made the server's way: a sample of the training source files, decoded whole with the
    server's code (cached per data version in ``cache_dir``). When the source files are gone, the validation
    split stands in, and the reference's name says so.
    """
    manifest = verify_artifact(data_dir, ["val.safetensors"])
    dataset = manifest["dataset"]
    counts = dataset.get("class_histogram", {})
    class_counts = np.add(counts.get("train", 0), counts.get("val", 0)).astype(np.float64)
    values, images, name = _served_view(data_dir, manifest, cache_dir)
    if values is None:
        val = load_split(data_dir / "val.safetensors")
        name = f"{data_dir.name} (validation split: ROI crops, not whole images)"
        values = {n: val.stats[:, j].numpy().astype(np.float64) for j, n in enumerate(STAT_NAMES)}
        values["width"] = val.sizes[:, 0].numpy().astype(np.float64)
        values["height"] = val.sizes[:, 1].numpy().astype(np.float64)
        images = np.ascontiguousarray(val.images.numpy().transpose(0, 2, 3, 1))
        if class_counts.ndim == 0:
            class_counts = np.bincount(val.labels.numpy(), minlength=int(dataset["num_classes"])).astype(float)
    confidence = top1 = None
    if evaluation_dir is not None:
        report = read_evaluation(evaluation_dir, verify=False)  # validated; not hash-checked, as before
        confidence = np.array([b["count"] for b in report.calibration.bins], dtype=np.float64)
        top1 = float(report.metrics["top1"])
    if model is not None:
        outputs = _model_outputs(model, images)
        values.update({n: outputs.embeddings[:, j].astype(np.float64) for j, n in enumerate(EMBEDDINGS)})
        class_counts = np.bincount(outputs.top_ids[:, 0], minlength=len(class_counts)).astype(np.float64)
        confidence = np.histogram(outputs.top_probs[:, 0], bins=CONFIDENCE_BINS, range=(0.0, 1.0))[0].astype(float)
        name += f"; predictions of {model.version}"
    edges = {n: np.histogram_bin_edges(v, bins=20) for n, v in values.items()}
    return Reference(name, class_counts, edges, values, confidence, top1)


def _served_view(data_dir: Path, manifest: dict[str, Any], cache_dir: Path | None, max_files: int = REFERENCE_FILES
                 ) -> tuple[dict[str, np.ndarray] | None, np.ndarray | None, str]:
    """Statistics and pixels of up to ``max_files`` training source files decoded whole, as the server decodes."""
    from signpost.data.images import decode_image, frame_pixels, full_scale_side, open_header
    from signpost.data.stats import image_stats

    name = f"{data_dir.name} (training images, whole, as served)"
    cached = None if cache_dir is None else Path(cache_dir) / f"reference-{manifest['key'][:16]}.npz"
    if cached is not None and cached.is_file():
        with np.load(cached) as stored:
            if {"images", *STAT_NAMES, "width", "height"} <= set(stored.files):  # else: an older layout, remade
                values = {n: stored[n] for n in stored.files if n != "images"}
                return values, stored["images"], name
    root = Path(manifest.get("inputs", {}).get("root", ""))
    if not root.is_dir() or not (data_dir / SOURCES).is_file():
        return None, None, ""
    train = [row["path"] for row in read_sources(data_dir) if row["origin"] == "train"]
    picked = [train[i] for i in np.random.default_rng(0).permutation(len(train))[:max_files]]
    size = int(manifest["dataset"]["image_size"])
    decoded, sizes = [], []
    for rel in picked:
        try:
            # The server's decode of an upload (serve/uploads.py): the header checked and a large JPEG set to decode
            # at reduced scale, then decoded upright and resized whole; sizes are the image's as sent, upright.
            frame = decode_image(open_header((root / rel).read_bytes(), min_side=full_scale_side(size)))
        except (OSError, ValueError):
            continue
        decoded.append(frame_pixels(frame, size))
        sizes.append(frame.size)
    if len(decoded) < 50:
        return None, None, ""
    images = np.stack(decoded)
    stats = image_stats(images.transpose(0, 3, 1, 2))
    values = {n: stats[:, j].astype(np.float64) for j, n in enumerate(STAT_NAMES)}
    values["width"] = np.array([w for w, _ in sizes], dtype=np.float64)
    values["height"] = np.array([h for _, h in sizes], dtype=np.float64)
    if cached is not None:
        cached.parent.mkdir(parents=True, exist_ok=True)
        np.savez(cached, images=images, **values)
    return values, images, name


def served_model_dir(config: SignpostConfig, url: str, *, last: int | None = None,
                     since: float | None = None) -> Path | None:
    """The artifact of the model that made most of the window's predictions of this experiment (a registry version
    is downloaded to ``workdir/registry/``), or None when it has none or the model cannot be found."""
    versions = predlog.model_versions(url, last=last, since=since, experiment=config.name)
    if not versions:
        return None
    version = max(versions, key=versions.get)
    name, _, number = version.rpartition("/")
    if name == config.tracking.registered_model and number.isdigit() and config.tracking.backend != "none":
        from signpost.registry import Registry, RegistryError

        try:
            return Registry(config.tracking, config.workdir).download(None, version=number)
        except (RegistryError, ArtifactError) as exc:
            log.warning("the log's model %s cannot be fetched from the registry: %s", version, exc)
            return None
    for stage in ("train", "optimize", "registry"):
        if is_complete(folder := config.workdir / stage / version):
            return folder
    log.warning("the log's model %s is not under %s: no embedding reference", version, config.workdir)
    return None


def _load_model(model_dir: Path) -> ServedModel:
    from signpost.serve.model import load, resolve

    return load(resolve(model_dir, SignpostConfig()), threads=None, max_batch=_BATCH)


def _model_outputs(model: ServedModel, images: np.ndarray) -> Outputs:
    """The served model's outputs on uint8 images [N, S, S, 3], the way the server computes them, in batches."""
    parts = [model.forward(images[i : i + _BATCH], top_k=1) for i in range(0, len(images), _BATCH)]
    return Outputs(*(np.concatenate([getattr(p, f) for p in parts]) for f in
                     ("top_ids", "top_probs", "entropy", "embeddings")))


def _read(url: str, *, last: int | None, since: float | None, reference: Reference,
          model_version: str | None = None, experiment: str | None = None, device_id: str | None = None) -> Window:
    """Fold the window (one model's records of it, with ``model_version``; one experiment's, with ``experiment``;
    one device's, with ``device_id``) into counts, histograms and a uniform sample (bottom-k of random keys), chunk
    by chunk."""
    rng = np.random.default_rng(0)
    features = [name for name in (*INPUTS, *EMBEDDINGS) if name in reference.edges]
    index = {name: COLUMNS.index(name) for name in COLUMNS}
    classes = np.zeros(len(reference.class_counts), dtype=np.float64)
    bins = CONFIDENCE_BINS if reference.confidence is None else len(reference.confidence)
    confidence = np.zeros(bins)
    latency = np.zeros(len(LATENCY_EDGES) - 1)
    hist = {name: np.zeros(len(reference.edges[name]) - 1) for name in features}
    sample_keys = np.empty(0)
    sample = np.empty((0, len(features)))
    rows, confidence_sum = 0, 0.0
    first_ts, last_ts = np.inf, -np.inf
    for chunk in predlog.read_window(url, COLUMNS, last=last, since=since, model_version=model_version,
                                     experiment=experiment, device_id=device_id):
        rows += len(chunk)
        first_ts = min(first_ts, float(chunk[:, index["ts"]].min()))
        last_ts = max(last_ts, float(chunk[:, index["ts"]].max()))
        ids = chunk[:, index["class_id"]].astype(np.int64)
        classes += np.bincount(np.clip(ids, 0, len(classes) - 1), minlength=len(classes))[: len(classes)]
        conf = chunk[:, index["confidence"]]
        confidence_sum += float(conf.sum())
        confidence += np.histogram(conf, bins=bins, range=(0.0, 1.0))[0]
        latency += histogram(chunk[:, index["latency_ms"]], LATENCY_EDGES)
        columns = chunk[:, [index[name] for name in features]]
        for j, name in enumerate(features):
            hist[name] += histogram(columns[:, j], reference.edges[name])
        keys = np.concatenate([sample_keys, rng.random(len(chunk))])
        pool = np.concatenate([sample, columns])
        keep = np.argpartition(keys, SAMPLE)[:SAMPLE] if len(keys) > SAMPLE else np.arange(len(keys))
        sample_keys, sample = keys[keep], pool[keep]
    # The failed requests the server logs are its own: a device's window has none of them.
    own = device_id in (None, predlog.SERVER_DEVICE)
    errors = predlog.error_count(url, first_ts, last_ts, experiment=experiment) if rows and own else 0
    return Window(rows, errors, classes, confidence, mean_confidence=confidence_sum / rows if rows else None,
                  latency=latency, hist=hist, sample={name: sample[:, j] for j, name in enumerate(features)},
                  features=features)


def quality(batches: list[Path], model: ServedModel | None, reference: Reference,
            cfg: MonitorConfig, trained: frozenset[str] = frozenset()) -> Quality:
    """Live accuracy of the model on the labelled feedback, overall and per class, against the evaluation's;
    images whose sha256 is in ``trained`` (the model learnt them) are left out."""
    if not batches:
        return Quality(note="no labelled feedback (signpost feedback add)")
    if model is None:
        return Quality(note="no model given to score the feedback with")
    from signpost.data.images import open_image, preprocess

    size = model.card.image_size
    every = [item for batch in batches for item in load_batch(batch)]
    items = [item for item in every if hashlib.sha256(item[0]).hexdigest() not in trained]
    if not items:
        return Quality(note=f"the model was trained on all {len(every)} feedback images: none left to score it on")
    images = np.stack([preprocess(open_image(data), size) for data, _ in items])
    labels = np.array([label for _, label in items])
    predicted = _model_outputs(model, images).top_ids[:, 0]
    return feedback_quality(labels, predicted, batches=[b.name for b in batches], trained_on=len(every) - len(items),
                            baseline=reference.top1, cfg=cfg)


def _compare_models(url: str, counts: dict[str, int], *, last: int | None, since: float | None,
                    reference: Reference, cfg: MonitorConfig, experiment: str | None = None) -> Canary | None:
    """Each model version's records of the window, folded and compared (``monitoring.verdict.compare_models``).
    ``counts``: records per version in the window (``predlog.model_versions``), of ``experiment`` when given (as
    ``counts`` should be). None when it holds one version."""
    if len(counts) < 2:
        return None
    windows = {}
    n_classes = len(reference.class_counts)
    for version in counts:
        classes, latency, confidence, n = np.zeros(n_classes), np.zeros(len(LATENCY_EDGES) - 1), 0.0, 0
        for chunk in predlog.read_window(url, ["class_id", "confidence", "latency_ms"], last=last, since=since,
                                         model_version=version, experiment=experiment):
            ids = np.clip(chunk[:, 0].astype(np.int64), 0, n_classes - 1)
            classes += np.bincount(ids, minlength=n_classes)
            confidence += float(chunk[:, 1].sum())
            latency += histogram(chunk[:, 2], LATENCY_EDGES)
            n += len(chunk)
        windows[version] = ModelWindow(n, classes, confidence, latency)
    return compare_models(windows, sum(counts.values()), cfg)


def _by_device(url: str, report: MonitorReport, *, last: int | None, since: float | None, reference: Reference,
               cfg: MonitorConfig, experiment: str) -> Devices:
    """The fleet's window (``report``) and each device's records of it, judged alone the same way."""
    counts = predlog.devices(url, last=last, since=since, experiment=experiment)
    devices = {}
    for device in sorted(counts):
        window = _read(url, last=last, since=since, reference=reference, experiment=experiment, device_id=device)
        devices[device or SERVER] = device_stats(evaluate_window(window, reference, cfg))
    return Devices(device_stats(report), devices)


def skipped_records(url: str, experiment: str, *, last: int | None, since: float | None) -> dict[str, Any]:
    """The records the monitor of ``experiment`` passed over: those of the log's newest ``last`` (or those since
    ``since``) that other experiments' servers wrote, or that an older Signpost wrote without naming one."""
    others = {name: n for name, n in sorted(predlog.experiments(url, last=last, since=since).items())
              if name != experiment}
    total = sum(others.values())
    parts = []
    named = {name: n for name, n in others.items() if name != predlog.UNKNOWN_EXPERIMENT}
    if named:
        parts.append(f"{sum(named.values()):,} of other experiments ("
                     + ", ".join(f"{name}: {n:,}" for name, n in named.items()) + ")")
    if predlog.UNKNOWN_EXPERIMENT in others:
        parts.append(f"{others[predlog.UNKNOWN_EXPERIMENT]:,} of an unknown experiment (logged before records "
                     "named theirs)")
    if since is not None:
        scope = f"since {dt.datetime.fromtimestamp(since, dt.timezone.utc):%Y-%m-%d %H:%M:%S} UTC"
    else:
        scope = "in the log" if last is None else f"among the log's newest {last:,}"
    note = (f"skipped {total:,} records {scope} not of experiment {experiment!r}: {'; '.join(parts)}" if total
            else f"every record {scope} is of experiment {experiment!r}")
    return {"name": experiment, "skipped": others, "skipped_total": total, "note": note}


def _trained_feedback(workdir: Path, model: ServedModel | None) -> frozenset[str]:
    """sha256 of the feedback images in the model's training split (``sources.tsv`` of the data it was trained on)."""
    if model is None or not model.card.data_artifact:
        return frozenset()
    data_dir = Path(workdir) / "data" / model.card.data_artifact
    if not (data_dir / SOURCES).is_file():
        return frozenset()
    return frozenset(row["sha256"] for row in read_sources(data_dir) if row["origin"] == "feedback")


def since_seconds(text: str) -> float:
    """``30m``, ``2h``, ``1d`` or seconds -> a Unix time that far in the past."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    value, unit = (text[:-1], text[-1]) if text and text[-1] in units else (text, "s")
    try:
        return time.time() - float(value) * units[unit]
    except ValueError:
        raise ValueError(f"--since {text!r}: expected a duration such as 30m, 2h or 1d") from None
