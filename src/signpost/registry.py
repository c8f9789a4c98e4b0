"""The model registry: versions of a model in MLflow's model registry, and the aliases that decide them.

``Registry`` registers a model artifact folder logged to a tracking run, looks versions up by alias or manifest key,
promotes by moving aliases (``challenger`` → ``champion``, never by copying files), rolls back and downloads a
version for serving or comparison. Models are logged as the plain files of their artifact folder (safetensors +
JSON): nothing here pickles. The runs that versions come from are ``signpost.tracking``'s job.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from signpost.artifacts import ArtifactError, atomic_dir, is_complete, verify_artifact
from signpost.config import TrackingConfig
from signpost.tracking import Tracker, mlflow_exception, quiet_mlflow, redact_uri, tracking_uri

if TYPE_CHECKING:
    # mlflow is imported lazily at run time (about a second): backend "none" and the CLI's --help should not pay.
    from mlflow import MlflowClient

log = logging.getLogger(__name__)

MODEL_ARTIFACT_PATH = "model"
CHALLENGER = "challenger"
CHAMPION = "champion"
DOWNLOADS = "registry"  # workdir/registry/: model versions downloaded from the registry (to serve or compare)
_MAX_HISTORY = 100  # earlier champions remembered for rollback


class RegistryError(RuntimeError):
    """A registry operation that cannot be done: no registry, an alias that is not set, nothing to roll back to."""



@dataclass(frozen=True)
class ModelVersion:
    """One registered model version, with the aliases that point at it and the metrics of the run that made it."""

    name: str
    version: str
    run_id: str | None
    source: str
    aliases: tuple[str, ...]
    metrics: dict[str, float]


class Registry:
    """The MLflow model registry for ``config.registered_model``: register, look up, promote, roll back, download.

    Promotion moves the ``champion`` alias and pushes the version it pointed at onto a history kept as a tag of the
    registered model (the top of it is also visible as the alias ``previous-champion``); rollback pops it.
    """

    def __init__(self, config: TrackingConfig, workdir: Path) -> None:
        self.config = config
        self.workdir = Path(workdir).resolve()
        if config.registered_model is None and config.backend != "none":
            # A whole config always names one (signpost-<name>); a TrackingConfig made alone must say it.
            raise RegistryError("no registered model name: set tracking.registered_model")
        self.name = config.registered_model or ""
        # Resolved once: a registry stays bound to one store even if the environment changes later.
        self.uri = tracking_uri(config, self.workdir)
        self._client: MlflowClient | None = None

    def register(
        self,
        tracker: Tracker,
        model_dir: Path,
        *,
        alias: str = CHALLENGER,
        tags: Mapping[str, str] | None = None,
    ) -> ModelVersion:
        """Log the model artifact folder to the run (artifact path ``model``), create a version from
        ``runs:/<run_id>/model`` and point ``alias`` at it. Version tags record the artifact's folder name, manifest
        key and data key."""
        client = self._mlflow()
        if tracker.run_id is None:
            raise RegistryError("cannot register a model without a tracking run: the tracker has no run id")
        tracker_uri = getattr(tracker, "uri", None)
        if tracker_uri is not None and tracker_uri != self.uri:
            raise RegistryError(
                f"the run is tracked at {redact_uri(tracker_uri)} but the registry is at {redact_uri(self.uri)}; "
                "use the same tracking config for both"
            )
        model_dir = Path(model_dir)
        try:
            manifest = verify_artifact(model_dir, signed=True)
        except ArtifactError as exc:
            raise RegistryError(f"cannot register {model_dir}: {exc}") from exc
        version_tags = {"signpost.artifact": model_dir.name, "signpost.key": str(manifest.get("key", ""))}
        if data_key := _read_card(model_dir).get("data_key"):
            version_tags["signpost.data_key"] = str(data_key)
        version_tags.update(tags or {})

        tracker.log_artifact(model_dir, MODEL_ARTIFACT_PATH)
        self._ensure_registered(client)
        created = client.create_model_version(
            self.name,
            f"runs:/{tracker.run_id}/{MODEL_ARTIFACT_PATH}",
            run_id=tracker.run_id,
            tags={k: v for k, v in version_tags.items() if v},
        )
        version = str(created.version)
        client.set_registered_model_alias(self.name, alias, version)
        log.info("registered %s version %s from run %s as %r", self.name, version, tracker.run_id, alias)
        return self._version(client, version)

    def get(self, alias: str) -> ModelVersion | None:
        """The version behind ``alias``; None when the alias is not set or the model is not registered."""
        client = self._mlflow()
        version = (self._aliases(client) or {}).get(alias)
        return None if version is None else self._version(client, version)

    def find(self, key: str) -> ModelVersion | None:
        """The newest version registered from the model artifact with manifest key ``key``, or None."""
        client = self._mlflow()
        if self._aliases(client) is None:
            return None
        found = [mv for mv in client.search_model_versions(f"name='{self.name}'")
                 if mv.tags.get("signpost.key") == key]
        return self._version(client, str(max(int(mv.version) for mv in found))) if found else None

    def version_tag(self, version: str, key: str) -> str | None:
        """One tag of one model version, or None when it is not set."""
        return self._mlflow().get_model_version(self.name, version).tags.get(key)

    def tag_version(self, version: str, key: str, value: str) -> None:
        """Set a tag on one model version (e.g. why it was or was not promoted)."""
        self._mlflow().set_model_version_tag(self.name, version, key, value)

    def promote(self, alias_from: str = CHALLENGER, alias_to: str = CHAMPION) -> ModelVersion:
        """Point ``alias_to`` at the version behind ``alias_from`` and remove ``alias_from`` (it has been decided).

        The version ``alias_to`` pointed at before is remembered so that ``rollback`` can restore it.
        """
        if alias_from == alias_to:
            raise RegistryError(f"cannot promote {alias_from!r} to itself")
        client = self._mlflow()
        aliases = self._require_aliases(client, "nothing to promote")
        target = aliases.get(alias_from)
        if target is None:
            raise RegistryError(
                f"{self.name} has no {alias_from!r} version: nothing to promote (register a model first); "
                f"aliases set: {_describe_aliases(aliases)}"
            )
        current = aliases.get(alias_to)
        if current is not None and current != target:
            history = [*self._history(client, alias_to), current][-_MAX_HISTORY:]
            self._save_history(client, alias_to, history)
        client.set_registered_model_alias(self.name, alias_to, target)
        client.delete_registered_model_alias(self.name, alias_from)
        log.info("promoted %s version %s from %r to %r (was %s)", self.name, target, alias_from, alias_to, current)
        return self._version(client, target)

    def rollback(self, alias: str = CHAMPION) -> ModelVersion:
        """Point ``alias`` back at the version it pointed at before the last promotion (repeatable, like undo)."""
        client = self._mlflow()
        aliases = self._require_aliases(client, "nothing to roll back")
        history = self._history(client, alias)
        if not history:
            raise RegistryError(
                f"nothing to roll back to: {self.name} has no previous {alias!r} (no promotion has replaced one); "
                f"aliases set: {_describe_aliases(aliases)}"
            )
        target = history.pop()
        current = aliases.get(alias)
        try:
            client.set_registered_model_alias(self.name, alias, target)
        except mlflow_exception() as exc:
            raise RegistryError(f"cannot move {alias!r} back to {self.name} version {target}: {exc}") from exc
        self._save_history(client, alias, history)
        if current is not None and current != target:
            stamp = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
            client.set_model_version_tag(self.name, current, f"signpost.rolled_back.{alias}", stamp)
        log.info("rolled %s %r back from version %s to %s", self.name, alias, current, target)
        return self._version(client, target)

    def download(self, alias: str | None, dest: Path | None = None, *, version: str | None = None) -> Path:
        """Download the model artifact folder behind ``alias`` (or the given ``version``) to
        ``dest/<artifact folder name>`` (default ``workdir/registry/``) and return it.

        The folder keeps the name it had when it was made (derived from its inputs' hashes), so a version already
        downloaded is reused; files are checked against the manifest either way.
        """
        from mlflow.artifacts import download_artifacts

        client = self._mlflow()
        dest = self.workdir / DOWNLOADS if dest is None else Path(dest)
        if version is None:
            version = (self._aliases(client) or {}).get(alias or "")
            if version is None:
                raise RegistryError(f"{self.name} has no {alias!r} version to download")
        try:
            tags = client.get_model_version(self.name, version).tags
        except mlflow_exception() as exc:
            raise RegistryError(f"{self.name} has no version {version!r} to download: {exc}") from exc
        final = dest / (tags.get("signpost.artifact") or f"{self.name}-v{version}")
        if is_complete(final):
            try:
                verify_artifact(final, signed=True)
                log.info("%s version %s is already at %s", self.name, version, final)
                return final
            except ArtifactError as exc:
                log.warning("%s; downloading it again", exc)
                shutil.rmtree(final)
        # Resolved here rather than through a models:/ URI: MLflow 3.17 resolves models:/ against the global
        # registry URI (sqlite:///mlflow.db in the current folder unless set), ignoring the one passed in.
        source = client.get_model_version_download_uri(self.name, version)
        with atomic_dir(final) as tmp:
            # A runs:/ source lands as <dst>/model/...; move its contents up so the folder is the artifact itself.
            local = Path(
                download_artifacts(artifact_uri=source, dst_path=str(tmp / ".download"), tracking_uri=self.uri)
            )
            for item in local.iterdir():
                item.rename(tmp / item.name)
            shutil.rmtree(tmp / ".download")
            verify_artifact(tmp, signed=True)
        log.info("downloaded %s version %s (%r) to %s", self.name, version, alias, final)
        return final

    def _registry_uri(self) -> str:
        return os.environ.get("MLFLOW_REGISTRY_URI", "").strip() or self.uri

    def _mlflow(self) -> MlflowClient:
        if self.config.backend == "none":
            raise RegistryError(
                "tracking.backend is none: there is no model registry; set tracking.backend=mlflow to register, "
                "promote, roll back or download models"
            )
        if self._client is None:
            from mlflow import MlflowClient

            quiet_mlflow()
            self.workdir.mkdir(parents=True, exist_ok=True)
            self._client = MlflowClient(tracking_uri=self.uri, registry_uri=self._registry_uri())
        return self._client

    def _ensure_registered(self, client: MlflowClient) -> None:
        if self._aliases(client) is not None:
            return
        try:
            client.create_registered_model(self.name, description="Signpost image classifier")
        except mlflow_exception() as exc:
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":  # else another process registered it first
                raise

    def _aliases(self, client: MlflowClient) -> dict[str, str] | None:
        """Alias → version of the registered model; None when it is not registered."""
        try:
            model = client.get_registered_model(self.name)
        except mlflow_exception() as exc:
            if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
                return None
            raise
        return {alias: str(version) for alias, version in model.aliases.items()}

    def _require_aliases(self, client: MlflowClient, what: str) -> dict[str, str]:
        aliases = self._aliases(client)
        if aliases is None:
            raise RegistryError(f"model {self.name!r} is not registered at {redact_uri(self.uri)}: {what}")
        return aliases

    def _history(self, client: MlflowClient, alias: str) -> list[str]:
        text = client.get_registered_model(self.name).tags.get(_history_tag(alias), "")
        try:
            history = json.loads(text) if text else []
        except json.JSONDecodeError:
            log.warning("ignoring unreadable %s on %s: %r", _history_tag(alias), self.name, text)
            return []
        return [str(v) for v in history]

    def _save_history(self, client: MlflowClient, alias: str, history: list[str]) -> None:
        client.set_registered_model_tag(self.name, _history_tag(alias), json.dumps(history))
        # A visible pointer to what rollback would restore, for people looking at the registry UI.
        if history:
            client.set_registered_model_alias(self.name, f"previous-{alias}", history[-1])
        else:
            with contextlib.suppress(mlflow_exception()):
                client.delete_registered_model_alias(self.name, f"previous-{alias}")

    def _version(self, client: MlflowClient, version: str) -> ModelVersion:
        mv = client.get_model_version(self.name, version)
        metrics: dict[str, float] = {}
        if mv.run_id:
            try:
                run_metrics = client.get_run(mv.run_id).data.metrics
            except mlflow_exception() as exc:
                log.warning("metrics of run %s (version %s) unavailable: %s", mv.run_id, version, exc)
            else:
                # system/* describe the machine the run used, not the model.
                metrics = {k: float(v) for k, v in run_metrics.items() if not k.startswith("system/")}
        return ModelVersion(
            name=mv.name,
            version=str(mv.version),
            run_id=mv.run_id or None,
            source=mv.source,
            aliases=tuple(sorted(mv.aliases or ())),
            metrics=metrics,
        )



def _history_tag(alias: str) -> str:
    return f"signpost.history.{alias}"


def _describe_aliases(aliases: Mapping[str, str]) -> str:
    return ", ".join(f"{a}→v{v}" for a, v in sorted(aliases.items())) or "none"



def _read_card(model_dir: Path) -> dict[str, Any]:
    """The model card as a plain dict (no torch import needed to register); empty when there is none."""
    path = model_dir / "model_card.json"
    if not path.is_file():
        return {}
    try:
        card = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise RegistryError(f"cannot register {model_dir}: unreadable model card: {exc}") from exc
    return card if isinstance(card, dict) else {}

