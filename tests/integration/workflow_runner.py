"""Run a GitHub Actions workflow's jobs for real on this machine, standing in only for what needs GitHub.

    run = WorkflowRun(ROOT / ".github/workflows/mlops.yml", ROOT, tmp_path, event="workflow_dispatch",
                      inputs={"config": "..."}, secrets={...})
    results = run.run()            # {"prepare": "success", "optimize (amd64)": "success", ...}

What runs for real: every ``run:`` step, with ``bash --noprofile --norc -eo pipefail`` as GitHub runs it, in a fresh
job workspace (a copy of the working tree: tracked and untracked, not ignored, files), with the workflow's, the
job's and the step's env, ``${{ }}`` values, and GITHUB_OUTPUT / GITHUB_ENV / GITHUB_PATH / GITHUB_STEP_SUMMARY.
Jobs run one at a time in ``needs`` order; a matrix (``include`` rows) runs every leg here.

What is stood in for, and how (the test and README "Run it on GitHub" say the same):

- the runner machine: this one, for every leg (an x86-64 machine stands in for the Arm64 runner too);
- ``actions/setup-python`` and the "Install Signpost" steps: this checkout's ``.venv`` is first on PATH (the package
  is installed there in editable mode, so ``signpost`` runs this working tree's code);
- ``actions/checkout``: the job workspace is filled with a copy of the working tree;
- ``actions/upload-artifact`` / ``download-artifact`` (v4 and later): a store folder per artifact name, hidden files
  left out (unless ``include-hidden-files: true``), an artifact name uploaded once per run, a download unpacked into
  ``path`` (``pattern`` without ``merge-multiple``: one sub-folder per artifact);
- ``actions/cache``: nothing (a cold cache every run, which the workflow must survive anyway);
- ``docker/setup-buildx-action`` and ``docker/login-action``: nothing; ``docker/build-push-action``: the build context
  is recorded under its tag (and given a digest, the sha256 of its files, when pushed); the ``docker`` command on
  PATH is :func:`docker_standin`: ``docker run`` serves the recorded context's model with ``signpost serve`` on the
  published loopback port (the same config and model the image would run; tests/integration/test_container.py proves
  the image itself builds, starts and answers), ``docker logs``/``rm`` read and stop it, and ``docker buildx
  imagetools`` records the tags it would create (``inspect --format`` answers a digest for that index);
- GitHub environments (a job's ``environment:``, where a team requires a reviewer): nothing, the job runs at once;
- the cluster: no ``SIGNPOST_KUBECONFIG`` secret is given, so the deploy job takes its render-only path (``--apply``
  runs the real kubectl against a stand-in API server in tests/stages/test_deploy.py);
- the ``gh`` command (GitHub's REST API: workflow runs, their artifacts, issue comments): the ``gh`` on PATH is
  tests/integration/gh_standin.py over the folder ``github`` (main's runs and their artifacts, a pull request's
  comments), which lives across runs when a test passes the same one;
- the event: ``event_payload`` is ``github.event`` (a pull request's ``{"pull_request": {"number": 7}}``), and
  ``changed`` the files its commit changes (path: text), written over the checkout's copy of the working tree.

Anything else (another action, an ``if:`` this runner does not know, an expression it cannot read) fails loudly,
naming it. No pickle, no network beyond loopback.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

STEP_TIMEOUT_S = 300  # one step, seconds: each demo-data stage here takes under a minute, so only a hang hits it
SHELL = ["bash", "--noprofile", "--norc", "-eo", "pipefail"]
EXPRESSION = re.compile(r"\$\{\{\s*(.*?)\s*\}\}")
# Steps that install what this machine already has in the checkout's .venv, by step name.
INSTALL_STEPS = {"Install Signpost"}
# Host variables that must not leak into a job: a job sees only the secrets and vars the workflow passes it.
_PRIVATE_PREFIXES = ("MLFLOW_", "SIGNPOST_", "GITHUB_", "RUNNER_")


class WorkflowError(RuntimeError):
    """Something in the workflow this runner cannot run faithfully; the message names it."""


# --- `if:` conditions: an explicit table of the ones the workflows use, not an expression engine ----------------


@dataclass
class Status:
    """What an ``if:`` can ask: the event, the results of the job's needs, and whether everything before succeeded."""

    event: str
    needs: dict[str, str]
    ok: bool  # job level: every need succeeded; step level: no earlier step failed
    outputs: dict[str, dict[str, str]] = field(default_factory=dict)  # the needs' job outputs, by job


CONDITIONS = {
    # No `if:` means success(): the needs (or the earlier steps) all succeeded.
    "": lambda s: s.ok,
    "always()": lambda s: True,
    "!cancelled()": lambda s: True,  # nothing is ever cancelled here
    # A condition without a status function is GitHub's `success() && (...)`.
    "github.event_name != 'pull_request'": lambda s: s.ok and s.event != "pull_request",
    "!cancelled() && github.event_name == 'pull_request'": lambda s: s.event == "pull_request",
    "needs.bench.result == 'success'": lambda s: s.ok and s.needs.get("bench") == "success",
    "github.event_name != 'pull_request' && needs.promote.outputs.deploy == 'true'":
        lambda s: s.ok and s.event != "pull_request" and s.outputs.get("promote", {}).get("deploy") == "true",
}


def condition(text: str | None, status: Status) -> bool:
    """Whether a job or step with ``if: text`` runs; ``WorkflowError`` for a condition not in the table."""
    key = EXPRESSION.sub(lambda m: m.group(1), str(text or "")).strip()
    if key not in CONDITIONS:
        raise WorkflowError(f"if: {text!r} is not one this runner knows; add it to CONDITIONS in {__file__}")
    return bool(CONDITIONS[key](status))


# --- `${{ }}` values: context lookups, quoted strings, ==/!=, && and || (JavaScript's truthiness) ---------------


def evaluate(expression: str, contexts: dict[str, Any]) -> Any:
    """The value of one expression such as ``inputs.config || 'configs/demo.yaml'``."""
    for operator, pick in (("||", lambda a: bool(a)), ("&&", lambda a: not a)):
        parts = _split(expression, operator)
        if len(parts) > 1:
            value = evaluate(parts[0], contexts)
            for part in parts[1:]:
                if pick(value):  # `a || b` stops at a truthy a; `a && b` stops at a falsy a
                    return value
                value = evaluate(part, contexts)
            return value
    for operator in ("!=", "=="):
        left, found, right = expression.partition(operator)
        if found:
            equal = str(evaluate(left.strip(), contexts)) == str(evaluate(right.strip(), contexts))
            return equal if operator == "==" else not equal
    expression = expression.strip()
    if len(expression) >= 2 and expression[0] == expression[-1] == "'":
        return expression[1:-1].replace("''", "'")
    if re.fullmatch(r"[A-Za-z_][\w-]*(\.[\w-]+)*", expression):
        value: Any = contexts
        for name in expression.split("."):
            if not isinstance(value, dict):
                raise WorkflowError(f"${{{{ {expression} }}}}: {name!r} is not in a context here")
            value = value.get(name, "")
        return value
    raise WorkflowError(f"${{{{ {expression} }}}} is not an expression this runner can read")


def _split(expression: str, operator: str) -> list[str]:
    """``expression`` split at ``operator`` outside quoted strings."""
    parts, quoted, start, i = [], False, 0, 0
    while i < len(expression):
        if expression[i] == "'":
            quoted = not quoted
        elif not quoted and expression.startswith(operator, i):
            parts.append(expression[start:i])
            start = i = i + len(operator)
            continue
        i += 1
    return [*parts, expression[start:]]


def substitute(value: Any, contexts: dict[str, Any]) -> str:
    """``value`` with every ``${{ }}`` replaced by its value (as GitHub writes it into a string)."""
    def one(match: re.Match[str]) -> str:
        result = evaluate(match.group(1), contexts)
        return ("true" if result else "false") if isinstance(result, bool) else str(result)

    text = str(value).lower() if isinstance(value, bool) else str(value)
    return EXPRESSION.sub(one, text)


# --- the workflow -----------------------------------------------------------------------------------------------


@dataclass
class Job:
    """One job, or one leg of a matrix job."""

    id: str
    name: str  # "bench (amd64)" for a matrix leg
    spec: dict[str, Any]
    matrix: dict[str, Any] = field(default_factory=dict)


def load_workflow(path: Path) -> dict[str, Any]:
    workflow = yaml.safe_load(path.read_text(encoding="utf-8"))
    workflow["on"] = workflow.pop(True, workflow.get("on"))  # YAML 1.1 reads the key `on` as the boolean true
    return workflow


def _needs(spec: dict[str, Any]) -> list[str]:
    needs = spec.get("needs", [])
    return [needs] if isinstance(needs, str) else list(needs)


def ordered_jobs(workflow: dict[str, Any]) -> list[Job]:
    """Every job (matrix legs expanded) in an order where each comes after all of its ``needs``; among jobs that
    are ready together, the file's order."""
    specs: dict[str, dict[str, Any]] = workflow["jobs"]
    done: list[str] = []
    while len(done) < len(specs):
        ready = [name for name, spec in specs.items()
                 if name not in done and all(need in done for need in _needs(spec))]
        if not ready:
            raise WorkflowError(f"jobs {sorted(set(specs) - set(done))} need each other or a job that does not exist")
        done.append(ready[0])
    jobs = []
    for name in done:
        spec = specs[name]
        matrix = spec.get("strategy", {}).get("matrix")
        if matrix is None:
            jobs.append(Job(name, name, spec))
            continue
        if set(matrix) != {"include"}:
            raise WorkflowError(f"job {name}: only `matrix: include:` rows are supported, not {sorted(matrix)}")
        for row in matrix["include"]:
            jobs.append(Job(name, f"{name} ({', '.join(str(v) for k, v in row.items() if k != 'runner')})", spec, row))
    return jobs


def combined_result(results: list[str]) -> str:
    """A matrix job's result from its legs' results, as ``needs.<job>.result`` reports it."""
    for result in ("failure", "success"):
        if result in results:
            return result
    return "skipped"


# --- running it -------------------------------------------------------------------------------------------------


@dataclass
class WorkflowRun:
    """One run of ``workflow`` on ``event``; everything it writes lives under ``work``."""

    workflow_path: Path
    repo: Path
    work: Path
    event: str = "workflow_dispatch"
    inputs: dict[str, str] = field(default_factory=dict)
    secrets: dict[str, str] = field(default_factory=dict)
    vars: dict[str, str] = field(default_factory=dict)
    venv_bin: Path = Path(sys.executable).parent
    before_job: Callable[[str], None] | None = None  # called with each job's name before it runs (a test's probe)
    event_payload: dict[str, Any] = field(default_factory=dict)  # github.event
    github: Path | None = None  # the gh stand-in's state (default: work/github)
    changed: dict[str, str] = field(default_factory=dict)  # files the pushed commit changes: path -> text
    order: list[str] = field(default_factory=list)  # the job names, in the order they ran (skipped ones left out)
    job_outputs: dict[str, dict[str, str]] = field(default_factory=dict)  # each job's `outputs:`, by job id

    def run(self) -> dict[str, str]:
        """Run every job; the result of each (``success``, ``failure`` or ``skipped``), by job or leg name."""
        workflow = load_workflow(self.workflow_path)
        self.store = self.work / "artifacts-store"
        self.docker = self.work / "docker"
        self.summary = self.work / "summary.md"
        self.github = self.github or self.work / "github"
        for folder in (self.store, self.docker / "images", self.docker / "containers", self.github):
            folder.mkdir(parents=True, exist_ok=True)
        self.summary.touch()
        self.snapshot = self._snapshot()
        for name, text in self.changed.items():  # the commit under test, on top of the working tree
            (self.snapshot / name).parent.mkdir(parents=True, exist_ok=True)
            (self.snapshot / name).write_text(text, encoding="utf-8")
        results: dict[str, str] = {}
        legs: dict[str, list[str]] = {}
        try:
            for job in ordered_jobs(workflow):
                needs = {name: combined_result(legs[name]) for name in _needs(job.spec)}
                status = Status(self.event, needs, ok=all(r == "success" for r in needs.values()),
                                outputs={name: self.job_outputs.get(name, {}) for name in needs})
                if condition(job.spec.get("if"), status):
                    if self.before_job is not None:
                        self.before_job(job.name)
                    results[job.name] = self._job(workflow, job, needs)
                    self.order.append(job.name)
                else:
                    results[job.name] = "skipped"
                legs.setdefault(job.id, []).append(results[job.name])
        finally:
            self._stop_containers()
        return results

    def _snapshot(self) -> Path:
        """The working tree as a checkout sees it: tracked and untracked files that git does not ignore."""
        listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                                cwd=self.repo, capture_output=True, check=True).stdout.decode()
        snapshot = self.work / "checkout"
        for name in filter(None, listed.split("\0")):
            source = self.repo / name
            if source.is_file():  # a tracked file deleted in the working tree is not in a checkout of it either
                (snapshot / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(source, snapshot / name)
        return snapshot

    def _job(self, workflow: dict[str, Any], job: Job, needs: dict[str, str]) -> str:
        slug = re.sub(r"[^\w.-]+", "-", job.name).strip("-")
        root = self.work / "jobs" / slug
        workspace, temp = root / "workspace", root / "temp"
        workspace.mkdir(parents=True)
        temp.mkdir()
        bin_dir = root / "bin"
        bin_dir.mkdir()
        shims = {"docker": f'"{Path(__file__)}" docker', "gh": f'"{Path(__file__).with_name("gh_standin.py")}"'}
        for name, command in shims.items():
            (bin_dir / name).write_text(f'#!/bin/sh\nexec "{sys.executable}" {command} "$@"\n', encoding="utf-8")
            (bin_dir / name).chmod(0o755)
        contexts: dict[str, Any] = {
            "inputs": self.inputs, "secrets": self.secrets, "vars": self.vars, "matrix": job.matrix,
            "needs": {name: {"result": result, "outputs": self.job_outputs.get(name, {})}
                      for name, result in needs.items()},
            "runner": {"temp": str(temp), "os": "Linux", "arch": "X64"},
            "github": {"event_name": self.event, "workflow": workflow.get("name", ""), "repository": "team/signpost",
                       "repository_owner": "team", "actor": "signpost-bot", "token": "stand-in-token",
                       "server_url": "https://github.com", "run_id": "1", "ref": "refs/heads/main",
                       "sha": "0" * 40, "workspace": str(workspace), "event": self.event_payload},
            "steps": {},
        }
        env = {k: v for k, v in os.environ.items() if not k.startswith(_PRIVATE_PREFIXES)}
        env |= {
            "CI": "true", "GITHUB_ACTIONS": "true", "GITHUB_WORKSPACE": str(workspace), "RUNNER_TEMP": str(temp),
            "GITHUB_EVENT_NAME": self.event, "GITHUB_REPOSITORY": "team/signpost", "GITHUB_REPOSITORY_OWNER": "team",
            "GITHUB_JOB": job.id, "GITHUB_RUN_ID": "1", "GITHUB_SHA": "0" * 40,
            "SIGNPOST_DOCKER_STANDIN": str(self.docker), "SIGNPOST_GH_STANDIN": str(self.github),
            "PATH": os.pathsep.join([str(bin_dir), str(self.venv_bin), env.get("PATH", "")]),
        }
        for scope in (workflow.get("env", {}), job.spec.get("env", {})):
            env |= {key: substitute(value, contexts) for key, value in scope.items()}
        summary = root / "step_summary.md"
        failed = False
        for index, step in enumerate(job.spec.get("steps", [])):
            status = Status(self.event, needs, ok=not failed)
            if not condition(step.get("if"), status):
                continue
            name = step.get("name") or step.get("uses") or step["run"].splitlines()[0]
            outputs = {}
            try:
                if "uses" in step:
                    outputs = self._action(step, contexts, workspace)
                elif name in INSTALL_STEPS:
                    pass  # stand-in: the checkout's .venv, first on PATH, has Signpost and its dependencies
                else:
                    outputs = self._script(step, contexts, env, workspace, root / f"step-{index}", summary)
            except StepFailed as exc:
                failed = True
                with (root / "failure.txt").open("a", encoding="utf-8") as failures:  # every failed step, in order
                    failures.write(f"{name}: {exc}\n")
            if "id" in step:
                contexts["steps"][step["id"]] = {"outputs": outputs}
        # The job's outputs (`needs.<job>.outputs.*` in the jobs after it), from its steps' outputs.
        self.job_outputs[job.id] = {key: substitute(str(value), contexts)
                                    for key, value in job.spec.get("outputs", {}).items()}
        if summary.is_file() and summary.stat().st_size:
            with self.summary.open("a", encoding="utf-8") as out:
                out.write(f"<!-- job: {job.name} -->\n{summary.read_text(encoding='utf-8')}\n")
        return "failure" if failed else "success"

    def _script(self, step: dict[str, Any], contexts: dict[str, Any], env: dict[str, str], workspace: Path,
                files: Path, summary: Path) -> dict[str, str]:
        """Run one ``run:`` step; its outputs. GITHUB_ENV and GITHUB_PATH additions go into ``env`` for the rest."""
        files.mkdir()
        paths = {key: files / key.lower() for key in ("GITHUB_OUTPUT", "GITHUB_ENV", "GITHUB_PATH")}
        for path in paths.values():
            path.touch()
        step_env = env | {key: substitute(value, contexts) for key, value in step.get("env", {}).items()}
        step_env |= {key: str(path) for key, path in paths.items()} | {"GITHUB_STEP_SUMMARY": str(summary)}
        script = files / "script.sh"
        script.write_text(step["run"], encoding="utf-8")
        with (files / "log.txt").open("w", encoding="utf-8") as log:
            try:
                done = subprocess.run([*SHELL, str(script)], cwd=workspace, env=step_env, stdout=log,
                                      stderr=subprocess.STDOUT, timeout=STEP_TIMEOUT_S)
            except subprocess.TimeoutExpired as exc:
                raise StepFailed(f"still running after {STEP_TIMEOUT_S} s; log: {files / 'log.txt'}") from exc
        if done.returncode != 0:
            tail = (files / "log.txt").read_text(encoding="utf-8", errors="replace")[-3000:]
            raise StepFailed(f"exit {done.returncode}; log {files / 'log.txt'} ends:\n{tail}")
        env |= _key_values(paths["GITHUB_ENV"].read_text(encoding="utf-8"))
        for line in paths["GITHUB_PATH"].read_text(encoding="utf-8").splitlines():
            env["PATH"] = f"{line}{os.pathsep}{env['PATH']}"
        return _key_values(paths["GITHUB_OUTPUT"].read_text(encoding="utf-8"))

    def _action(self, step: dict[str, Any], contexts: dict[str, Any], workspace: Path) -> dict[str, str]:
        """Stand in for one ``uses:`` step; its outputs."""
        action, _, version = step["uses"].partition("@")
        if action == "actions/checkout":
            shutil.copytree(self.snapshot, workspace, dirs_exist_ok=True)
            return {}
        if action in ("actions/setup-python", "actions/cache", "docker/setup-buildx-action", "docker/login-action"):
            return {}  # stand-ins: the .venv on PATH; a cold cache; no builder or registry to set up or log in to
        with_ = {key: substitute(value, contexts) for key, value in step.get("with", {}).items()}
        if action in ("actions/upload-artifact", "actions/download-artifact"):
            if int(version.lstrip("v").split(".")[0]) < 4:
                raise WorkflowError(f"{step['uses']}: this runner has v4 semantics only")
            if action == "actions/upload-artifact":
                self._upload(with_, workspace)
            else:
                self._download(with_, workspace)
            return {}
        if action == "docker/build-push-action":
            return build_push_standin(with_, workspace, self.docker)
        raise WorkflowError(f"uses: {step['uses']} has no stand-in here; add one to WorkflowRun._action")

    def _upload(self, with_: dict[str, str], workspace: Path) -> None:
        name, source = with_.get("name", "artifact"), workspace / with_["path"]
        target = self.store / name
        if target.exists():
            raise StepFailed(f"upload-artifact: an artifact named {name!r} was already uploaded in this run")
        # A folder's contents go to the artifact's root; a single file goes there by its name.
        root = source.parent if source.is_file() else source
        files = [source] if source.is_file() else sorted(p for p in source.rglob("*") if p.is_file())
        # v4.4 and later leave hidden files (and files in hidden folders) out unless include-hidden-files is true.
        if str(with_.get("include-hidden-files", "false")).lower() != "true":
            files = [p for p in files if not any(part.startswith(".") for part in p.relative_to(root).parts)]
        if not files:
            if with_.get("if-no-files-found", "warn") == "error":
                raise StepFailed(f"upload-artifact: no files found at {with_['path']} for {name!r}")
            return
        for path in files:
            (target / path.relative_to(root)).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, target / path.relative_to(root))

    def _download(self, with_: dict[str, str], workspace: Path) -> None:
        destination = workspace / with_.get("path", ".")
        if "name" in with_:
            if not (self.store / with_["name"]).is_dir():
                raise StepFailed(f"download-artifact: no artifact named {with_['name']!r} in this run")
            shutil.copytree(self.store / with_["name"], destination, dirs_exist_ok=True)
            return
        merge = with_.get("merge-multiple") == "true"
        for artifact in sorted(self.store.iterdir()):
            if fnmatch.fnmatchcase(artifact.name, with_.get("pattern", "*")):
                shutil.copytree(artifact, destination if merge else destination / artifact.name, dirs_exist_ok=True)

    def _stop_containers(self) -> None:
        for pid_file in (self.docker / "containers").glob("*.pid"):
            _stop(int(pid_file.read_text()))


class StepFailed(RuntimeError):
    """A step that failed as it would on GitHub (its job fails; the run goes on by the `if:` rules)."""


def _key_values(text: str) -> dict[str, str]:
    """GITHUB_OUTPUT / GITHUB_ENV lines: ``key=value`` and ``key<<DELIMITER`` ... ``DELIMITER``."""
    values, lines = {}, iter(text.splitlines())
    for line in lines:
        if "<<" in line and ("=" not in line or line.index("<<") < line.index("=")):
            key, delimiter = line.split("<<", 1)
            body = []
            for inner in lines:
                if inner == delimiter:
                    break
                body.append(inner)
            values[key] = "\n".join(body)
        elif "=" in line:
            key, value = line.split("=", 1)
            values[key] = value
    return values


# --- docker stand-ins -------------------------------------------------------------------------------------------


def build_push_standin(with_: dict[str, str], workspace: Path, state: Path) -> dict[str, str]:
    """docker/build-push-action: record the build context under each tag; a push gets the context's digest."""
    context = (workspace / with_["context"]).resolve()
    if not (context / "Dockerfile").is_file():
        raise StepFailed(f"build-push-action: no Dockerfile in the context {context}")
    digest = hashlib.sha256()
    for path in sorted(p for p in context.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(context)).encode() + b"\0" + path.read_bytes())
    image = {"context": str(context), "labels": with_.get("labels", ""), "platforms": with_.get("platforms", ""),
             "digest": f"sha256:{digest.hexdigest()}", "outputs": with_.get("outputs", "")}
    for tag in with_.get("tags", "").split():
        (state / "images" / f"{_slug(tag)}.json").write_text(json.dumps(image), encoding="utf-8")
    pushed = "push=true" in with_.get("outputs", "") or with_.get("push") == "true"
    if pushed:
        with (state / "pushed.jsonl").open("a", encoding="utf-8") as log:
            log.write(json.dumps(image) + "\n")
    return {"digest": image["digest"]} if pushed else {}


def _slug(text: str) -> str:
    return re.sub(r"[^\w.-]+", "_", text)


def _stop(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)
    os.killpg(pid, signal.SIGKILL)


def docker_standin(argv: list[str]) -> int:
    """The ``docker`` command in a job: the subcommands the workflow runs, nothing else."""
    state = Path(os.environ["SIGNPOST_DOCKER_STANDIN"])
    containers = state / "containers"
    if argv[:1] == ["run"]:
        args = argv[1:]
        name, publish = _option(args, "--name"), _option(args, "--publish")
        if "--detach" in args:
            args.remove("--detach")
        if len(args) != 1 or not name or not publish:
            return _refuse(argv, "docker run --detach --name NAME --publish 127.0.0.1:PORT:8000 IMAGE")
        host, port, _ = publish.split(":")
        image_file = state / "images" / f"{_slug(args[0])}.json"
        if host != "127.0.0.1" or not image_file.is_file():
            return _refuse(argv, f"an image built in this job, published on 127.0.0.1 (no {image_file.name})")
        context = Path(json.loads(image_file.read_text(encoding="utf-8"))["context"])
        root = containers / name
        if root.exists():
            return _refuse(argv, f"a container name not in use ({name} is: `docker rm --force {name}` first)")
        # The image's own command (Dockerfile CMD) over the context's files, laid out where the image has them: the
        # model folder keeps its path (its name is the model version the server reports).
        model = root / "srv" / "artifacts" / json.loads((context.parent / "manifest.json").read_text(
            encoding="utf-8"))["image"]["model_path"]
        shutil.copytree(context / "model", model)
        command = ["signpost", "serve", "--config", str(context / "signpost.yaml"), "--model", str(model),
                   "--host", host, "--port", port, f"workdir={root / 'var' / 'lib' / 'signpost'}"]
        if (context / "keys" / "trusted.pub").is_file():
            command.append(f"security.public_keys=[{context / 'keys' / 'trusted.pub'}]")
        log = (containers / f"{name}.log").open("w", encoding="utf-8")
        server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                  env={k: v for k, v in os.environ.items() if not k.startswith("SIGNPOST_SIGNING")})
        (containers / f"{name}.pid").write_text(str(server.pid), encoding="utf-8")
        print(name)
        return 0
    if argv[:1] == ["logs"] and len(argv) == 2:
        print((containers / f"{argv[1]}.log").read_text(encoding="utf-8"), end="")
        return 0
    if argv[:2] == ["rm", "--force"] and len(argv) == 3:
        pid_file = containers / f"{argv[2]}.pid"
        if pid_file.is_file():
            _stop(int(pid_file.read_text()))
            pid_file.unlink()
        shutil.rmtree(containers / argv[2], ignore_errors=True)
        return 0
    if argv[:3] == ["buildx", "imagetools", "create"]:
        with (state / "imagetools.jsonl").open("a", encoding="utf-8") as log:
            log.write(json.dumps(argv[3:]) + "\n")
        return 0
    if argv[:3] == ["buildx", "imagetools", "inspect"]:
        if "--format" in argv:  # the index the last create made: its digest stands in for the registry's
            created = (state / "imagetools.jsonl").read_text(encoding="utf-8").splitlines()[-1]
            print(json.dumps(f"sha256:{hashlib.sha256(created.encode()).hexdigest()}"))
        return 0
    return _refuse(argv, "run, logs, rm --force, buildx imagetools create/inspect")


def _option(args: list[str], name: str) -> str | None:
    if name not in args:
        return None
    index = args.index(name)
    value = args[index + 1]
    del args[index:index + 2]
    return value


def _refuse(argv: list[str], supported: str) -> int:
    print(f"docker stand-in: `docker {' '.join(argv)}` is not supported here (supported: {supported})",
          file=sys.stderr)
    return 2


if __name__ == "__main__":
    if sys.argv[1:2] != ["docker"]:
        print(f"usage: {sys.argv[0]} docker ARGS... (the docker stand-in a job's PATH names)", file=sys.stderr)
        sys.exit(2)
    sys.exit(docker_standin(sys.argv[2:]))
