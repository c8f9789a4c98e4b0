"""monitor: compare a window of the prediction log with the reference saved at prepare and evaluate time.

Reads the newest ``monitor.window`` predictions of this experiment (or those since a time) a chunk at a time,
folding each chunk into running histograms, counts and a bounded uniform sample, so a million rows take bounded
memory. A log shared by several experiments' servers is fine: each record names the experiment (the server's config
name) and the model's lineage, the monitor reads only its config's records, and it reports how many of the others
(and of an older log's, which name none) it skipped. Then:

- prediction drift: the predicted class distribution against the training data's (PSI or Jensen-Shannon over
  the threshold, and a chi-square test saying it is not a small window's noise), and the mean confidence against
  the evaluation's;
- input drift: every image statistic (brightness, contrast, sharpness, colour, size) against the training images
  measured as the server measures uploads: KS for small windows, normed Wasserstein for large ones, and PSI; the
  inputs drift when ``drift_share`` of them do, or one of them shifts by a PSI of ``psi_major`` or more;
- embedding drift: the logged output summaries against the model's own summaries of the reference images, when
  the model is at hand (``served_model_dir`` finds the one the log names); with two models in the window (a canary,
  a reload) only the main model's records are compared, as output summaries differ from model to model;
- quality: with labelled feedback (``signpost feedback add``), the model's live accuracy overall and per class
  against the evaluation's, on the feedback images the model was not trained on (prepare folds feedback into
  later data versions); a drop beyond ``monitor.accuracy_drop`` also calls for retraining;
- service health: latency p99 against ``monitor.latency_p99_ms``, and the share of prediction requests answered
  with an error (the server logs those too) against ``monitor.max_error_rate``;
- canary: when the window holds predictions of more than one model version (``signpost serve --canary``), each
  model's share, class mix, confidence and latency, and whether the canary looks no worse than the main model.

It writes ``result.json``, a drift chart and ``report.html`` under ``monitor/<name>-<time>/``, sends alerts for
incidents that started or cleared (``signpost.monitoring.alerts``), and says whether retraining is needed (the CLI
exits 5 then).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import html
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from signpost.artifacts import ArtifactError, is_complete, verify_artifact
from signpost.config import MonitorConfig, SignpostConfig, config_to_dict
from signpost.data.cache import SOURCES, load_split, read_sources
from signpost.data.stats import STAT_NAMES
from signpost.monitoring.alerts import AlertManager, Incident
from signpost.monitoring.drift import chi_square_p, histogram, jensen_shannon, ks_test, psi, wasserstein_normed
from signpost.monitoring.feedback import feedback_batches, load_batch
from signpost.report.plots import drift_png
from signpost.serve import predlog
from signpost.serve.model import Outputs, ServedModel

log = logging.getLogger(__name__)

STAGE = "monitor"
INPUTS = (*STAT_NAMES, "width", "height")
EMBEDDINGS = predlog.EMBEDDING_COLUMNS
COLUMNS = ["ts", "class_id", "confidence", "latency_ms", *INPUTS, *EMBEDDINGS]
SAMPLE = 5000  # values per feature kept for KS / Wasserstein (a uniform sample of the window)
LATENCY_EDGES = np.logspace(-2, 5, 1401)  # 0.01 ms .. 100 s, 0.5 % wide bins: p99 to within 0.5 %
REFERENCE_FILES = 2000  # training source files measured for the input reference
_BATCH = 256  # images per forward pass over reference and feedback images
CONFIDENCE_BINS = 10  # equal-width bins of top-1 confidence, unless the evaluation's calibration has others


@dataclass
class MonitorResult:
    path: Path
    result: dict[str, Any]

    @property
    def retrain(self) -> bool:
        return bool(self.result["verdict"]["retrain"])


@dataclass
class Reference:
    """What the live window is compared with."""

    name: str
    class_counts: np.ndarray
    edges: dict[str, np.ndarray]  # per input feature and embedding dimension
    samples: dict[str, np.ndarray]
    confidence: np.ndarray | None  # counts over equal-width confidence bins, from the evaluation's calibration
    top1: float | None


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
) -> MonitorResult:
    """Check the prediction log's window against the reference; see the module doc."""
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
            window["hist"][name], window["sample"][name] = own["hist"][name], own["sample"][name]
    result = evaluate_window(window, reference, cfg)
    trained = _trained_feedback(config.workdir, model)
    result["quality"] = quality(feedback_batches(config.workdir, config.name), model, reference, cfg, trained)
    if result["quality"].get("dropped"):
        result["verdict"]["retrain"] = True
        result["verdict"]["reasons"] = [*result["verdict"].get("reasons", []), "accuracy drop on feedback"]
    result["models"] = compare_models(url, versions, last=last, since=since, reference=reference, cfg=cfg,
                                      experiment=experiment)
    result["log"] = predlog.redact(url)
    result["experiment"] = skipped_records(url, experiment, last=last, since=since)
    if result["experiment"]["skipped_total"]:
        log.warning("%s", result["experiment"]["note"])
    result["reference"] = reference.name
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%d-%H%M%S-%f")[:-3]  # ms: two runs, two folders
    path = config.workdir / STAGE / f"{config.name}-{stamp}"
    path.mkdir(parents=True, exist_ok=True)
    if window["rows"]:
        _chart(window, reference, result, path / "drift.png")
    if alerts:
        manager = AlertManager(cfg.alerts, config.workdir / STAGE / "alerts.json", cfg.cooldown_minutes * 60)
        result["alerts"] = manager.update(_incidents(result), source=f"signpost monitor ({config.name}, {stamp})")
    (path / "result.json").write_text(json.dumps(result, indent=1, default=float) + "\n", encoding="utf-8")
    (path / "report.html").write_text(_html(result, config), encoding="utf-8")
    return MonitorResult(path, result)


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
        report = json.loads((Path(evaluation_dir) / "report.json").read_text(encoding="utf-8"))
        confidence = np.array([b["count"] for b in report["calibration"]["bins"]], dtype=np.float64)
        top1 = float(report["metrics"]["top1"])
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
    from signpost.data.cache import open_image, preprocess
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
            image = open_image((root / rel).read_bytes())
        except (OSError, ValueError):
            continue
        decoded.append(preprocess(image, size))
        sizes.append(image.size)
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
        from signpost.tracking import Registry, RegistryError

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
          model_version: str | None = None, experiment: str | None = None) -> dict[str, Any]:
    """Fold the window (one model's records of it, with ``model_version``; one experiment's, with ``experiment``)
    into counts, histograms and a uniform sample (bottom-k of random keys), chunk by chunk."""
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
                                     experiment=experiment):
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
    errors = predlog.error_count(url, first_ts, last_ts, experiment=experiment) if rows else 0
    return {"rows": rows, "errors": errors, "span": (first_ts, last_ts) if rows else None,
            "classes": classes, "confidence": confidence,
            "mean_confidence": confidence_sum / rows if rows else None, "latency": latency, "hist": hist,
            "sample": {name: sample[:, j] for j, name in enumerate(features)}, "features": features}


def evaluate_window(window: dict[str, Any], reference: Reference, cfg: MonitorConfig) -> dict[str, Any]:
    """The drift, health and quality verdicts for a folded window."""
    rows = window["rows"]
    result: dict[str, Any] = {"window": {"rows": rows}, "settings": config_to_dict(cfg)}
    if rows < cfg.min_window:
        result["verdict"] = {"retrain": False, "reasons": [], "enough_data": False,
                             "note": f"{rows} predictions in the window; at least {cfg.min_window} are needed "
                                     "(monitor.min_window)"}
        return result
    class_psi = psi(reference.class_counts, window["classes"])
    class_js = jensen_shannon(reference.class_counts, window["classes"])
    class_p = chi_square_p(reference.class_counts, window["classes"])
    # Material (PSI or JS over the threshold) and significant (not the noise of a small window).
    prediction = {"class_psi": class_psi, "class_js": class_js, "class_p_value": class_p,
                  "drifted": (class_psi >= cfg.psi_threshold or class_js >= cfg.js_threshold)
                  and class_p < cfg.ks_p_value,
                  "mean_confidence": window["mean_confidence"]}
    if reference.confidence is not None:
        edges = np.linspace(0, 1, len(reference.confidence) + 1)
        ref_mean = float((reference.confidence * (edges[:-1] + edges[1:]) / 2).sum() / reference.confidence.sum())
        shift = window["mean_confidence"] - ref_mean
        prediction |= {"reference_confidence": ref_mean, "confidence_shift": shift,
                       "confidence_psi": psi(reference.confidence, window["confidence"])}
        prediction["drifted"] = prediction["drifted"] or abs(shift) >= cfg.confidence_shift
    result["prediction_drift"] = prediction

    def feature_drift(name: str) -> dict[str, Any]:
        current, ref = window["sample"][name], reference.samples[name]
        entry: dict[str, Any] = {"psi": psi(histogram(ref, reference.edges[name]), window["hist"][name])}
        if rows <= cfg.ks_max_window:
            statistic, p_value = ks_test(ref, current)
            entry |= {"method": "ks", "statistic": statistic, "p_value": p_value,
                      "drifted": p_value < cfg.ks_p_value}
        else:
            distance = wasserstein_normed(ref, current)
            entry |= {"method": "wasserstein", "statistic": distance,
                      "drifted": distance >= cfg.wasserstein_threshold}
        entry["reference_mean"] = float(ref.mean())
        entry["current_mean"] = float(current.mean())
        return entry

    inputs = {name: feature_drift(name) for name in INPUTS if name in window["features"]}
    share = sum(f["drifted"] for f in inputs.values()) / max(len(inputs), 1)
    # Many features moving a little, or one (blur: sharpness) moving a lot.
    major = [name for name, f in inputs.items() if f["drifted"] and f["psi"] >= cfg.psi_major]
    result["input_drift"] = {"features": inputs, "drifted_share": share, "major": major,
                             "drifted": share >= cfg.drift_share or bool(major)}
    embeddings = {name: feature_drift(name) for name in EMBEDDINGS if name in window["features"]}
    if embeddings:
        e_share = sum(f["drifted"] for f in embeddings.values()) / len(embeddings)
        result["embedding_drift"] = {"dimensions": embeddings, "drifted_share": e_share,
                                     "drifted": e_share >= cfg.drift_share}
    else:
        result["embedding_drift"] = {"drifted": False, "note": "not measured: no model given for the reference"}
    p99 = _quantile(window["latency"], 0.99)
    error_rate = window["errors"] / (window["errors"] + rows)
    result["health"] = {"latency_p99_ms": p99, "latency_p50_ms": _quantile(window["latency"], 0.5),
                        "slo_ms": cfg.latency_p99_ms, "latency_breached": p99 > cfg.latency_p99_ms,
                        "errors": window["errors"], "error_rate": error_rate, "max_error_rate": cfg.max_error_rate,
                        "errors_breached": error_rate > cfg.max_error_rate}
    result["health"]["breached"] = result["health"]["latency_breached"] or result["health"]["errors_breached"]
    reasons = [name for name, part in (("prediction drift", prediction), ("input drift", result["input_drift"]),
                                       ("embedding drift", result["embedding_drift"])) if part["drifted"]]
    result["verdict"] = {"retrain": bool(reasons), "reasons": reasons, "enough_data": True}
    return result


def quality(batches: list[Path], model: ServedModel | None, reference: Reference,
            cfg: MonitorConfig, trained: frozenset[str] = frozenset()) -> dict[str, Any]:
    """Live accuracy of the model on the labelled feedback, overall and per class, against the evaluation's;
    images whose sha256 is in ``trained`` (the model learnt them) are left out."""
    if not batches:
        return {"note": "no labelled feedback (signpost feedback add)"}
    if model is None:
        return {"note": "no model given to score the feedback with"}
    from signpost.data.cache import open_image, preprocess

    size = model.card.image_size
    every = [item for batch in batches for item in load_batch(batch)]
    items = [item for item in every if hashlib.sha256(item[0]).hexdigest() not in trained]
    if not items:
        return {"note": f"the model was trained on all {len(every)} feedback images: none left to score it on"}
    images = np.stack([preprocess(open_image(data), size) for data, _ in items])
    labels = np.array([label for _, label in items])
    predicted = _model_outputs(model, images).top_ids[:, 0]
    correct = predicted == labels
    per_class = {int(c): float(correct[labels == c].mean()) for c in np.unique(labels)}
    accuracy = float(correct.mean())
    result: dict[str, Any] = {"images": len(labels), "trained_on": len(every) - len(items),
                              "batches": [b.name for b in batches], "accuracy": accuracy,
                              "per_class": per_class, "baseline": reference.top1}
    result["dropped"] = reference.top1 is not None and reference.top1 - accuracy > cfg.accuracy_drop
    return result


def compare_models(url: str, counts: dict[str, int], *, last: int | None, since: float | None,
                   reference: Reference, cfg: MonitorConfig, experiment: str | None = None) -> dict[str, Any] | None:
    """Per model version in the window (canary mode): records, class mix against the main model's (the version with
    most records), mean confidence and latency; a canary looks worse when its mean confidence is lower by
    ``monitor.confidence_shift`` or more, or its p99 latency breaks the SLO while the main model's does not.
    ``counts``: records per version in the window (``predlog.model_versions``), of ``experiment`` when given (as
    ``counts`` should be). None when it holds one version."""
    if len(counts) < 2:
        return None
    stats = {}
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
        stats[version] = {"records": n, "share": n / sum(counts.values()), "classes": classes,
                          "mean_confidence": confidence / max(n, 1), "latency_p50_ms": _quantile(latency, 0.5),
                          "latency_p99_ms": _quantile(latency, 0.99)}
    main = max(stats, key=lambda v: stats[v]["records"])
    models = {}
    for version, entry in stats.items():
        row = {k: v for k, v in entry.items() if k != "classes"} | {"role": "main" if version == main else "canary"}
        if version != main:
            ours, theirs = entry, stats[main]
            row["class_psi_vs_main"] = psi(theirs["classes"], ours["classes"])
            row["confidence_vs_main"] = ours["mean_confidence"] - theirs["mean_confidence"]
            worse = []
            if row["confidence_vs_main"] <= -cfg.confidence_shift:
                worse.append(f"mean confidence {row['confidence_vs_main']:+.3f} against the main model")
            if ours["latency_p99_ms"] > cfg.latency_p99_ms >= theirs["latency_p99_ms"]:
                worse.append(f"p99 latency {ours['latency_p99_ms']:.1f} ms over the {cfg.latency_p99_ms:.0f} ms SLO")
            row["worse"] = worse
            row["verdict"] = "worse: " + "; ".join(worse) if worse else "no worse than the main model"
        models[version] = row
    return {"main": main, "versions": models}


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


def _quantile(counts: np.ndarray, q: float) -> float:
    total = counts.sum()
    if total == 0:
        return 0.0
    i = int(np.searchsorted(np.cumsum(counts), q * total))
    return float(LATENCY_EDGES[min(i + 1, len(LATENCY_EDGES) - 1)])


def _incidents(result: dict[str, Any]) -> list[Incident]:
    incidents = []
    q = result.get("quality", {})
    if q.get("dropped"):
        incidents.append(Incident("accuracy", f"live accuracy {q['accuracy']:.3f} on {q['images']} labelled feedback "
                                  f"images, against {q['baseline']:.3f} at evaluation", q))
    if not result["verdict"].get("enough_data"):
        return incidents
    p = result["prediction_drift"]
    if p["drifted"]:
        incidents.append(Incident("prediction-drift", f"class PSI {p['class_psi']:.3f}, JS {p['class_js']:.3f}, "
                                  f"mean confidence {p['mean_confidence']:.3f}", p))
    i = result["input_drift"]
    if i["drifted"]:
        names = [n for n, f in i["features"].items() if f["drifted"]]
        incidents.append(Incident("input-drift", f"{len(names)} of {len(i['features'])} image statistics drifted: "
                                  f"{', '.join(names)}", {"features": names}))
    e = result["embedding_drift"]
    if e["drifted"]:
        incidents.append(Incident("embedding-drift", f"{e['drifted_share']:.0%} of the output summaries drifted",
                                  {}))
    h = result["health"]
    if h["latency_breached"]:
        incidents.append(Incident("latency", f"p99 {h['latency_p99_ms']:.1f} ms over the {h['slo_ms']:.0f} ms "
                                  "SLO", h))
    if h["errors_breached"]:
        incidents.append(Incident("errors", f"{h['error_rate']:.1%} of prediction requests failed ({h['errors']}); "
                                  f"the limit is {h['max_error_rate']:.1%}", h))
    return incidents


def _chart(window: dict[str, Any], reference: Reference, result: dict[str, Any], path: Path) -> None:
    panels = [{"name": "predicted class", "edges": None, "reference": reference.class_counts,
               "current": window["classes"], "drifted": result.get("prediction_drift", {}).get("drifted")}]
    features = result.get("input_drift", {}).get("features", {})
    for name in INPUTS:
        if name in window["hist"]:
            panels.append({"name": name, "edges": reference.edges[name],
                           "reference": histogram(reference.samples[name], reference.edges[name]),
                           "current": window["hist"][name], "drifted": features.get(name, {}).get("drifted")})
    drift_png(panels, path, f"Reference (filled) against the last {window['rows']:,} predictions (line)")


def _html(result: dict[str, Any], config: SignpostConfig) -> str:
    verdict = result["verdict"]
    rows = []
    for name, f in result.get("input_drift", {}).get("features", {}).items():
        p_value = f"{f['p_value']:.4f}" if "p_value" in f else "–"  # Wasserstein has none
        rows.append(f"<tr{' class=drift' if f['drifted'] else ''}><td>{html.escape(name)}</td><td>{f['method']}</td>"
                    f"<td>{f['statistic']:.4f}</td><td>{p_value}</td><td>{f['psi']:.4f}</td>"
                    f"<td>{f['reference_mean']:.4f}</td><td>{f['current_mean']:.4f}</td></tr>")
    prediction = result.get("prediction_drift", {})
    health = result.get("health", {})
    chart = '<img src="drift.png" alt="reference against current distributions">' if result["window"]["rows"] else ""
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Signpost drift report — {html.escape(config.name)}</title>
<style>body{{font-family:system-ui,sans-serif;margin:2rem;max-width:70rem}}td,th{{padding:.2rem .6rem;text-align:right}}
td:first-child{{text-align:left}}tr.drift td{{color:#c44e52;font-weight:600}}img{{max-width:100%}}</style></head>
<body><h1>Drift report — {html.escape(config.name)}</h1>
<p>{result['window']['rows']:,} predictions from <code>{html.escape(str(result.get('log', '')))}</code> against
<code>{html.escape(str(result.get('reference', '')))}</code>.</p>
<p>{html.escape(result.get('experiment', {}).get('note', ''))}</p>
<h2>Verdict</h2><p><b>{'retrain' if verdict['retrain'] else 'no retraining needed'}</b>
{html.escape('; '.join(verdict.get('reasons', [])) or verdict.get('note', ''))}</p>
<h2>Predictions</h2><p>class PSI {prediction.get('class_psi', float('nan')):.4f}, Jensen-Shannon
{prediction.get('class_js', float('nan')):.4f}, mean confidence {prediction.get('mean_confidence') or float('nan'):.4f}
(reference {prediction.get('reference_confidence', float('nan')):.4f})</p>
<h2>Inputs</h2><table><tr><th>feature</th><th>test</th><th>statistic</th><th>p-value</th><th>PSI</th>
<th>reference mean</th><th>current mean</th></tr>{''.join(rows)}</table>
<h2>Model outputs</h2><p>{html.escape(_embedding_line(result))}</p>
{_models_table(result.get("models"))}
<h2>Service</h2><p>latency p50 {health.get('latency_p50_ms', float('nan')):.2f} ms, p99
{health.get('latency_p99_ms', float('nan')):.2f} ms (SLO {health.get('slo_ms', float('nan')):.0f} ms);
{health.get('errors', 0)} failed prediction requests ({health.get('error_rate', 0.0):.2%})</p>
{chart}
</body></html>
"""


def _models_table(models: dict[str, Any] | None) -> str:
    if not models:
        return ""
    rows = "".join(
        f"<tr><td>{html.escape(version)}</td><td>{m['role']}</td><td>{m['records']:,}</td><td>{m['share']:.1%}</td>"
        f"<td>{m['mean_confidence']:.4f}</td><td>{m['latency_p50_ms']:.2f}</td><td>{m['latency_p99_ms']:.2f}</td>"
        f"<td>{m.get('class_psi_vs_main', 0.0):.4f}</td><td>{html.escape(m.get('verdict', ''))}</td></tr>"
        for version, m in models["versions"].items()
    )
    return ("<h2>Canary</h2><table><tr><th>model version</th><th>role</th><th>predictions</th><th>share</th>"
            "<th>mean confidence</th><th>p50 ms</th><th>p99 ms</th><th>class PSI vs main</th><th>verdict</th></tr>"
            f"{rows}</table>")


def _embedding_line(result: dict[str, Any]) -> str:
    embedding = result.get("embedding_drift", {})
    if "dimensions" not in embedding:
        return embedding.get("note", "not measured")
    return (f"{embedding['drifted_share']:.0%} of the {len(embedding['dimensions'])} output-summary dimensions "
            f"drifted{' — drift' if embedding['drifted'] else ''}")


def since_seconds(text: str) -> float:
    """``30m``, ``2h``, ``1d`` or seconds -> a Unix time that far in the past."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    value, unit = (text[:-1], text[-1]) if text and text[-1] in units else (text, "s")
    try:
        return time.time() - float(value) * units[unit]
    except ValueError:
        raise ValueError(f"--since {text!r}: expected a duration such as 30m, 2h or 1d") from None
