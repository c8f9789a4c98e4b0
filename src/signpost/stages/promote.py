"""promote: the champion / challenger duel that decides whether a newly registered model replaces the champion.

``evaluate_and_register`` is the step ``signpost evaluate`` and ``signpost run`` share: evaluate against the current
champion, register a model that passes the gate as the ``challenger`` (its version linked to the tracking run the
evaluation was logged in) and, with ``evaluate.promote``, hold the duel below.

Both models are scored on the same prepared data by the evaluate stage: the original test split and, when prepare
folded labelled feedback in, the held-out ``feedback`` split (production images neither model was trained on). The
challenger wins when it leads on the deciding score — feedback top-1 when there is feedback, else test top-1 — by at
least ``evaluate.promote_margin`` (and by more than nothing: a tie keeps the champion), and does not fall more than
``evaluate.max_drop`` below the champion on the test split. The first model to pass the gate becomes champion.
Only a champion trained for the same classes and input (its model card: class names, image size, normalization) is
a yardstick: any other is not compared, the challenger is not promoted over it, and the reason says why.

The champion is downloaded to ``workdir/registry/``. Promotion moves the registry's ``champion`` alias
(``signpost rollback`` moves it back); the decision and its reason are tagged on the challenger's model version and
written to the run's folder.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from signpost.artifacts import ArtifactError, read_manifest
from signpost.config import EvaluateConfig, SignpostConfig
from signpost.contracts import EvaluationReport, read_evaluation
from signpost.models.artifact import ModelCard, read_card
from signpost.registry import CHALLENGER, CHAMPION, DOWNLOADS, ModelVersion, Registry, RegistryError
from signpost.stages.evaluate import EvaluateResult, evaluate
from signpost.tracking import Tracker, run_factory

log = logging.getLogger(__name__)

DECISION_TAG = "signpost.promotion"  # on the challenger's model version: the decision and its reason

_TOLERANCE = 1e-12
# Largest difference of a channel mean or std (0..1 pixel units) between a champion and a challenger fed the same
# way. They are each model's training-set statistics, so a retrain moves them: by 0.075 when blurred feedback became
# most of the small fixture's training images (tests/integration/test_loop.py). A model fed pixels another way
# (unscaled: mean 0, std 1; or another dataset's constants) is 0.25 and more away.
NORMALIZATION_TOLERANCE = 0.25


@dataclass
class Decision:
    """Whether the challenger became champion, why, and the scores the decision compared."""

    promoted: bool
    reason: str
    challenger: str | None = None  # model versions
    champion: str | None = None  # the champion before the decision
    deciding: str | None = None  # "feedback" or "test": the split whose top-1 decided
    scores: dict[str, dict[str, float]] = field(default_factory=dict)  # model → split → top-1

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def evaluate_and_register(
    config: SignpostConfig, *, model_dir: Path, data_dir: Path, progress: bool = True
) -> tuple[EvaluateResult, ModelVersion | None, Decision | None]:
    """Evaluate against the current champion (when it was trained for the same classes and input; otherwise the
    gate says why it was not compared); a model that passes the gate becomes the registry's challenger and, with
    ``evaluate.promote``, the champion when it beats the current one.

    With ``evaluate.register_challenger: false`` (a pull request's run) the registry is only read: the champion is
    scored on this test split (``score_champion``) and the gate compares against those figures; nothing is
    registered or promoted. Otherwise the gate compares against the champion's registered top-1.

    Returns the evaluation, the version registered (None when nothing new was) and the promotion decision (None
    when none was made). With ``tracking.backend: none`` the gate still applies, against no champion, and nothing
    is registered. The evaluation's tracking run and the registry both come from ``config.tracking``: a version
    can only link to a run in the registry's own store.
    """
    registry = Registry(config.tracking, config.workdir) if config.tracking.backend != "none" else None
    champion = registry.get(CHAMPION) if registry is not None else None
    champion_metrics = skipped = None
    if registry is not None and champion is not None:
        # The champion's top-1 is a yardstick only for a model of the same classes and input.
        if (skipped := champion_not_comparable(registry, champion, model_dir)) is not None:
            log.warning("%s %s", registry.name, skipped)
        elif not config.evaluate.register_challenger:
            champion_metrics, skipped = score_champion(config, registry, champion, data_dir, progress=progress)
        elif "top1" in champion.metrics:
            champion_metrics = {"top1": champion.metrics["top1"]}
    elif registry is not None and not config.evaluate.register_challenger:
        skipped = f"{registry.name} has no champion yet"  # a pull request's comment says so
    version: ModelVersion | None = None

    def register(tracker: Tracker, result: EvaluateResult) -> None:
        """Inside the evaluation's tracking run: a passing model not registered yet becomes the challenger."""
        nonlocal version
        if registry is None or not result.passed or not config.evaluate.register_challenger:
            return
        if (known := registry.find(result.report.model.key)) is not None:
            # Evaluated again (e.g. against a new champion), but the same model: not a new challenger.
            log.info("%s is already registered as %s version %s", model_dir.name, known.name, known.version)
            return
        version = registry.register(tracker, model_dir, alias=CHALLENGER)

    result = evaluate(config, model_dir=model_dir, data_dir=data_dir, champion=champion_metrics,
                      champion_skipped=skipped, progress=progress, tracking=run_factory(config), on_logged=register)
    if registry is None or not config.evaluate.register_challenger:
        return result, None, None
    if result.reused:
        # Evaluated before; if that run stopped after registering its challenger but before deciding, decide now.
        pending = undecided_challenger(registry, result.report.model.key) if (
            result.passed and config.evaluate.promote) else None
        if pending is None:
            return result, None, None
        log.info("%s version %s was registered but never compared with the champion: deciding now",
                 pending.name, pending.version)
        return result, pending, promote_if_better(config, registry=registry, challenger=pending, evaluation=result,
                                                  model_dir=model_dir, data_dir=data_dir, progress=progress)
    if version is None:
        return result, None, None
    log.info("registered %s version %s as %s", version.name, version.version, CHALLENGER)
    if not config.evaluate.promote:
        return result, version, None
    decision = promote_if_better(config, registry=registry, challenger=version, evaluation=result,
                                 model_dir=model_dir, data_dir=data_dir, progress=progress)
    return result, version, decision


def score_champion(config: SignpostConfig, registry: Registry, champion: ModelVersion, data_dir: Path, *,
                   progress: bool = True) -> tuple[dict[str, float] | None, str | None]:
    """The champion's metrics on ``data_dir``'s test split, scored as the challenger is, or None and why it could
    not be. Read-only: nothing is logged or registered, and the evaluation is written under
    ``workdir/registry/evaluate/``, apart from the challenger's (a workflow uploads ``workdir/evaluate``)."""
    try:
        champion_dir = registry.download(CHAMPION)
        aside = config.model_copy(update={"workdir": Path(config.workdir) / DOWNLOADS})
        scored = evaluate(aside, model_dir=champion_dir, data_dir=data_dir, progress=progress)
    except (ArtifactError, RegistryError, ValueError) as exc:
        why = f"champion v{champion.version} cannot be scored on this data: {exc}"
        log.warning("%s %s", registry.name, why)
        return None, why
    log.info("%s champion v%s scored on %s: top-1 %.4f", registry.name, champion.version, Path(data_dir).name,
             scored.report.metrics["top1"])
    return dict(scored.report.metrics), None


def decide(settings: EvaluateConfig, challenger: EvaluationReport, champion: EvaluationReport) -> Decision:
    """Compare two evaluate reports of the same data under ``settings``."""
    scores = {name: _scores(report) for name, report in (("challenger", challenger), ("champion", champion))}
    if challenger.data.key != champion.data.key:
        raise ValueError("challenger and champion must be scored on the same data to be compared")
    ours, theirs = scores["challenger"]["test"], scores["champion"]["test"]
    if ours + _TOLERANCE < theirs - settings.max_drop:
        return Decision(False, f"test top-1 {ours:.4f} is more than evaluate.max_drop {settings.max_drop:g} below "
                        f"the champion's {theirs:.4f}", deciding="test", scores=scores)
    deciding = "feedback" if "feedback" in scores["challenger"] and "feedback" in scores["champion"] else "test"
    ours, theirs = scores["challenger"][deciding], scores["champion"][deciding]
    lead = ours - theirs
    margin = settings.promote_margin
    what = f"{deciding} top-1 {ours:.4f} vs the champion's {theirs:.4f} ({lead:+.4f})"
    if lead > _TOLERANCE and lead + _TOLERANCE >= margin:
        return Decision(True, f"{what}, a lead of at least evaluate.promote_margin {margin:g}", deciding=deciding,
                        scores=scores)
    needed = "more than 0" if margin == 0 else f"at least evaluate.promote_margin {margin:g}"
    return Decision(False, f"{what}: the lead must be {needed}", deciding=deciding, scores=scores)


def not_comparable(ours: ModelCard, theirs: ModelCard, version: str) -> str | None:
    """Why champion ``version`` (model card ``theirs``) cannot be compared with the model of card ``ours``, or None
    when both were trained for the same classes and the same input (image size, normalization)."""
    made_for = f" ({name})" if (name := theirs.config.get("name")) else ""  # the champion's experiment
    champion = f"champion v{version}"
    if theirs.num_classes != ours.num_classes:
        return (f"{champion} was trained for {theirs.num_classes} classes{made_for}, this model for "
                f"{ours.num_classes}: not compared")
    if theirs.class_names != ours.class_names:
        pairs = enumerate(zip(theirs.class_names, ours.class_names, strict=False))
        first = next(((i, a, b) for i, (a, b) in pairs if a != b), None)
        which = f" (class {first[0]} is {first[1]!r} there, {first[2]!r} here)" if first else ""
        return f"{champion} was trained for other classes{made_for}{which}: not compared"
    if theirs.image_size != ours.image_size:
        return (f"{champion} takes {theirs.image_size}x{theirs.image_size} images{made_for}, this model "
                f"{ours.image_size}x{ours.image_size}: not compared")
    # Each model is scored with its own mean and std, so only a normalization of another kind, not a retrain's
    # drift, makes the champion's score a different measure (NORMALIZATION_TOLERANCE).
    gap = max(abs(a - b) for a, b in zip([*theirs.mean, *theirs.std], [*ours.mean, *ours.std], strict=True))
    if gap > NORMALIZATION_TOLERANCE:
        return (f"{champion} normalizes its input another way{made_for}: mean {_rounded(theirs.mean)}, std "
                f"{_rounded(theirs.std)}, this model mean {_rounded(ours.mean)}, std {_rounded(ours.std)} (up to "
                f"{gap:.3f} apart, more than {NORMALIZATION_TOLERANCE:g}): not compared")
    return None


def champion_not_comparable(registry: Registry, champion: ModelVersion, model_dir: Path) -> str | None:
    """``not_comparable`` for the registry's ``champion`` (its model card, downloaded) and the model in
    ``model_dir``; a champion whose card cannot be read is not compared either, and the reason says so."""
    try:
        theirs = read_card(registry.download(None, version=champion.version))
    except (ArtifactError, RegistryError) as exc:
        return f"champion v{champion.version} cannot be read ({exc}): not compared"
    return not_comparable(read_card(model_dir), theirs, champion.version)


def promote_if_better(
    config: SignpostConfig,
    *,
    registry: Registry,
    challenger: ModelVersion,
    evaluation: EvaluateResult,
    model_dir: Path,
    data_dir: Path,
    progress: bool = True,
) -> Decision:
    """Score the champion on ``data_dir`` as the challenger (the model in ``model_dir``) was scored
    (``evaluation``) and promote the challenger when it wins. Without a champion the challenger is promoted: it
    passed the gate and there is nothing to beat. A champion trained for other classes or input is not compared,
    and the challenger is not promoted over it (``signpost promote`` does that by hand)."""
    current = registry.get(CHAMPION)
    if current is None:
        registry.promote()
        decision = Decision(True, "no champion yet: the first model to pass the gate becomes champion",
                            challenger=challenger.version, scores={"challenger": _scores(evaluation.report)})
        _record(registry, challenger, decision)
        return decision
    if (why := champion_not_comparable(registry, current, model_dir)) is not None:
        decision = Decision(False, f"{why}; `signpost promote` makes v{challenger.version} champion if it should "
                            "replace it", challenger=challenger.version, champion=current.version)
        log.warning("kept %s v%s as champion: %s", registry.name, current.version, decision.reason)
        _record(registry, challenger, decision)
        return decision
    try:
        champion_dir = registry.download(CHAMPION)
        theirs = evaluate(config, model_dir=champion_dir, data_dir=data_dir, progress=progress)
    except (ArtifactError, RegistryError, ValueError) as exc:
        decision = Decision(False, f"the champion (v{current.version}) cannot be scored on this data: {exc}; "
                            "compare them by hand and use `signpost promote`", challenger=challenger.version,
                            champion=current.version)
        _record(registry, challenger, decision)
        return decision
    decision = decide(config.evaluate, evaluation.report, theirs.report)
    decision.challenger, decision.champion = challenger.version, current.version
    if decision.promoted:
        registry.promote()
        log.info("promoted %s v%s over v%s: %s", registry.name, challenger.version, current.version, decision.reason)
    else:
        log.info("kept %s v%s as champion: %s", registry.name, current.version, decision.reason)
    _record(registry, challenger, decision)
    return decision


def _scores(report: EvaluationReport) -> dict[str, float]:
    scores = {"test": float(report.metrics["top1"])}
    if report.feedback is not None:
        scores["feedback"] = float(report.feedback.top1)
    return scores


def _rounded(values: list[float]) -> list[float]:
    return [round(v, 3) for v in values]


def _record(registry: Registry, challenger: ModelVersion, decision: Decision) -> None:
    verdict = "promoted" if decision.promoted else "not promoted"
    registry.tag_version(challenger.version, DECISION_TAG, f"{verdict}: {decision.reason}"[:5000])


def decide_later(config: SignpostConfig, *, evaluation_dir: Path, model_dir: Path, data_dir: Path,
                 progress: bool = True) -> Decision:
    """The duel an earlier ``signpost evaluate`` with ``evaluate.promote: false`` left for later: the challenger it
    registered from ``model_dir`` against the champion, scored on ``data_dir`` as ``evaluation_dir`` scored the
    challenger; the challenger becomes champion only when it wins. mlops.yml's promote job runs this last, after the
    variants were benchmarked and the images packaged and probed on both architectures.

    Raises ``ArtifactError`` when the three folders do not belong together and ``RegistryError`` when there is no
    registry or no undecided challenger registered from this model.
    """
    if config.tracking.backend == "none":
        raise RegistryError("tracking.backend is none: there is no registry whose champion could be decided")
    report = read_evaluation(evaluation_dir, signed=True)
    model_key, data_key = read_manifest(model_dir, signed=True)["key"], read_manifest(data_dir, signed=True)["key"]
    if model_key != report.model.key or data_key != report.data.key:
        raise ArtifactError(f"{evaluation_dir} scored model {report.model.key} on data {report.data.key}, not "
                            f"{model_dir} ({model_key}) on {data_dir} ({data_key}): pass the evaluation of this model")
    if not report.gate.passed:
        raise RegistryError(f"{model_dir.name} failed the gate ({'; '.join(report.gate.failures)}): nothing to promote")
    registry = Registry(config.tracking, config.workdir)
    pending = undecided_challenger(registry, model_key)
    if pending is None:
        raise RegistryError(f"{registry.name} has no undecided {CHALLENGER} registered from {model_dir.name}: "
                            "`signpost evaluate` registers it (and with evaluate.promote decides at once)")
    evaluation = EvaluateResult(Path(evaluation_dir), True, report, True, [])
    return promote_if_better(config, registry=registry, challenger=pending, evaluation=evaluation,
                             model_dir=model_dir, data_dir=data_dir, progress=progress)


def undecided_challenger(registry: Registry, model_key: str) -> ModelVersion | None:
    """The challenger registered from the model with manifest key ``model_key`` when no decision was recorded for
    it (a run stopped between registering and deciding), else None."""
    challenger = registry.get(CHALLENGER)
    if challenger is None or registry.version_tag(challenger.version, DECISION_TAG) is not None:
        return None
    known = registry.find(model_key)
    return challenger if known is not None and known.version == challenger.version else None
