"""The ``signpost`` command: one subcommand per stage, plus ``run`` for the whole chain.

Every subcommand takes ``--config FILE`` and ``key=value`` overrides. The CLI is the only place that prints;
errors the user can fix end in one line on stderr and a non-zero exit, without a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from signpost import GLIBC_TUNABLES, __version__
from signpost.artifacts import ArtifactError, find_artifact
from signpost.config import ConfigError, SignpostConfig, load_config

if TYPE_CHECKING:  # the stages import torch and MLflow: loaded only by the commands that need them
    from signpost.contracts import BenchResults, VariantRow
    from signpost.registry import ModelVersion
    from signpost.stages.evaluate import EvaluateResult
    from signpost.stages.promote import Decision

EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_GATE = 3  # the model was evaluated and failed the gate
EXIT_REGRESSION = 4  # bench --compare found B slower than A beyond the threshold
EXIT_DRIFT = 5  # monitor: the window drifted; retraining is needed
EXIT_PARITY = 6  # evaluate --served: the server's top-1 differs from evaluate's by more than evaluate.max_served_gap
EXIT_INTERRUPTED = 130


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

    prepare = _stage_parser(sub, "prepare", "decode a raw dataset once into a versioned uint8 tensor cache", _prepare)
    prepare.add_argument(
        "--download", action="store_true", help="fetch the official GTSRB archives into data.root first, from "
        "data.base_url (a mirror works: the official checksums are verified whatever the URL)"
    )
    prepare.add_argument("--data-root", type=Path, help="the raw dataset folder (same as data.root=...)")

    train = _stage_parser(sub, "train", "train a model on prepared data (also under torchrun)", _train)
    train.add_argument("--data", type=Path, help="prepared data folder (default: the newest of this experiment, "
                       "made with its data settings)")
    train.add_argument("--resume", action="store_true", help="continue an interrupted run from its checkpoint")

    evaluate = _stage_parser(sub, "evaluate", "score a model on the test split and apply the gate", _evaluate)
    evaluate.add_argument("--model", type=Path, help="model folder (default: the newest trained for this experiment)")
    evaluate.add_argument("--data", type=Path, help="prepared data folder (default: the model's own)")
    evaluate.add_argument("--served", nargs="?", const="http://127.0.0.1:8000", metavar="URL",
                          help="instead of scoring and gating, send the test files to the server at URL (default "
                          "%(const)s; SIGNPOST_API_KEY if it needs one), which must serve this model, and compare its "
                          "answers with evaluate's: exit 6 when top-1 differs by more than evaluate.max_served_gap")
    evaluate.add_argument("--concurrency", type=int, help="with --served: requests in flight at once (default 8)")
    evaluate.add_argument("--timeout", type=float, help="with --served: seconds a request may take (default 30)")

    optimize = _stage_parser(sub, "optimize", "make int8, pruned, distilled and exported variants of a model",
                             _optimize)
    optimize.add_argument("--model", type=Path, help="model folder (default: the newest trained for this experiment)")
    optimize.add_argument("--data", type=Path, help="prepared data folder (default: the model's own)")

    bench = _stage_parser(sub, "bench", "measure accuracy and speed of the variants across runtimes and math "
                          "settings; or compare two results", _bench)
    bench.add_argument("--optimized", type=Path, help="optimize folder (default: the newest of this experiment)")
    bench.add_argument("--data", type=Path, help="prepared data folder (default: the optimized model's own)")
    bench.add_argument("--profile", metavar="VARIANT/RUNTIME/MATH/BATCH",
                       help="write the op table and a Chrome trace of one cell, e.g. int8/compile/default/64")
    bench.add_argument("--compare", nargs=2, type=Path, metavar=("A.json", "B.json"),
                       help="compare two results files (or bench folders) instead of measuring")
    bench.add_argument("--threshold", type=float, default=0.10,
                       help="--compare: a cell more than this fraction slower in B is a regression (default 0.10)")

    serve = _stage_parser(sub, "serve", "serve a model over HTTP: predict, health, readiness, metrics", _serve)
    serve.add_argument("--model", required=True,
                       help="a model folder (train/ or an optimize variant), a bench folder (serves its candidate), "
                       "or models:/<registered model>@<alias>")
    serve.add_argument("--host", help="interface to listen on (default serve.host, 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port (default serve.port, 8000)")
    serve.add_argument("--runtime", choices=("auto", "eager", "compile", "aoti", "onnxruntime"),
                       help="how to run the model (default serve.runtime)")
    serve.add_argument("--canary", metavar="MODEL", help="canary mode: a second model (same forms as --model, e.g. "
                       "models:/<name>@challenger) answering serve.canary_share of the requests")

    package = _stage_parser(sub, "package", "write a container build context for a model; build and push the "
                            "multi-arch image", _package)
    package.add_argument("--model", help="a model folder, a bench folder (packages its candidate) or "
                         "models:/<name>@<alias> (default: the newest bench candidate, else the newest trained model)")
    package.add_argument("--runtime", choices=("auto", "eager", "onnxruntime", "aoti", "compile"), default="auto",
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

    monitor = _stage_parser(sub, "monitor", "check the prediction log for drift and latency; alert; exit 5 when "
                            "retraining is needed", _monitor)
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

    simulate = _stage_parser(sub, "simulate", "send clean then drifted traffic to a running service and monitor "
                             "each window", _simulate)
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
                             "store labelled images as a feedback batch", _feedback)
    feedback.add_argument("--images", nargs="+", type=Path, default=[], help="image files, all with --label")
    feedback.add_argument("--label", help="the class (id or name) of every --images file")
    feedback.add_argument("--csv", type=Path, help="a CSV with the header row path,label, then one row per image "
                          "(paths relative to the CSV)")
    feedback.add_argument("--data", type=Path, help="prepared data whose classes the labels name (default: newest)")

    _stage_parser(sub, "promote", "move the registry's champion alias to the challenger", _promote)
    _stage_parser(sub, "rollback", "move the champion alias back to the previous champion", _rollback)

    keys_group = sub.add_parser("keys", help="Ed25519 keys that sign and verify model artifacts (SECURITY.md)",
                                description="Ed25519 keys that sign and verify model artifacts (SECURITY.md)")
    keys = keys_group.add_subparsers(title="actions", metavar="ACTION", required=True).add_parser(
        "generate", help="write a new key pair: NAME.key (private, mode 0600) and NAME.pub",
        description="write a new key pair: NAME.key (private, mode 0600) and NAME.pub")
    keys.add_argument("--out", type=Path, required=True, help="folder for the two files (never overwritten)")
    keys.add_argument("--name", default="signpost", help="file name stem (default %(default)s)")
    keys.set_defaults(handler=_keys_generate)

    synth = _stage_parser(sub, "synth", "write a synthetic dataset in the official GTSRB file layout", _synth)
    synth.add_argument("--out", type=Path, required=True, help="folder to write the dataset into (must be empty)")

    run = _stage_parser(sub, "run", "run the whole pipeline, skipping stages whose inputs are unchanged", _run)
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


def _progress(args: argparse.Namespace) -> bool:
    """Progress bars on a terminal only: in CI logs every redraw would become a line."""
    return not args.no_progress and sys.stderr.isatty()


def _config(args: argparse.Namespace, extra: Sequence[str] = ()) -> SignpostConfig:
    """The config with its overrides, and this process's signing policy set from it (``signpost.signing``)."""
    from signpost import signing

    unsigned = ["security.allow_unsigned=true"] if getattr(args, "allow_unsigned", False) else []
    config = load_config(args.config, [*args.overrides, *extra, *unsigned])
    policy = signing.configure_from(config.security)
    if policy.enforced and config.security.allow_unsigned:
        print("warning: --allow-unsigned: unsigned models will be loaded although public keys are configured; "
              "for local experiments only", file=sys.stderr)
    return config


def _prepare(args: argparse.Namespace) -> int:
    from signpost.stages.prepare import prepare

    config = _config_with_data_root(args, ["data.source=download"] if args.download else [], fetch="--download")
    result = prepare(config, progress=_progress(args))
    _print_prepared(result.path, result.reused, result.manifest)
    return 0


def _config_with_data_root(
    args: argparse.Namespace, extra: Sequence[str] = (), *, fetch: str = "data.source=download"
) -> SignpostConfig:
    """The config with ``--data-root`` as data.root (prepare, run); a folder named either way that a synthetic
    source would ignore is refused, ``fetch`` being how this command downloads into it."""
    root = [f"data.root={args.data_root}"] if args.data_root is not None else []
    config = _config(args, [*extra, *root])
    roots = [item for item in args.overrides if item.partition("=")[0].strip() == "data.root"]
    given = f"--data-root {args.data_root}" if args.data_root is not None else (roots[-1] if roots else None)
    if given and config.data.source == "synthetic":
        # The synthetic source generates its own data: a folder named here would be silently left unread.
        raise ConfigError(f"{given} is ignored because data.source is synthetic"
                          f"{f' in {args.config}' if args.config else ''}: "
                          f"add data.source=local to read that folder as it is (or {fetch} to fetch GTSRB into "
                          "it), or leave the folder out for generated data")
    return config


def _print_prepared(path: Path, reused: bool, manifest: dict) -> None:
    data = manifest.get("dataset", {})
    metrics = manifest.get("metrics", {})
    verb = "reused" if reused else "wrote"
    print(f"prepare: {verb} {path} ({'inputs unchanged' if reused else 'new inputs'})")
    print(
        f"  {data.get('layout')} layout, {data.get('num_classes')} classes, "
        f"train {metrics.get('train_images')} / val {metrics.get('val_images')} / test {metrics.get('test_images')} "
        f"images at {data.get('image_size')}px"
    )
    skipped = manifest.get("skipped", [])
    if skipped:
        print(f"  skipped {len(skipped)} unreadable image(s), listed in {path / 'manifest.json'}")
    timing = manifest.get("timing", {})
    if not reused and timing:
        print(f"  decoded {timing['images']} images in {timing['seconds']:.2f} s ({timing['images_per_s']:.0f}/s)")


def _train(args: argparse.Namespace) -> int:
    from signpost.stages.train import train
    from signpost.tracking import run_factory
    from signpost.training import TrainingInterrupted

    config = _config(args)
    data = _given("train", "data", args.data, "--data") or _newest_data(config, "train")
    try:
        result = train(config, data_dir=data, resume=args.resume, progress=_progress(args),
                       tracking=run_factory(config))
    except TrainingInterrupted as exc:
        print(f"train: {exc}", file=sys.stderr)
        return EXIT_INTERRUPTED
    if not result.manifest:  # a torchrun rank other than 0: rank 0 reports
        return 0
    metrics = result.manifest["metrics"]
    verb = "reused" if result.reused else "wrote"
    print(f"train: {verb} {result.path}")
    print(f"  best val accuracy {metrics['val_acc']:.4f} at epoch {metrics['best_epoch']:.0f}")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from signpost.stages.promote import evaluate_and_register

    config = _config(args)
    if args.served is None and (args.concurrency is not None or args.timeout is not None):
        raise ConfigError("--concurrency and --timeout set how `evaluate --served URL` sends the test files: add "
                          "--served URL, or leave them out")
    model = _given("evaluate", "train", args.model, "--model") or _newest(config, "evaluate", "train",
                                                                          "signpost train", "--model")
    data = _given("evaluate", "data", args.data, "--data") or _model_data(config, model, "evaluate")
    if args.served is not None:
        return _served_parity(args, config, model, data)
    result, version, decision = evaluate_and_register(config, model_dir=model, data_dir=data,
                                                      progress=_progress(args))
    _print_evaluation(result, version, decision)
    return 0 if result.passed else EXIT_GATE


def _served_parity(args: argparse.Namespace, config: SignpostConfig, model: Path, data: Path) -> int:
    """``evaluate --served``: the running server's answers on the test files against evaluate's; nothing written."""
    from signpost.stages.evaluate import served_parity

    result = served_parity(config, model_dir=model, data_dir=data, url=args.served,
                           concurrency=8 if args.concurrency is None else args.concurrency,
                           timeout_s=30.0 if args.timeout is None else args.timeout,
                           api_key=os.environ.get("SIGNPOST_API_KEY"), progress=_progress(args))
    print(f"evaluate --served: {result.url} serves {result.served_version} ({result.runtime}), the model evaluated")
    print(f"  {result.images} test files: served top-1 {result.served_top1:.4f}, evaluated top-1 "
          f"{result.evaluated_top1:.4f}, {result.gap_points:.2f} points apart; agreement {result.agreement:.2%}"
          + (f"; {result.failed} not classified" if result.failed else ""))
    for row in result.disagreements:
        print(f"    {row['file']}: label {row['label']}, served {row['served']}, evaluated {row['evaluated']}")
    if result.passed:
        print(f"  parity: passed (within evaluate.max_served_gap {result.max_gap:g} points)")
        return 0
    print(f"  parity: FAILED: {result.gap_points:.2f} points > evaluate.max_served_gap {result.max_gap:g}")
    return EXIT_PARITY


def _optimize(args: argparse.Namespace) -> int:
    from signpost.stages.optimize import optimize
    from signpost.tracking import run_factory

    config = _config(args)
    model = _given("optimize", "train", args.model, "--model") or _newest(config, "optimize", "train",
                                                                          "signpost train", "--model")
    data = _given("optimize", "data", args.data, "--data") or _model_data(config, model, "optimize")
    result = optimize(config, model_dir=model, data_dir=data, progress=_progress(args), tracking=run_factory(config))
    _print_variants(result.path, result.reused, result.variants)
    return 0


def _bench(args: argparse.Namespace) -> int:
    from signpost.report.bench_table import compare
    from signpost.stages.bench import bench
    from signpost.tracking import run_factory

    if args.compare:
        report, regressed = compare(*args.compare, threshold=args.threshold)
        print(report)
        return EXIT_REGRESSION if regressed else 0
    config = _config(args)
    optimized = _given("bench", "optimize", args.optimized, "--optimized") or _newest(
        config, "bench", "optimize", "signpost optimize", "--optimized")
    data = _given("bench", "data", args.data, "--data") or _optimized_data(config, optimized)
    result = bench(config, optimize_dir=optimized, data_dir=data, profile=args.profile, progress=_progress(args),
                   tracking=run_factory(config))
    _print_bench(result.path, result.reused, result.results)
    return 0


def _print_bench(path: Path, reused: bool, results: BenchResults) -> None:
    rows = results.rows
    failed = [r for r in rows if r["status"] == "failed"]
    print(f"bench: {'reused' if reused else 'wrote'} {path} ({len(rows)} rows, {len(failed)} failed cells)")
    print(f"  table: {path / 'results.md'}; chart: {path / 'chart.png'}")
    for r in failed:
        print(f"  failed: {r['variant']}/{r['runtime']}/{r['math']}: {r['reason']}")
    timed = [r for r in rows if r["status"] != "failed"]
    unstable = sum(not r.get("stable", True) for r in timed)
    stability = results.stability
    print(f"  stability: {unstable} of {len(timed)} timed rows unstable ({stability.unstable_first_pass} "
          f"before {stability.repeat_passes} repeat passes of {stability.repeat_measurements} cell measurements; "
          f"{stability.stopped})")
    if unstable:
        print(f"warning: {unstable} of {len(timed)} timed rows are unstable: their figures and ratios swing from run "
              "to run (the stable column of results.md)", file=sys.stderr)
    candidate = results.candidate
    if candidate:
        print(f"  deployable: {candidate.variant} on {candidate.runtime} ({candidate.math}) — {candidate.reason}")
        if candidate.stable is False:
            print(f"warning: the deployable was chosen from an unstable timing ({unstable} of {len(timed)} rows "
                  "unstable, none stable at its batch size)", file=sys.stderr)
    else:
        print("  deployable: none (no variant within the accuracy budget was measured at the deploy batch size)")
    keys = ("variant", "runtime", "math", "threads", "batch")
    for batch, best in results.candidates_by_batch.items():
        if best:
            row = next(r for r in timed if all(r[k] == getattr(best, k) for k in keys))
            ratio = f", {row['speedup']:.1f}x eager fp32 ±{100 * row['speedup_spread']:.1f}%" if row["speedup"] else ""
            print(f"  fastest at batch {batch}: {best.variant} on {best.runtime} ({best.math}), "
                  f"{best.images_per_s:,.0f} images/s ±{100 * row['spread']:.1f}%{ratio}"
                  f"{'' if best.stable is not False else ' (UNSTABLE)'}")


def _optimized_data(config: SignpostConfig, optimized: Path) -> Path:
    """The prepared data the optimized model was made from, as its manifest names it."""
    from signpost.artifacts import read_manifest

    data = config.workdir / "data" / read_manifest(optimized)["inputs"]["data"]
    print(f"bench: data {data} (the variants were made from it)")
    return data


def _print_variants(path: Path, reused: bool, variants: list[VariantRow]) -> None:
    print(f"optimize: {'reused' if reused else 'wrote'} {path}")
    print(f"  {'variant':14} {'status':9} {'val':>7} {'test':>7} {'size':>9} {'MFLOP':>6}  forms / reason")
    for v in variants:
        size = "-" if v.size_bytes is None else f"{v.size_bytes / 1024:.0f} KiB"
        mflops = "-" if v.mflops is None else f"{v.mflops:.1f}"
        status = v.status if v.role != "control" else "control"
        detail = v.reason or ", ".join(v.forms)
        print(f"  {v.name:14} {status:9} {_pct(v.val_acc):>7} {_pct(v.test_acc):>7} {size:>9} {mflops:>6}  "
              f"{detail}")


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}%"


def _model_data(config: SignpostConfig, model: Path, who: str) -> Path:
    """The prepared data a model was trained on, as its card names it."""
    from signpost.artifacts import read_manifest
    from signpost.models.artifact import CARD

    read_manifest(model, signed=True)  # a missing, unfinished or unsigned folder is a clear error here
    card = json.loads((model / CARD).read_text(encoding="utf-8"))
    data = config.workdir / "data" / card["data_artifact"]
    print(f"{who}: data {data} (the model was trained on it, says its card)")
    return data


def _print_evaluation(
    result: EvaluateResult, version: ModelVersion | None, decision: Decision | None = None
) -> None:
    metrics = result.report.metrics
    verb = "reused" if result.reused else "wrote"
    print(f"evaluate: {verb} {result.path}")
    print(f"  top-1 {metrics['top1']:.4f}, top-5 {metrics['top5']:.4f}, macro-F1 {metrics['macro_f1']:.4f}, "
          f"ECE {metrics['ece']:.4f}")
    if feedback := result.report.feedback:
        print(f"  held-out feedback: top-1 {feedback.top1:.4f} on {feedback.images} images")
    if result.passed:
        print("  gate: passed" + (f"; registered {version.name} v{version.version} as challenger" if version else ""))
    else:
        print("  gate: FAILED")
        for failure in result.failures:
            print(f"    - {failure}")
    if decision is not None and version is not None:
        if decision.promoted:
            print(f"  promoted {version.name} v{decision.challenger} to champion: {decision.reason}")
        else:
            print(f"  {version.name} v{decision.champion} stays champion (v{decision.challenger} stays challenger): "
                  f"{decision.reason}")


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from signpost.serve.app import create_app
    from signpost.serve.server import uvicorn_config

    extra = [f"serve.{key}={value}" for key, value in (("host", args.host), ("port", args.port)) if value is not None]
    config = _config(args, extra)
    app = create_app(config, args.model, runtime=args.runtime, canary=args.canary)
    canary = f" with canary {args.canary} ({config.serve.canary_share:.0%} of requests)" if args.canary else ""
    print(f"serve: {args.model}{canary} on http://{config.serve.host}:{config.serve.port} (docs at /docs); "
          "Ctrl-C stops")
    # uvicorn turns SIGTERM and SIGINT into a graceful shutdown: open requests are answered, then the app's
    # shutdown writes every queued prediction record. Slow, idle and surplus clients are bounded by serve.*.
    server = uvicorn.Server(uvicorn_config(app, config, log_level="warning" if args.quiet else "info",
                                           access_log=bool(args.verbose), timeout_graceful_shutdown=30))
    with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C, after the graceful shutdown: a normal end
        server.run()
    if not server.started:
        print(f"error: the server did not start on {config.serve.host}:{config.serve.port} (the log above says why)",
              file=sys.stderr)
        return EXIT_FAILURE
    return 0


def _package(args: argparse.Namespace) -> int:
    from signpost.stages.package import build_image, package

    config = _config(args)
    model = (_given("package", "train", args.model, "--model") or _latest(config, "package", "bench", "--model")[0]
             or _newest(config, "package", "train", "signpost train", "--model"))
    build_args = {}
    for item in args.build_arg:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--build-arg {item!r}: expected KEY=VALUE")
        build_args[key] = value
    result = package(config, model=str(model), runtime=args.runtime)
    image = result.manifest["image"]
    print(f"package: {'reused' if result.reused else 'wrote'} {result.context}")
    print(f"  serves {result.manifest['inputs']['model']} on {image['runtime']} ({image['runtime_reason']})")
    print(f"  tags: {', '.join(image['tags'])}; platforms: {', '.join(args.platforms or image['platforms'])}")
    if args.build or args.push or config.package.build:
        build_image(result, config, engine=args.engine, platforms=args.platforms, build_args=build_args,
                    volumes=args.volume, push=args.push)
        print(f"  built {', '.join(result.images)}" + (f"; pushed {result.pushed}" if result.pushed else ""))
    else:
        print(f"  build it: docker buildx build --platform {','.join(image['platforms'])} -t "
              f"{image['name']}:{image['tags'][0]} {result.context}   (or signpost package --build)")
    return 0


def _monitor(args: argparse.Namespace) -> int:
    from signpost.serve import predlog
    from signpost.stages.monitor import monitor, served_model_dir, since_seconds

    config = _config(args)
    since = since_seconds(args.since) if args.since else None
    if args.log:
        predlog.check_log(args.log)  # a log named by hand must exist: opening would create a mistyped one
    url = args.log or config.serve.prediction_log or predlog.default_url(config.workdir)
    window = None if since is not None else (args.last or config.monitor.window)
    model = _given("monitor", "train", args.model, "--model") or _served(
        served_model_dir(config, url, last=window, since=since)) or _latest(config, "monitor", "train", "--model")[0]
    result = monitor(
        config, data_dir=_given("monitor", "data", args.data, "--data") or _newest_data(config, "monitor"),
        log_url=url, last=args.last, since=since,
        evaluation_dir=_given("monitor", "evaluate", args.evaluation, "--evaluation") or _latest(
            config, "monitor", "evaluate", "--evaluation")[0],
        model_dir=model, alerts=not args.no_alerts,
    )
    r = result.report
    verdict, checks = r.verdict, r.checks
    print(f"monitor: {r.rows:,} predictions -> {result.path / 'report.html'}")
    if r.experiment and r.experiment.skipped_total:  # a log shared with other experiments, or an older Signpost's
        print(f"  {r.experiment.note}")
    if checks is None:  # too few predictions to judge
        print(f"  {verdict.note}")
        return 0
    p, i, e, h = checks.prediction_drift, checks.input_drift, checks.embedding_drift, checks.health
    print(f"  predictions: class PSI {p.class_psi:.3f}, JS {p.class_js:.3f}, mean confidence "
          f"{p.mean_confidence:.3f}{' — DRIFT' if p.drifted else ''}")
    drifted = [name for name, f in i.features.items() if f.drifted]
    listed = f": {', '.join(drifted)}" if drifted else ""
    print(f"  inputs: {len(drifted)} of {len(i.features)} statistics drifted{listed}{' — DRIFT' if i.drifted else ''}")
    print(f"  embeddings: {'DRIFT' if e.drifted else e.note or 'stable'}")
    print(f"  latency p99 {h.latency_p99_ms:.1f} ms (SLO {h.slo_ms:.0f} ms)"
          f"{' — BREACHED' if h.latency_breached else ''}; errors {h.error_rate:.1%}"
          f"{' — BREACHED' if h.errors_breached else ''}")
    for version, m in (r.models.versions if r.models else {}).items():
        canary = f"; {m.verdict}" if m.verdict is not None else ""  # the main model has no verdict
        print(f"  model {version} ({m.role}): {m.records} predictions ({m.share:.0%}), mean confidence "
              f"{m.mean_confidence:.3f}, p99 {m.latency_p99_ms:.1f} ms{canary}")
    for alert in r.alerts or []:
        print(f"  alert {alert.status} {alert.incident} -> {alert.sink}: {'sent' if alert.ok else alert.error}")
    q = r.quality
    if q.accuracy is not None:
        print(f"  feedback: accuracy {q.accuracy:.3f} on {q.images} labelled images it was not trained on "
              f"(evaluation {q.baseline if q.baseline is not None else '-'}){' — DROP' if q.dropped else ''}")
    reasons = ", ".join(verdict.reasons)
    print(f"  verdict: {f'retrain ({reasons})' if verdict.retrain else 'no retraining needed'}")
    return EXIT_DRIFT if verdict.retrain else 0


def _simulate(args: argparse.Namespace) -> int:
    from signpost.stages.simulate import simulate, summary

    config = _config(args)
    windows = simulate(
        config, url=args.url, data_dir=_given("simulate", "data", args.data, "--data") or _newest_data(config,
                                                                                                     "simulate"),
        per_window=args.per_window, clean_windows=args.clean_windows,
        drifts=tuple(d for d in args.drifts.split(",") if d), concurrency=args.concurrency,
        api_key=os.environ.get("SIGNPOST_API_KEY"), log_url=args.log,
        evaluation_dir=_latest(config, "simulate", "evaluate", None)[0],
        model_dir=args.model, feedback=args.feedback,
    )
    print(f"{'window':>6}  {'traffic':8} {'sent':>5} {'failed':>6}  monitor")
    for i, w in enumerate(windows, 1):
        said = f"DRIFT: {', '.join(w.reasons)}" if w.retrain else "no drift"
        print(f"{i:>6}  {w.kind:8} {w.sent:>5} {w.failed:>6}  {said}" + (f"; alerts: {'; '.join(w.alerts)}"
                                                                          if w.alerts else ""))
    s = summary(windows)
    print(f"false alarms: {s['false_alarms']} of {s['clean_windows']} clean windows "
          f"({s['false_alarm_rate']:.0%}); drift detected: "
          + ", ".join(f"{k} {'yes' if v else 'NO'}" for k, v in s["detected"].items()))
    return 0 if s["all_detected"] and s["false_alarms"] == 0 else EXIT_FAILURE


def _feedback(args: argparse.Namespace) -> int:
    from signpost.stages.feedback import add_feedback, read_items

    config = _config(args)
    if bool(args.images) == bool(args.csv) or (args.images and args.label is None):
        raise ConfigError("feedback add: give --images FILE ... with --label CLASS, or --csv FILE")
    items = read_items(args.csv) if args.csv else [(path, args.label) for path in args.images]
    data = _given("feedback", "data", args.data, "--data") or _newest_data(config, "feedback")
    result = add_feedback(config, data_dir=data, items=items)
    classes = ", ".join(f"{name} ×{n}" for name, n in result.manifest.get("classes", {}).items())
    print(f"feedback: {'already stored' if result.reused else 'stored'} {result.manifest['metrics']['images']} "
          f"images in {result.path} ({classes})")
    return 0


def _promote(args: argparse.Namespace) -> int:
    from signpost.registry import Registry

    config = _config(args)
    version = Registry(config.tracking, config.workdir).promote()
    print(f"promote: {version.name} v{version.version} is now the champion")
    return 0


def _rollback(args: argparse.Namespace) -> int:
    from signpost.registry import Registry

    config = _config(args)
    version = Registry(config.tracking, config.workdir).rollback()
    print(f"rollback: {version.name} v{version.version} is the champion again")
    return 0


# What each stage's artifact is to the command that reads it.
_INPUT = {"data": "data", "train": "model", "evaluate": "evaluation", "optimize": "variants", "bench": "bench"}


def _given(who: str, stage: str, path: Path | str | None, option: str) -> Path | None:
    """The input artifact the user named with ``option``, printed as the one used (None when not given)."""
    if path is None:
        return None
    print(f"{who}: {_INPUT[stage]} {path} ({option})")
    return Path(path)


def _latest(
    config: SignpostConfig, who: str, stage: str, option: str | None, settings: dict | None = None
) -> tuple[Path | None, list[str]]:
    """The newest ``stage`` artifact of this experiment (its manifest names it; with ``settings``, made with them),
    printed with why it was picked, and each newer look-alike passed over with the option that picks it instead."""
    found, passed_over = find_artifact(config.workdir, stage, config.name, settings)
    if found is not None:
        print(f"{who}: {_INPUT[stage]} {found} (newest for experiment {config.name})")
        for miss in passed_over:
            print(f"  passed over {miss}" + (f": pass it with {option} to use it" if option else ""))
    return found, passed_over


def _newest(
    config: SignpostConfig, who: str, stage: str, command: str, option: str, settings: dict | None = None
) -> Path:
    """``_latest``, required: none is an error naming what was found instead and how to use it."""
    found, passed_over = _latest(config, who, stage, option, settings)
    if found is None:
        which = " made with this config's settings" if settings is not None else ""
        seen = f"; found {', '.join(passed_over)}: pass one with {option} to use it" if passed_over else ""
        raise ArtifactError(f"no {stage} artifact of experiment {config.name!r}{which} in {config.workdir}: run "
                            f"`{command}` first{seen}")
    return found


def _served(model: Path | None) -> Path | None:
    """The model the prediction log names, printed as monitor's input when there is one."""
    if model is not None:
        print(f"monitor: model {model} (it made most of the window's predictions)")
    return model


def _newest_data(config: SignpostConfig, who: str) -> Path:
    """The newest prepared data of this experiment made with this config's data settings: another experiment's, or
    this one's prepared with other settings, would silently train or compare on other images."""
    from signpost.stages.prepare import data_settings

    return _newest(config, who, "data", "signpost prepare", "--data", data_settings(config))


def _keys_generate(args: argparse.Namespace) -> int:
    from signpost import signing

    private, public = signing.generate(args.out, args.name)
    key = signing.load_public_keys(public.read_bytes(), str(public))
    print(f"keys: wrote {private} (private: keep it secret; CI reads it from ${signing.SIGNING_KEY_ENV}) and {public} "
          f"(public, key id {next(iter(key))}: list it in security.public_keys or ${signing.PUBLIC_KEYS_ENV})")
    return 0


def _synth(args: argparse.Namespace) -> int:
    from signpost.data.synthetic import generate_gtsrb

    config = _config(args)
    summary = generate_gtsrb(args.out, config.data.synthetic, progress=_progress(args))
    print(
        f"synth: wrote {summary.train_images} training and {summary.test_images} test images "
        f"({len(summary.class_counts)} classes) in the GTSRB layout under {summary.root}"
    )
    return 0


def _run(args: argparse.Namespace) -> int:
    from signpost.stages.pipeline import run_pipeline

    config = _config_with_data_root(args)
    result = run_pipeline(config, progress=_progress(args))
    for outcome in result.outcomes:
        state = "skipped" if outcome.skipped else "ran"
        print(f"{outcome.stage:>8}: {state:7} ({outcome.reason}) -> {outcome.path}")
        if outcome.used:
            print(f"{'':>8}  input: {outcome.used}")
    _print_evaluation(result.evaluation, result.registered, result.promotion)
    if result.registered is None and result.registry:
        print(f"  registry: {result.registry}")
    if result.candidate:
        c = result.candidate
        print(f"deployable: {c.variant} on {c.runtime} ({c.math}) — {c.reason}")
    print(f"report: {result.report}")
    return 0 if result.evaluation.passed else EXIT_GATE


if __name__ == "__main__":
    entry()
