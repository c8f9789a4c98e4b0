"""A pull request's verdict as one markdown comment, rendered from the run's own files.

The comment opens with a hidden marker (``MARKER``) so the workflow finds its earlier comment and updates it on each
push instead of adding another. Then: the gate's verdict and every rule it applied; the challenger against the
champion from the evaluation report (or why no champion was compared); this run's bench against a baseline results
file (main's), with the same-architecture regression verdict of ``bench_table.compare_results``; the model card
(classes, image size, architecture, data key); and a link to the run. Every figure comes from ``report.json`` and
``results.json`` as their contracts read them: nothing is typed in by the workflow.
"""

from __future__ import annotations

from signpost.contracts import BenchResults, EvaluationReport
from signpost.report.bench_table import architecture, compare_results, machine_line

MARKER = "<!-- signpost-pr-comment -->"
_METRICS = ("top1", "top5", "macro_f1", "feedback_top1", "ece", "nll")  # lower is better for the last two


def pr_comment(evaluation: EvaluationReport, *, bench: BenchResults | None = None,
               baseline: BenchResults | None = None, run_url: str | None = None, threshold: float = 0.10,
               champion_scored_here: bool = False) -> str:
    """The comment's markdown: marker first, then gate, challenger vs champion, bench against ``baseline``, model
    card and links. ``threshold``: a cell more than this fraction slower than the baseline's is a regression.
    ``champion_scored_here``: the evaluation scored the champion on its own test split
    (``evaluate.register_challenger: false``), rather than taking the top-1 logged when the champion was
    registered; the comment says which."""
    gate = evaluation.gate
    verdict = "passed" if gate.passed else "FAILED"
    lines = [MARKER, f"## Signpost: the gate {verdict} — {evaluation.model.architecture}, top-1 "
             f"{evaluation.metrics['top1']:.4f}", ""]
    lines += [*_gate(evaluation), "", *_champion(evaluation, champion_scored_here), ""]
    lines += [*_bench(bench, baseline, threshold), "", *_card(evaluation), "", *_links(run_url)]
    return "\n".join(lines) + "\n"


def _gate(evaluation: EvaluationReport) -> list[str]:
    gate = evaluation.gate
    lines = ["### Gate", "", f"**{'Passed' if gate.passed else 'Failed'}**: {len(gate.rules)} rules, "
             f"{len(gate.failures)} failed.", "", "| rule | metric | value | threshold | verdict | detail |",
             "|---|---|---|---|---|---|"]
    for rule in gate.rules:
        threshold = "-" if rule.get("threshold") is None else f"{rule['threshold']:.4f}"
        detail = str(rule.get("detail", "")).replace("|", "/")
        lines.append(f"| {rule['rule']} | {rule['metric']} | {rule['value']:.4f} | {threshold} | "
                     f"{'**fail**' if rule['verdict'] == 'fail' else rule['verdict']} | {detail} |")
    return lines


def _champion(evaluation: EvaluationReport, scored_here: bool) -> list[str]:
    data = evaluation.data
    where = f"the {data.split} split of data `{data.key[:12]}` ({data.images:,} images)"
    whose = (f"Both scored on {where}: the champion as the challenger, in this run." if scored_here else
             f"The challenger scored on {where}; the champion's figures are those logged when it was registered "
             "(on its own test data), which the gate compared against.")
    lines = ["### Challenger vs champion", "", whose, ""]
    champion = evaluation.champion
    if champion is None:
        return [*lines, f"No champion compared: {evaluation.champion_skipped or 'none was given'}."]
    lines += ["| metric | challenger | champion | challenger − champion |", "|---|---|---|---|"]
    for name in (m for m in _METRICS if m in evaluation.metrics):
        ours = evaluation.metrics[name]
        theirs = champion.get(name)
        if theirs is None:
            lines.append(f"| {name} | {ours:.4f} | - | - |")
        else:
            lines.append(f"| {name} | {ours:.4f} | {theirs:.4f} | {ours - theirs:+.4f} |")
    return lines


def _bench(bench: BenchResults | None, baseline: BenchResults | None, threshold: float) -> list[str]:
    lines = ["### Bench", ""]
    if bench is None:
        return [*lines, "No bench in this run."]
    lines += [f"Measured on {machine_line(bench)}.", ""]
    if (c := bench.candidate) is not None:
        lines.append(f"Deployable: **{c.variant} / {c.runtime} / {c.math}**, {c.threads} threads, batch {c.batch}: "
                     f"{c.images_per_s:,.0f} images/s, top-1 {c.top1:.4f}.")
    else:
        lines.append("No deployable cell: nothing within the accuracy budget measured ok.")
    lines.append("")
    if baseline is None:
        lines += ["No baseline results from main (`--baseline`): no regression verdict. Fastest cell at each batch "
                  "size:", "", "| batch | variant | runtime | math | images/s |", "|---|---|---|---|---|"]
        lines += [f"| {b} | {cell.variant} | {cell.runtime} | {cell.math} | {cell.images_per_s:,.0f} |"
                  for b, cell in bench.candidates_by_batch.items() if cell is not None]
        return lines
    table, regressed = compare_results(baseline, bench, a_name="main", b_name="this pull request",
                                       threshold=threshold)
    body, _, summary = table.rpartition("\n")
    if architecture(baseline.machine) != architecture(bench.machine):
        lines.append(f"**No regression verdict**: main's baseline ran on {architecture(baseline.machine)}, this run "
                     f"on {architecture(bench.machine)}; the table gives ratios.")
    else:
        lines.append(f"**{'REGRESSION' if regressed else 'No regression'}** against main "
                     f"(threshold {100 * threshold:.0f}% slower images/s).")
    return [*lines, "", summary, "", "<details><summary>Every cell against main</summary>", "", body.rstrip(), "",
            "</details>"]


def _card(evaluation: EvaluationReport) -> list[str]:
    model = evaluation.model
    size = evaluation.image_size
    classes = evaluation.class_names
    shown = ", ".join(name.replace("|", "/") for name in classes[:8])
    shown += f", … ({len(classes) - 8} more)" if len(classes) > 8 else ""
    return ["### Model card", "", "| | |", "|---|---|", f"| architecture | {model.architecture} |",
            f"| classes | {len(classes)}: {shown} |", f"| image size | {size}×{size} px |",
            f"| data key | `{model.data_key}` |", f"| model key | `{model.key}` |"]


def _links(run_url: str | None) -> list[str]:
    if not run_url:
        return ["### Links", "", "No run URL given (`--run-url`)."]
    return ["### Links", "", f"- [The workflow run]({run_url}): its HTML report, bench table and chart are the "
            "run's artifacts."]
