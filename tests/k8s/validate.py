"""Render a kustomize overlay with the real kubectl and check every object against its schema: the Kubernetes JSON
schemas that ``kubernetes-validate`` bundles (strict: an unknown field is an error, as the API server's strict field
validation makes it), and KServe's InferenceService CRD schema vendored in ``schemas/`` (from kserve/kserve at the
commit its ``source`` names, descriptions removed), with unknown fields refused the same way."""

from __future__ import annotations

import gzip
import json
import shutil
import subprocess
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import yaml

KUBERNETES_VERSION = "1.33"  # the schemas checked against; kubernetes-validate bundles 1.x up to its own version
KSERVE_SCHEMA = Path(__file__).parent / "schemas" / "kserve-inferenceservice-v1beta1.json.gz"
INSTALL_KUBECTL = ("kubectl is not installed: `apt-get install kubernetes-client` (Debian; `make test` does it as "
                   "root) or see https://kubernetes.io/docs/tasks/tools/")


def kubectl() -> str:
    path = shutil.which("kubectl")
    assert path, INSTALL_KUBECTL  # fail, not skip: the default tests render every overlay
    return path


def kustomize(folder: Path) -> list[dict[str, Any]]:
    """``kubectl kustomize folder``: the objects the overlay makes."""
    done = subprocess.run([kubectl(), "kustomize", str(folder)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, f"kubectl kustomize {folder}: {done.stderr}"
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc]


@cache
def _kserve_validator() -> jsonschema.Draft7Validator:
    # One validator, made once: jsonschema.validate would check the 0.6 MB schema against the metaschema per call.
    doc = json.loads(gzip.decompress(KSERVE_SCHEMA.read_bytes()))
    return jsonschema.Draft7Validator(_closed(doc["openAPIV3Schema"]))


def _closed(schema: Any) -> Any:
    """The schema with unknown fields refused wherever it lists the fields an object has (CRD schemas leave them
    open and let the API server prune them: a misspelled field would vanish silently)."""
    if isinstance(schema, list):
        return [_closed(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    closed = {key: _closed(value) for key, value in schema.items()}
    if ("properties" in closed and "additionalProperties" not in closed
            and not closed.get("x-kubernetes-preserve-unknown-fields")):
        closed["additionalProperties"] = False
    return closed


def validate(obj: dict[str, Any]) -> None:
    """Raise when ``obj`` does not match its kind's schema (``jsonschema`` or ``kubernetes_validate`` errors)."""
    if obj.get("apiVersion", "").startswith("serving.kserve.io/"):
        assert obj["apiVersion"] == "serving.kserve.io/v1beta1", obj["apiVersion"]
        metadata = obj.get("metadata", {})
        # The CRD's schema leaves metadata to the API server: check it with the core ObjectMeta schema.
        kubernetes_validate.validate({"apiVersion": "v1", "kind": "ConfigMap", "metadata": metadata},
                                     KUBERNETES_VERSION, strict=True)
        _kserve_validator().validate(obj)
        return
    kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
