"""A bench folder's ``candidate.json`` is checked against the bench manifest and validated: an edit cannot point the
server (or the package stage) at another path, and a malformed file is a one-line error, not a traceback."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from signpost.artifacts import ArtifactError, hash_file, write_manifest
from signpost.cli import main
from signpost.config import SignpostConfig
from signpost.contracts import CANDIDATE, read_candidate
from signpost.serve.model import resolve

GOOD = {"variant": "int8", "runtime": "compile", "math": "bf16", "threads": 2, "batch": 64, "images_per_s": 1e4,
        "top1": 0.9, "reason": "fastest", "small_batch": {"runtime": "onnxruntime", "math": "default", "below": 8,
                                                          "reason": "p50"}}


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    """A workdir with an optimize run (one variant) and a bench folder whose candidate names that variant."""
    work = tmp_path / "work"
    run = work / "optimize" / "demo-0123456789ab"
    variant = run / "int8"
    variant.mkdir(parents=True)
    write_manifest(variant, stage="optimize", key="v", inputs={}, config={}, code="c")
    write_manifest(run, stage="optimize", key="run-key", inputs={}, config={}, code="c")
    bench = work / "bench" / "demo-ba9876543210"
    bench.mkdir(parents=True)
    (bench / CANDIDATE).write_text(json.dumps(GOOD | {"folder": str(variant)}), encoding="utf-8")
    write_manifest(bench, stage="bench", key="b", inputs={"optimize": run.name, "optimize_key": "run-key"},
                   config={}, code="c")
    return work


def _bench(work: Path) -> Path:
    return next((work / "bench").iterdir())


def _rewrite(bench: Path, candidate: dict, *, rehash: bool) -> None:
    """Edit the candidate; with ``rehash`` also its manifest hash, as an attacker who can write the folder would."""
    (bench / CANDIDATE).write_text(json.dumps(candidate), encoding="utf-8")
    if rehash:
        manifest = json.loads((bench / "manifest.json").read_text())
        manifest["files"][CANDIDATE] = hash_file(bench / CANDIDATE)
        (bench / "manifest.json").write_text(json.dumps(manifest))


def test_a_valid_candidate_resolves_to_the_measured_variant(workdir: Path) -> None:
    source = resolve(_bench(workdir), SignpostConfig(workdir=workdir))
    assert source.folder == workdir / "optimize" / "demo-0123456789ab" / "int8"
    assert (source.runtime, source.bf16, source.small_runtime, source.small_below) == ("compile", True,
                                                                                       "onnxruntime", 8)


def test_an_edited_candidate_is_refused_by_its_hash(workdir: Path, tmp_path: Path) -> None:
    bench = _bench(workdir)
    _rewrite(bench, GOOD | {"folder": str(tmp_path / "elsewhere")}, rehash=False)
    with pytest.raises(ArtifactError, match=r"candidate\.json does not match its manifest"):
        resolve(bench, SignpostConfig(workdir=workdir))


@pytest.mark.parametrize("folder", ["/etc", "../../../../tmp/evil/int8", "{run}/../other/int8"])
def test_a_rehashed_candidate_cannot_name_another_path(workdir: Path, tmp_path: Path, folder: str) -> None:
    bench = _bench(workdir)
    evil = tmp_path / "evil" / "int8"  # a model folder the attacker controls
    evil.mkdir(parents=True)
    write_manifest(evil, stage="optimize", key="evil", inputs={}, config={}, code="c")
    folder = folder.format(run=workdir / "optimize" / "demo-0123456789ab")
    _rewrite(bench, GOOD | {"folder": folder}, rehash=True)
    with pytest.raises(ArtifactError, match="is not variant 'int8' of the measured optimize run"):
        resolve(bench, SignpostConfig(workdir=workdir))


def test_a_variant_name_cannot_climb_out_of_the_run(workdir: Path) -> None:
    bench = _bench(workdir)
    _rewrite(bench, GOOD | {"variant": "..", "folder": str(workdir / "optimize")}, rehash=True)
    with pytest.raises(ArtifactError, match=r"variant: Value error, '\.\.' is not a variant folder name"):
        read_candidate(bench)


def test_another_optimize_run_under_the_same_name_is_refused(workdir: Path) -> None:
    run = workdir / "optimize" / "demo-0123456789ab"
    write_manifest(run, stage="optimize", key="another-key", inputs={}, config={}, code="c")
    with pytest.raises(ArtifactError, match="not the optimize run the bench measured"):
        resolve(_bench(workdir), SignpostConfig(workdir=workdir))


@pytest.mark.parametrize(("candidate", "message"), [
    ({}, "variant: Field required"),
    (GOOD | {"small_batch": {"runtime": "onnxruntime", "below": 8, "reason": "p50"}},
     "small_batch.math: Field required"),
    (GOOD | {"runtime": "tensorrt"}, "runtime: Input should be"),
    (GOOD | {"extra": 1}, "extra: Extra inputs are not permitted"),
])
def test_a_malformed_candidate_is_a_one_line_cli_error(
    workdir: Path, candidate: dict, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    bench = _bench(workdir)
    _rewrite(bench, candidate | ({"folder": "x"} if candidate else {}), rehash=True)
    code = main(["serve", "--model", str(bench), f"workdir={workdir}", "tracking.backend=none"])
    err = capsys.readouterr().err
    assert code == 1
    assert err.startswith("error: ") and "not a valid candidate file" in err and message in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
