"""The service's alerting rules and Grafana dashboard as Kubernetes objects, for the rendered manifests.

The rules and the dashboard are plain files shipped in ``signpost/k8s/monitoring/`` (``rules.yaml``, checked and
unit-tested by ``promtool``; ``dashboard.json``), so an operator without the Prometheus operator can load them as
they are. This module wraps them: ``prometheus_rule`` in a ``monitoring.coreos.com/v1`` PrometheusRule (the Prometheus
operator's), ``dashboard_configmap`` in a ConfigMap labelled ``grafana_dashboard: "1"``, the label Grafana's
dashboard sidecar (kube-prometheus-stack, the Grafana Helm chart) looks for.
"""

from __future__ import annotations

import json
import re
from importlib import resources
from typing import Any

import yaml

MONITORING = "monitoring"  # the package-data folder beside this module
RULES_FILE, DASHBOARD_FILE = "rules.yaml", "dashboard.json"
DEFAULT_JOB = "signpost"  # the scrape job the rules' `up{job="signpost"}` selects
DASHBOARD_LABEL = {"grafana_dashboard": "1"}
# A Kubernetes object name (DNS-1123 subdomain) and a namespace (DNS-1123 label).
_NAME = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")
_NAMESPACE = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
_LABEL_VALUE = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?$")
# A Prometheus label value goes between the double quotes of a selector (the operator's jobs look like ns/name).
_JOB = re.compile(r'^[^"\\\n]+$')


def _read(name: str) -> str:
    return resources.files(__package__).joinpath(MONITORING, name).read_text(encoding="utf-8")


def rule_groups(job: str = DEFAULT_JOB) -> list[dict[str, Any]]:
    """The rule groups of ``rules.yaml``, with the target alerts' ``up{job=...}`` naming ``job``."""
    _check("job", job, _JOB, "the scrape job's name, without quotes or backslashes, such as signpost")
    groups: list[dict[str, Any]] = yaml.safe_load(_read(RULES_FILE))["groups"]
    for group in groups:
        for rule in group["rules"]:
            rule["expr"] = rule["expr"].replace(f'job="{DEFAULT_JOB}"', f'job="{job}"')
    return groups


def prometheus_rule(name: str, namespace: str, labels: dict[str, str], job: str = DEFAULT_JOB) -> dict[str, Any]:
    """A PrometheusRule holding ``rules.yaml``'s groups. ``labels`` must include what the Prometheus resource's
    ``ruleSelector`` selects (kube-prometheus-stack: ``release: <its release name>``)."""
    _check_object(name, namespace, labels)
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {"name": name, "namespace": namespace, "labels": dict(labels)},
        "spec": {"groups": rule_groups(job)},
    }


def dashboard() -> dict[str, Any]:
    """The Grafana dashboard (``dashboard.json``) as a dict."""
    return json.loads(_read(DASHBOARD_FILE))


def dashboard_configmap(name: str, namespace: str, labels: dict[str, str]) -> dict[str, Any]:
    """A ConfigMap holding the dashboard JSON, labelled so that Grafana's sidecar loads it."""
    _check_object(name, namespace, labels)
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": name, "namespace": namespace, "labels": {**labels, **DASHBOARD_LABEL}},
        "data": {"signpost-serving.json": json.dumps(dashboard(), indent=2) + "\n"},
    }


def _check_object(name: str, namespace: str, labels: dict[str, str]) -> None:
    _check("name", name, _NAME, "lowercase letters, digits, '-' and '.', at most 253 characters")
    _check("namespace", namespace, _NAMESPACE, "lowercase letters, digits and '-', at most 63 characters")
    for key, value in labels.items():
        _check(f"label {key}", value, _LABEL_VALUE, "letters, digits, '-', '_' and '.', at most 63 characters")


def _check(what: str, value: str, pattern: re.Pattern[str], rule: str) -> None:
    if not isinstance(value, str) or not pattern.match(value):
        raise ValueError(f"{what} {value!r} is not valid: use {rule}")
