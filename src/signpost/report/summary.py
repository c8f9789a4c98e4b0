"""The bench as a job summary: the tutorial's comparison of CPU math backends, read from one bench folder.

Per bench folder (one architecture each): the machine, the deployed cell, and for the deployed variant and runtime
the images/s and p50 latency at each measured batch size under oneDNN (``default``; built with the Arm Compute
Library on Arm64) and without it (``no-onednn``: PyTorch's own kernels over the build's BLAS, OpenBLAS on Arm64)
side by side, with the ratio and its spread; then the top ops of the profiler's table when the bench ran with
``--profile``, or when a bench of the deployed cell alone did (``profiles``: mlops.yml profiles the cell its bench
chose in a second, one-cell bench). Given two folders of different architectures, the x86-64 vs Arm64 table of
ratios follows (``bench_table.compare_results``, which never calls that a regression). Markdown for
``$GITHUB_STEP_SUMMARY``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from signpost.artifacts import verify_artifact
from signpost.contracts import RESULTS, BenchResults, Candidate, read_results
from signpost.report.bench_table import architecture, blas, compare_results, machine_line

ONEDNN, NO_ONEDNN = "default", "no-onednn"  # the two math settings the tutorial compares
_BLAS_NAMES = {"open": "OpenBLAS", "openblas": "OpenBLAS", "mkl": "MKL", "accelerate": "Accelerate"}
TOP_OPS = 8  # rows of the profiler's table shown: the ops that take most of the self CPU time


def bench_summary(folders: list[Path], *, profiles: list[Path] | None = None, top_ops: int = TOP_OPS) -> str:
    """The job summary of one or more bench folders: a section each, then the architecture comparison when two
    folders ran on different architectures. ``profiles``: bench folders that profiled one cell; each goes with the
    bench of the same optimized variants, data and architecture whose deployed cell it profiled. Each folder is
    checked against its manifest (an ``ArtifactError`` names a file that is missing or changed)."""
    folders = [Path(f) for f in folders]
    loaded = [(folder, read_results(folder)) for folder in folders]
    pool = [(Path(folder), read_results(folder)) for folder in profiles or []]
    sections = []
    for folder, results in loaded:
        source, row = _profile_source(folder, results, pool)
        sections.append(render_bench(results, folder.name, profile_table=_profile_table(source, row),
                                     profiled=row, top_ops=top_ops))
    archs = {architecture(results.machine) for _, results in loaded}
    if len(loaded) == 2 and len(archs) == 2:
        (a_folder, a), (b_folder, b) = loaded
        table, _ = compare_results(a, b, a_name=a_folder.name, b_name=b_folder.name)
        sections.append(f"### {architecture(a.machine)} vs {architecture(b.machine)}\n\n{table}")
    return "\n\n".join(sections) + "\n"


def render_bench(results: BenchResults, name: str, *, profile_table: str | None = None,
                 profiled: dict[str, Any] | None = None, top_ops: int = TOP_OPS) -> str:
    """One bench's section: machine, deployed cell, the oneDNN vs no-oneDNN table and the profiler's top ops
    (``profile_table``, of the row ``profiled``; default: the profiled row of ``results``)."""
    arch = architecture(results.machine)
    lines = [f"### Bench on {arch}: {name}", "", f"Machine: {machine_line(results)}.", ""]
    c = results.candidate
    if c is None:
        lines.append(f"No deployable cell: nothing within the accuracy budget measured ok at batch "
                     f"{results.settings.get('deploy_batch_size', '?')}, so there is no deployed cell to compare "
                     "backends on.")
        return "\n".join(lines)
    lines.append(f"Deployed: **{c.variant} / {c.runtime} / {c.math}**, {c.threads} threads, batch {c.batch}: "
                 f"{c.images_per_s:,.0f} images/s, top-1 {c.top1:.4f}.")
    lines += ["", *backend_table(results, c)]
    row = profiled if profiled is not None else _profiled_row(results.rows, c)
    lines += ["", *profile_lines(row, c, profile_table, top_ops)]
    return "\n".join(lines)


def backend_table(results: BenchResults, c: Candidate) -> list[str]:
    """The deployed cell ``c``'s variant under oneDNN and without it, per batch size: images/s, p50 ms and the
    ratio. When the deployed runtime takes no math setting (ONNX Runtime, an AOTInductor package), another runtime
    of the same variant that measured both stands in, and the table says so; when none did, one line says why."""
    arch, backend = architecture(results.machine), _blas_name(results.machine)
    onednn = "oneDNN + ACL" if arch == "Arm64" else "oneDNN"
    cells: dict[tuple[str, str], dict[int, dict[str, Any]]] = {}
    for r in results.rows:
        if r["batch"] is not None and r["variant"] == c.variant and r["threads"] == c.threads:  # timed rows only
            cells.setdefault((r["runtime"], r["math"]), {})[r["batch"]] = r
    both = [rt for rt in dict.fromkeys([c.runtime, "compile", "eager", *(rt for rt, _ in cells)])
            if (rt, ONEDNN) in cells and (rt, NO_ONEDNN) in cells]
    if not both:
        measured = results.settings.get("math") or sorted({r["math"] for r in results.rows})
        if NO_ONEDNN not in measured:
            return [f"The bench did not measure `{NO_ONEDNN}` (bench.math: {', '.join(measured)}), so there is no "
                    f"{onednn} vs {backend} table: add {NO_ONEDNN} to bench.math to see it."]
        return [f"`{NO_ONEDNN}` and `{ONEDNN}` were not both measured ok for {c.variant} at {c.threads} threads on a "
                f"runtime that takes the math setting (eager, compile), so there is no {onednn} vs {backend} table."]
    runtime = both[0]
    lines = [f"#### {onednn} (`{ONEDNN}`) vs {backend} (`{NO_ONEDNN}`): {c.variant} on {runtime}, {c.threads} "
             "threads", ""]
    if runtime != c.runtime:
        lines += [f"The deployed runtime, {c.runtime}, takes no math setting (its kernels are its own or compiled "
                  f"in): the backends are compared on {runtime}, the same variant's weights.", ""]
    lines += [f"| batch | {onednn} images/s | {backend} images/s | {onednn} / {backend} | {onednn} p50 ms | "
              f"{backend} p50 ms |", "|---|---|---|---|---|---|"]
    with_dnn, without = cells[(runtime, ONEDNN)], cells[(runtime, NO_ONEDNN)]
    for batch in sorted(set(with_dnn) & set(without)):
        a, b = with_dnn[batch], without[batch]
        ratio = a["images_per_s"] / b["images_per_s"]
        spread = a.get("spread", 0.0) + b.get("spread", 0.0)  # a ratio's spread: the sum of its two figures'
        unstable = "" if a.get("stable", True) and b.get("stable", True) else " (UNSTABLE)"
        lines.append(f"| {batch} | {a['images_per_s']:,.0f} | {b['images_per_s']:,.0f} | {ratio:.2f}x "
                     f"±{100 * spread:.1f}%{unstable} | {a['ms_median']:.3f} | {b['ms_median']:.3f} |")
    return lines


def profile_lines(row: dict[str, Any] | None, c: Candidate, table: str | None, top_ops: int) -> list[str]:
    """The profiler's top ops for the profiled ``row`` (said when that is not the deployed cell ``c``), or why there
    are none."""
    if (row is None or table is None) and c.runtime == "onnxruntime":
        return [f"No profile: the deployed cell runs on ONNX Runtime ({c.variant}/{c.runtime}), whose kernels the "
                "torch profiler cannot see into."]
    if row is None or table is None:
        return [f"No profile: the bench ran without `--profile` (`--profile {c.variant}/{c.runtime}/{c.math}/"
                f"{c.batch}` profiles the deployed cell)."]
    cell = f"{row['variant']}/{row['runtime']}/{row['math']}, {row['threads']} threads"
    deployed = (row["variant"], row["runtime"], row["math"], row["threads"]) == (c.variant, c.runtime, c.math,
                                                                                 c.threads)
    ops, total = top_operators(table, top_ops)
    if not ops:
        return [f"The profile of {cell} has no op table that could be read ({row['profile']['table']})."]
    heading = f"#### Top {len(ops)} ops by self CPU time: {cell}"
    lines = [heading + ("" if deployed else " (the profiled cell; not the deployed one)"), "",
             "| op | self CPU % | self CPU | calls |", "|---|---|---|---|"]
    lines += [f"| `{op['Name']}` | {op['Self CPU %']} | {op['Self CPU']} | {op['# of Calls']} |" for op in ops]
    if total:
        lines += ["", f"Self CPU time total: {total} (the profiler's 20 calls)."]
    return lines


def top_operators(table: str, count: int) -> tuple[list[dict[str, str]], str | None]:
    """The first ``count`` rows of ``torch.profiler``'s ``key_averages().table()`` text (sorted as printed) as
    dicts by column name, and its ``Self CPU time total``. Columns are cut where the dashed rule cuts them, so a
    name with spaces in it stays whole. No rows when the text is not such a table."""
    lines = table.splitlines()
    rules = [i for i, line in enumerate(lines) if line.strip() and set(line.strip()) <= {"-", " "}]
    if len(rules) < 3:
        return [], None
    spans = [m.span() for m in re.finditer(r"-+", lines[rules[0]])]
    header = [lines[rules[0] + 1][start:end].strip() for start, end in spans]
    wanted = ("Name", "Self CPU %", "Self CPU", "# of Calls")
    if any(column not in header for column in wanted):
        return [], None
    ops = []
    for line in lines[rules[1] + 1: rules[2]][:count]:
        values = dict(zip(header, (line[start:end].strip() for start, end in spans), strict=True))
        ops.append({column: values[column] for column in wanted})
    total = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("Self CPU time total")), None)
    return ops, total


def _profiled_row(rows: list[dict[str, Any]], c: Candidate | None) -> dict[str, Any] | None:
    """A row of the profiled cell: the deployed cell ``c``'s when it was profiled, else the one cell that was."""
    profiled = [r for r in rows if r.get("profile")]
    deployed = [r for r in profiled if c is not None and (r["variant"], r["runtime"], r["math"], r["threads"]) ==
                (c.variant, c.runtime, c.math, c.threads)]
    return (deployed or profiled or [None])[0]


def _profile_source(folder: Path, results: BenchResults,
                    pool: list[tuple[Path, BenchResults]]) -> tuple[Path, dict[str, Any] | None]:
    """Where the profile of ``results``' deployed cell is: the first bench in ``pool`` (taken out of it) of the same
    variants, data and architecture that profiled that cell, else ``folder`` itself; and the profiled row."""
    c = results.candidate
    for i, (other, profiled) in enumerate(pool):
        row = _profiled_row(profiled.rows, c)
        same = (profiled.optimize, profiled.data, architecture(profiled.machine)) == (
            results.optimize, results.data, architecture(results.machine))
        if same and row is not None and c is not None and (row["variant"], row["runtime"], row["math"],
                                                           row["threads"]) == (c.variant, c.runtime, c.math, c.threads):
            del pool[i]
            return other, row
    return folder, _profiled_row(results.rows, c)


def _profile_table(folder: Path, row: dict[str, Any] | None) -> str | None:
    """The profiler's table of ``row`` the bench in ``folder`` wrote under ``cells/``, checked against the folder's
    manifest."""
    if row is None:
        return None
    name = f"cells/{row['profile']['table']}"
    verify_artifact(folder, [RESULTS, name])
    return (folder / name).read_text(encoding="utf-8")


def _blas_name(machine: dict[str, Any]) -> str:
    """The BLAS PyTorch's own kernels use without oneDNN, by name: OpenBLAS on Arm64 wheels, MKL on x86-64 ones."""
    name = blas(machine)
    return _BLAS_NAMES.get(name.lower(), f"BLAS {name}")
