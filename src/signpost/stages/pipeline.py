"""run: the whole chain from one config, each stage skipped when its inputs are unchanged.

Stages meet only at artifacts; this module calls them in order and reports why each stage ran or was skipped. Each
stage logs its own tracking run (``tracking=run_factory(config)``), as the stage's own command does. A model that
passes the gate is registered as the challenger and, with ``evaluate.promote``, duels the champion on the same data
(``stages/promote.py``): the test split and the held-out labelled feedback. A model that fails the gate goes no
further: it is not optimized, benchmarked or packaged. The package stage packages the bench's deployable candidate
(or the trained model when there is no bench) and builds the image only when ``package.build`` is set.
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass
from pathlib import Path

from signpost.config import SignpostConfig, save_config
from signpost.contracts import Candidate
from signpost.registry import CHALLENGER, CHAMPION, ModelVersion, Registry
from signpost.report.html import write_run_report
from signpost.stages.bench import bench
from signpost.stages.evaluate import EvaluateResult
from signpost.stages.optimize import optimize
from signpost.stages.package import build_image, package
from signpost.stages.prepare import prepare
from signpost.stages.promote import Decision, evaluate_and_register
from signpost.stages.train import train
from signpost.tracking import run_factory


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
    candidate: Candidate | None = None  # the bench's deployable choice, when it ran
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
        optimized = optimize(config, model_dir=model.path, data_dir=data.path, progress=progress,
                             tracking=run_factory(config))
        optimize_dir = optimized.path
        outcomes.append(StageOutcome("optimize", optimized.path, optimized.reused, _why(
            optimized.reused, "model, data, optimize and train settings and code"),
            _used("model", model.path, "train", model.reused)))
        if not config.bench.enabled:
            outcomes.append(StageOutcome("bench", optimized.path, True, "not run: bench.enabled is false"))
        else:
            measured = bench(config, optimize_dir=optimized.path, data_dir=data.path, progress=progress,
                             tracking=run_factory(config))
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
