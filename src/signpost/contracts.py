"""Typed contracts for files one stage writes and others read, beside their file names.

- ``candidate.json`` (bench → serve, package, the CLI): ``Candidate``, read with ``read_candidate``;
- ``variants.json`` (optimize → bench, the run report, the CLI): rows of ``VariantRow``, read with ``read_variants``;
- ``report.json`` (evaluate → promote, monitor, the run report, the CLI): ``EvaluationReport``, ``read_evaluation``;
- ``results.json`` (bench → compare, the run report, the CLI): ``BenchResults``, ``read_results``.

The stage that writes a file builds its model and writes that; a reader gets a validated model or an
``ArtifactError`` that names the file and the field: never a ``KeyError`` from a dict, and never a value a hand-edit
slipped past the artifact's manifest. Each top-level field is required and no other is allowed, so a file of another
shape is refused where it is read, not three calls later. Parts that are tables of their own (per-class scores,
the bench's cells, the machine description) stay plain JSON objects inside.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator

from signpost.artifacts import ArtifactError, read_manifest, verify_artifact

CANDIDATE = "candidate.json"  # written by the bench stage: the variant and runtime to deploy
VARIANTS_FILE = "variants.json"  # written by the optimize stage: its table of variants, one row each
EVALUATION_REPORT = "report.json"  # written by the evaluate stage: metrics, per-class scores and the gate
RESULTS = "results.json"  # written by the bench stage: the measured matrix, one row per cell and batch size

Runtime = Literal["eager", "compile", "aoti", "onnxruntime", "executorch", "openvino"]
Math = Literal["default", "bf16", "no-onednn"]
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")  # a variant or artifact folder name: no separators, no ".."


class SmallBatch(BaseModel):
    """The runtime that answered the smallest measured batch faster than the candidate's own, and from which batch
    size on the candidate's runtime wins."""

    model_config = ConfigDict(extra="forbid")

    runtime: Runtime
    math: Math
    below: int = Field(ge=1)
    reason: str


class Candidate(BaseModel):
    """``candidate.json``: the bench's deployable choice, one cell of its table."""

    model_config = ConfigDict(extra="forbid")

    variant: str = Field(description="the optimize variant's folder name, e.g. int8 or pruned")
    runtime: Runtime
    math: Math
    threads: int = Field(ge=1)
    batch: int = Field(ge=1)
    folder: str = Field(description="where the variant was when it was measured: <workdir>/optimize/<run>/<variant>")
    images_per_s: float = Field(ge=0)
    top1: float = Field(ge=0, le=1)
    reason: str
    small_batch: SmallBatch | None = None
    stable: bool | None = Field(
        None, description="false: chosen from a timing that never settled (no stable cell was left); None: a file "
        "written before the bench recorded it"
    )

    @field_validator("variant")
    @classmethod
    def _plain_name(cls, value: str) -> str:
        if not _NAME.fullmatch(value) or value in (".", ".."):
            raise ValueError(f"{value!r} is not a variant folder name")
        return value


def read_candidate(bench_folder: Path) -> Candidate:
    """The bench folder's candidate, hash-checked against the bench manifest and validated."""
    bench_folder = Path(bench_folder)
    verify_artifact(bench_folder, [CANDIDATE], signed=True)
    path = bench_folder / CANDIDATE
    try:
        return Candidate.model_validate_json(path.read_text(encoding="utf-8"))
    except ValidationError as exc:
        raise ArtifactError(f"{path}: not a valid candidate file ({_problems(exc)})") from None


def candidate_variant(bench_folder: Path, candidate: Candidate, workdir: Path) -> Path:
    """The variant folder the candidate names: in the optimize run the bench measured (its manifest's inputs name it
    and its key), found beside the bench folder or in ``workdir``, never at a path the file alone chooses."""
    bench_folder = Path(bench_folder)
    inputs = read_manifest(bench_folder, signed=True).get("inputs", {})
    run, run_key = inputs.get("optimize"), inputs.get("optimize_key")
    if not isinstance(run, str) or not _NAME.fullmatch(run) or not run_key:
        raise ArtifactError(f"{bench_folder}: its manifest does not name the optimize run it measured")
    if Path(candidate.folder).parts[-2:] != (run, candidate.variant):
        raise ArtifactError(f"{bench_folder / CANDIDATE}: folder {candidate.folder!r} is not variant "
                            f"{candidate.variant!r} of the measured optimize run {run!r}")
    places = [bench_folder.resolve().parent.parent / "optimize" / run, Path(workdir) / "optimize" / run]
    for optimize_dir in places:
        if (optimize_dir / candidate.variant).is_dir():
            if read_manifest(optimize_dir, signed=True).get("key") != run_key:
                raise ArtifactError(f"{optimize_dir} is not the optimize run the bench measured (its key differs)")
            return optimize_dir / candidate.variant
    raise ArtifactError(f"{bench_folder}: variant {candidate.variant!r} of optimize run {run!r} not found in "
                        f"{' or '.join(str(p) for p in places)}")


# --- variants.json: the optimize stage's table ------------------------------------------------------------------

VariantStatus = Literal["ok", "rejected", "failed", "skipped"]
Role = Literal["candidate", "control"]


class VariantRow(BaseModel):
    """One row of ``variants.json``: an optimized form of the parent model, how it was made and what it measured."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="the variant, e.g. int8 or pruned; also its folder's name")
    method: str = Field(description="how it was made, e.g. int8-static or structured-pruning")
    settings: dict[str, Any] = Field(description="the method's settings, and its test_drop / val_drop against fp32")
    status: VariantStatus = Field(description="rejected: over the accuracy budget; failed and skipped: see reason")
    reason: str
    path: str = Field(description="its folder, relative to the optimize artifact; empty when none was made")
    forms: list[str] = Field(description="the files it has beside its weights: onnx, aoti, program, ...")
    val_acc: float | None
    test_acc: float | None
    size_bytes: int | None = Field(description="the file that holds the weights (safetensors, or the int8 program)")
    parameters: int | None
    mflops: float | None = Field(description="per image, multiply-adds counted as 2")
    seconds: float = Field(description="time taken to make and score it, s")
    role: Role = Field(description="control: the student trained alone, a comparison that is never shipped")


_VARIANTS = TypeAdapter(list[VariantRow])


def variants_json(rows: list[VariantRow]) -> str:
    """The text of ``variants.json``: the rows as a JSON array, one key a line."""
    return json.dumps([row.model_dump(mode="json") for row in rows], indent=1) + "\n"


def read_variants(optimize_dir: Path, *, verify: bool = True, signed: bool = False) -> list[VariantRow]:
    """The optimize artifact's variants table, validated; with ``verify`` first checked against the artifact's
    manifest (with ``signed``, its signature too, under this process's policy)."""
    optimize_dir = Path(optimize_dir)
    if verify:
        verify_artifact(optimize_dir, [VARIANTS_FILE], signed=signed)
    return _load(optimize_dir / VARIANTS_FILE, _VARIANTS.validate_json, "signpost variants table",
                 f"remove {optimize_dir} and run `signpost optimize` again")


# --- report.json: the evaluate stage's report -------------------------------------------------------------------


class EvaluatedModel(BaseModel):
    """The model an evaluation scored."""

    model_config = ConfigDict(extra="forbid")

    path: str
    key: str = Field(description="its manifest's key")
    architecture: str
    data_key: str = Field(description="the key of the data it was trained on")


class EvaluatedData(BaseModel):
    """The prepared data an evaluation scored on."""

    model_config = ConfigDict(extra="forbid")

    path: str
    key: str = Field(description="its manifest's key: two reports compare only on the same key")
    split: str
    images: int = Field(ge=0)


class Calibration(BaseModel):
    """Expected calibration error and its table of equal-width confidence bins."""

    model_config = ConfigDict(extra="forbid")

    num_bins: int = Field(ge=1)
    ece: float
    bins: list[dict[str, Any]] = Field(description="lower, upper, confidence, accuracy, count per bin")


class FeedbackScore(BaseModel):
    """Top-1 on the held-out labelled feedback split, overall and per class name."""

    model_config = ConfigDict(extra="forbid")

    images: int = Field(ge=0)
    top1: float
    per_class: dict[str, float]


class Gate(BaseModel):
    """The gate's verdict, its failures and every rule it applied."""

    model_config = ConfigDict(extra="forbid")

    passed: bool
    failures: list[str]
    rules: list[dict[str, Any]] = Field(description="rule, metric, threshold, value, verdict, detail per rule")


class EvaluationReport(BaseModel):
    """``report.json``: what the evaluate stage measured on the test split, and the gate's verdict."""

    model_config = ConfigDict(extra="forbid")

    model: EvaluatedModel
    data: EvaluatedData
    image_size: int = Field(ge=1)
    class_names: list[str]
    warnings: list[str]
    champion: dict[str, float] | None = Field(description="the champion's test metrics the gate compared against")
    champion_skipped: str | None = Field(description="why the champion was not compared, when it was not")
    metrics: dict[str, float] = Field(description="top1, top5, macro_f1, ece, nll (and feedback_top1)")
    per_class: list[dict[str, Any]]
    worst_classes: list[dict[str, Any]]
    confused_pairs: list[dict[str, Any]]
    confusion_matrix: list[list[int]] = Field(description="counts: row = true class, column = predicted class")
    calibration: Calibration
    feedback: FeedbackScore | None
    gate: Gate


def read_evaluation(evaluation_dir: Path, *, verify: bool = True, signed: bool = False) -> EvaluationReport:
    """The evaluation's report, validated; with ``verify`` first checked against the artifact's manifest (with
    ``signed``, its signature too, under this process's policy)."""
    evaluation_dir = Path(evaluation_dir)
    if verify:
        verify_artifact(evaluation_dir, [EVALUATION_REPORT], signed=signed)
    return _load(evaluation_dir / EVALUATION_REPORT, EvaluationReport.model_validate_json,
                 "signpost evaluation report", f"remove {evaluation_dir} and run `signpost evaluate` again")


# --- results.json: the bench stage's table ----------------------------------------------------------------------


class MeasuredVariant(BaseModel):
    """A variant as the bench results record it: optimize's row without its folder, forms and settings."""

    model_config = ConfigDict(extra="forbid")

    name: str
    method: str
    status: VariantStatus
    reason: str
    val_acc: float | None
    test_acc: float | None
    size_bytes: int | None
    mflops: float | None
    role: Role


class Stability(BaseModel):
    """How many timed rows settled, before and after the repeat passes, and why the repeats stopped."""

    model_config = ConfigDict(extra="forbid")

    rows: int = Field(ge=0)
    unstable_first_pass: int = Field(ge=0)
    unstable: int = Field(ge=0)
    repeat_passes: int = Field(ge=0)
    repeat_measurements: int = Field(ge=0)
    repeat_seconds: float = Field(description="time spent repeating, s")
    stopped: str


class BenchResults(BaseModel):
    """``results.json``: the bench's measured matrix, the machine it ran on and the deployable choice."""

    model_config = ConfigDict(extra="forbid")

    machine: dict[str, Any] = Field(description="cpu, arch, isa, cores, library versions, BLAS")
    peaks_gflops: dict[str, dict[str, float]] = Field(description="threads → fp32 / bf16 matmul peak, GFLOP/s")
    peak_measurements: dict[str, list[dict[str, float]]] = Field(description="threads → the peaks before and after "
                                                                             "the cells")
    baseline: str
    optimize: str = Field(description="the optimize artifact measured (folder name)")
    data: str = Field(description="the prepared data measured on (folder name)")
    settings: dict[str, Any] = Field(description="the bench section of the config")
    variants: list[MeasuredVariant]
    rows: list[dict[str, Any]] = Field(description="one per cell and batch size; a failed cell has one, batch None")
    stability: Stability
    seconds: float
    candidate: Candidate | None = Field(description="the deployable choice at bench.deploy_batch_size")
    candidates_by_batch: dict[str, Candidate | None] = Field(description="batch size → its fastest cell")


def results_json(results: BenchResults) -> str:
    """The text of ``results.json``: only the fields the bench set (a choice at one batch size has no
    ``small_batch``), one key a line."""
    return json.dumps(results.model_dump(mode="json", exclude_unset=True), indent=1) + "\n"


def read_results(bench_folder: Path, *, verify: bool = True, signed: bool = False) -> BenchResults:
    """The bench folder's results, validated; with ``verify`` first checked against the artifact's manifest (with
    ``signed``, its signature too, under this process's policy)."""
    bench_folder = Path(bench_folder)
    if verify:
        verify_artifact(bench_folder, [RESULTS], signed=signed)
    return _load(bench_folder / RESULTS, BenchResults.model_validate_json, "signpost bench results file",
                 f"remove {bench_folder} and run `signpost bench` again")


def load_results(path: Path) -> BenchResults:
    """A results file on its own, validated: one copied off another machine has no manifest beside it."""
    return _load(Path(path), BenchResults.model_validate_json, "signpost bench results file",
                 "give the results.json of a bench folder, as `signpost bench` wrote it")


# --- reading -------------------------------------------------------------------------------------------------

_T = TypeVar("_T")


def _load(path: Path, parse: Callable[[str], _T], what: str, fix: str) -> _T:
    """``parse`` of the file's text; an unreadable or invalid file is an ``ArtifactError`` naming the file, its
    first problems and ``fix``."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"{path}: not a readable {what} ({exc.__class__.__name__}: {exc}); {fix}") from None
    try:
        return parse(text)
    except ValidationError as exc:
        raise ArtifactError(f"{path}: not a {what} ({_problems(exc)}); {fix}") from None


def _problems(exc: ValidationError) -> str:
    """The first three problems of a validation, each as ``field.path: message`` (``0.status`` is row 0's)."""
    return "; ".join(f"{'.'.join(map(str, e['loc'])) or 'file'}: {e['msg']}" for e in exc.errors()[:3])
