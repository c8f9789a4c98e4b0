"""The typed contracts of the files stages hand each other: optimize's ``variants.json``, evaluate's ``report.json``
and bench's ``results.json``.

A file a stage wrote reads back as its model and is written again byte for byte. A file of another shape is refused
with an ``ArtifactError`` that names the file and the field, even when its manifest hash was rewritten to match (as
someone who can write the folder would): the contract is what refuses it, not a ``KeyError`` three calls later.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from signpost.artifacts import ArtifactError, hash_file, verify_artifact
from signpost.config import load_config
from signpost.contracts import (
    EVALUATION_REPORT,
    RESULTS,
    VARIANTS_FILE,
    load_results,
    read_evaluation,
    read_results,
    read_variants,
    results_json,
    variants_json,
)
from signpost.stages.bench import bench
from signpost.stages.evaluate import evaluate

# One cell, one batch size, one short measurement: enough for a results.json of every field.
ONE_CELL = ["bench.variants=[fp32]", "bench.runtimes=[eager]", "bench.math=[default]", "bench.threads=[1]",
            "bench.batch_sizes=[1]", "bench.min_seconds=0.05", "bench.max_seconds=0.2", "bench.repeats=0",
            "bench.deploy_batch_size=1"]


@pytest.fixture(scope="module")
def work(optimized: dict, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The session's optimized model in a workdir of this module's own, with a one-cell bench matrix."""
    path = tmp_path_factory.mktemp("contracts")
    config = optimized["config"].model_copy(update={"workdir": path, "bench": load_config(None, ONE_CELL).bench})
    return optimized | {"config": config}


@pytest.fixture(scope="module")
def written(work: dict) -> Callable[[str], Path]:
    """The folder the stage wrote each file in, made when first asked for: the session's optimize run, an
    evaluation of its model (seconds) and a one-cell bench of its variants (about 15 s: two matmul peaks and a
    subprocess that imports torch)."""
    made: dict[str, Path] = {VARIANTS_FILE: work["result"].path}

    def folder(name: str) -> Path:
        if name == EVALUATION_REPORT and name not in made:
            made[name] = evaluate(work["config"], model_dir=work["model_dir"], data_dir=work["data_dir"],
                                  progress=False).path
        if name == RESULTS and name not in made:
            made[name] = bench(work["config"], optimize_dir=work["result"].path, data_dir=work["data_dir"],
                               progress=False).path
        return made[name]

    return folder


def test_the_variants_table_reads_back_and_writes_the_same_bytes(written: Callable[[str], Path]) -> None:
    variants = read_variants(written(VARIANTS_FILE), signed=True)
    assert variants_json(variants) == (written(VARIANTS_FILE) / VARIANTS_FILE).read_text(encoding="utf-8")
    assert variants[0].name == "fp32" and variants[0].status == "ok" and variants[0].path == "fp32"


def test_the_evaluation_report_reads_back_and_writes_the_same_bytes(written: Callable[[str], Path]) -> None:
    report = read_evaluation(written(EVALUATION_REPORT))
    text = json.dumps(report.model_dump(mode="json"), indent=2) + "\n"
    assert text == (written(EVALUATION_REPORT) / EVALUATION_REPORT).read_text(encoding="utf-8")
    assert 0.0 <= report.metrics["top1"] <= 1.0 and report.gate.passed is not bool(report.gate.failures)
    assert len(report.per_class) == len(report.class_names) == len(report.confusion_matrix)


@pytest.mark.slow
def test_the_bench_results_read_back_and_write_the_same_bytes(written: Callable[[str], Path]) -> None:
    results = read_results(written(RESULTS))
    assert results_json(results) == (written(RESULTS) / RESULTS).read_text(encoding="utf-8")
    assert [(r["variant"], r["runtime"], r["batch"]) for r in results.rows] == [("fp32", "eager", 1)]
    assert results.candidate is not None and results.candidate.variant == "fp32"
    assert "small_batch" not in json.loads(results_json(results))["candidates_by_batch"]["1"]  # as the bench set it
    assert load_results(written(RESULTS) / RESULTS) == results  # a results file on its own, as compare reads it


def _variants(table: list[dict[str, Any]]) -> None:
    table[0]["speed"] = "fast"


def _variants_missing(table: list[dict[str, Any]]) -> None:
    del table[0]["test_acc"]


def _variants_type(table: list[dict[str, Any]]) -> None:
    table[0]["size_bytes"] = "big"


def _unknown(doc: dict[str, Any]) -> None:
    doc["speed"] = "fast"


def _report_missing(doc: dict[str, Any]) -> None:
    del doc["gate"]


def _report_type(doc: dict[str, Any]) -> None:
    doc["metrics"]["top1"] = "high"


def _results_missing(doc: dict[str, Any]) -> None:
    del doc["stability"]


def _results_type(doc: dict[str, Any]) -> None:
    doc["rows"] = "all of them"


CASES = {
    "variants-unknown": (VARIANTS_FILE, read_variants, _variants, "0.speed: Extra inputs are not permitted"),
    "variants-missing": (VARIANTS_FILE, read_variants, _variants_missing, "0.test_acc: Field required"),
    "variants-type": (VARIANTS_FILE, read_variants, _variants_type, "0.size_bytes: Input should be a valid integer"),
    "report-unknown": (EVALUATION_REPORT, read_evaluation, _unknown, "speed: Extra inputs are not permitted"),
    "report-missing": (EVALUATION_REPORT, read_evaluation, _report_missing, "gate: Field required"),
    "report-type": (EVALUATION_REPORT, read_evaluation, _report_type, "metrics.top1: Input should be a valid number"),
    "results-unknown": (RESULTS, read_results, _unknown, "speed: Extra inputs are not permitted"),
    "results-missing": (RESULTS, read_results, _results_missing, "stability: Field required"),
    "results-type": (RESULTS, read_results, _results_type, "rows: Input should be a valid array"),
}
_BENCHED = pytest.mark.slow  # the first of these makes the one-cell bench


@pytest.mark.parametrize("case", [pytest.param(c, marks=_BENCHED) if CASES[c][0] == RESULTS else c for c in CASES])
def test_an_unknown_missing_or_mistyped_field_is_refused_naming_the_file(
    written: Callable[[str], Path], tmp_path: Path, case: str
) -> None:
    name, read, edit, problem = CASES[case]
    folder = _copy(written(name), name, tmp_path / "copy")
    doc = json.loads((folder / name).read_text(encoding="utf-8"))
    edit(doc)
    (folder / name).write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
    _rehash(folder, name)
    verify_artifact(folder, [name])  # the hash matches: only the contract can refuse the file

    with pytest.raises(ArtifactError) as refused:
        read(folder)
    message = str(refused.value)
    assert message.startswith(f"{folder / name}: not a signpost ")
    assert problem in message and "run `signpost " in message  # the field, and how to get a good file again
    assert "\n" not in message


def test_a_file_edited_without_its_hash_is_refused_by_the_hash(written: Callable[[str], Path], tmp_path: Path) -> None:
    folder = _copy(written(EVALUATION_REPORT), EVALUATION_REPORT, tmp_path / "copy")
    doc = json.loads((folder / EVALUATION_REPORT).read_text(encoding="utf-8"))
    doc["gate"]["passed"] = True
    doc["metrics"]["top1"] = 1.0
    (folder / EVALUATION_REPORT).write_text(json.dumps(doc), encoding="utf-8")
    with pytest.raises(ArtifactError, match=r"report\.json does not match its manifest"):
        read_evaluation(folder)


@pytest.mark.parametrize("text", ["not json {", "[1, 2]", None])
def test_an_unreadable_results_file_is_one_line_naming_it(tmp_path: Path, text: str | None) -> None:
    path = tmp_path / "a.json"
    if text is not None:
        path.write_text(text, encoding="utf-8")
    with pytest.raises(ArtifactError, match=r"a\.json: not a (readable )?signpost bench results file") as refused:
        load_results(path)
    assert "\n" not in str(refused.value)


def test_bench_refuses_a_variants_table_of_another_shape(work: dict, tmp_path: Path) -> None:
    """The bench reads optimize's rows through the contract: a row without its status stops it at the start."""
    (tmp_path / "optimize").mkdir()
    run = _copy(work["result"].path, VARIANTS_FILE, tmp_path / "optimize" / work["result"].path.name)
    table = json.loads((run / VARIANTS_FILE).read_text(encoding="utf-8"))
    del table[0]["status"]
    (run / VARIANTS_FILE).write_text(json.dumps(table), encoding="utf-8")
    _rehash(run, VARIANTS_FILE)
    config = work["config"].model_copy(update={"workdir": tmp_path})
    with pytest.raises(ArtifactError, match=r"variants\.json: not a signpost variants table \(0\.status: Field"):
        bench(config, optimize_dir=run, data_dir=work["data_dir"], progress=False)
    assert not (tmp_path / "bench").exists()  # refused before anything was measured or written


def _copy(folder: Path, name: str, to: Path) -> Path:
    """A folder holding ``name`` and the manifest of ``folder``: all that reading ``name`` checks."""
    to.mkdir()
    for each in (name, "manifest.json"):
        shutil.copyfile(folder / each, to / each)
    return to


def _rehash(folder: Path, name: str) -> None:
    """Rewrite ``name``'s hash in the folder's manifest, as someone who can write the folder would."""
    manifest = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
    manifest["files"][name] = hash_file(folder / name)
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
