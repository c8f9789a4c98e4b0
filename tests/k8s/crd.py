"""Check a custom resource against its CRD's schema, vendored in ``schemas/`` (each file's ``source`` names the
repository, path and commit it came from; descriptions removed, the schema unchanged otherwise).

Unknown fields are refused (``validate._closed``), as the API server's strict field validation refuses them; the
object's metadata is checked with the core ObjectMeta schema, which CRD schemas leave to the API server. CEL rules
(``x-kubernetes-validations``) are not evaluated."""

from __future__ import annotations

import gzip
import json
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate

from tests.k8s.validate import KUBERNETES_VERSION, _closed

SCHEMAS = Path(__file__).parent / "schemas"


@cache
def crd(file: str) -> dict[str, Any]:
    """The vendored CRD ``file``: source, group, version, kind and its openAPIV3Schema with unknown fields refused."""
    doc = json.loads(gzip.decompress((SCHEMAS / file).read_bytes()))
    return {**doc, "openAPIV3Schema": _closed(_python_patterns(doc["openAPIV3Schema"]))}


def _python_patterns(schema: Any) -> Any:
    """The schema with Go's ``^(?i)...`` patterns as Python's ``(?i)^...`` (Python wants inline flags first)."""
    if isinstance(schema, list):
        return [_python_patterns(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    fixed = {key: _python_patterns(value) for key, value in schema.items()}
    if isinstance(fixed.get("pattern"), str) and fixed["pattern"].startswith("^(?i)"):
        fixed["pattern"] = "(?i)^" + fixed["pattern"].removeprefix("^(?i)")
    return fixed


def validate_custom(obj: dict[str, Any], file: str) -> None:
    """Raise when ``obj`` is not a valid object of the CRD in ``file`` (jsonschema or kubernetes_validate errors)."""
    schema = crd(file)
    assert obj.get("apiVersion") == f"{schema['group']}/{schema['version']}", obj.get("apiVersion")
    assert obj.get("kind") == schema["kind"], obj.get("kind")
    kubernetes_validate.validate({"apiVersion": "v1", "kind": "ConfigMap", "metadata": obj.get("metadata", {})},
                                 KUBERNETES_VERSION, strict=True)
    jsonschema.validate(obj, schema["openAPIV3Schema"])
