"""The printed summaries of a stage's outcome: prepare's data, evaluate's scores and gate, optimize's variants and
bench's table."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the stages import torch and MLflow: loaded only by the commands that need them
    from signpost.contracts import BenchResults, VariantRow
    from signpost.registry import ModelVersion
    from signpost.stages.evaluate import EvaluateResult
    from signpost.stages.promote import Decision


def print_prepared(path: Path, reused: bool, manifest: dict) -> None:
    """The prepared data: its layout, split sizes, skipped images and decoding rate."""
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


def print_evaluation(
    result: EvaluateResult, version: ModelVersion | None, decision: Decision | None = None
) -> None:
    """The evaluation: its scores, the gate's verdict and failures, registration and promotion."""
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
        print_decision(decision, version.name, indent="  ")


def print_decision(decision: Decision, name: str, *, indent: str = "") -> None:
    """The champion / challenger decision: who is champion now, and why."""
    if decision.promoted:
        print(f"{indent}promoted {name} v{decision.challenger} to champion: {decision.reason}")
    else:
        print(f"{indent}{name} v{decision.champion} stays champion (v{decision.challenger} stays challenger): "
              f"{decision.reason}")


def print_variants(path: Path, reused: bool, variants: list[VariantRow]) -> None:
    """The variants as a table: status, val and test accuracy, size, MFLOP, forms or why not."""
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


def print_bench(path: Path, reused: bool, results: BenchResults) -> None:
    """The bench: failed cells, timing stability (warnings on stderr), the deployable and the fastest per batch."""
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
