"""The ``signpost`` command: one subcommand per stage, plus ``run`` for the whole chain.

Every subcommand takes ``--config FILE`` and ``key=value`` overrides. The CLI is the only place that prints;
errors the user can fix end in one line on stderr and a non-zero exit, without a traceback.

This module is the command and its parser; beside it:
- ``common``: the exit codes, and the config and progress setting every command reads from its arguments;
- ``commands``: one handler per subcommand: find its inputs, call its stage, print the outcome;
- ``inputs``: finding a command's inputs (the one given with --data/--model, else the newest of this experiment);
- ``output``: the printed summaries of prepare, evaluate, optimize and bench;
- ``__main__``: ``python -m signpost.cli``, which ``entry`` re-executes and torchrun runs.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

from signpost import GLIBC_TUNABLES, __version__
from signpost.artifacts import ArtifactError
from signpost.cli import commands
from signpost.cli.common import (
    EXIT_CANARY_WAIT,
    EXIT_DRIFT,
    EXIT_FAILURE,
    EXIT_GATE,
    EXIT_INTERRUPTED,
    EXIT_PARITY,
    EXIT_REGRESSION,
    EXIT_USAGE,
)
from signpost.cli.edge import add_edge_parser
from signpost.config import ConfigError

# The exit codes are the command's answer to scripts and CI: importable from here with main and entry.
__all__ = ["EXIT_CANARY_WAIT", "EXIT_DRIFT", "EXIT_FAILURE", "EXIT_GATE", "EXIT_INTERRUPTED", "EXIT_PARITY",
           "EXIT_REGRESSION", "EXIT_USAGE", "entry", "main"]


def entry() -> None:
    """The console script: start again once with the allocator settings (Linux/glibc), then run ``main``."""
    if sys.platform == "linux" and "GLIBC_TUNABLES" not in os.environ and "SIGNPOST_NO_REEXEC" not in os.environ:
        env = {**os.environ, "GLIBC_TUNABLES": GLIBC_TUNABLES}
        os.execve(sys.executable, [sys.executable, "-m", "signpost.cli", *sys.argv[1:]], env)
    sys.exit(main())


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``signpost`` console script."""
    parser = _build_parser()
    args = _parse(parser, argv)
    logging.basicConfig(
        level=logging.DEBUG
        if getattr(args, "verbose", False)
        else logging.WARNING
        if getattr(args, "quiet", False)
        else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    if not getattr(args, "verbose", False):
        # torch.export's own pytree internals, deserializing a saved program; nothing a user can act on.
        warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")
    if not hasattr(args, "handler"):
        parser.print_help()
        return EXIT_USAGE
    try:
        return args.handler(args)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted; nothing half-written was kept", file=sys.stderr)
        return EXIT_INTERRUPTED
    except ModuleNotFoundError as exc:
        # A device's install (`signpost[edge]`) has no MLflow, FastAPI or ONNX: the pipeline's commands say so.
        if exc.name is None or exc.name.split(".")[0] == "signpost":
            raise
        print(f"error: this command needs {exc.name}, which is not installed: pip install 'signpost[pipeline]' "
              "installs what every pipeline command needs", file=sys.stderr)
        return EXIT_FAILURE
    except (ArtifactError, OSError, ValueError, RuntimeError) as exc:
        # Stage errors (LayoutError, PrepareError, DownloadError, ...) subclass these and carry a full message.
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILURE


def _parse(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse ``argv``, taking ``key=value`` overrides wherever they stand among the options.

    argparse fills a ``nargs="*"`` positional from the first run of positionals only, so an override after an
    option comes back unrecognized (and ``parse_intermixed_args`` refuses subparsers). Such leftovers join the
    overrides in command-line order; ``load_config`` names any that is not ``key=value``. A leftover option stays
    argparse's usage error.
    """
    args, leftover = parser.parse_known_args(argv)
    options = [item for item in leftover if item.startswith("-")]
    if options or (leftover and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(options or leftover)}")
    if leftover:
        args.overrides = [*args.overrides, *leftover]
    return args


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="signpost",
        description="Signpost: an image-classification dataset to a trained, optimized, served and monitored model.",
    )
    parser.add_argument("--version", action="version", version=f"signpost {__version__}")
    sub = parser.add_subparsers(title="commands", metavar="COMMAND")

    prepare = _stage_parser(sub, "prepare", "decode a raw dataset once into a versioned uint8 tensor cache",
                            commands.prepare_command)
    prepare.add_argument(
        "--download", action="store_true", help="fetch data.archives (each pinned by content) into data.root first "
        "(same as data.source=download); data.base_url=URL fetches them from a mirror, the pins verified whatever "
        "the URL"
    )
    prepare.add_argument("--data-root", type=Path, help="the raw dataset folder (same as data.root=...)")

    train = _stage_parser(sub, "train", "train a model on prepared data (also under torchrun)", commands.train_command)
    train.add_argument("--data", type=Path, help="prepared data folder (default: the newest of this experiment, "
                       "made with its data settings)")
    train.add_argument("--resume", action="store_true", help="continue an interrupted run from its checkpoint")

    evaluate = _stage_parser(sub, "evaluate", "score a model on the test split and apply the gate",
                             commands.evaluate_command)
    evaluate.add_argument("--model", type=Path, help="model folder (default: the newest trained for this experiment)")
    evaluate.add_argument("--data", type=Path, help="prepared data folder (default: the model's own)")
    evaluate.add_argument("--served", nargs="?", const="http://127.0.0.1:8000", metavar="URL",
                          help="instead of scoring and gating, send the test files to the server at URL (default "
                          "%(const)s; SIGNPOST_API_KEY if it needs one), which must serve this model, and compare its "
                          "answers with evaluate's: exit 6 when top-1 differs by more than evaluate.max_served_gap")
    evaluate.add_argument("--concurrency", type=int, help="with --served: requests in flight at once (default 8)")
    evaluate.add_argument("--timeout", type=float, help="with --served: seconds a request may take (default 30)")

    optimize = _stage_parser(sub, "optimize", "make int8, pruned, distilled and exported variants of a model",
                             commands.optimize_command)
    optimize.add_argument("--model", type=Path, help="model folder (default: the newest trained for this experiment)")
    optimize.add_argument("--data", type=Path, help="prepared data folder (default: the model's own)")

    bench = _stage_parser(sub, "bench", "measure accuracy and speed of the variants across runtimes and math "
                          "settings; or compare two results", commands.bench_command)
    bench.add_argument("--optimized", type=Path, help="optimize folder (default: the newest of this experiment)")
    bench.add_argument("--data", type=Path, help="prepared data folder (default: the optimized model's own)")
    bench.add_argument("--profile", metavar="VARIANT/RUNTIME/MATH/BATCH",
                       help="write the op table and a Chrome trace of one cell, e.g. int8/compile/default/64")
    bench.add_argument("--compare", nargs=2, type=Path, metavar=("A.json", "B.json"),
                       help="compare two results files (or bench folders) instead of measuring")
    bench.add_argument("--threshold", type=float, default=0.10,
                       help="--compare: a cell more than this fraction slower in B is a regression (default 0.10)")

    serve = _stage_parser(sub, "serve", "serve a model over HTTP: predict, health, readiness, metrics",
                          commands.serve_command)
    serve.add_argument("--model", required=True,
                       help="a model folder (train/ or an optimize variant), a bench folder (serves its candidate), "
                       "or models:/<registered model>@<alias>")
    serve.add_argument("--host", help="interface to listen on (default serve.host, 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port (default serve.port, 8000)")
    serve.add_argument("--runtime",
                       choices=("auto", "eager", "compile", "aoti", "onnxruntime", "executorch", "openvino"),
                       help="how to run the model (default serve.runtime)")
    serve.add_argument("--canary", metavar="MODEL", help="canary mode: a second model (same forms as --model, e.g. "
                       "models:/<name>@challenger) answering serve.canary_share of the requests")

    package = _stage_parser(sub, "package", "write a container build context for a model; build and push the "
                            "multi-arch image; or (--target edge) a signed edge bundle", commands.package_command)
    package.add_argument("--target", choices=("image", "edge"), default="image",
                         help="image: a container build context (default); edge: a signed bundle of the model's "
                         "ExecuTorch program and its tarball, for `signpost edge update` on a device")
    package.add_argument("--model", help="a model folder, a bench folder (packages its candidate) or "
                         "models:/<name>@<alias> (default: the newest bench candidate, else the newest trained model)")
    package.add_argument("--runtime", choices=("auto", "eager", "onnxruntime", "executorch", "openvino", "aoti",
                                               "compile"), default="auto",
                         help="how the image runs the model (default: the candidate's if portable, else ONNX Runtime "
                         "when the model has ONNX, else eager)")
    package.add_argument("--build", action="store_true", help="build the image (docker buildx, buildah or podman)")
    package.add_argument("--push", metavar="REGISTRY/IMAGE:TAG", help="push the built image (implies --build)")
    package.add_argument("--platform", action="append", dest="platforms", metavar="OS/ARCH",
                         help="build for this platform (repeatable; default package.platforms)")
    package.add_argument("--engine", choices=("docker", "buildah", "podman"), help="default: the first that works")
    package.add_argument("--build-arg", action="append", default=[], metavar="KEY=VALUE",
                         help="a Dockerfile build argument, e.g. BASE_IMAGE=localhost/python:3.11 (repeatable)")
    package.add_argument("--volume", action="append", default=[], metavar="SRC:DST[:ro]",
                         help="mount a host folder into the build's RUN steps (buildah/podman; repeatable)")

    deploy = _stage_parser(sub, "deploy", "render the Kubernetes manifests of a pushed image (kustomize base + "
                           "overlays); apply them with a rollout check, a smoke test and rollback; promote a canary "
                           f"on the monitor's verdict (exit {EXIT_CANARY_WAIT}: not enough canary requests yet)",
                           commands.deploy_command)
    deploy.add_argument("--image", metavar="REGISTRY/NAME@sha256:DIGEST", help="the pushed image, by digest")
    deploy.add_argument("--package-result", type=Path, metavar="DIR", help="the `signpost package` folder the image "
                        "was built from: what it serves and its server config")
    deploy.add_argument("--canary-image", metavar="REGISTRY/NAME@sha256:DIGEST", help="the challenger's image")
    deploy.add_argument("--canary-package-result", type=Path, metavar="DIR", help="the challenger's package folder")
    deploy.add_argument("--out", type=Path, metavar="DIR", help="where the tree goes (default <workdir>/deploy)")
    deploy.add_argument("--overlay", choices=("plain", "canary", "kserve"), default="plain",
                        help="what --apply applies (default %(default)s)")
    deploy.add_argument("--namespace", help="default deploy.namespace")
    deploy.add_argument("--apply", action="store_true", help="kubectl apply -k, wait for the rollout, smoke-test, "
                        "roll back on failure (kubectl's current context)")
    deploy.add_argument("--smoke-url", help="the service's address for the smoke test (default: kubectl "
                        "port-forward on 127.0.0.1)")
    deploy.add_argument("--smoke-image", type=Path, metavar="FILE", help="an image the model classifies right")
    deploy.add_argument("--smoke-class", type=int, metavar="ID", help="its class id")
    deploy.add_argument("--promote-canary", action="store_true", help="decide on the canary of the tree in --out "
                        "from the prediction log: promote it, or delete it when worse")
    deploy.add_argument("--log", metavar="URL", help="--promote-canary: the prediction log (default: "
                        "$SIGNPOST_PREDICTION_LOG, else as monitor)")

    monitor = _stage_parser(sub, "monitor", "check the prediction log for drift and latency; alert; exit 5 when "
                            "retraining is needed", commands.monitor_command)
    window = monitor.add_mutually_exclusive_group()
    window.add_argument("--last", type=int, metavar="N", help="the newest N predictions (default monitor.window)")
    window.add_argument("--since", metavar="DURATION", help="predictions of the last 30m, 2h, 1d, ...")
    monitor.add_argument("--log", metavar="URL", help="prediction log SQLAlchemy URL (default: serve.prediction_log, "
                         "else the workdir's SQLite file)")
    monitor.add_argument("--data", type=Path, help="prepared data for the reference (default: the newest)")
    monitor.add_argument("--evaluation", type=Path, help="evaluation for the confidence reference (default: newest)")
    monitor.add_argument("--model", type=Path, help="model for the embedding reference and the feedback score "
                         "(default: the one the log's window names, else the newest trained)")
    monitor.add_argument("--no-alerts", action="store_true", help="report only; send no alerts")
    monitor.add_argument("--by", choices=["device"], help="device: also judge each device's records alone (drift, "
                         "confidence, latency) beside the fleet's")

    simulate = _stage_parser(sub, "simulate", "send clean then drifted traffic to a running service and monitor "
                             "each window", commands.simulate_command)
    simulate.add_argument("--url", default="http://127.0.0.1:8000", help="the service (default %(default)s)")
    simulate.add_argument("--data", type=Path, help="prepared data whose source files are sent (default: the newest)")
    simulate.add_argument("--per-window", type=int, default=500, help="requests per window (default 500)")
    simulate.add_argument("--clean-windows", type=int, default=4, help="undrifted windows first (default 4)")
    simulate.add_argument("--drifts", default="dark,blur,mix", help="drifted windows, in order (default %(default)s)")
    simulate.add_argument("--concurrency", type=int, default=8, help="concurrent requests (default 8)")
    simulate.add_argument("--log", metavar="URL", help="the service's prediction log (default: as monitor)")
    simulate.add_argument("--model", type=Path, help="model for the embedding reference (default: the one the "
                          "service logs)")
    simulate.add_argument("--feedback", type=int, default=0, metavar="N",
                          help="store N images of each drifted window, labelled, as feedback (default 0)")

    feedback_group = sub.add_parser("feedback", help="labelled images from production, for monitoring and training",
                                    description="labelled images from production, for monitoring and training")
    feedback = _stage_parser(feedback_group.add_subparsers(title="actions", metavar="ACTION", required=True), "add",
                             "store labelled images as a feedback batch", commands.feedback_command)
    feedback.add_argument("--images", nargs="+", type=Path, default=[], help="image files, all with --label")
    feedback.add_argument("--label", help="the class (id or name) of every --images file")
    feedback.add_argument("--csv", type=Path, help="a CSV with the header row path,label, then one row per image "
                          "(paths relative to the CSV)")
    feedback.add_argument("--data", type=Path, help="prepared data whose classes the labels name (default: newest)")

    promote = _stage_parser(sub, "promote", "move the registry's champion alias to the challenger; with --if-better "
                            "only when it beats the champion on the same data", commands.promote_command)
    promote.add_argument("--if-better", action="store_true",
                         help="decide the duel an evaluate with evaluate.promote=false left for later: score the "
                         "champion on the challenger's data and promote only when the challenger wins")
    promote.add_argument("--evaluation", type=Path,
                         help="--if-better: the challenger's evaluate folder (default: the newest of this experiment)")
    _stage_parser(sub, "rollback", "move the champion alias back to the previous champion", commands.rollback_command)

    keys_group = sub.add_parser("keys", help="Ed25519 keys that sign and verify model artifacts (SECURITY.md)",
                                description="Ed25519 keys that sign and verify model artifacts (SECURITY.md)")
    keys = keys_group.add_subparsers(title="actions", metavar="ACTION", required=True).add_parser(
        "generate", help="write a new key pair: NAME.key (private, mode 0600) and NAME.pub",
        description="write a new key pair: NAME.key (private, mode 0600) and NAME.pub")
    keys.add_argument("--out", type=Path, required=True, help="folder for the two files (never overwritten)")
    keys.add_argument("--name", default="signpost", help="file name stem (default %(default)s)")
    keys.set_defaults(handler=commands.keys_generate_command)

    add_edge_parser(sub)

    report_group = sub.add_parser("report", help="markdown from a run's files: the bench's job summary, a pull "
                                  "request's comment", description="markdown from a run's files, printed to stdout")
    reports = report_group.add_subparsers(title="actions", metavar="ACTION", required=True)
    summary = reports.add_parser("summary", help="the job summary of bench folders: oneDNN vs no-oneDNN per "
                                 "architecture, the profiler's top ops, x86-64 vs Arm64",
                                 description="the job summary of bench folders: oneDNN vs no-oneDNN per "
                                 "architecture, the profiler's top ops, x86-64 vs Arm64 ratios")
    summary.add_argument("--bench", type=Path, action="append", required=True, metavar="DIR",
                         help="a bench folder (repeatable: one per architecture)")
    summary.add_argument("--profile", type=Path, action="append", metavar="DIR",
                         help="a bench folder that profiled a bench's deployed cell (repeatable), shown with it")
    summary.set_defaults(handler=commands.report_command, report="summary")
    comment = reports.add_parser("pr-comment", help="a pull request's comment: gate, challenger vs champion, bench "
                                 "against main's, model card, links", description="a pull request's comment: gate, "
                                 "challenger vs champion, bench against main's, model card, links")
    comment.add_argument("--evaluation", type=Path, required=True, metavar="DIR", help="the evaluate folder")
    comment.add_argument("--bench", type=Path, metavar="DIR", help="this run's bench folder")
    comment.add_argument("--baseline", type=Path, metavar="RESULTS_JSON",
                         help="main's results.json (or bench folder) to compare the bench against")
    comment.add_argument("--run-url", metavar="URL", help="the workflow run, linked from the comment")
    comment.add_argument("--threshold", type=float, default=0.10,
                         help="a cell more than this fraction slower than the baseline's is a regression "
                         "(default 0.10)")
    comment.set_defaults(handler=commands.report_command, report="pr-comment")

    synth = _stage_parser(sub, "synth", "write a synthetic dataset in the official GTSRB file layout",
                          commands.synth_command)
    synth.add_argument("--out", type=Path, required=True, help="folder to write the dataset into (must be empty)")

    run = _stage_parser(sub, "run", "run the whole pipeline, skipping stages whose inputs are unchanged",
                        commands.run_command)
    run.add_argument("--data-root", type=Path, help="the raw dataset folder prepare reads (same as data.root=...)")
    return parser


def _stage_parser(
    sub: argparse._SubParsersAction, name: str, help_text: str, handler: Callable[[argparse.Namespace], int]
) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=help_text, description=help_text)
    p.add_argument("--config", "-c", type=Path, help="experiment YAML (configs/demo.yaml, configs/gtsrb.yaml, ...)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. data.image_size=48")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (they show only on a terminal)")
    p.add_argument("--allow-unsigned", action="store_true", help="load unsigned models although public keys are "
                   "configured (security.allow_unsigned; local experiments only, said loudly)")
    verbosity = p.add_mutually_exclusive_group()
    verbosity.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    verbosity.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    p.set_defaults(handler=handler)
    return p
