"""The report of one `signpost monitor` run: its drift chart (``drift.png``) and ``report.html``, from the typed
result."""

from __future__ import annotations

import html
from pathlib import Path

from signpost.monitoring.drift import histogram
from signpost.monitoring.result import Canary, Devices, DeviceStats, MonitorReport
from signpost.monitoring.verdict import INPUTS, Reference, Window
from signpost.report.plots import drift_png

NAN = float("nan")  # printed as "nan" where the report has no value to show


def drift_chart(window: Window, reference: Reference, report: MonitorReport, path: Path) -> None:
    """The window's predicted classes and image statistics against the reference's, one panel each."""
    checks = report.checks
    panels = [{"name": "predicted class", "edges": None, "reference": reference.class_counts,
               "current": window.classes, "drifted": None if checks is None else checks.prediction_drift.drifted}]
    features = {} if checks is None else checks.input_drift.features
    for name in INPUTS:
        if name in window.hist:
            panels.append({"name": name, "edges": reference.edges[name],
                           "reference": histogram(reference.samples[name], reference.edges[name]),
                           "current": window.hist[name],
                           "drifted": features[name].drifted if name in features else None})
    drift_png(panels, path, f"Reference (filled) against the last {window.rows:,} predictions (line)")


def monitor_html(report: MonitorReport, name: str) -> str:
    """``report.html``: the verdict, then each check's figures, for the experiment ``name``."""
    verdict, checks = report.verdict, report.checks
    rows = []
    for feature, f in ({} if checks is None else checks.input_drift.features).items():
        p_value = f"{f.p_value:.4f}" if f.p_value is not None else "–"  # Wasserstein has none
        rows.append(f"<tr{' class=drift' if f.drifted else ''}><td>{html.escape(feature)}</td><td>{f.method}</td>"
                    f"<td>{f.statistic:.4f}</td><td>{p_value}</td><td>{f.psi:.4f}</td>"
                    f"<td>{f.reference_mean:.4f}</td><td>{f.current_mean:.4f}</td></tr>")
    prediction = None if checks is None else checks.prediction_drift
    class_psi, class_js, mean_confidence, reference_confidence = (
        (NAN, NAN, NAN, NAN) if prediction is None else
        (prediction.class_psi, prediction.class_js, prediction.mean_confidence or NAN,
         NAN if prediction.reference_confidence is None else prediction.reference_confidence))
    health = None if checks is None else checks.health
    p50, p99, slo, errors, error_rate = ((NAN, NAN, NAN, 0, 0.0) if health is None else (
        health.latency_p50_ms, health.latency_p99_ms, health.slo_ms, health.errors, health.error_rate))
    chart = '<img src="drift.png" alt="reference against current distributions">' if report.rows else ""
    experiment_note = "" if report.experiment is None else report.experiment.note
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Signpost drift report — {html.escape(name)}</title>
<style>body{{font-family:system-ui,sans-serif;margin:2rem;max-width:70rem}}td,th{{padding:.2rem .6rem;text-align:right}}
td:first-child{{text-align:left}}tr.drift td{{color:#c44e52;font-weight:600}}img{{max-width:100%}}</style></head>
<body><h1>Drift report — {html.escape(name)}</h1>
<p>{report.rows:,} predictions from <code>{html.escape(str(report.log))}</code> against
<code>{html.escape(str(report.reference))}</code>.</p>
<p>{html.escape(experiment_note)}</p>
<h2>Verdict</h2><p><b>{'retrain' if verdict.retrain else 'no retraining needed'}</b>
{html.escape('; '.join(verdict.reasons) or verdict.note or '')}</p>
<h2>Predictions</h2><p>class PSI {class_psi:.4f}, Jensen-Shannon
{class_js:.4f}, mean confidence {mean_confidence:.4f}
(reference {reference_confidence:.4f})</p>
<h2>Inputs</h2><table><tr><th>feature</th><th>test</th><th>statistic</th><th>p-value</th><th>PSI</th>
<th>reference mean</th><th>current mean</th></tr>{''.join(rows)}</table>
<h2>Model outputs</h2><p>{html.escape(_embedding_line(report))}</p>
{_models_table(report.models)}
{_devices_table(report.devices)}
<h2>Service</h2><p>latency p50 {p50:.2f} ms, p99
{p99:.2f} ms (SLO {slo:.0f} ms);
{errors} failed prediction requests ({error_rate:.2%})</p>
{chart}
</body></html>
"""


def _models_table(models: Canary | None) -> str:
    if models is None:
        return ""
    rows = "".join(
        f"<tr><td>{html.escape(version)}</td><td>{m.role}</td><td>{m.records:,}</td><td>{m.share:.1%}</td>"
        f"<td>{m.mean_confidence:.4f}</td><td>{m.latency_p50_ms:.2f}</td><td>{m.latency_p99_ms:.2f}</td>"
        f"<td>{0.0 if m.class_psi_vs_main is None else m.class_psi_vs_main:.4f}</td>"
        f"<td>{html.escape(m.verdict or '')}</td></tr>"
        for version, m in models.versions.items()
    )
    return ("<h2>Canary</h2><table><tr><th>model version</th><th>role</th><th>predictions</th><th>share</th>"
            "<th>mean confidence</th><th>p50 ms</th><th>p99 ms</th><th>class PSI vs main</th><th>verdict</th></tr>"
            f"{rows}</table>")


def _devices_table(devices: Devices | None) -> str:
    """``monitor --by device``: the fleet, then each device, judged alone; a drifted one in red."""
    if devices is None:
        return ""

    def row(name: str, d: DeviceStats) -> str:
        if not d.enough_data:
            return (f"<tr><td>{html.escape(name)}</td><td>{d.records:,}</td>"
                    f"<td colspan=5>{html.escape(d.note or '')}</td></tr>")
        verdict = ", ".join(d.drift) + (f" ({', '.join(d.drifted_inputs)})" if d.drifted_inputs else "")
        shift = "–" if d.confidence_shift is None else f"{d.confidence_shift:+.4f}"
        return (f"<tr{' class=drift' if d.drifted or d.latency_breached else ''}><td>{html.escape(name)}</td>"
                f"<td>{d.records:,}</td><td>{_number(d.mean_confidence):.4f}</td><td>{shift}</td>"
                f"<td>{_number(d.latency_p50_ms):.2f}</td><td>{_number(d.latency_p99_ms):.2f}</td>"
                f"<td>{html.escape(verdict or 'no drift')}</td></tr>")

    rows = row("fleet (all devices)", devices.fleet) + "".join(row(n, d) for n, d in devices.devices.items())
    return ("<h2>Devices</h2><table><tr><th>device</th><th>predictions</th><th>mean confidence</th>"
            "<th>confidence shift</th><th>p50 ms</th><th>p99 ms</th><th>drift</th></tr>"
            f"{rows}</table>")


def _number(value: float | None) -> float:
    return NAN if value is None else value


def _embedding_line(report: MonitorReport) -> str:
    embedding = None if report.checks is None else report.checks.embedding_drift
    if embedding is None:
        return "not measured"
    if embedding.dimensions is None:
        return embedding.note or "not measured"
    return (f"{embedding.drifted_share:.0%} of the {len(embedding.dimensions)} output-summary dimensions "
            f"drifted{' — drift' if embedding.drifted else ''}")
