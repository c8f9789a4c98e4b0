"""A pull request's comment rendered from a real evaluation and bench: the marker first, the gate and its rules, the
challenger against the champion, the bench against main's with the same-architecture verdict, the model card."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from signpost.cli import main
from signpost.contracts import RESULTS, BenchResults, read_evaluation, read_results
from signpost.report.pr_comment import MARKER, pr_comment


def _baseline(bench: Path, path: Path, *, scale: float, arch: str | None = None) -> Path:
    """main's results as a copy of ``bench``'s, every cell ``scale`` times as fast (on ``arch``, when given)."""
    results = json.loads((bench / RESULTS).read_text(encoding="utf-8"))
    for row in results["rows"]:
        if row["status"] != "failed":
            row["images_per_s"] *= scale
    if arch:
        results["machine"]["arch"] = arch
    path.write_text(json.dumps(results), encoding="utf-8")
    return path


@pytest.mark.slow
def test_the_comment_carries_the_gate_the_champion_the_bench_and_the_card(
    evaluated: Path, backends: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    report = read_evaluation(evaluated)
    main_results = _baseline(backends, tmp_path / "main.json", scale=2.0)  # main twice as fast: a regression
    args = ["report", "pr-comment", "--evaluation", str(evaluated), "--bench", str(backends), "--baseline",
            str(main_results), "--run-url", "https://github.com/o/r/actions/runs/1"]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert text.splitlines()[0] == MARKER
    verdict = "passed" if report.gate.passed else "FAILED"
    assert f"## Signpost: the gate {verdict} — {report.model.architecture}, top-1 {report.metrics['top1']:.4f}" in text
    for rule in report.gate.rules:  # every rule, with its value and verdict
        assert f"| {rule['rule']} | {rule['metric']} | {rule['value']:.4f} |" in text
    top1 = report.metrics["top1"]
    assert f"| top1 | {top1:.4f} | 0.3000 | {top1 - 0.3:+.4f} |" in text
    assert f"| top5 | {report.metrics['top5']:.4f} | 0.8000 |" in text
    assert f"data `{report.data.key[:12]}` ({report.data.images:,} images)" in text
    # which champion figures these are: logged at its registration (evaluate.register_challenger true, as here) ...
    assert "the champion's figures are those logged when it was registered (on its own test data)" in text
    # ... or scored on this same split, as a pull request's evaluate does
    assert "Both scored on the test split of data" in pr_comment(report, champion_scored_here=True)
    assert "**REGRESSION** against main" in text and "Verdict: REGRESSION" in text
    candidate = read_results(backends).candidate
    assert f"Deployable: **{candidate.variant} / {candidate.runtime} / {candidate.math}**" in text
    assert f"| classes | {len(report.class_names)}: {report.class_names[0]}" in text
    assert f"| image size | {report.image_size}×{report.image_size} px |" in text
    assert f"| data key | `{report.model.data_key}` |" in text
    assert "[The workflow run](https://github.com/o/r/actions/runs/1)" in text
    # main measured on the other architecture: ratios, never a regression
    arm = _baseline(backends, tmp_path / "arm.json", scale=2.0, arch="aarch64")
    text = pr_comment(report, bench=read_results(backends), baseline=BenchResults.model_validate_json(arm.read_text()))
    assert "REGRESSION" not in text and "**No regression verdict**: main's baseline ran on Arm64" in text
    assert "Arm64 vs x86-64" in text and "No run URL given (`--run-url`)" in text


@pytest.mark.slow
def test_without_a_champion_bench_or_baseline_the_comment_says_so(
    evaluated: Path, backends: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    report = read_evaluation(evaluated)
    alone = report.model_copy(update={"champion": None, "champion_skipped": "the champion was trained for 43 classes"})
    text = pr_comment(alone)
    assert "No champion compared: the champion was trained for 43 classes." in text and "No bench in this run." in text
    text = pr_comment(alone, bench=read_results(backends))
    assert "No baseline results from main (`--baseline`): no regression verdict" in text
    same = _baseline(backends, tmp_path / "same.json", scale=1.0)
    assert main(["report", "pr-comment", "--evaluation", str(evaluated), "--bench", str(backends),
                 "--baseline", str(same)]) == 0
    assert "**No regression** against main" in capsys.readouterr().out
    # bad inputs: one line naming the file, exit 1
    assert main(["report", "pr-comment", "--evaluation", str(backends)]) == 1
    assert "report.json is not listed in the manifest" in capsys.readouterr().err
    (tmp_path / "junk.json").write_text("{}")
    junk = str(tmp_path / "junk.json")
    assert main(["report", "pr-comment", "--evaluation", str(evaluated), "--baseline", junk]) == 1
    err = capsys.readouterr().err
    assert "junk.json: not a signpost bench results file" in err and "Traceback" not in err
