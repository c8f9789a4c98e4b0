"""run: the whole chain from one config, each stage skipped when its inputs are unchanged.

Stages meet only at artifacts; this module calls them in order, decides what a passing model becomes in the
registry, and reports why each stage ran or was skipped. A model that passes the gate is registered as the
challenger and, with ``evaluate.promote``, duels the champion on the same data (``stages/promote.py``): the test
split and the held-out labelled feedback. A model that fails the gate goes no further: it is not
optimized, benchmarked or packaged. The package stage packages the bench's deployable candidate (or the trained
model when there is no bench) and builds the image only when ``package.build`` is set.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from dataclasses import dataclass
from pathlib import Path

from signpost.config import SignpostConfig, config_to_dict, save_config
from signpost.registry import CHALLENGER, CHAMPION, ModelVersion, Registry
from signpost.report.html import write_run_report
from signpost.stages.bench import bench
from signpost.stages.bench import tracking_summary as bench_summary
from signpost.stages.evaluate import EvaluateResult, evaluate
from signpost.stages.optimize import optimize
from signpost.stages.optimize import tracking_summary as optimize_summary
from signpost.stages.package import build_image, package
from signpost.stages.prepare import prepare
from signpost.stages.promote import Decision, champion_not_comparable, promote_if_better, undecided_challenger
from signpost.stages.train import train
from signpost.tracking import log_stage, run_factory

log = logging.getLogger(__name__)


@dataclass
class StageOutcome:
    """What one stage of a run did."""

    stage: str
    path: Path
    skipped: bool
    reason: str
    used: str = ""  # the input artifact it read, and why that one: `signpost run` hands each stage the one before's


@dataclass
class RunResult:
    """Every stage's outcome, the gate's verdict on the trained model, and the run's HTML report."""

    outcomes: list[StageOutcome]
    evaluation: EvaluateResult
    registered: ModelVersion | None
    report: Path
    candidate: dict | None = None  # the bench's deployable choice, when it ran
    promotion: Decision | None = None  # the champion / challenger decision, when a challenger was registered
    registry: str | None = None  # the model's version and aliases in the registry, as the report says


def run_pipeline(config: SignpostConfig, *, progress: bool = True) -> RunResult:
    """Run every stage for ``config`` in order: prepare → train → evaluate (register a passing model, promote it
    when it beats the champion) → optimize → bench → package."""
    data = prepare(config, progress=progress)
    model = train(config, data_dir=data.path, progress=progress, tracking=run_factory(config))
    evaluation, registered, promotion = evaluate_and_register(config, model_dir=model.path, data_dir=data.path,
                                                              progress=progress)
    outcomes = [
        StageOutcome("prepare", data.path, data.reused, _why(data.reused, "data, feedback, data settings and code"),
                     f"raw data {data.manifest['inputs']['root']} (data.source {config.data.source})"),
        StageOutcome("train", model.path, model.reused, _why(model.reused, "prepared data, train settings and code"),
                     _used("data", data.path, "prepare", data.reused)),
        StageOutcome("evaluate", evaluation.path, evaluation.reused, _why(evaluation.reused, "model, test data, "
                     "gate settings, champion and code"), _used("model", model.path, "train", model.reused)),
    ]
    if registered is None:
        outcomes.append(StageOutcome("promote", evaluation.path, True, "not run: no new challenger was registered"))
    elif promotion is None:
        outcomes.append(StageOutcome("promote", evaluation.path, True, "not run: evaluate.promote is false "
                                     "(`signpost promote` promotes by hand)"))
    else:
        outcomes.append(StageOutcome("promote", evaluation.path, False, promotion.reason))
    optimize_dir = bench_dir = candidate = None
    if not evaluation.passed:
        outcomes.append(StageOutcome("optimize", evaluation.path, True, "not run: the model failed the gate"))
    elif not config.optimize.enabled:
        outcomes.append(StageOutcome("optimize", model.path, True, "not run: optimize.enabled is false"))
    else:
        optimized = optimize(config, model_dir=model.path, data_dir=data.path, progress=progress)
        if not optimized.reused:
            log_stage(run_factory(config), "optimize", **optimize_summary(config, optimized))
        optimize_dir = optimized.path
        outcomes.append(StageOutcome("optimize", optimized.path, optimized.reused, _why(
            optimized.reused, "model, data, optimize and train settings and code"),
            _used("model", model.path, "train", model.reused)))
        if not config.bench.enabled:
            outcomes.append(StageOutcome("bench", optimized.path, True, "not run: bench.enabled is false"))
        else:
            measured = bench(config, optimize_dir=optimized.path, data_dir=data.path, progress=progress)
            if not measured.reused:
                log_stage(run_factory(config), "bench", **bench_summary(config, measured))
            bench_dir, candidate = measured.path, measured.candidate
            outcomes.append(StageOutcome("bench", measured.path, measured.reused, _why(
                measured.reused, "variants, test data, bench settings, machine and code"),
                _used("variants", optimized.path, "optimize", optimized.reused)))
    if not evaluation.passed:
        outcomes.append(StageOutcome("package", evaluation.path, True, "not run: the model failed the gate"))
    elif not config.package.enabled:
        outcomes.append(StageOutcome("package", model.path, True, "not run: package.enabled is false"))
    else:
        source = bench_dir if candidate else model.path  # the deployable variant and its runtime, when measured
        packaged = package(config, model=str(source))
        used = (_used("bench candidate", bench_dir, "bench", measured.reused) if bench_dir and candidate
                else _used("model", model.path, "train", model.reused))
        outcomes.append(StageOutcome("package", packaged.path, packaged.reused, _why(
            packaged.reused, "model, runtime, package and serve settings and code"), used))
        if config.package.build:
            build_image(packaged, config)
    # Each run gets a folder of its own: the resolved config it ran with and its report.
    run_dir = config.workdir / "runs" / f"{dt.datetime.now():%Y%m%d-%H%M%S}-{config.name}"
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(config, run_dir / "config.yaml")
    # A model registered by an earlier run (this run reused or repeated its evaluation) is still in the registry.
    label = (f"{registered.name} v{registered.version} as {CHALLENGER}" if registered
             else _registered_before(config, model.manifest["key"]))
    if promotion is not None:
        (run_dir / "promotion.json").write_text(json.dumps(promotion.to_dict(), indent=2) + "\n", encoding="utf-8")
        label += f"; {'promoted to' if promotion.promoted else 'not promoted to'} {CHAMPION}: {promotion.reason}"
    report = write_run_report(
        run_dir / "report.html", config_name=config.name, outcomes=outcomes, data_dir=data.path,
        model_dir=model.path, evaluation_dir=evaluation.path, registered=label, optimize_dir=optimize_dir,
        bench_dir=bench_dir,
    )
    return RunResult(outcomes, evaluation, registered, report, candidate, promotion, label)


def evaluate_and_register(
    config: SignpostConfig, *, model_dir: Path, data_dir: Path, progress: bool = True
) -> tuple[EvaluateResult, ModelVersion | None, Decision | None]:
    """Evaluate against the current champion (when it was trained for the same classes and input; otherwise the
    gate says why it was not compared); a model that passes the gate becomes the registry's challenger and, with
    ``evaluate.promote``, the champion when it beats the current one (``stages/promote.py``).

    Returns the evaluation, the version registered (None when nothing new was) and the promotion decision (None
    when none was made). With ``tracking.backend: none`` the gate still applies, against no champion, and nothing
    is registered.
    """
    registry = Registry(config.tracking, config.workdir) if config.tracking.backend != "none" else None
    champion = registry.get(CHAMPION) if registry is not None else None
    champion_metrics = skipped = None
    if registry is not None and champion is not None:
        # The champion's top-1 is a yardstick only for a model of the same classes and input.
        if (skipped := champion_not_comparable(registry, champion, model_dir)) is not None:
            log.warning("%s %s", registry.name, skipped)
        elif "top1" in champion.metrics:
            champion_metrics = {"top1": champion.metrics["top1"]}
    result = evaluate(config, model_dir=model_dir, data_dir=data_dir, champion=champion_metrics,
                      champion_skipped=skipped, progress=progress)
    if registry is None:
        return result, None, None
    if result.reused:
        # Evaluated before; if that run stopped after registering its challenger but before deciding, decide now.
        pending = undecided_challenger(registry, result.report["model"]["key"]) if (
            result.passed and config.evaluate.promote) else None
        if pending is None:
            return result, None, None
        log.info("%s version %s was registered but never compared with the champion: deciding now",
                 pending.name, pending.version)
        return result, pending, promote_if_better(config, registry=registry, challenger=pending, evaluation=result,
                                                  model_dir=model_dir, data_dir=data_dir, progress=progress)
    with run_factory(config)("evaluate") as tracker:
        params = {"evaluate": config_to_dict(config.evaluate), "model": model_dir.name, "data": data_dir.name}
        tracker.log_params(params)
        tracker.log_metrics(result.report["metrics"])
        tracker.log_artifact(result.path, "evaluate")
        tracker.set_tags({"signpost.gate": "passed" if result.passed else "failed"})
        if not result.passed:
            return result, None, None
        if (known := registry.find(result.report["model"]["key"])) is not None:
            # Evaluated again (e.g. against a new champion), but the same model: not a new challenger.
            log.info("%s is already registered as %s version %s", model_dir.name, known.name, known.version)
            return result, None, None
        version = registry.register(tracker, model_dir, alias=CHALLENGER)
    log.info("registered %s version %s as %s", version.name, version.version, CHALLENGER)
    if not config.evaluate.promote:
        return result, version, None
    decision = promote_if_better(config, registry=registry, challenger=version, evaluation=result,
                                 model_dir=model_dir, data_dir=data_dir, progress=progress)
    return result, version, decision


def _why(reused: bool, inputs: str) -> str:
    return f"{inputs} unchanged" if reused else f"no artifact for these {inputs} yet"


def _registered_before(config: SignpostConfig, model_key: str) -> str | None:
    """The registry's version of the model with manifest key ``model_key`` and the aliases on it now, when an
    earlier run registered it; None when it is not registered or there is no registry."""
    if config.tracking.backend == "none":
        return None
    known = Registry(config.tracking, config.workdir).find(model_key)
    if known is None:
        return None
    return f"{known.name} v{known.version} ({', '.join(known.aliases) or 'no alias'}; registered by an earlier run)"


def _used(what: str, path: Path, stage: str, reused: bool) -> str:
    return f"{what} {path} (this run's {stage}, {'reused' if reused else 'made now'})"
