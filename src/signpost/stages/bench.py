"""bench: the optimized variants → one accuracy + speed table across runtimes, CPU math settings and batch sizes.

Read top to bottom: describe the machine and measure its matmul peaks, plan the matrix (variants × runtimes × math
settings × threads; every batch size is measured inside each process), run each setting in a fresh subprocess
(``signpost.bench_worker``) with a timeout, measure the cells whose timing did not settle again (fresh processes,
each pass in the opposite order to the one before, within ``bench.repeat_seconds``), then turn the results into a
table (JSON and markdown) with speedups against eager fp32 measured in the same run and the spread beside every
ratio, achieved GFLOP/s against the peak, a chart, and the deployable choice: the fastest stable cell of a variant
within the accuracy budget at the stated batch size (an unstable one only when nothing else is left, and marked so).
Variants optimize rejected are not timed unless ``bench.include_rejected`` asks for them.

``compare`` reads two results files (two machines, two PyTorch builds, before/after a change) and gives a
regression verdict. Results carry the machine they were measured on, so a comparison says what it compares.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from signpost import GLIBC_TUNABLES
from signpost.artifacts import (
    artifact_path,
    atomic_dir,
    code_version,
    hash_json,
    is_complete,
    library_versions,
    read_manifest,
    verify_artifact,
    write_manifest,
)
from signpost.config import BenchConfig, SignpostConfig, config_to_dict
from signpost.contracts import CANDIDATE, Candidate
from signpost.optimize import VARIANTS_FILE, variant_folders
from signpost.report.plots import bench_chart_png
from signpost.runtime import available_runtimes

log = logging.getLogger(__name__)

STAGE = "bench"
_CODE = (__name__, "signpost.bench_worker", "signpost.runtime", "signpost.optimize")
RESULTS, TABLE, CHART = "results.json", "results.md", "chart.png"
BASELINE = ("fp32", "eager", "default")  # variant, runtime, math of the speedup baseline
# Math settings each runtime can honour: ONNX Runtime uses its own kernels (MLAS), not oneDNN's settings; an
# AOTInductor package has its kernels compiled in: bf16 runs the variant's bf16 package when it has one (float
# variants), else the fp32 package with oneDNN's fpmath mode, the one setting that still reaches it.
_RUNTIME_MATH = {"eager": ("default", "bf16", "no-onednn"), "compile": ("default", "bf16", "no-onednn"),
                 "aoti": ("default", "bf16"), "onnxruntime": ("default",)}


@dataclass
class BenchResult:
    """Where the bench results are, whether they were reused, the table rows, and the deployable choice."""

    path: Path
    reused: bool
    results: dict[str, Any]
    candidate: dict[str, Any] | None


def machine_info() -> dict[str, Any]:
    """The CPU, its instruction-set extensions that matter for inference, core counts and library builds."""
    import psutil

    cpu_model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip().lower()
            if key in ("model name", "cpu model", "hardware") and cpu_model in ("", platform.machine()):
                cpu_model = value.strip()
            elif key in ("flags", "features"):
                flags.update(value.split())
    except OSError:
        pass
    wanted = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8",
              "avx_vnni", "asimd", "asimddp", "bf16", "i8mm", "sve", "sve2")
    config = torch.__config__.show()
    blas = next((line.split("=", 1)[1].strip() for line in config.splitlines() if "BLAS_INFO" in line), "")
    return {
        "cpu": cpu_model,
        "arch": platform.machine(),
        "isa": sorted(f for f in wanted if f in flags),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "logical_cores": os.cpu_count(),
        "physical_cores": psutil.cpu_count(logical=False),
        "python": platform.python_version(),
        "libraries": library_versions(),
        "blas": blas,
        "onednn": torch.backends.mkldnn.is_available(),
    }


def matmul_peak(threads: int, seconds: float = 1.0) -> dict[str, float]:
    """GFLOP/s of a large fp32 and bf16 matmul on ``threads`` threads, measured in a fresh subprocess."""
    code = (
        "import torch,time,json,sys\n"
        f"torch.set_num_threads({threads})\n"
        "out={}\n"
        "for name,dt in (('fp32',torch.float32),('bf16',torch.bfloat16)):\n"
        "  a=torch.randn(1024,1024).to(dt); b=torch.randn(1024,1024).to(dt)\n"
        "  for _ in range(3): a@b\n"
        "  best=0.0\n"
        "  for _ in range(5):\n"
        "    n=0; t=time.perf_counter()\n"
        f"    while time.perf_counter()-t<{seconds / 5}: a@b; n+=1\n"
        "    best=max(best, 2*1024**3*n/(time.perf_counter()-t)/1e9)\n"
        "  out[name]=best\n"
        "print(json.dumps(out))\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "GLIBC_TUNABLES": GLIBC_TUNABLES}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    if done.returncode != 0:
        raise RuntimeError(f"matmul peak measurement failed: {done.stderr.strip()[-500:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def plan(variants: list[tuple[dict[str, Any], Path]], cfg: BenchConfig) -> list[dict[str, Any]]:
    """Every (variant, runtime, math, threads) the matrix holds; runtimes a variant has no form for are left out, and
    so are variants over the accuracy budget unless ``bench.include_rejected``: they can never be the choice."""
    timed = ("ok", "rejected") if cfg.include_rejected else ("ok",)
    cells = []
    for row, folder in variants:
        if row["role"] != "candidate" or row["status"] not in timed:
            continue
        if cfg.variants is not None and row["name"] not in cfg.variants:
            continue
        available = available_runtimes(folder)
        for runtime in cfg.runtimes:
            if runtime not in available:
                continue
            for math in cfg.math:
                if math not in _RUNTIME_MATH[runtime]:
                    continue
                for threads in cfg.threads:
                    cells.append({"variant": row["name"], "folder": folder, "runtime": runtime, "math": math,
                                  "threads": threads})
    return cells


def bench(
    config: SignpostConfig,
    *,
    optimize_dir: Path,
    data_dir: Path,
    profile: str | None = None,
    progress: bool = True,
) -> BenchResult:
    """Measure the variants in ``optimize_dir`` on the test split of ``data_dir``; reuse results for equal inputs.

    ``profile`` names one cell as ``variant/runtime/math/batch`` (e.g. ``int8/compile/default/64``) to profile.
    """
    optimize_dir, data_dir = Path(optimize_dir), Path(data_dir)
    stage = read_manifest(optimize_dir).get("stage")
    if stage != "optimize":
        raise ValueError(f"{optimize_dir} is a {stage!r} artifact, not the output of `signpost optimize`")
    opt_manifest = verify_artifact(optimize_dir, [VARIANTS_FILE])
    data_manifest = verify_artifact(data_dir, ["test.safetensors"])
    cfg = config.bench
    machine = machine_info()
    key = hash_json({"optimize": opt_manifest["key"], "data": data_manifest["key"], "bench": config_to_dict(cfg),
                     "machine": machine, "profile": profile, "code": code_version(*_CODE)})
    path = artifact_path(config.workdir, STAGE, config.name, key)
    if is_complete(path):
        log.info("these variants were benchmarked on this machine with these settings already: reusing %s", path)
        verify_artifact(path, [RESULTS])
        results = json.loads((path / RESULTS).read_text(encoding="utf-8"))
        return BenchResult(path, True, results, results.get("candidate"))

    variants = list(variant_folders(optimize_dir))
    rows_by_name = {row["name"]: row for row, _ in variants}
    cells = plan(variants, cfg)
    table = json.loads((optimize_dir / VARIANTS_FILE).read_text(encoding="utf-8"))
    unknown = sorted(set(cfg.variants or ()) - {row["name"] for row in table})
    if unknown:
        raise ValueError(f"bench.variants names {unknown}, which {optimize_dir} does not have; it has "
                         f"{', '.join(row['name'] for row in table)}")
    for name in sorted(set(cfg.variants or ()) - set(rows_by_name)):
        log.warning("bench.variants names %s, which was not made (%s): it is left out", name,
                    next(row["reason"] for row in table if row["name"] == name))
    rejected = [row["name"] for row, _ in variants if row["role"] == "candidate" and row["status"] == "rejected"
                and (cfg.variants is None or row["name"] in cfg.variants)]
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
                       if done["status"] == "ok" else f"failed: {done['reason']}")
            log.info("cell %d/%d %s/%s/%s/%dt: %s", i + 1, len(cells), cell["variant"], cell["runtime"],
                     cell["math"], cell["threads"], summary)
        stability = repeat_unstable(cells, measured, tmp / "cells", data_dir, cfg, progress)
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
        results = {
            "machine": machine,
            "peaks_gflops": {str(t): p for t, p in peaks.items()},
            "peak_measurements": {str(t): [first[t], second[t]] for t in peaks},  # before and after the cells
            "baseline": "/".join(BASELINE) + ": eager fp32 measured in this same run, same threads and batch size",
            "optimize": optimize_dir.name,
            "data": data_dir.name,
            "settings": config_to_dict(cfg),
            "variants": [{k: r[k] for k in ("name", "method", "status", "reason", "val_acc", "test_acc", "size_bytes",
                                            "mflops", "role")} for r in rows_by_name.values()],
            "rows": rows,
            "stability": stability,
            "seconds": time.perf_counter() - started,
        }
        results["candidate"] = choose(rows, cfg.deploy_batch_size, optimize_dir)
        if results["candidate"]:
            results["candidate"]["small_batch"] = small_batch_runtime(rows, results["candidate"])
        # The best cell at every measured batch size: a server can run single images on one runtime (often ONNX
        # Runtime, whose per-call overhead is lowest) and batches on another.
        results["candidates_by_batch"] = {str(b): choose(rows, b, optimize_dir) for b in cfg.batch_sizes}
        (tmp / RESULTS).write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
        (tmp / TABLE).write_text(markdown_table(results) + "\n", encoding="utf-8")
        if results["candidate"]:
            chosen = Candidate.model_validate(results["candidate"])  # the contract serve and package read back
            (tmp / CANDIDATE).write_text(chosen.model_dump_json(indent=1) + "\n", encoding="utf-8")
        bench_chart_png(rows, cfg.deploy_batch_size, tmp / CHART)
        write_manifest(
            tmp, stage=STAGE, key=key, experiment=config.name,
            inputs={"optimize": optimize_dir.name, "optimize_key": opt_manifest["key"], "data": data_dir.name},
            config=config_to_dict(cfg), code=code_version(*_CODE),
            metrics={"cells": len(rows), "failed": sum(r["status"] == "failed" for r in rows)},
            extra={"machine": machine, "candidate": results["candidate"]},
        )
    return BenchResult(path, False, results, results["candidate"])


def _parse_profile(profile: str | None, cells: list[dict[str, Any]], cfg: BenchConfig) -> dict[str, Any] | None:
    if not profile:
        return None
    parts = profile.split("/")
    if len(parts) != 4 or not parts[3].isdigit():
        raise ValueError(f"--profile {profile!r}: expected variant/runtime/math/batch, e.g. int8/compile/default/64")
    wanted = {"variant": parts[0], "runtime": parts[1], "math": parts[2]}
    if parts[1] == "onnxruntime":
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
    try:
        done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=cfg.timeout)
    except subprocess.TimeoutExpired:
        return base | {"status": "failed", "reason": f"timed out after {cfg.timeout:.0f} s (bench.timeout)"}
    if not out.is_file():
        tail = (done.stderr or "").strip().splitlines()[-1:] or [f"exit code {done.returncode}"]
        return base | {"status": "failed", "reason": f"the worker died: {tail[0][:300]}"}
    return base | json.loads(out.read_text(encoding="utf-8"))


def repeat_unstable(cells: list[dict[str, Any]], measured: list[dict[str, Any]], folder: Path, data_dir: Path,
                     cfg: BenchConfig, progress: bool) -> dict[str, Any]:
    """Measure again, each in a fresh process, the cells with a batch size whose timing did not settle, and merge
    every batch size's runs into one (``merge_runs``, in ``measured`` in place): pass after pass while unstable cells
    are left, at most ``bench.repeats`` passes, no new measurement after ``bench.repeat_seconds``. A repeat times
    only the batch sizes still unstable. Returns the counts of unstable rows before and after, and why it stopped."""
    runs = [{b["batch"]: [b] for b in m["batches"]} if m["status"] == "ok" else {} for m in measured]

    def unstable_rows() -> int:
        return sum(not b["stable"] for m in measured if m["status"] == "ok" for b in m["batches"])

    first, started, last, passes, repeated = unstable_rows(), time.perf_counter(), len(cells) - 1, 0, 0
    stopped, out_of_time = f"bench.repeats={cfg.repeats} passes done", False
    for number in range(1, cfg.repeats + 1):
        todo = [i for i, m in enumerate(measured) if _unstable_batches(m)]
        if not todo:
            break
        bar = tqdm(repeat_order(todo, number, last), desc=f"bench repeat {number}", unit="cell",
                   disable=not progress, file=sys.stderr)
        for i in bar:
            if time.perf_counter() - started >= cfg.repeat_seconds:
                out_of_time = True
                break
            cell, batches = cells[i], _unstable_batches(measured[i])
            name = f"{cell['variant']}/{cell['runtime']}/{cell['math']}/{cell['threads']}t"
            bar.set_postfix_str(name)
            out = folder / (f"{i:03d}-{cell['variant']}-{cell['runtime']}-{cell['math']}-{cell['threads']}t"
                            f"-repeat{number}.json")
            again = _measure(cell, out, data_dir, cfg, 0, batches)
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
    if not unstable_rows():
        stopped = "every row settled"
    for i, m in enumerate(measured):  # every row, repeated or not, carries its runs
        if m["status"] == "ok":
            m["batches"] = [merge_runs(found, cfg.max_cv) for found in runs[i].values()]
    return {"rows": sum(len(r) for r in runs), "unstable_first_pass": first, "unstable": unstable_rows(),
            "repeat_passes": passes, "repeat_measurements": repeated, "repeat_seconds": time.perf_counter() - started,
            "stopped": stopped}


def _unstable_batches(measurement: dict[str, Any]) -> list[int]:
    if measurement["status"] != "ok":
        return []  # a failed cell is reported failed, not timed again
    return [b["batch"] for b in measurement["batches"] if not b["stable"]]


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
    and stable only when some run settled and the settled runs agree within ``max_cv``."""
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
    }


def _table_rows(measured: list[dict[str, Any]], variants: dict[str, dict[str, Any]],
                peaks: dict[int, dict[str, float]]) -> list[dict[str, Any]]:
    """One row per (cell, batch size) with speedup, GFLOP/s and the variant's verdict; failed cells keep one row."""
    baseline = {(m["threads"], b["batch"]): b for m in measured if m["status"] == "ok"
                and (m["variant"], m["runtime"], m["math"]) == BASELINE for b in m["batches"]}
    rows = []
    for m in measured:
        variant = variants[m["variant"]]
        common = {"variant": m["variant"], "runtime": m["runtime"], "math": m["math"], "threads": m["threads"],
                  "size_bytes": variant["size_bytes"], "mflops": variant["mflops"],
                  "variant_status": variant["status"], "variant_test_acc": variant["test_acc"]}
        if m["status"] != "ok":
            rows.append(common | {"status": "failed", "reason": m.get("reason", ""), "batch": None})
            continue
        status = "rejected" if variant["status"] == "rejected" else "ok"
        reason = variant["reason"] if status == "rejected" else ""
        for b in m["batches"]:
            base = baseline.get((m["threads"], b["batch"]))
            gflops = (variant["mflops"] or 0) * b["images_per_s"] / 1e3
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
            })
    return rows


def choose(rows: list[dict[str, Any]], batch: int, optimize_dir: Path) -> dict[str, Any] | None:
    """The fastest stable cell at ``batch`` whose variant is within the accuracy budget: what to package, and why,
    with the spread beside every figure. When no cell at ``batch`` settled, the fastest unstable one, marked
    ``stable: False`` and said so in the reason: a timing that swings is no ground for a choice."""
    ok = [r for r in rows if r["status"] == "ok" and r["batch"] == batch]
    if not ok:
        return None
    stable = [r for r in ok if r["stable"]]
    best = max(stable or ok, key=lambda r: r["images_per_s"])
    onnx = max((r for r in ok if r["runtime"] == "onnxruntime"), key=lambda r: r["images_per_s"], default=None)
    reason = (f"fastest within the accuracy budget at batch {batch}: {best['images_per_s']:,.0f} images/s "
              f"{_pm(best['spread'])}, top-1 {best['top1']:.4f}")
    if best.get("speedup"):
        reason += f", {best['speedup']:.1f}x eager fp32 {_pm(best['speedup_spread'])}"
    if onnx:
        spread = 0.0 if onnx is best else best["spread"] + onnx["spread"]  # as for the speedup: the sum
        reason += f", {best['images_per_s'] / onnx['images_per_s']:.2f}x the best ONNX Runtime cell {_pm(spread)}"
    faster = sum(r["images_per_s"] > best["images_per_s"] for r in ok)
    if not stable:
        reason += (f"; UNSTABLE: none of the {len(ok)} cells at this batch size gave a settled timing, so the "
                   "choice may not hold (a quieter machine, or a larger bench.max_seconds or bench.repeats, "
                   "may settle them)")
    elif faster:
        reason += f"; passed over {faster} faster cell{'s' if faster > 1 else ''} whose timing never settled"
    return {
        "variant": best["variant"], "runtime": best["runtime"], "math": best["math"], "threads": best["threads"],
        "batch": batch, "folder": str(Path(optimize_dir) / best["variant"]), "images_per_s": best["images_per_s"],
        "top1": best["top1"], "reason": reason, "stable": bool(stable),
    }


def _pm(spread: float) -> str:
    """A relative spread as ``±4.2%``."""
    return f"±{100 * spread:.1f}%"


def tracking_summary(config: SignpostConfig, result: BenchResult) -> dict[str, Any]:
    """What a tracking run of this bench result holds: the settings, every ok cell's images/s, p50 and share of
    the bf16 peak, the machine, the table, chart and candidate (``signpost.tracking.log_stage`` keywords)."""
    metrics = {}
    for r in result.results["rows"]:
        if r["status"] != "ok":
            continue
        cell = f"{r['variant']}/{r['runtime']}/{r['math']}/{r['threads']}t/b{r['batch']}"
        metrics |= {f"{cell}/images_per_s": r["images_per_s"], f"{cell}/p50_ms": r["ms_median"]}
        if r["bf16_peak_fraction"] is not None:
            metrics[f"{cell}/bf16_peak_fraction"] = r["bf16_peak_fraction"]
    candidate = result.candidate or {}
    tags = {"signpost.machine": str(result.results["machine"].get("cpu", "")),
            "signpost.candidate": "/".join(str(candidate.get(k, "")) for k in ("variant", "runtime", "math"))}
    files = [result.path / name for name in (RESULTS, TABLE, CHART, CANDIDATE)]
    return {"params": {"bench": config_to_dict(config.bench), "artifact": result.path.name}, "metrics": metrics,
            "files": files, "tags": tags}


def small_batch_runtime(rows: list[dict[str, Any]], candidate: dict[str, Any]) -> dict[str, Any] | None:
    """For the candidate's variant, the runtime that answers the smallest measured batch fastest, when that is not
    the candidate's own (typically ONNX Runtime: its per-call overhead is the lowest), and ``below``: the smallest
    measured batch size from which the candidate's runtime is the faster one. A server runs batches smaller than
    ``below`` on it. None when the candidate's runtime is also the fastest for small batches."""
    cells = {(r["runtime"], r["math"], r["batch"]): r for r in rows
             if r["status"] == "ok" and r["variant"] == candidate["variant"] and r["threads"] == candidate["threads"]}
    if not cells:
        return None
    smallest = min(batch for _, _, batch in cells)
    at_smallest = [r for (_, _, batch), r in cells.items() if batch == smallest]
    # As in choose, a stable cell first (a row with no stability record, made by hand, counts as stable).
    best = max([r for r in at_smallest if r.get("stable", True)] or at_smallest, key=lambda r: r["images_per_s"])
    ours, theirs = (candidate["runtime"], candidate["math"]), (best["runtime"], best["math"])
    if theirs == ours:
        return None

    def speed(runtime_math: tuple[str, str], batch: int) -> float:
        row = cells.get((*runtime_math, batch))
        return row["images_per_s"] if row else 0.0

    sizes = sorted({batch for _, _, batch in cells})
    below = next((b for b in sizes if speed(ours, b) >= speed(theirs, b) > 0), candidate["batch"])
    reason = f"p50 {best['ms_median']:.3f} ms at batch {smallest}"
    if (own := cells.get((*ours, smallest))) is not None:
        reason += f" against {own['ms_median']:.3f} ms on {ours[0]} ({ours[1]})"
    if not best.get("stable", True):
        reason += f" (UNSTABLE: no cell at batch {smallest} settled; spread {_pm(best['spread'])})"
    return {"runtime": theirs[0], "math": theirs[1], "below": below, "reason": reason}


def markdown_table(results: dict[str, Any]) -> str:
    """The results as markdown: machine, baseline, then one row per cell and batch size."""
    m = results["machine"]
    peaks = ", ".join(f"{t} threads: fp32 {p['fp32']:.0f}, bf16 {p['bf16']:.0f} GFLOP/s"
                      for t, p in results["peaks_gflops"].items())
    lines = [
        f"Machine: {m['cpu']} ({m['arch']}; {m['physical_cores']} cores / {m['logical_cores']} threads; ISA "
        f"{' '.join(m['isa']) or '-'}); torch {m['libraries'].get('torch', '?')}, "
        f"onnxruntime {m['libraries'].get('onnxruntime', '-')}, torchao {m['libraries'].get('torchao', '-')}.",
        f"Matmul peaks: {peaks}.",
        f"Baseline: {results['baseline']}.",
    ]
    if stability := results.get("stability"):
        lines.append(
            f"Stability: {stability['unstable']} of {stability['rows']} timed rows unstable (their latency never "
            f"settled within bench.max_cv {100 * results['settings']['max_cv']:g}%), "
            f"{stability['unstable_first_pass']} before {stability['repeat_passes']} repeat passes "
            f"({stability['repeat_measurements']} cell measurements in {stability['repeat_seconds']:.0f} s; "
            f"{stability['stopped']}). "
            "Spread: of all timed chunks and between runs; beside a ratio, the sum of its two figures' spreads. "
            "An unstable row's figures are not to be trusted."
        )
    lines += [
        "",
        "| variant | runtime | math | threads | batch | status | top-1 | size KiB | ms/image | images/s | p50 ms | "
        "p95 ms | p99 ms | spread | stable | speedup | GFLOP/s | % bf16 peak | CPU cores | peak RSS MiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results["rows"]:
        size = f"{r['size_bytes'] / 1024:.0f}" if r["size_bytes"] else "-"
        if r["status"] == "failed":
            lines.append(f"| {r['variant']} | {r['runtime']} | {r['math']} | {r['threads']} | - | failed: "
                         f"{r['reason'].replace('|', '/')} | - | {size} |" + " - |" * 12)
            continue
        status = "ok" if r["status"] == "ok" else "rejected (budget)"
        speedup = f"{r['speedup']:.2f}x {_pm(r['speedup_spread'])}" if r["speedup"] else "-"
        runs = len(r.get("runs", [])) or 1
        stable = ("yes" if r["stable"] else "**no**") + (f", {runs} runs" if runs > 1 else "")
        frac = f"{100 * r['bf16_peak_fraction']:.0f}%" if r["bf16_peak_fraction"] is not None else "-"
        lines.append(
            f"| {r['variant']} | {r['runtime']} | {r['math']} | {r['threads']} | {r['batch']} | {status} | "
            f"{r['top1']:.4f} | {size} | {r['ms_per_image']:.4f} | {r['images_per_s']:,.0f} | {r['ms_median']:.3f} | "
            f"{r['ms_p95']:.3f} | {r['ms_p99']:.3f} | {100 * r['spread']:.1f}% | {stable} | {speedup} | "
            f"{r['gflops']:.0f} | {frac} | {r['cpu_cores_mean']:.2f} | {r['rss_mib_peak']:.0f} |"
        )
    if results.get("candidate"):
        c = results["candidate"]
        lines += ["", f"Deployable choice: **{c['variant']} / {c['runtime']} / {c['math']}** — {c['reason']}."]
        if small := c.get("small_batch"):
            lines.append(f"Batches smaller than {small['below']} are served on {small['runtime']} ({small['math']}): "
                         f"{small['reason']}.")
    by_batch = {b: c for b, c in (results.get("candidates_by_batch") or {}).items() if c}
    if by_batch:
        lines += ["", "Fastest within the budget at each batch size: " + "; ".join(
            f"{b}: {c['variant']} / {c['runtime']} / {c['math']} ({c['images_per_s']:,.0f} images/s"
            f"{'' if c.get('stable', True) else ', UNSTABLE'})"
            for b, c in by_batch.items()) + "."]
    return "\n".join(lines)


# --- compare -------------------------------------------------------------------------------------------------


def compare(a_path: Path, b_path: Path, *, threshold: float = 0.10) -> tuple[str, bool]:
    """Compare two results files cell by cell: the markdown report and whether B regressed against A.

    B regresses when any cell both measured is more than ``threshold`` slower (images/s), or a cell ok in A
    failed in B.
    """
    a, b = (_load_results(p) for p in (a_path, b_path))

    def index(results: dict[str, Any]) -> dict[tuple, dict[str, Any]]:
        return {(r["variant"], r["runtime"], r["math"], r["threads"], r["batch"]): r for r in results["rows"]}

    ia, ib = index(a), index(b)
    lines = [f"A: {a_path} — {_machine_line(a)}", f"B: {b_path} — {_machine_line(b)}", "",
             "| variant | runtime | math | threads | batch | A images/s | B images/s | B/A | verdict |",
             "|---|---|---|---|---|---|---|---|---|"]
    regressions = []
    for k in sorted(set(ia) & set(ib), key=lambda k: tuple(str(x) for x in k)):
        ra, rb = ia[k], ib[k]
        if ra["status"] == "failed" or k[4] is None:
            continue
        if rb["status"] == "failed":
            regressions.append(k)
            lines.append(f"| {' | '.join(map(str, k[:4]))} | - | {ra['images_per_s']:,.0f} | failed | - | "
                         "REGRESSION |")
            continue
        ratio = rb["images_per_s"] / ra["images_per_s"]
        verdict = "REGRESSION" if ratio < 1 - threshold else ("faster" if ratio > 1 + threshold else "same")
        if verdict == "REGRESSION":
            regressions.append(k)
        lines.append(f"| {' | '.join(map(str, k))} | {ra['images_per_s']:,.0f} | {rb['images_per_s']:,.0f} | "
                     f"{ratio:.2f} | {verdict} |")
    only = len(set(ia) ^ set(ib))
    lines += ["", f"Verdict: {'REGRESSION' if regressions else 'no regression'} — {len(regressions)} of "
              f"{len(set(ia) & set(ib))} shared cells more than {100 * threshold:.0f}% slower or failed in B"
              + (f"; {only} cells measured in only one of the two" if only else "") + "."]
    return "\n".join(lines), bool(regressions)


def _load_results(path: Path) -> dict[str, Any]:
    path = Path(path)
    if path.is_dir():
        path = path / RESULTS
    try:
        results = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: not a readable bench results file: {exc}") from exc
    if not isinstance(results, dict) or "rows" not in results or "machine" not in results:
        raise ValueError(f"{path}: not a signpost bench results file (no rows/machine)")
    return results


def _machine_line(results: dict[str, Any]) -> str:
    m = results["machine"]
    return (f"{m['cpu']} ({m['arch']}, {m['physical_cores']} cores, {' '.join(m['isa'])}), torch "
            f"{m['libraries'].get('torch', '?')}, BLAS {m.get('blas') or '?'}")

