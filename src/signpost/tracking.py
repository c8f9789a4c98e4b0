"""Experiment tracking: the one small interface every stage reports its runs through.

Stages report params, metrics, tags and artifacts through a ``Tracker``: an ``MLflowTracker`` when
``tracking.backend`` is ``mlflow``, a ``NullTracker`` when it is ``none``. Either way the stages write their own
manifests, so a run without MLflow still leaves a complete record on disk.

The embedded default store is a SQLite database in the workdir with artifacts in ``<workdir>/mlruns`` (nothing to
start); a team points ``MLFLOW_TRACKING_URI`` (or ``tracking.uri``) at its MLflow server.

Model versions and their aliases are ``signpost.registry``'s job; it registers models logged to runs made here.

MLflow params are immutable within a run: a tracker logs each param once, and a value that changes later is kept
at its first value with a warning. A resumed training job must either reuse its run (same run id) with the same
params or start a new run.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import os
import re
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Protocol, TypeAlias, TypeVar, runtime_checkable
from urllib.parse import urlsplit, urlunsplit

from signpost.config import SignpostConfig, TrackingConfig

if TYPE_CHECKING:
    # mlflow is imported lazily at run time: it takes about a second to import, and backend "none" and the CLI's
    # --help should not pay for it.
    from mlflow import MlflowClient
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

log = logging.getLogger(__name__)

STATUSES = ("FINISHED", "FAILED", "KILLED")
# Seconds between system-metric samples; MLflow's MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL overrides it.
SYSTEM_METRICS_INTERVAL_S = 5.0
DB_NAME = "mlflow.db"
ARTIFACTS_DIR = "mlruns"

# MLflow's request limits (mlflow.utils.validation): 100 params or tags per batch, 1000 metrics per batch, param
# values up to 6000 characters, tag values up to 8000.
_MAX_PARAMS_TAGS_PER_BATCH = 100
_MAX_METRICS_PER_BATCH = 1000
_MAX_PARAM_VALUE = 6000
_MAX_TAG_VALUE = 8000
# Stores where the client writes artifacts itself (no server in between), so we choose where they go.
_DATABASE_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql")
# INFO chatter from MLflow that says nothing a user acts on (schema creation on first SQLite use, system-metrics
# thread start/stop). Warnings and errors still show.
_NOISY_LOGGERS = ("mlflow.store.db.utils", "mlflow.system_metrics")

_T = TypeVar("_T")


class TrackingError(RuntimeError):
    """A tracking store that cannot be used as configured; the message says what to change."""


@runtime_checkable
class Tracker(Protocol):
    """What a stage reports through. ``run_id`` is None when nothing is tracked."""

    run_id: str | None

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Log a (nested) config once per run; nested keys are joined with dots (``train.lr``)."""

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        """Log numeric metrics at ``step``; NaN and infinite values are skipped with a warning."""

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        """Log a file (under ``artifact_path``) or a folder's contents (under ``artifact_path`` or its own name)."""

    def set_tags(self, tags: Mapping[str, str]) -> None:
        """Set run tags."""

    def finish(self, status: str = "FINISHED") -> None:
        """End the run as FINISHED, FAILED or KILLED. Calling it again does nothing."""

    def __enter__(self: _T) -> _T: ...

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None: ...


# What every tracked stage takes as ``tracking``: a function that opens the tracking run of one stage (``"train"``,
# ``"evaluate"``, ...). ``run_factory`` makes it from a config; a stage calls it only when it makes an artifact.
RunFactory: TypeAlias = Callable[[str], Tracker]


def _exit_status(exc_type: type[BaseException] | None) -> str:
    if exc_type is None:
        return "FINISHED"
    return "KILLED" if issubclass(exc_type, KeyboardInterrupt) else "FAILED"


class NullTracker:
    """The tracker for ``tracking.backend: none``: accepts everything and records nothing."""

    run_id: str | None = None

    def log_params(self, params: Mapping[str, Any]) -> None:
        pass

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        pass

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        pass

    def set_tags(self, tags: Mapping[str, str]) -> None:
        pass

    def finish(self, status: str = "FINISHED") -> None:
        pass

    def __enter__(self) -> NullTracker:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        pass


class MLflowTracker:
    """One MLflow run, addressed by its id through an ``MlflowClient``.

    It never touches mlflow's global active run, so two trackers (two stages, or two tests) can be open at once in
    one process. Use it as a context manager to end the run as FINISHED, FAILED (exception) or KILLED (Ctrl-C).
    """

    def __init__(
        self,
        uri: str,
        *,
        experiment: str,
        run_name: str,
        tags: Mapping[str, str] | None = None,
        artifact_root: Path | None = None,
        system_metrics: bool = True,
    ) -> None:
        from mlflow import MlflowClient

        quiet_mlflow()
        self.uri = uri
        self.client = MlflowClient(tracking_uri=uri)
        self.experiment_id = _experiment_id(self.client, experiment, artifact_root)
        run = self.client.create_run(self.experiment_id, run_name=run_name)
        self.run_id: str | None = run.info.run_id
        self._run_id: str = run.info.run_id
        self._params: dict[str, str] = {}
        self._finished = False
        self._monitor: SystemMetricsMonitor | None = None
        try:
            if tags:
                self.set_tags(tags)
        except BaseException:
            self.finish("FAILED")  # a run left RUNNING would look alive in the UI forever
            raise
        if system_metrics:
            self._monitor = self._start_system_metrics()
        log.info("tracking run %s (%s) in experiment %r at %s", run_name, self._run_id, experiment, redact_uri(uri))

    def log_params(self, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        new: dict[str, str] = {}
        for key, value in _flatten(params).items():
            logged = self._params.get(key)
            if logged is None:
                new[key] = value
            elif logged != value:
                # MLflow rejects a changed param value in the same run; keep the run usable instead of failing.
                log.warning("param %s was logged as %r; MLflow params cannot change in a run, keeping it", key, logged)
        for chunk in _chunks([Param(k, v) for k, v in new.items()], _MAX_PARAMS_TAGS_PER_BATCH):
            self.client.log_batch(self._run_id, params=chunk)
        self._params.update(new)

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        from mlflow.entities import Metric

        timestamp_ms = int(time.time() * 1000)
        entries = []
        for key, value in metrics.items():
            number = float(value)
            if not math.isfinite(number):
                log.warning("metric %s is %s at step %s; not logged", key, number, step)
                continue
            entries.append(Metric(key, number, timestamp_ms, step or 0))
        for chunk in _chunks(entries, _MAX_METRICS_PER_BATCH):
            self.client.log_batch(self._run_id, metrics=chunk)

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        path = Path(path)
        if path.is_dir():
            self.client.log_artifacts(self._run_id, str(path), artifact_path if artifact_path else path.name)
        elif path.is_file():
            self.client.log_artifact(self._run_id, str(path), artifact_path)
        else:
            raise FileNotFoundError(f"cannot log artifact {path}: no such file or folder")

    def set_tags(self, tags: Mapping[str, str]) -> None:
        from mlflow.entities import RunTag

        entries = [RunTag(key, _truncate(key, str(value), _MAX_TAG_VALUE)) for key, value in tags.items()]
        for chunk in _chunks(entries, _MAX_PARAMS_TAGS_PER_BATCH):
            self.client.log_batch(self._run_id, tags=chunk)

    def finish(self, status: str = "FINISHED") -> None:
        if status not in STATUSES:
            raise ValueError(f"run status must be one of {', '.join(STATUSES)}, got {status!r}")
        if self._finished:
            return
        self._finished = True
        if self._monitor is not None:
            # Stop the sampler first: it flushes its last samples, which MLflow refuses once the run has ended.
            self._monitor.finish()
            self._monitor = None
        # For a tracking server MLflow writes "View run ... at: <url>" straight to stdout; library code must not
        # print (the CLI's stdout may be machine-read), so the lines are caught and logged instead.
        with contextlib.redirect_stdout(io.StringIO()) as out:
            self.client.set_terminated(self._run_id, status)
        for line in out.getvalue().splitlines():
            log.info("%s", line.strip())
        log.info("run %s ended: %s", self._run_id, status)

    def __enter__(self) -> MLflowTracker:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is None:
            self.finish()
            return
        try:
            self.finish(_exit_status(exc_type))
        except Exception:
            # The block's own exception is the one to see; a tracking failure on the way out is only logged.
            log.exception("could not mark run %s as %s", self._run_id, _exit_status(exc_type))

    def _start_system_metrics(self) -> SystemMetricsMonitor | None:
        """Sample CPU, memory, disk, network (and GPU when pynvml finds one) into ``system/*`` metrics.

        MLflow's SystemMetricsMonitor takes an explicit run id and tracking URI, so it works without the global
        active run. It logs nothing for a run shorter than one sampling interval.
        """
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        try:
            monitor = SystemMetricsMonitor(
                self._run_id, sampling_interval=SYSTEM_METRICS_INTERVAL_S, tracking_uri=self.uri
            )
            monitor.start()
        except Exception as exc:  # system metrics are a nice-to-have; never fail a run over them
            log.warning("system metrics disabled for run %s: %s", self._run_id, exc)
            return None
        return monitor


def tracking_uri(config: TrackingConfig, workdir: Path) -> str:
    """``config.uri``, else ``$MLFLOW_TRACKING_URI``, else ``sqlite:///<absolute workdir>/mlflow.db``.

    With a database store and no server (the SQLite default included), experiments this module creates keep their
    artifacts in ``<workdir>/mlruns/<experiment>``; behind a server, the server decides.
    """
    if config.uri:
        return config.uri
    if env := os.environ.get("MLFLOW_TRACKING_URI", "").strip():
        return env
    return f"sqlite:///{(Path(workdir).resolve() / DB_NAME).as_posix()}"


def start_run(
    config: TrackingConfig,
    *,
    workdir: Path,
    experiment: str,
    run_name: str,
    tags: Mapping[str, str] | None = None,
    system_metrics: bool = True,
) -> Tracker:
    """A ``NullTracker`` for backend ``none``, else a new run in an ``MLflowTracker`` on the resolved URI.

    The experiment is ``config.experiment`` when set, else ``experiment`` (callers pass the config's name).
    """
    if config.backend == "none":
        return NullTracker()
    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    uri = tracking_uri(config, workdir)
    return MLflowTracker(
        uri,
        experiment=config.experiment or experiment,
        run_name=run_name,
        tags=tags,
        artifact_root=_local_artifact_root(uri, workdir),
        system_metrics=system_metrics,
    )


def mlflow_exception() -> type[Exception]:
    """MLflow's exception class, imported only when an MLflow call is made (``except mlflow_exception() as exc``)."""
    from mlflow.exceptions import MlflowException

    return MlflowException


def _experiment_id(client: MlflowClient, name: str, artifact_root: Path | None) -> str:
    """The id of experiment ``name``, created if missing (artifacts under ``artifact_root/<name>`` when given)."""
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        location = (artifact_root / _slug(name)).as_uri() if artifact_root is not None else None
        try:
            return client.create_experiment(name, artifact_location=location)
        except mlflow_exception() as exc:
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            experiment = client.get_experiment_by_name(name)  # another process created it first
            if experiment is None:
                raise TrackingError(f"MLflow experiment {name!r} can neither be created nor found") from exc
    if experiment.lifecycle_stage != "active":
        raise TrackingError(
            f"MLflow experiment {name!r} is deleted; restore it (mlflow experiments restore --experiment-id "
            f"{experiment.experiment_id}) or set tracking.experiment to another name"
        )
    return experiment.experiment_id


def _local_artifact_root(uri: str, workdir: Path) -> Path | None:
    """``<workdir>/mlruns`` for a database store the client writes to directly; None lets a server decide."""
    scheme = urlsplit(uri).scheme.split("+")[0]
    return workdir / ARTIFACTS_DIR if scheme in _DATABASE_SCHEMES else None


def quiet_mlflow() -> None:
    """Silence MLflow's progress bars and its INFO chatter (a level the user set on those loggers wins)."""
    # MLflow draws a tqdm bar on stderr for every artifact download (the champion, before a promotion decision).
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    for name in _NOISY_LOGGERS:
        logger = logging.getLogger(name)
        if logger.level == logging.NOTSET:  # a level set by the user wins
            logger.setLevel(logging.WARNING)


def _flatten(params: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """``{"train": {"lr": 0.1}}`` → ``{"train.lr": "0.1"}``; lists as JSON, long values truncated."""
    flat: dict[str, str] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(_flatten(value, f"{name}."))
        elif isinstance(value, (list, tuple)):
            flat[name] = _truncate(name, json.dumps(value, default=str), _MAX_PARAM_VALUE)
        else:
            flat[name] = _truncate(name, str(value), _MAX_PARAM_VALUE)
    return flat


def _truncate(key: str, value: str, limit: int) -> str:
    if len(value) <= limit:
        return value
    log.warning("%s is %d characters; MLflow keeps at most %d, truncating", key, len(value), limit)
    return value[: limit - 1] + "…"


def _chunks(items: Sequence[_T], size: int) -> Iterator[list[_T]]:
    for start in range(0, len(items), size):
        yield list(items[start : start + size])


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("._") or "experiment"


def redact_uri(uri: str) -> str:
    """``uri`` without a password, for logs and error messages."""
    parts = urlsplit(uri)
    if parts.password is None:
        return uri
    host = parts.hostname or ""
    netloc = f"{parts.username}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def log_stage(
    make: RunFactory,
    stage: str,
    *,
    params: Mapping[str, Any],
    metrics: Mapping[str, float],
    files: Sequence[Path],
    tags: Mapping[str, str] | None = None,
) -> str | None:
    """One tracking run for a finished stage artifact: its settings, its numbers and its small files (tables,
    charts; not the models). Returns the run id (None when nothing is tracked)."""
    with make(stage) as tracker:
        tracker.log_params(params)
        tracker.log_metrics(metrics)
        for file in files:
            if Path(file).is_file():
                tracker.log_artifact(Path(file), stage)
        if tags:
            tracker.set_tags(tags)
        return tracker.run_id


def run_factory(config: SignpostConfig) -> RunFactory:
    """A function making the tracking run of one stage (``"train"``, ...) for ``config``: what stages take as
    ``tracking``."""

    def make(stage: str) -> Tracker:
        return start_run(
            config.tracking,
            workdir=config.workdir,
            experiment=config.name,
            run_name=f"{config.name}-{stage}",
            tags={"signpost.stage": stage},
        )

    return make
