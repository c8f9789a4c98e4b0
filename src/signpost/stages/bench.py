"""bench: the optimized variants → one accuracy + speed table across runtimes, CPU math settings and batch sizes.

Read top to bottom: describe the machine and measure its matmul peaks, plan the matrix (variants × runtimes × math
settings × threads; every batch size is measured inside each process; the runtimes are Signpost's own and every
peer a user would pick instead: ONNX Runtime, OpenVINO, ExecuTorch), run each setting in a fresh subprocess
(``signpost.bench_worker``) with a timeout, measure every cell again ``bench.repeats`` times (fresh processes, each
pass in the opposite order to the one before, within ``bench.repeat_seconds``), then turn the results into a table
(JSON and markdown) with the median run and the min-max across runs, speedups against eager fp32 measured in the
same run and the spread beside every ratio, achieved GFLOP/s against the peak, a chart, the deployable choice (the
fastest stable cell of a variant within the accuracy budget at the stated batch size; an unstable one only when
nothing else is left, and marked so) and the deployable against each peer's best form of the fp32 parent.
Variants optimize rejected are not timed unless ``bench.include_rejected`` asks for them.

The variants come from optimize's ``variants.json`` and the results go to ``results.json``, both typed contracts
(``signpost.contracts``). The choice read off the rows, the markdown table and ``compare`` of two results files are
``signpost.report.bench_table``; the machine's description and matmul peak, ``signpost.machine``.
"""

from __future__ import annotations

import json
import logging
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from signpost import GLIBC_TUNABLES
from signpost.artifacts import (
    artifact_path,
    atomic_dir,
    code_version,
    hash_json,
    is_complete,
    read_manifest,
    verify_artifact,
    write_manifest,
)
from signpost.config import BenchConfig, SignpostConfig, config_to_dict
from signpost.contracts import (
    CANDIDATE,
    RESULTS,
    BenchResults,
    Candidate,
    MeasuredVariant,
    VariantRow,
    read_results,
    read_variants,
    results_json,
)
from signpost.machine import machine_info, matmul_peak
from signpost.optimize import variant_folders
from signpost.report.bench_table import choose, markdown_table, small_batch_runtime
from signpost.report.plots import bench_chart_png
from signpost.runtime import available_runtimes
from signpost.tracking import RunFactory, log_stage

log = logging.getLogger(__name__)

STAGE = "bench"
_CODE = (__name__, "signpost.bench_worker", "signpost.runtime", "signpost.optimize", "signpost.machine",
         "signpost.contracts", "signpost.report.bench_table")
TABLE, CHART = "results.md", "chart.png"  # beside RESULTS, results.json
BASELINE = ("fp32", "eager", "default")  # variant, runtime, math of the speedup baseline
# Math settings each runtime can honour: ONNX Runtime uses its own kernels (MLAS), not oneDNN's settings; an
# AOTInductor package has its kernels compiled in: bf16 runs the variant's bf16 package when it has one (float
# variants), else the fp32 package with oneDNN's fpmath mode, the one setting that still reaches it. OpenVINO's CPU
# plugin has its own precision hint: bf16 is its INFERENCE_PRECISION_HINT (the worker records the cell as not
# applicable on a CPU without bf16 kernels rather than time f32 under that name); ExecuTorch's XNNPACK has no switch.
_RUNTIME_MATH = {"eager": ("default", "bf16", "no-onednn"), "compile": ("default", "bf16", "no-onednn"),
                 "aoti": ("default", "bf16"), "onnxruntime": ("default",), "executorch": ("default",),
                 "openvino": ("default", "bf16")}
# The runtime → the key optimize records in a variant's settings when it could not make that runtime's form.
_FORM_ERRORS = {"aoti": "aoti_error", "onnxruntime": "onnx_error", "executorch": "executorch_error",
                "openvino": "openvino_error"}


@dataclass
class BenchResult:
    """Where the bench results are, whether they were reused, the table rows, and the deployable choice."""

    path: Path
    reused: bool
    results: BenchResults
    candidate: Candidate | None


def plan(variants: list[tuple[VariantRow, Path]], cfg: BenchConfig) -> list[dict[str, Any]]:
    """Every (variant, runtime, math, threads) the matrix holds; runtimes a variant has no form for are left out (a
    cell with ``skip``, the reason, when optimize recorded why it could not make the form), and so are variants over
    the accuracy budget unless ``bench.include_rejected``: they can never be the choice."""
    timed = ("ok", "rejected") if cfg.include_rejected else ("ok",)
    cells = []
    for row, folder in variants:
        if row.role != "candidate" or row.status not in timed:
            continue
        if cfg.variants is not None and row.name not in cfg.variants:
            continue
        available = available_runtimes(folder)
        for runtime in cfg.runtimes:
            error = row.settings.get(_FORM_ERRORS.get(runtime, ""))
            if runtime not in available and not error:
                continue
            for math in cfg.math:
                if math not in _RUNTIME_MATH[runtime]:
                    continue
                for threads in cfg.threads:
                    cell = {"variant": row.name, "folder": folder, "runtime": runtime, "math": math,
                            "threads": threads}
                    if runtime not in available:
                        cell["skip"] = f"optimize could not make its {runtime} form: {error}"
                    cells.append(cell)
    return cells


def bench(
    config: SignpostConfig,
    *,
    optimize_dir: Path,
    data_dir: Path,
    profile: str | None = None,
    progress: bool = True,
    tracking: RunFactory | None = None,
) -> BenchResult:
    """Measure the variants in ``optimize_dir`` on the test split of ``data_dir``; reuse results for equal inputs.

    ``profile`` names one cell as ``variant/runtime/math/batch`` (e.g. ``int8/compile/default/64``) to profile.
    ``tracking`` makes the stage's tracking run (``signpost.tracking.run_factory``), opened only when the cells are
    measured, not reused: it gets ``tracking_summary``.
    """
    optimize_dir, data_dir = Path(optimize_dir), Path(data_dir)
    opt_manifest = read_manifest(optimize_dir)
    if (stage := opt_manifest.get("stage")) != "optimize":
        raise ValueError(f"{optimize_dir} is a {stage!r} artifact, not the output of `signpost optimize`")
    # optimize's rows, checked against its manifest and, as a file another stage made, its signature
    table = read_variants(optimize_dir, signed=True)
    data_manifest = verify_artifact(data_dir, ["test.safetensors"])
    cfg = config.bench
    machine = machine_info()
    key = hash_json({"optimize": opt_manifest["key"], "data": data_manifest["key"], "bench": config_to_dict(cfg),
                     "machine": machine, "profile": profile, "code": code_version(*_CODE)})
    path = artifact_path(config.workdir, STAGE, config.name, key)
    if is_complete(path):
        log.info("these variants were benchmarked on this machine with these settings already: reusing %s", path)
        results = read_results(path)  # checked against the manifest, as written
        return BenchResult(path, True, results, results.candidate)

    variants = list(variant_folders(optimize_dir, table))
    rows_by_name = {row.name: row for row, _ in variants}
    cells = plan(variants, cfg)
    unknown = sorted(set(cfg.variants or ()) - {row.name for row in table})
    if unknown:
        raise ValueError(f"bench.variants names {unknown}, which {optimize_dir} does not have; it has "
                         f"{', '.join(row.name for row in table)}")
    for name in sorted(set(cfg.variants or ()) - set(rows_by_name)):
        log.warning("bench.variants names %s, which was not made (%s): it is left out", name,
                    next(row.reason for row in table if row.name == name))
    rejected = [row.name for row, _ in variants if row.role == "candidate" and row.status == "rejected"
                and (cfg.variants is None or row.name in cfg.variants)]
    if rejected and not cfg.include_rejected:
        log.warning("not timing %s: over the accuracy budget, so never the deployable choice "
                    "(bench.include_rejected=true times them)", ", ".join(rejected))
    if BASELINE[0] not in {c["variant"] for c in cells} or "eager" not in cfg.runtimes:
        log.warning("the matrix leaves out eager fp32, the speedup baseline: the speedup column will be empty")
    profile_cell = _parse_profile(profile, cells, cfg)
    started = time.perf_counter()
    with atomic_dir(path) as tmp:
        (tmp / "cells").mkdir()
        peaks = {threads: matmul_peak(threads) for threads in sorted(set(cfg.threads))}
        measured = []
        bar = tqdm(cells, desc="bench", unit="cell", disable=not progress, file=sys.stderr)
        for i, cell in enumerate(bar):
            bar.set_postfix_str(f"{cell['variant']}/{cell['runtime']}/{cell['math']}/{cell['threads']}t")
            is_profiled = profile_cell is not None and all(cell[k] == profile_cell[k] for k in
                                                           ("variant", "runtime", "math"))
            out = tmp / "cells" / f"{i:03d}-{cell['variant']}-{cell['runtime']}-{cell['math']}-{cell['threads']}t.json"
            measured.append(_measure(cell, out, data_dir, cfg, profile_cell["batch"] if is_profiled else 0))
            done = measured[-1]
            summary = (", ".join(f"batch {b['batch']}: {b['images_per_s']:,.0f}/s" for b in done["batches"])
                       if done["status"] == "ok" else f"{done['status']}: {done['reason']}")
            log.info("cell %d/%d %s/%s/%s/%dt: %s", i + 1, len(cells), cell["variant"], cell["runtime"],
                     cell["math"], cell["threads"], summary)
        stability = repeat_cells(cells, measured, tmp / "cells", data_dir, cfg, progress)
        if stability["unstable"]:
            log.warning("%d of %d timed rows are unstable (%d before repeating; %s): their figures and ratios swing "
                        "from run to run", stability["unstable"], stability["rows"],
                        stability["unstable_first_pass"], stability["stopped"])
        # The peak is a property of the machine, but one measurement can land in a busy second (469 against the
        # usual ~1,100 bf16 GFLOP/s once, which read as 150 % of peak): measured again after the cells, the larger
        # of the two counts.
        first, second = peaks, {t: matmul_peak(t) for t in peaks}
        peaks = {t: {k: max(v, second[t][k]) for k, v in first[t].items()} for t in first}
        rows = _table_rows(measured, rows_by_name, peaks)
        seconds = time.perf_counter() - started
        candidate = choose(rows, cfg.deploy_batch_size, optimize_dir)
        if candidate:
            candidate["small_batch"] = small_batch_runtime(rows, candidate)
        results = BenchResults(
            machine=machine,
            peaks_gflops={str(t): p for t, p in peaks.items()},
            peak_measurements={str(t): [first[t], second[t]] for t in peaks},  # before and after the cells
            baseline="/".join(BASELINE) + ": eager fp32 measured in this same run, same threads and batch size",
            optimize=optimize_dir.name,
            data=data_dir.name,
            settings=config_to_dict(cfg),
            variants=[MeasuredVariant.model_validate(r.model_dump(include=set(MeasuredVariant.model_fields)))
                      for r in rows_by_name.values()],
            rows=rows,
            stability=stability,
            seconds=seconds,
            candidate=candidate,
            # The best cell at every measured batch size: a server can run single images on one runtime (often
            # ONNX Runtime, whose per-call overhead is lowest) and batches on another.
            candidates_by_batch={str(b): choose(rows, b, optimize_dir) for b in cfg.batch_sizes},
        )
        (tmp / RESULTS).write_text(results_json(results), encoding="utf-8")
        (tmp / TABLE).write_text(markdown_table(results) + "\n", encoding="utf-8")
        if results.candidate:  # the contract serve and package read back
            (tmp / CANDIDATE).write_text(results.candidate.model_dump_json(indent=1) + "\n", encoding="utf-8")
        bench_chart_png(rows, cfg.deploy_batch_size, tmp / CHART)
        write_manifest(
            tmp, stage=STAGE, key=key, experiment=config.name,
            inputs={"optimize": optimize_dir.name, "optimize_key": opt_manifest["key"], "data": data_dir.name},
            config=config_to_dict(cfg), code=code_version(*_CODE),
            metrics={"cells": len(rows), "failed": sum(r["status"] == "failed" for r in rows)},
            extra={"machine": machine,
                   "candidate": results.candidate.model_dump(mode="json") if results.candidate else None},
        )
    result = BenchResult(path, False, results, results.candidate)
    if tracking is not None:
        log_stage(tracking, STAGE, **tracking_summary(config, result))
    return result


def _parse_profile(profile: str | None, cells: list[dict[str, Any]], cfg: BenchConfig) -> dict[str, Any] | None:
    if not profile:
        return None
    parts = profile.split("/")
    if len(parts) != 4 or not parts[3].isdigit():
        raise ValueError(f"--profile {profile!r}: expected variant/runtime/math/batch, e.g. int8/compile/default/64")
    wanted = {"variant": parts[0], "runtime": parts[1], "math": parts[2]}
    if parts[1] in ("onnxruntime", "executorch", "openvino"):
        raise ValueError("--profile: the torch profiler sees into the torch runtimes only (eager, compile, aoti)")
    if not any(all(c[k] == v for k, v in wanted.items()) for c in cells):
        options = sorted({f"{c['variant']}/{c['runtime']}/{c['math']}" for c in cells})
        raise ValueError(f"--profile {profile!r}: no such cell in the matrix; cells: {', '.join(options)}")
    return wanted | {"batch": int(parts[3])}


def _measure(cell: dict[str, Any], out: Path, data_dir: Path, cfg: BenchConfig, profile_batch: int,
             batches: list[int] | None = None) -> dict[str, Any]:
    """Run one cell's worker in a fresh subprocess at ``batches`` (default: every batch size); a crash or a timeout
    is a failed cell with the reason."""
    env = {**os.environ, "OMP_NUM_THREADS": str(cell["threads"]), "GLIBC_TUNABLES": GLIBC_TUNABLES}
    env.pop("DNNL_DEFAULT_FPMATH_MODE", None)
    if cell["math"] == "bf16":
        env["DNNL_DEFAULT_FPMATH_MODE"] = "BF16"
    command = [sys.executable, "-m", "signpost.bench_worker", "--folder", str(cell["folder"]),
               "--runtime", cell["runtime"], "--math", cell["math"], "--threads", str(cell["threads"]),
               "--batches", ",".join(map(str, batches or cfg.batch_sizes)),
               "--test", str(data_dir / "test.safetensors"),
               "--min-seconds", str(cfg.min_seconds), "--max-seconds", str(cfg.max_seconds),
               "--max-cv", str(cfg.max_cv), "--profile-batch", str(profile_batch), "--out", str(out)]
    base = {k: cell[k] for k in ("variant", "runtime", "math", "threads")}
    if "skip" in cell:
        return base | {"status": "skipped", "reason": cell["skip"]}
    try:
        done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=cfg.timeout)
    except subprocess.TimeoutExpired:
        return base | {"status": "failed", "reason": f"timed out after {cfg.timeout:.0f} s (bench.timeout)"}
    if not out.is_file():
        tail = (done.stderr or "").strip().splitlines()[-1:] or [f"exit code {done.returncode}"]
        return base | {"status": "failed", "reason": f"the worker died: {tail[0][:300]}"}
    return base | json.loads(out.read_text(encoding="utf-8"))


def repeat_cells(cells: list[dict[str, Any]], measured: list[dict[str, Any]], folder: Path, data_dir: Path,
                 cfg: BenchConfig, progress: bool) -> dict[str, Any]:
    """Measure every cell that ran again, each in a fresh process, ``bench.repeats`` passes after the first, each
    pass in the opposite order to the one before (``repeat_order``), no new measurement after
    ``bench.repeat_seconds``; then merge every batch size's runs into one (``merge_runs``, in ``measured`` in
    place): the median run with the min-max across runs. Thread pools of two runtimes in one process starve each
    other, and a slow stretch of the machine would land on whichever cells ran in it: fresh processes and
    alternating passes spread both over every cell. Returns the counts of unstable rows after the first pass and
    after all, and why it stopped."""
    runs = [{b["batch"]: [b] for b in m["batches"]} if m["status"] == "ok" else {} for m in measured]

    def unstable_rows() -> int:
        return sum(not b["stable"] for m in measured if m["status"] == "ok" for b in m["batches"])

    first, started, last, passes, repeated = unstable_rows(), time.perf_counter(), len(cells) - 1, 0, 0
    stopped, out_of_time = f"bench.repeats={cfg.repeats} passes done", False
    for number in range(1, cfg.repeats + 1):
        todo = [i for i, m in enumerate(measured) if m["status"] == "ok"]  # a failed cell is not timed again
        if not todo:
            break
        bar = tqdm(repeat_order(todo, number, last), desc=f"bench repeat {number}", unit="cell",
                   disable=not progress, file=sys.stderr)
        for i in bar:
            if time.perf_counter() - started >= cfg.repeat_seconds:
                out_of_time = True
                break
            cell = cells[i]
            name = f"{cell['variant']}/{cell['runtime']}/{cell['math']}/{cell['threads']}t"
            bar.set_postfix_str(name)
            out = folder / (f"{i:03d}-{cell['variant']}-{cell['runtime']}-{cell['math']}-{cell['threads']}t"
                            f"-repeat{number}.json")
            again = _measure(cell, out, data_dir, cfg, 0)
            last, repeated, passes = i, repeated + 1, number
            if again["status"] != "ok":  # a repeat that fails leaves the cell's earlier runs as they were
                log.warning("repeat %d of %s failed (%s): its earlier runs stand", number, name, again["reason"])
                continue
            for b in again["batches"]:
                runs[i][b["batch"]].append(b)
            measured[i]["batches"] = [merge_runs(found, cfg.max_cv) for found in runs[i].values()]
            log.info("repeat %d of %s: %s", number, name, ", ".join(
                f"batch {b['batch']}: {b['images_per_s']:,.0f}/s{'' if b['stable'] else ' (unstable)'}"
                for b in again["batches"]))
        if out_of_time:
            stopped = f"bench.repeat_seconds={cfg.repeat_seconds:g} spent"
            break
    for i, m in enumerate(measured):  # every row, repeated or not, carries its runs
        if m["status"] == "ok":
            m["batches"] = [merge_runs(found, cfg.max_cv) for found in runs[i].values()]
    return {"rows": sum(len(r) for r in runs), "unstable_first_pass": first, "unstable": unstable_rows(),
            "repeat_passes": passes, "repeat_measurements": repeated, "repeat_seconds": time.perf_counter() - started,
            "stopped": stopped}


def repeat_order(cells: list[int], pass_number: int, last: int) -> list[int]:
    """The order of repeat pass ``pass_number`` (1, 2, ...) over ``cells``, indices in the plan's order: reversed on
    odd passes, as planned on even ones (A B C, then C B A, then A B C), so a drift in the machine's load over the run
    does not fall on the same cells each time; and never starting with ``last``, the cell measured just before, when
    another can go first: the same cell twice in a row would see the same moment of the machine twice."""
    order = sorted(cells, reverse=pass_number % 2 == 1)
    if len(order) > 1 and order[0] == last:
        order = order[1:] + order[:1]
    return order


def merge_runs(runs: list[dict[str, Any]], max_cv: float) -> dict[str, Any]:
    """One batch size's measurements of a cell (the worker's batch dicts, first run first) as one row: the median
    run among those that settled (among all, when none did), its spread widened to the spread between those runs,
    the min-max of images/s and p50 (ms) across every run, and stable only when some run settled and the settled
    runs agree within ``max_cv``."""
    settled = [r for r in runs if r["stable"]]
    pool = sorted(settled or runs, key=lambda r: r["images_per_s"])
    chosen = pool[(len(pool) - 1) // 2]  # the lower median: of two runs the slower, the figure less likely flattered
    rates = [r["images_per_s"] for r in pool]
    between = statistics.pstdev(rates) / statistics.fmean(rates) if len(rates) > 1 else 0.0
    return chosen | {
        "spread": max(chosen["spread"], between),
        "spread_between_runs": between,
        "stable": bool(settled) and between <= max_cv,
        "stable_first_run": runs[0]["stable"],
        "runs": [r["images_per_s"] for r in runs],  # images/s of every run, first run first
        "p50_runs": [r["ms_median"] for r in runs],  # p50 (ms) of every run, first run first
        "images_per_s_min": min(r["images_per_s"] for r in runs),
        "images_per_s_max": max(r["images_per_s"] for r in runs),
        "ms_median_min": min(r["ms_median"] for r in runs),
        "ms_median_max": max(r["ms_median"] for r in runs),
    }


def _table_rows(measured: list[dict[str, Any]], variants: dict[str, VariantRow],
                peaks: dict[int, dict[str, float]]) -> list[dict[str, Any]]:
    """One row per (cell, batch size) with speedup, GFLOP/s and the variant's verdict; failed cells keep one row."""
    baseline = {(m["threads"], b["batch"]): b for m in measured if m["status"] == "ok"
                and (m["variant"], m["runtime"], m["math"]) == BASELINE for b in m["batches"]}
    rows = []
    for m in measured:
        variant = variants[m["variant"]]
        common = {"variant": m["variant"], "runtime": m["runtime"], "math": m["math"], "threads": m["threads"],
                  "size_bytes": variant.size_bytes, "mflops": variant.mflops,
                  "variant_status": variant.status, "variant_test_acc": variant.test_acc}
        if m["status"] != "ok":  # failed, or skipped: not applicable here (the reason says why)
            rows.append(common | {"status": m["status"], "reason": m.get("reason", ""), "batch": None})
            continue
        status = "rejected" if variant.status == "rejected" else "ok"
        reason = variant.reason if status == "rejected" else ""
        for b in m["batches"]:
            base = baseline.get((m["threads"], b["batch"]))
            gflops = (variant.mflops or 0) * b["images_per_s"] / 1e3
            peak = peaks[m["threads"]]["bf16"]
            rows.append(common | {
                "status": status, "reason": reason, "top1": m["top1"], **b,
                "speedup": b["images_per_s"] / base["images_per_s"] if base else None,
                # A ratio's relative spread is at most about the sum of its two figures' (first order); the
                # baseline against itself is exactly 1.
                "speedup_spread": (0.0 if b is base else b["spread"] + base["spread"]) if base else None,
                "gflops": gflops, "bf16_peak_fraction": gflops / peak if peak else None,
                "cpu_cores_mean": m["resources"]["cpu_cores_mean"], "rss_mib_peak": m["resources"]["rss_mib_peak"],
                "load_seconds": m["load_seconds"], "profile": m.get("profile"),
                "settings": m.get("settings", {}),  # what the runtime ran with: its peer's documented best settings
            })
    return rows


def tracking_summary(config: SignpostConfig, result: BenchResult) -> dict[str, Any]:
    """What a tracking run of this bench result holds: the settings, every ok cell's images/s, p50 and share of
    the bf16 peak, the machine, the table, chart and candidate (``signpost.tracking.log_stage`` keywords)."""
    metrics = {}
    for r in result.results.rows:
        if r["status"] != "ok":
            continue
        cell = f"{r['variant']}/{r['runtime']}/{r['math']}/{r['threads']}t/b{r['batch']}"
        metrics |= {f"{cell}/images_per_s": r["images_per_s"], f"{cell}/p50_ms": r["ms_median"]}
        if r["bf16_peak_fraction"] is not None:
            metrics[f"{cell}/bf16_peak_fraction"] = r["bf16_peak_fraction"]
    chosen = (result.candidate.variant, result.candidate.runtime, result.candidate.math) if result.candidate else ()
    tags = {"signpost.machine": str(result.results.machine.get("cpu", "")),
            "signpost.candidate": "/".join(chosen) or "//"}  # "//": no deployable choice
    files = [result.path / name for name in (RESULTS, TABLE, CHART, CANDIDATE)]
    return {"params": {"bench": config_to_dict(config.bench), "artifact": result.path.name}, "metrics": metrics,
            "files": files, "tags": tags}
