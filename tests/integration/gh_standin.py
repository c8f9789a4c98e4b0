"""The ``gh`` command in a workflow job run by tests/integration/workflow_runner.py: the GitHub CLI calls mlops.yml's
comment job makes, answered from a state folder instead of GitHub's REST API. Nothing else.

    gh run list --workflow W --branch B --status S --limit N --json databaseId --jq EXPR
        GET /repos/{owner}/{repo}/actions/workflows/{W}/runs?branch=B&status=S: the runs in ``runs.json``
        (``[{"databaseId": 7, "workflow": "mlops.yml", "branch": "main", "status": "success"}, ...]``), newest
        (largest id) first.
    gh run download RUN --name NAME --dir DIR
        GET /repos/{owner}/{repo}/actions/runs/{RUN}/artifacts and the artifact's archive: ``runs/RUN/NAME/``'s
        files copied into DIR, as gh unpacks a single named artifact there.
    gh api [--paginate] repos/{owner}/{repo}/issues/{N}/comments --jq EXPR
        GET "List issue comments": the comments in ``comments.json`` on that issue, oldest first.
    gh api --method POST repos/{owner}/{repo}/issues/{N}/comments -F body=@FILE
        POST "Create an issue comment"; prints the new comment.
    gh api --method PATCH repos/{owner}/{repo}/issues/comments/{ID} -F body=@FILE
        PATCH "Update an issue comment"; prints the comment.

``--jq`` takes only the two expressions the workflow writes (``.[0].databaseId // empty`` and
``.[] | select(.body | startswith("MARKER")) | .id``), evaluated here as jq would; any other is refused, as is any
other command or flag. Like gh it needs ``GH_TOKEN``. The state folder is ``$SIGNPOST_GH_STANDIN``; every call is
appended to its ``calls.jsonl`` so a test can check what the job asked for.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Any

_FIRST_ID = ".[0].databaseId // empty"
_MARKED = re.compile(r'^\.\[\] \| select\(\.body \| startswith\(("(?:[^"\\]|\\.)*")\)\) \| \.id$')
_COMMENTS = re.compile(r"^repos/([\w.-]+/[\w.-]+)/issues/(\d+)/comments$")
_COMMENT = re.compile(r"^repos/([\w.-]+/[\w.-]+)/issues/comments/(\d+)$")


class Refused(Exception):
    """A call this stand-in does not answer; the message says what it does answer."""


def main(argv: list[str]) -> int:
    state = Path(os.environ["SIGNPOST_GH_STANDIN"])
    with (state / "calls.jsonl").open("a", encoding="utf-8") as log:
        log.write(json.dumps(argv) + "\n")
    if not os.environ.get("GH_TOKEN"):
        print("gh: To use GitHub CLI in a GitHub Actions workflow, set the GH_TOKEN environment variable.",
              file=sys.stderr)
        return 4
    try:
        if argv[:2] == ["run", "list"]:
            return _run_list(state, argv[2:])
        if argv[:2] == ["run", "download"]:
            return _run_download(state, argv[2:])
        if argv[:1] == ["api"]:
            return _api(state, argv[1:])
    except Refused as exc:
        print(f"gh stand-in: `gh {' '.join(argv)}`: {exc}", file=sys.stderr)
        return 2
    print(f"gh stand-in: `gh {' '.join(argv)}` is not supported (run list, run download, api)", file=sys.stderr)
    return 2


def _options(args: list[str], names: set[str],
             switches: frozenset[str] = frozenset()) -> tuple[dict[str, Any], list[str]]:
    """``--name value`` options (the last of each wins, except ``-F``, which gathers) and the positional rest."""
    found: dict[str, Any] = {}
    rest, i = [], 0
    while i < len(args):
        if args[i] in switches:
            found[args[i]] = True
            i += 1
        elif args[i] in names:
            if i + 1 >= len(args):
                raise Refused(f"{args[i]} needs a value")
            if args[i] == "-F":
                found.setdefault("-F", []).append(args[i + 1])
            else:
                found[args[i]] = args[i + 1]
            i += 2
        elif args[i].startswith("-"):
            raise Refused(f"the flag {args[i]} is not one the workflow uses")
        else:
            rest.append(args[i])
            i += 1
    return found, rest


def _jq(expression: str, value: Any) -> list[str]:
    """The lines gh prints for ``--jq expression`` over ``value`` (strings raw, as gh's jq prints them)."""
    if expression == _FIRST_ID:
        first = value[0].get("databaseId") if value else None
        return [] if first is None or first is False else [str(first)]
    if (match := _MARKED.match(expression)) is not None:
        prefix = json.loads(match.group(1))
        return [str(item["id"]) for item in value if str(item["body"]).startswith(prefix)]
    raise Refused(f"--jq {expression!r} is not an expression this stand-in evaluates ({_FIRST_ID!r} and "
                  "'.[] | select(.body | startswith(\"...\")) | .id')")


def _print(value: Any, jq: str | None) -> int:
    for line in _jq(jq, value) if jq is not None else [json.dumps(value)]:
        print(line)
    return 0


def _run_list(state: Path, args: list[str]) -> int:
    found, rest = _options(args, {"--workflow", "--branch", "--status", "--limit", "--json", "--jq"})
    if rest or found.get("--json") != "databaseId":
        raise Refused("only `--json databaseId` and the --workflow/--branch/--status/--limit filters")
    runs = json.loads((state / "runs.json").read_text(encoding="utf-8")) if (state / "runs.json").is_file() else []
    keys = {"--workflow": "workflow", "--branch": "branch", "--status": "status"}
    chosen = [run for run in runs if all(run[key] == found[flag] for flag, key in keys.items() if flag in found)]
    chosen.sort(key=lambda run: run["databaseId"], reverse=True)
    limit = int(found.get("--limit", 20))
    return _print([{"databaseId": run["databaseId"]} for run in chosen[:limit]], found.get("--jq"))


def _run_download(state: Path, args: list[str]) -> int:
    found, rest = _options(args, {"--name", "--dir"})
    if len(rest) != 1 or "--name" not in found:
        raise Refused("only `gh run download RUN --name NAME [--dir DIR]`")
    artifact = state / "runs" / rest[0] / found["--name"]
    if not artifact.is_dir():
        print(f"no artifact matches any of the names or patterns provided: {found['--name']} (run {rest[0]})",
              file=sys.stderr)
        return 1
    shutil.copytree(artifact, Path(found.get("--dir", ".")), dirs_exist_ok=True)
    return 0


def _api(state: Path, args: list[str]) -> int:
    found, rest = _options(args, {"--method", "--jq", "-F"}, frozenset({"--paginate"}))
    if len(rest) != 1:
        raise Refused("one endpoint, e.g. repos/OWNER/REPO/issues/7/comments")
    fields = {}
    for field in found.get("-F", []):
        name, _, value = field.partition("=")
        if not value.startswith("@"):
            raise Refused(f"-F {field}: only name=@FILE fields")
        fields[name] = Path(value[1:]).read_text(encoding="utf-8")  # gh reads @FILE's contents
    method = found.get("--method", "POST" if fields else "GET")  # as gh: fields make a POST unless told
    path = state / "comments.json"
    comments = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else []
    if method == "GET" and (match := _COMMENTS.match(rest[0])):
        on = [c for c in comments if c["issue"] == f"{match.group(1)}#{match.group(2)}"]
        return _print([{"id": c["id"], "body": c["body"]} for c in on], found.get("--jq"))
    if method == "POST" and (match := _COMMENTS.match(rest[0])) and set(fields) == {"body"}:
        comment = {"id": max((c["id"] for c in comments), default=1000) + 1,
                   "issue": f"{match.group(1)}#{match.group(2)}", "body": fields["body"], "updates": 0}
        comments.append(comment)
    elif method == "PATCH" and (match := _COMMENT.match(rest[0])) and set(fields) == {"body"}:
        comment = next((c for c in comments if c["id"] == int(match.group(2))), None)
        if comment is None:
            print(f"gh: Not Found (HTTP 404) {rest[0]}", file=sys.stderr)
            return 1
        comment["body"], comment["updates"] = fields["body"], comment["updates"] + 1
    else:
        raise Refused(f"{method} {rest[0]} with fields {sorted(fields)}: only GET/POST .../issues/N/comments and "
                      "PATCH .../issues/comments/ID with -F body=@FILE")
    path.write_text(json.dumps(comments, indent=1), encoding="utf-8")
    return _print({"id": comment["id"], "body": comment["body"]}, found.get("--jq"))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
