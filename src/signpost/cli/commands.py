"""The command handlers, one per subcommand: find the command's inputs, call its stage (imported when the command
runs: the stages import torch and MLflow), print the outcome and return the exit code. ``<name>_command`` handles
``signpost <name>``."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from signpost.cli.common import (
    EXIT_CANARY_WAIT,
    EXIT_DRIFT,
    EXIT_FAILURE,
    EXIT_GATE,
    EXIT_INTERRUPTED,
    EXIT_PARITY,
    EXIT_REGRESSION,
    config_from_args,
    progress,
)
from signpost.cli.inputs import given, latest, model_data, newest, newest_data, optimized_data, served
from signpost.cli.output import print_bench, print_decision, print_evaluation, print_prepared, print_variants
from signpost.config import ConfigError, SignpostConfig


def prepare_command(args: argparse.Namespace) -> int:
    from signpost.stages.prepare import prepare

    config = _config_with_data_root(args, ["data.source=download"] if args.download else [], fetch="--download")
    result = prepare(config, progress=progress(args))
    print_prepared(result.path, result.reused, result.manifest)
    return 0


def _config_with_data_root(
    args: argparse.Namespace, extra: Sequence[str] = (), *, fetch: str = "data.source=download"
) -> SignpostConfig:
    """The config with ``--data-root`` as data.root (prepare, run); a folder named either way that a synthetic
    source would ignore is refused, ``fetch`` being how this command downloads into it."""
    root = [f"data.root={args.data_root}"] if args.data_root is not None else []
    config = config_from_args(args, [*extra, *root])
    roots = [item for item in args.overrides if item.partition("=")[0].strip() == "data.root"]
    named = f"--data-root {args.data_root}" if args.data_root is not None else (roots[-1] if roots else None)
    if named and config.data.source == "synthetic":
        # The synthetic source generates its own data: a folder named here would be silently left unread.
        raise ConfigError(f"{named} is ignored because data.source is synthetic"
                          f"{f' in {args.config}' if args.config else ''}: "
                          f"add data.source=local to read that folder as it is (or {fetch} to fetch GTSRB into "
                          "it), or leave the folder out for generated data")
    return config


def train_command(args: argparse.Namespace) -> int:
    from signpost.stages.train import train
    from signpost.tracking import run_factory
    from signpost.training import TrainingInterrupted

    config = config_from_args(args)
    data = given("train", "data", args.data, "--data") or newest_data(config, "train")
    try:
        result = train(config, data_dir=data, resume=args.resume, progress=progress(args),
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


def evaluate_command(args: argparse.Namespace) -> int:
    from signpost.stages.promote import evaluate_and_register

    config = config_from_args(args)
    if args.served is None and (args.concurrency is not None or args.timeout is not None):
        raise ConfigError("--concurrency and --timeout set how `evaluate --served URL` sends the test files: add "
                          "--served URL, or leave them out")
    model = given("evaluate", "train", args.model, "--model") or newest(config, "evaluate", "train",
                                                                        "signpost train", "--model")
    data = given("evaluate", "data", args.data, "--data") or model_data(config, model, "evaluate")
    if args.served is not None:
        return _served_parity(args, config, model, data)
    result, version, decision = evaluate_and_register(config, model_dir=model, data_dir=data,
                                                      progress=progress(args))
    print_evaluation(result, version, decision)
    return 0 if result.passed else EXIT_GATE


def _served_parity(args: argparse.Namespace, config: SignpostConfig, model: Path, data: Path) -> int:
    """``evaluate --served``: the running server's answers on the test files against evaluate's; nothing written."""
    from signpost.stages.evaluate import served_parity

    result = served_parity(config, model_dir=model, data_dir=data, url=args.served,
                           concurrency=8 if args.concurrency is None else args.concurrency,
                           timeout_s=30.0 if args.timeout is None else args.timeout,
                           api_key=os.environ.get("SIGNPOST_API_KEY"), progress=progress(args))
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


def optimize_command(args: argparse.Namespace) -> int:
    from signpost.stages.optimize import optimize
    from signpost.tracking import run_factory

    config = config_from_args(args)
    model = given("optimize", "train", args.model, "--model") or newest(config, "optimize", "train",
                                                                        "signpost train", "--model")
    data = given("optimize", "data", args.data, "--data") or model_data(config, model, "optimize")
    result = optimize(config, model_dir=model, data_dir=data, progress=progress(args), tracking=run_factory(config))
    print_variants(result.path, result.reused, result.variants)
    return 0


def bench_command(args: argparse.Namespace) -> int:
    from signpost.report.bench_table import compare
    from signpost.stages.bench import bench
    from signpost.tracking import run_factory

    if args.compare:
        report, regressed = compare(*args.compare, threshold=args.threshold)
        print(report)
        return EXIT_REGRESSION if regressed else 0
    config = config_from_args(args)
    optimized = given("bench", "optimize", args.optimized, "--optimized") or newest(
        config, "bench", "optimize", "signpost optimize", "--optimized")
    data = given("bench", "data", args.data, "--data") or optimized_data(config, optimized)
    result = bench(config, optimize_dir=optimized, data_dir=data, profile=args.profile, progress=progress(args),
                   tracking=run_factory(config))
    print_bench(result.path, result.reused, result.results)
    return 0


def serve_command(args: argparse.Namespace) -> int:
    import uvicorn

    from signpost.serve.app import create_app
    from signpost.serve.server import uvicorn_config

    extra = [f"serve.{key}={value}" for key, value in (("host", args.host), ("port", args.port)) if value is not None]
    config = config_from_args(args, extra)
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


def package_command(args: argparse.Namespace) -> int:
    from signpost.stages.package import build_image, package

    config = config_from_args(args)
    model = (given("package", "train", args.model, "--model") or latest(config, "package", "bench", "--model")[0]
             or newest(config, "package", "train", "signpost train", "--model"))
    if args.target == "edge":
        if args.build or args.push:
            raise ConfigError("--build and --push make a container image; --target edge writes a bundle (drop them)")
        return _package_edge(config, model)
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


def _package_edge(config: SignpostConfig, model: str | Path) -> int:
    from signpost.stages.package import package_edge

    result = package_edge(config, model=str(model))
    size = result.tarball.stat().st_size
    print(f"package: {'reused' if result.reused else 'wrote'} the edge bundle {result.path}")
    print(f"  {result.manifest['bundle']['model_version']} on ExecuTorch (XNNPACK); tarball {result.tarball} "
          f"({size / 1024:.0f} KiB)")
    if result.signed:
        print(f"  signed; install it on a device: signpost edge update --home DIR --source {result.tarball} "
              "--public-key PUB")
    else:
        print("  UNSIGNED (no signing key configured): devices refuse it unless run with --allow-unsigned; set "
              "SIGNPOST_SIGNING_KEY or security.signing_key and package again")
    return 0


def deploy_command(args: argparse.Namespace) -> int:
    from signpost.stages.deploy import Smoke, deploy, promote_canary, release_from

    config = config_from_args(args)
    if args.promote_canary:
        result = promote_canary(config, args.out, log_url=args.log or os.environ.get("SIGNPOST_PREDICTION_LOG"),
                                apply=args.apply)
        print(f"deploy: canary {result.decision}: {result.reason}")
        if result.decision == "wait":
            print(f"  nothing changed; run --promote-canary again later (exit {EXIT_CANARY_WAIT})")
            return EXIT_CANARY_WAIT
        print(f"  {result.out} now runs {result.champion.model_version} alone"
              + ("; applied" if args.apply else "; apply it with --apply or kubectl apply -k"))
        return 0 if result.decision == "promote" else EXIT_GATE
    if args.package_result is None:
        raise ConfigError("deploy needs --package-result DIR (the `signpost package` folder the image was built "
                          "from) and --image NAME@sha256:DIGEST")
    champion = release_from(args.package_result, args.image)
    canary = None
    if args.canary_image or args.canary_package_result:
        if not (args.canary_image and args.canary_package_result):
            raise ConfigError("a canary needs both --canary-image and --canary-package-result")
        canary = release_from(args.canary_package_result, args.canary_image)
    smoke = None
    if args.smoke_image is not None or args.smoke_class is not None:
        if args.smoke_image is None or args.smoke_class is None:
            raise ConfigError("the smoke test needs both --smoke-image FILE and --smoke-class ID")
        smoke = Smoke(args.smoke_image, args.smoke_class, url=args.smoke_url,
                      api_key=os.environ.get("SIGNPOST_API_KEY"))
    result = deploy(config, champion, canary=canary, out=args.out, overlay=args.overlay, namespace=args.namespace,
                    apply=args.apply, smoke=smoke)
    print(f"deploy: wrote {result.out} ({result.champion.model_version}"
          + (f", canary {result.canary.model_version}" if result.canary else "") + ")")
    print(f"  render: kubectl kustomize {result.out}/overlays/{result.overlay}")
    if not args.apply:
        print(f"  apply:  signpost deploy ... --apply, or kubectl apply -k {result.out}/overlays/{result.overlay}")
        return 0
    if result.failure:
        print(f"deploy: {result.failure}", file=sys.stderr)
        print("deploy: rolled back" if result.rolled_back else "deploy: nothing to roll back", file=sys.stderr)
        return EXIT_FAILURE
    print(f"  applied, rolled out and smoke-tested ({len(result.commands)} kubectl commands)")
    return 0


def monitor_command(args: argparse.Namespace) -> int:
    from signpost.serve import predlog
    from signpost.stages.monitor import monitor, served_model_dir, since_seconds

    config = config_from_args(args)
    since = since_seconds(args.since) if args.since else None
    if args.log:
        predlog.check_log(args.log)  # a log named by hand must exist: opening would create a mistyped one
    url = args.log or config.serve.prediction_log or predlog.default_url(config.workdir)
    window = None if since is not None else (args.last or config.monitor.window)
    model = given("monitor", "train", args.model, "--model") or served(
        served_model_dir(config, url, last=window, since=since)) or latest(config, "monitor", "train", "--model")[0]
    result = monitor(
        config, data_dir=given("monitor", "data", args.data, "--data") or newest_data(config, "monitor"),
        log_url=url, last=args.last, since=since,
        evaluation_dir=given("monitor", "evaluate", args.evaluation, "--evaluation") or latest(
            config, "monitor", "evaluate", "--evaluation")[0],
        model_dir=model, alerts=not args.no_alerts, by_device=args.by == "device",
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
    for name, d in ({"(fleet)": r.devices.fleet} | r.devices.devices if r.devices else {}).items():
        said = d.note if not d.enough_data else (f"mean confidence {d.mean_confidence:.3f}, p99 {d.latency_p99_ms:.1f} "
                                                 f"ms{' — ' + ', '.join(d.drift).upper() if d.drift else ''}")
        print(f"  device {name}: {d.records:,} predictions, {said}")
    for alert in r.alerts or []:
        print(f"  alert {alert.status} {alert.incident} -> {alert.sink}: {'sent' if alert.ok else alert.error}")
    q = r.quality
    if q.accuracy is not None:
        print(f"  feedback: accuracy {q.accuracy:.3f} on {q.images} labelled images it was not trained on "
              f"(evaluation {q.baseline if q.baseline is not None else '-'}){' — DROP' if q.dropped else ''}")
    reasons = ", ".join(verdict.reasons)
    print(f"  verdict: {f'retrain ({reasons})' if verdict.retrain else 'no retraining needed'}")
    return EXIT_DRIFT if verdict.retrain else 0


def simulate_command(args: argparse.Namespace) -> int:
    from signpost.stages.simulate import simulate, summary

    config = config_from_args(args)
    windows = simulate(
        config, url=args.url, data_dir=given("simulate", "data", args.data, "--data") or newest_data(config,
                                                                                                   "simulate"),
        per_window=args.per_window, clean_windows=args.clean_windows,
        drifts=tuple(d for d in args.drifts.split(",") if d), concurrency=args.concurrency,
        api_key=os.environ.get("SIGNPOST_API_KEY"), log_url=args.log,
        evaluation_dir=latest(config, "simulate", "evaluate", None)[0],
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


def feedback_command(args: argparse.Namespace) -> int:
    from signpost.stages.feedback import add_feedback, read_items

    config = config_from_args(args)
    if bool(args.images) == bool(args.csv) or (args.images and args.label is None):
        raise ConfigError("feedback add: give --images FILE ... with --label CLASS, or --csv FILE")
    items = read_items(args.csv) if args.csv else [(path, args.label) for path in args.images]
    data = given("feedback", "data", args.data, "--data") or newest_data(config, "feedback")
    result = add_feedback(config, data_dir=data, items=items)
    classes = ", ".join(f"{name} ×{n}" for name, n in result.manifest.get("classes", {}).items())
    print(f"feedback: {'already stored' if result.reused else 'stored'} {result.manifest['metrics']['images']} "
          f"images in {result.path} ({classes})")
    return 0


def promote_command(args: argparse.Namespace) -> int:
    from signpost.registry import Registry

    config = config_from_args(args)
    if args.if_better:
        return _promote_if_better(args, config)
    if args.evaluation is not None:
        raise ConfigError("--evaluation names the challenger's evaluation for --if-better: add --if-better, or leave "
                          "it out to move the alias by hand")
    version = Registry(config.tracking, config.workdir).promote()
    print(f"promote: {version.name} v{version.version} is now the champion")
    return 0


def _promote_if_better(args: argparse.Namespace, config: SignpostConfig) -> int:
    """``promote --if-better``: the duel for the challenger the evaluation registered, its model and data found
    beside it in the workdir by the folder names the report gives."""
    from signpost.contracts import read_evaluation
    from signpost.stages.promote import decide_later

    evaluation = given("promote", "evaluate", args.evaluation, "--evaluation") or newest(
        config, "promote", "evaluate", "signpost evaluate", "--evaluation")
    report = read_evaluation(evaluation, signed=True)
    model = config.workdir / "train" / Path(report.model.path).name
    data = config.workdir / "data" / Path(report.data.path).name
    decision = decide_later(config, evaluation_dir=evaluation, model_dir=model, data_dir=data,
                            progress=progress(args))
    print_decision(decision, config.tracking.registered_model, indent="promote: ")
    return 0


def rollback_command(args: argparse.Namespace) -> int:
    from signpost.registry import Registry

    config = config_from_args(args)
    version = Registry(config.tracking, config.workdir).rollback()
    print(f"rollback: {version.name} v{version.version} is the champion again")
    return 0


def keys_generate_command(args: argparse.Namespace) -> int:
    from signpost import signing

    private, public = signing.generate(args.out, args.name)
    key = signing.load_public_keys(public.read_bytes(), str(public))
    print(f"keys: wrote {private} (private: keep it secret; CI reads it from ${signing.SIGNING_KEY_ENV}) and {public} "
          f"(public, key id {next(iter(key))}: list it in security.public_keys or ${signing.PUBLIC_KEYS_ENV})")
    return 0


def report_command(args: argparse.Namespace) -> int:
    """``signpost report summary`` and ``signpost report pr-comment``: markdown on stdout, for the workflow to put
    in ``$GITHUB_STEP_SUMMARY`` or a pull request's comment. Every file is read through its contract."""
    from signpost.artifacts import read_manifest
    from signpost.contracts import RESULTS, load_results, read_evaluation, read_results
    from signpost.report.pr_comment import pr_comment
    from signpost.report.summary import bench_summary

    def folder(path: Path, option: str, stage: str) -> Path:
        if not path.is_dir():
            raise ValueError(f"{option} {path}: not a folder; give the folder `signpost {stage}` wrote")
        return path

    if args.report == "summary":
        print(bench_summary([folder(path, "--bench", "bench") for path in args.bench],
                            profiles=[folder(path, "--profile", "bench") for path in args.profile or []]), end="")
        return 0
    evaluation = read_evaluation(folder(args.evaluation, "--evaluation", "evaluate"))
    # evaluate.register_challenger false (a pull request's run) scored the champion on the same test split; else
    # its figures are those logged at its registration.
    scored_here = read_manifest(args.evaluation)["config"].get("register_challenger", True) is False
    bench = read_results(folder(args.bench, "--bench", "bench")) if args.bench is not None else None
    baseline = None
    if args.baseline is not None:  # main's results, copied off its run: no manifest beside it
        baseline = load_results(args.baseline / RESULTS if args.baseline.is_dir() else args.baseline)
    print(pr_comment(evaluation, bench=bench, baseline=baseline, run_url=args.run_url, threshold=args.threshold,
                     champion_scored_here=scored_here), end="")
    return 0


def synth_command(args: argparse.Namespace) -> int:
    from signpost.data.synthetic import generate_gtsrb

    config = config_from_args(args)
    summary = generate_gtsrb(args.out, config.data.synthetic, progress=progress(args))
    print(
        f"synth: wrote {summary.train_images} training and {summary.test_images} test images "
        f"({len(summary.class_counts)} classes) in the GTSRB layout under {summary.root}"
    )
    return 0


def run_command(args: argparse.Namespace) -> int:
    from signpost.stages.pipeline import run_pipeline

    config = _config_with_data_root(args)
    result = run_pipeline(config, progress=progress(args))
    for outcome in result.outcomes:
        state = "skipped" if outcome.skipped else "ran"
        print(f"{outcome.stage:>8}: {state:7} ({outcome.reason}) -> {outcome.path}")
        if outcome.used:
            print(f"{'':>8}  input: {outcome.used}")
    print_evaluation(result.evaluation, result.registered, result.promotion)
    if result.registered is None and result.registry:
        print(f"  registry: {result.registry}")
    if result.candidate:
        c = result.candidate
        print(f"deployable: {c.variant} on {c.runtime} ({c.math}) — {c.reason}")
    print(f"report: {result.report}")
    return 0 if result.evaluation.passed else EXIT_GATE
