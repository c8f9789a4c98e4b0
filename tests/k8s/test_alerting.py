"""The alerting rules and the dashboard: promtool checks and unit-tests the rules, every metric they name is one a
real server exports, the dashboard matches Grafana's model, and the Kubernetes objects wrapping them validate."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from importlib import resources
from pathlib import Path

import jsonschema
import pytest
import yaml
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from signpost.k8s import alerting
from signpost.serve.app import create_app
from signpost.stages.prepare import prepare
from signpost.stages.train import train
from tests.conftest import local_config
from tests.k8s.crd import validate_custom
from tests.k8s.validate import validate
from tests.serve.conftest import image_bytes, wait_ready

MONITORING = Path(str(resources.files("signpost.k8s") / "monitoring"))
DASHBOARD_SCHEMA = Path(__file__).parent / "schemas" / "grafana-dashboard-subset.schema.json"
INSTALL_PROMTOOL = ("promtool is not installed: `apt-get install --no-install-recommends prometheus` (Debian; "
                    "`make test` does it as root or through sudo)")
ALERTS = {"SignpostHighErrorRate", "SignpostP99LatencyAboveSLO", "SignpostQueueSaturated",
          "SignpostModelVersionChanged", "SignpostModelVersionSkew", "SignpostTargetDown", "SignpostServiceDown",
          "SignpostPredictionLogDropping"}


def promtool(*args: str, cwd: Path = MONITORING) -> subprocess.CompletedProcess:
    path = shutil.which("promtool")
    assert path, INSTALL_PROMTOOL  # fail, not skip: the rules are checked in the default tests
    return subprocess.run([path, *args], cwd=cwd, capture_output=True, text=True, timeout=60)


def rule_exprs() -> list[str]:
    return [rule["expr"] for group in alerting.rule_groups() for rule in group["rules"]]


def dashboard_exprs() -> list[str]:
    return [target["expr"] for panel in alerting.dashboard()["panels"] for target in panel["targets"]]


def metric_names(expr: str) -> set[str]:
    """The series names a PromQL expression reads: ours all start signpost_, plus Prometheus's own ``up``."""
    return set(re.findall(r"\bsignpost_[a-z0-9_]+", expr)) | ({"up"} if re.search(r"\bup\{", expr) else set())


# --- promtool ---------------------------------------------------------------------------------------------------------

def test_promtool_checks_the_rules() -> None:
    done = promtool("check", "rules", "rules.yaml")
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(ALERTS)} rules found" in done.stdout


def test_promtool_unit_tests_pass_and_cover_every_alert() -> None:
    done = promtool("test", "rules", "rules_test.yaml")
    assert done.returncode == 0, done.stdout + done.stderr
    tests = yaml.safe_load((MONITORING / "rules_test.yaml").read_text())["tests"]
    checks = [check for test in tests for check in test["alert_rule_test"]]
    # every alert has a case that fires it and one that does not
    assert {c["alertname"] for c in checks if c["exp_alerts"]} == ALERTS
    assert {c["alertname"] for c in checks if not c["exp_alerts"]} == ALERTS
    assert {rule["alert"] for group in alerting.rule_groups() for rule in group["rules"]} == ALERTS


def test_promtool_refuses_a_broken_rule(tmp_path: Path) -> None:
    text = (MONITORING / "rules.yaml").read_text()
    (tmp_path / "rules.yaml").write_text(text.replace("> 0.05", "> > 0.05", 1))
    done = promtool("check", "rules", "rules.yaml", cwd=tmp_path)
    assert done.returncode != 0
    assert "parse error" in done.stdout + done.stderr


def test_promtool_unit_tests_catch_a_changed_threshold(tmp_path: Path) -> None:
    # 50 % instead of 5 %: the case with 10 % errors no longer fires, and the unit tests say so.
    text = (MONITORING / "rules.yaml").read_text()
    assert text.count("            > 0.05\n") == 1
    (tmp_path / "rules.yaml").write_text(text.replace("            > 0.05\n", "            > 0.5\n"))
    shutil.copy(MONITORING / "rules_test.yaml", tmp_path)
    done = promtool("test", "rules", "rules_test.yaml", cwd=tmp_path)
    assert done.returncode != 0
    assert "alertname: SignpostHighErrorRate" in done.stdout + done.stderr


# --- the names a real server exports ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def scraped(synthetic_root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A real app on a briefly trained model, after one prediction: its /metrics parsed, and its config."""
    work = tmp_path_factory.mktemp("alerting")
    config = local_config(synthetic_root, work, "train.epochs=1", "train.batch_size=16", "train.threads=1",
                          "tracking.backend=none", "serve.max_queue=300")
    data = prepare(config, progress=False)
    model = train(config, data_dir=data.path, progress=False)
    with TestClient(create_app(config, str(model.path), runtime="eager"), raise_server_exceptions=False) as client:
        wait_ready(client)
        for seed in range(3):
            answer = client.post("/v1/predict", content=image_bytes(seed=seed), headers={"Content-Type": "image/png"})
            assert answer.status_code == 200, answer.text
        text = client.get("/metrics").text
    samples = [s for family in text_string_to_metric_families(text) for s in family.samples]
    return {"samples": samples, "config": config}


def test_every_metric_in_the_rules_and_dashboard_is_exported(scraped: dict) -> None:
    exported = {sample.name for sample in scraped["samples"]} | {"up"}  # up: Prometheus's own, per target
    used = set().union(*map(metric_names, rule_exprs() + dashboard_exprs()))
    assert {"signpost_queue_capacity", "signpost_predicted_classes_total", "signpost_model_info"} <= used
    assert used - exported == set(), f"not exported by the server: {sorted(used - exported)}"
    # every label the rules and dashboard group or select by is one the series carry
    labels = {name for sample in scraped["samples"] for name in sample.labels} | {"job", "instance", "namespace", "le"}
    for expr in rule_exprs() + dashboard_exprs():
        used_labels = set(re.findall(r"\b([a-z_]+)(?:=~|!~|!=|=)\"", expr))
        used_labels |= {name.strip() for group in re.findall(r"by \(([^)]*)\)", expr) for name in group.split(",")}
        assert used_labels <= labels, f"{expr}: unknown labels {sorted(used_labels - labels)}"


def test_queue_capacity_and_predicted_classes_are_exported(scraped: dict) -> None:
    values = {(s.name, tuple(sorted(s.labels.items()))): s.value for s in scraped["samples"]}
    assert values[("signpost_queue_capacity", ())] == scraped["config"].serve.max_queue == 300
    by_class = {k: v for k, v in values.items() if k[0] == "signpost_predicted_classes_total"}
    by_version = {k: v for k, v in values.items() if k[0] == "signpost_predictions_total"}
    assert by_class and sum(by_class.values()) == sum(by_version.values()) == 3
    assert all(dict(labels)["class_name"] for _, labels in by_class)


# --- the dashboard ----------------------------------------------------------------------------------------------------

def test_dashboard_matches_grafanas_model() -> None:
    dashboard = json.loads((MONITORING / "dashboard.json").read_text())
    jsonschema.validate(dashboard, json.loads(DASHBOARD_SCHEMA.read_text()))
    panels = dashboard["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    cells = [(p["gridPos"]["x"] + dx, p["gridPos"]["y"] + dy) for p in panels
             for dx in range(p["gridPos"]["w"]) for dy in range(p["gridPos"]["h"])]
    assert len(cells) == len(set(cells)), "panels overlap"
    assert all(x < 24 for x, _ in cells), "a panel runs past Grafana's 24 columns"
    titles = " ".join(p["title"] for p in panels).lower()
    for wanted in ("request rate", "error rate", "p50", "p99", "batch size", "queue depth", "model version",
                   "by class"):
        assert wanted in titles


def test_dashboard_schema_refuses_a_panel_without_queries() -> None:
    dashboard = alerting.dashboard()
    del dashboard["panels"][0]["targets"]
    with pytest.raises(jsonschema.ValidationError, match="targets"):
        jsonschema.validate(dashboard, json.loads(DASHBOARD_SCHEMA.read_text()))


# --- the Kubernetes objects -------------------------------------------------------------------------------------------

def test_prometheus_rule_validates_against_the_operators_crd() -> None:
    rule = alerting.prometheus_rule("signpost", "ml", {"release": "kube-prometheus-stack"})
    validate_custom(rule, "prometheusrule-v1.json.gz")
    assert rule["spec"]["groups"] == yaml.safe_load((MONITORING / "rules.yaml").read_text())["groups"]
    broken = alerting.prometheus_rule("signpost", "ml", {})
    broken["spec"]["groups"][0]["rules"][0]["severity"] = "critical"  # belongs under labels
    with pytest.raises(jsonschema.ValidationError, match="severity"):
        validate_custom(broken, "prometheusrule-v1.json.gz")


def test_prometheus_rule_names_the_scrape_job() -> None:
    groups = alerting.prometheus_rule("signpost", "ml", {}, job="ml/signpost")["spec"]["groups"]
    exprs = [rule["expr"] for group in groups for rule in group["rules"]]
    assert 'up{job="ml/signpost"} == 0' in exprs
    assert not any('job="signpost"' in expr for expr in exprs)
    with pytest.raises(ValueError, match="job 'a\"b' is not valid: use "):
        alerting.prometheus_rule("signpost", "ml", {}, job='a"b')


def test_dashboard_configmap_is_a_valid_configmap_grafana_loads() -> None:
    configmap = alerting.dashboard_configmap("signpost-dashboard", "monitoring", {"app.kubernetes.io/name": "signpost"})
    validate(configmap)
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    (text,) = configmap["data"].values()
    assert json.loads(text) == json.loads((MONITORING / "dashboard.json").read_text())


@pytest.mark.parametrize(("name", "namespace", "labels", "problem"), [
    ("Signpost", "ml", {}, "name 'Signpost'"),
    ("signpost", "ml_team", {}, "namespace 'ml_team'"),
    ("signpost", "ml", {"release": "a b"}, "label release 'a b'"),
])
def test_bad_names_are_refused_naming_the_fix(name: str, namespace: str, labels: dict, problem: str) -> None:
    with pytest.raises(ValueError, match=f"{problem} is not valid: use "):
        alerting.prometheus_rule(name, namespace, labels)
    with pytest.raises(ValueError, match=f"{problem} is not valid: use "):
        alerting.dashboard_configmap(name, namespace, labels)
