"""The HTML report of one `signpost run`: one self-contained file (pictures embedded) that a person reads first.

It is built only from artifacts on disk (manifests, the typed files stages hand each other, PNGs), so it says exactly
what the stages wrote. It reads them as they are, without checking them against their manifests again: the stages
that made or reused them in this run have just done so.
"""

from __future__ import annotations

import base64
import datetime as dt
import html
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from signpost.contracts import EvaluationReport, Gate, read_evaluation, read_results, read_variants

_STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 2rem auto; max-width: 1100px; color: #222; padding: 0 1rem; }
h1 { margin-bottom: .2rem; } h2 { margin-top: 2.2rem; border-bottom: 1px solid #ddd; padding-bottom: .3rem; }
table { border-collapse: collapse; margin: .6rem 0; } td, th { border: 1px solid #ddd; padding: .25rem .6rem; }
th { background: #f5f5f5; text-align: left; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
.pass { color: #176f2c; font-weight: 600; } .fail { color: #b3261e; font-weight: 600; } .skip { color: #777; }
.badge { display: inline-block; padding: .2rem .7rem; border-radius: 1rem; color: #fff; font-weight: 600; }
.badge.pass { background: #2e7d32; } .badge.fail { background: #c62828; }
img { max-width: 100%; border: 1px solid #eee; margin: .4rem 0; } code { background: #f4f4f4; padding: 0 .25rem; }
tr.low td { background: #fdecea; } .muted { color: #666; }
"""


def write_run_report(
    path: Path,
    *,
    config_name: str,
    outcomes: Sequence[Any],
    data_dir: Path,
    model_dir: Path,
    evaluation_dir: Path,
    registered: str | None,
    optimize_dir: Path | None = None,
    bench_dir: Path | None = None,
) -> Path:
    """Write the report of a run to ``path`` (an .html file) and return it.

    ``optimize_dir`` and ``bench_dir`` add the variants table, the benchmark table and chart when those ran.
    """
    data = _json(data_dir / "manifest.json")
    model = _json(model_dir / "manifest.json")
    report = read_evaluation(evaluation_dir, verify=False)
    gate = report.gate
    verdict = "pass" if gate.passed else "fail"
    sections = [
        f"<h1>Signpost run: {_e(config_name)}</h1>",
        f'<p class="muted">{dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M UTC} · code '
        f'{_e(str(model.get("code", {}).get("git") or "uncommitted"))[:12]} · '
        f'<span class="badge {verdict}">gate {"passed" if gate.passed else "FAILED"}</span></p>',
        _stages(outcomes),
        _lineage(data, model, report, registered),
        _gate(gate),
        _metrics(report),
        "<h2>Training</h2>" + _schedule(model) + _img(model_dir / "training_curves.png", "training curves")
        + _history(model),
        "<h2>Confusion matrix</h2>" + _img(evaluation_dir / "confusion_matrix.png", "confusion matrix"),
        "<h2>Calibration</h2>" + _img(evaluation_dir / "reliability.png", "reliability diagram"),
        _per_class(report),
        "<h2>Most confident mistakes</h2>" + _img(evaluation_dir / "misclassified.png", "misclassified images"),
        _variants(optimize_dir) if optimize_dir else "",
        _bench(bench_dir) if bench_dir else "",
        _data(data, data_dir),
    ]
    page = (
        f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>Signpost run: {_e(config_name)}</title>'
        f"<style>{_STYLE}</style></head><body>{''.join(sections)}</body></html>"
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page, encoding="utf-8")
    return path


def _stages(outcomes: Sequence[Any]) -> str:
    rows = "".join(
        f"<tr><td>{_e(o.stage)}</td><td class=\"{'skip' if o.skipped else 'pass'}\">"
        f"{'skipped' if o.skipped else 'ran'}</td><td>{_e(o.reason)}</td><td><code>{_e(str(o.path))}</code></td></tr>"
        for o in outcomes
    )
    return f"<h2>Stages</h2><table><tr><th>stage</th><th></th><th>why</th><th>artifact</th></tr>{rows}</table>"


def _lineage(data: dict, model: dict, report: EvaluationReport, registered: str | None) -> str:
    sources = data["inputs"]
    steps = [
        ("prepared data", f"{_code(data['key'])} from {sources['files']} files ({_code(sources['sources_sha256'])})"),
        *_feedback_lineage(data),
        ("trained model", f"{_code(model['key'])} from data {_code(model['inputs']['data_key'])}"),
        ("training run", _code(model["tracking_run"]) if model.get("tracking_run") else "<span class=\"muted\">"
                         "not tracked</span>"),
        ("evaluation", f"test top-1 {report.metrics['top1']:.4f} on data {_code(report.data.key)}"),
        ("registry", _e(registered) if registered else '<span class="muted">not registered</span>'),
    ]
    items = "".join(f"<tr><th>{name}</th><td>{value}</td></tr>" for name, value in steps)
    return f"<h2>Lineage</h2><table>{items}</table>"


def _feedback_lineage(data: dict) -> list[tuple[str, str]]:
    lineage = data.get("lineage") or {}
    batches = lineage.get("feedback") or []
    if not batches:
        return []
    images = sum(b["images"] for b in batches)
    held = sum(b["holdout"] for b in batches)
    names = ", ".join(f"<code>{_e(b['batch'])}</code>" for b in batches)
    return [("feedback", f"{images} labelled images ({held} held out for the champion / challenger comparison) "
                         f"from {names}, on top of <code>{_e(lineage['base'])}</code>")]


def _gate(gate: Gate) -> str:
    rows = "".join(
        f"<tr><td>{_e(r['rule'])}</td><td>{_e(r['metric'])}</td><td class=\"num\">{_num(r.get('threshold'))}</td>"
        f"<td class=\"num\">{_num(r.get('value'))}</td><td class=\"{_verdict_class(r['verdict'])}\">{_e(r['verdict'])}"
        f"</td><td>{_e(r.get('detail') or '')}</td></tr>"
        for r in gate.rules
    )
    return (
        "<h2>Gate</h2><table><tr><th>rule</th><th>metric</th><th>threshold</th><th>value</th><th>verdict</th>"
        f"<th>detail</th></tr>{rows}</table>"
    )


def _metrics(report: EvaluationReport) -> str:
    cells = "".join(f"<tr><th>{_e(k)}</th><td class=\"num\">{_num(v)}</td></tr>" for k, v in report.metrics.items())
    return f"<h2>Test metrics</h2><table>{cells}</table>"


def _schedule(model: dict) -> str:
    """How long the model trained, and why longer than configured when train.min_steps raised the epochs."""
    schedule = model.get("schedule")
    if not schedule:
        return ""  # a model trained before schedules were recorded
    line = (f"{schedule['total_steps']:,} optimizer steps: {schedule['epochs']} epochs of "
            f"{schedule['steps_per_epoch']:,}, {schedule['warmup_steps']:,} of them warm-up")
    note = f"<br><strong>{_e(schedule['note'])}</strong>" if schedule.get("raised") else ""
    return f"<p>{line}{note}</p>"


def _history(model: dict) -> str:
    history = model.get("history") or []
    if not history:
        return ""
    head = "".join(f"<th>{_e(k)}</th>" for k in history[0])
    rows = "".join("<tr>" + "".join(f'<td class="num">{_num(v)}</td>' for v in h.values()) + "</tr>" for h in history)
    return f"<details><summary>per-epoch numbers</summary><table><tr>{head}</tr>{rows}</table></details>"


def _per_class(report: EvaluationReport) -> str:
    threshold = next((r.get("threshold") for r in report.gate.rules if r["rule"] == "min_class_accuracy"), None)
    rows = []
    for c in sorted(report.per_class, key=lambda c: (c["recall"] is None, c["recall"] or 0.0)):
        low = threshold is not None and c["recall"] is not None and c["recall"] < threshold
        row_class = ' class="low"' if low else ""
        rows.append(
            f'<tr{row_class}><td class="num">{c["id"]}</td><td>{_e(c["name"])}</td>'
            + "".join(f'<td class="num">{_num(c[k])}</td>' for k in ("precision", "recall", "f1", "support"))
            + "</tr>"
        )
    return (
        "<h2>Per class</h2><p class=\"muted\">Worst recall first; rows below the gate's class threshold are red.</p>"
        "<table><tr><th>id</th><th>class</th><th>precision</th><th>recall</th><th>F1</th><th>support</th></tr>"
        + "".join(rows) + "</table>"
    )


def _variants(optimize_dir: Path) -> str:
    rows = []
    for v in read_variants(optimize_dir, verify=False):
        status = "control" if v.role == "control" else v.status
        css = {"ok": "pass", "rejected": "fail", "failed": "fail"}.get(status, "skip")
        size = f"{v.size_bytes / 1024:.0f} KiB" if v.size_bytes else "–"
        mflops = f"{v.mflops:.1f}" if v.mflops else "–"
        rows.append(
            f"<tr><td>{_e(v.name)}</td><td>{_e(v.method)}</td><td class=\"{css}\">{_e(status)}</td>"
            f'<td class="num">{_num(v.val_acc)}</td><td class="num">{_num(v.test_acc)}</td>'
            f'<td class="num">{size}</td><td class="num">{mflops}</td><td>{_e(", ".join(v.forms))}</td>'
            f"<td>{_e(v.reason)}</td></tr>"
        )
    return (
        "<h2>Optimized variants</h2><p class=\"muted\">Each held to the accuracy budget against fp32 on test top-1; "
        "the student trained alone is the distillation's control.</p><table><tr><th>variant</th><th>method</th>"
        "<th>status</th><th>val top-1</th><th>test top-1</th><th>size</th><th>MFLOP</th><th>forms</th><th>reason</th>"
        "</tr>" + "".join(rows) + "</table>"
    )


def _bench(bench_dir: Path) -> str:
    results = read_results(bench_dir, verify=False)
    m = results.machine
    head = ("variant", "runtime", "math", "threads", "batch", "status", "top-1", "images/s", "p50 ms", "p99 ms",
            "speedup", "GFLOP/s", "% bf16 peak")
    rows = []
    for r in results.rows:
        if r["status"] in ("failed", "skipped"):
            cells = [r["variant"], r["runtime"], r["math"], r["threads"], "–", f"{r['status']}: {r['reason']}"]
            rows.append("<tr>" + "".join(f"<td>{_e(str(c))}</td>" for c in cells) + "<td></td>" * 7 + "</tr>")
            continue
        cells = [r["variant"], r["runtime"], r["math"], r["threads"], r["batch"], r["status"], f"{r['top1']:.4f}",
                 f"{r['images_per_s']:,.0f}", f"{r['ms_median']:.3f}", f"{r['ms_p99']:.3f}",
                 f"{r['speedup']:.2f}x" if r["speedup"] else "–", f"{r['gflops']:.0f}",
                 f"{100 * r['bf16_peak_fraction']:.0f}%" if r["bf16_peak_fraction"] is not None else "–"]
        rows.append("<tr>" + "".join(f"<td>{_e(str(c))}</td>" for c in cells) + "</tr>")
    candidate = results.candidate
    choice = (f"<p><b>Deployable choice:</b> {_e(candidate.variant)} on {_e(candidate.runtime)} "
              f"({_e(candidate.math)}) — {_e(candidate.reason)}.</p>" if candidate else
              '<p class="muted">No variant within the accuracy budget was measured at the deploy batch size.</p>')
    return (
        f"<h2>Benchmark</h2><p class=\"muted\">{_e(m['cpu'])} ({_e(m['arch'])}, {m['physical_cores']} cores); "
        f"{_e(results.baseline)}. Each setting ran in a fresh process; warm-up and compilation excluded.</p>"
        + choice + _img(bench_dir / "chart.png", "benchmark chart")
        + "<details><summary>all cells</summary><table><tr>" + "".join(f"<th>{h}</th>" for h in head) + "</tr>"
        + "".join(rows) + "</table></details>"
    )


def _data(data: dict, data_dir: Path) -> str:
    dataset = data["dataset"]
    counts = ", ".join(f"{k.removesuffix('_images')} {v:,}" for k, v in data["metrics"].items())
    return (
        f"<h2>Data</h2><p>{_e(dataset['layout'])} layout, {dataset['num_classes']} classes, {_e(counts)} images at "
        f"{dataset['image_size']}px; {len(data.get('skipped', []))} unreadable images skipped.</p>"
        + _img(data_dir / "preview.png", "one training image per class")
    )


def _img(path: Path, alt: str) -> str:
    if not path.is_file():
        return f'<p class="muted">({_e(alt)}: not produced)</p>'
    encoded = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img alt="{_e(alt)}" src="data:image/png;base64,{encoded}">'


def _code(key: str) -> str:
    """A content hash, shortened the way artifact folder names shorten it."""
    return f"<code>{_e(key[:12])}</code>"


def _json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def _num(value: object) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.4f}"
    return _e(str(value))


def _verdict_class(verdict: str) -> str:
    return {"pass": "pass", "fail": "fail"}.get(verdict, "skip")


def _e(text: str) -> str:
    return html.escape(text, quote=True)
