"""What the bench results say and how people read them: the deployable choice read off the table's rows, the
markdown table, and ``compare`` of two runs' results.

``choose`` picks the fastest stable cell within the accuracy budget at a batch size and says why, with the spread
beside every figure; ``small_batch_runtime`` names the runtime that serves batches too small for the choice's own.
``markdown_table`` is what the bench stage writes beside ``results.json`` as ``results.md``. ``compare`` reads two
results files (two PyTorch builds, before/after a change) and gives a regression verdict; results carry the machine
they were measured on, so a comparison says what it compares, and two architectures (x86-64 against Arm64) get a
table of ratios instead: a difference between machines is not a regression. The table and the comparison read
the typed results (``signpost.contracts.BenchResults``), so a file of another shape is refused with its name.
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any

from signpost.contracts import RESULTS, BenchResults, load_results


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
        ratio = best["images_per_s"] / onnx["images_per_s"]
        reason += f", {ratio:.2f}x the best ONNX Runtime cell {_pm(spread)}"
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
    own = cells.get((*ours, smallest))
    # None when the candidate's runtime answers the smallest batch itself at least as fast: a settled slower cell
    # is no reason to move small batches off an unsettled faster one (each figure's spread is in the table).
    if theirs == ours or (own is not None and own["images_per_s"] >= best["images_per_s"]):
        return None

    def speed(runtime_math: tuple[str, str], batch: int) -> float:
        row = cells.get((*runtime_math, batch))
        return row["images_per_s"] if row else 0.0

    sizes = sorted({batch for _, _, batch in cells})
    below = next((b for b in sizes if speed(ours, b) >= speed(theirs, b) > 0), candidate["batch"])
    reason = f"p50 {best['ms_median']:.3f} ms at batch {smallest}"
    if own is not None:
        reason += f" against {own['ms_median']:.3f} ms on {ours[0]} ({ours[1]})"
    if not best.get("stable", True):
        reason += f" (UNSTABLE: no cell at batch {smallest} settled; spread {_pm(best['spread'])})"
    return {"runtime": theirs[0], "math": theirs[1], "below": below, "reason": reason}


def markdown_table(results: BenchResults) -> str:
    """The results as markdown: machine, baseline, then one row per cell and batch size."""
    m = results.machine
    peaks = ", ".join(f"{t} threads: fp32 {p['fp32']:.0f}, bf16 {p['bf16']:.0f} GFLOP/s"
                      for t, p in results.peaks_gflops.items())
    lines = [
        f"Machine: {m['cpu']} ({m['arch']}; {m['physical_cores']} cores / {m['logical_cores']} threads; ISA "
        f"{' '.join(m['isa']) or '-'}); torch {m['libraries'].get('torch', '?')}, "
        f"onnxruntime {m['libraries'].get('onnxruntime', '-')}, torchao {m['libraries'].get('torchao', '-')}.",
        f"Matmul peaks: {peaks}.",
        f"Baseline: {results.baseline}.",
    ]
    stability = results.stability
    lines.append(
        f"Stability: {stability.unstable} of {stability.rows} timed rows unstable (their latency never "
        f"settled within bench.max_cv {100 * results.settings['max_cv']:g}%), "
        f"{stability.unstable_first_pass} before {stability.repeat_passes} repeat passes "
        f"({stability.repeat_measurements} cell measurements in {stability.repeat_seconds:.0f} s; "
        f"{stability.stopped}). "
        "Spread: of all timed chunks and between runs; beside a ratio, the sum of its two figures' spreads. "
        "An unstable row's figures are not to be trusted."
    )
    lines += [
        "",
        "| variant | runtime | math | threads | batch | status | top-1 | size KiB | ms/image | images/s | p50 ms | "
        "p95 ms | p99 ms | spread | stable | speedup | GFLOP/s | % bf16 peak | CPU cores | peak RSS MiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results.rows:
        size = f"{r['size_bytes'] / 1024:.0f}" if r["size_bytes"] else "-"
        if r["status"] in ("failed", "skipped"):
            lines.append(f"| {r['variant']} | {r['runtime']} | {r['math']} | {r['threads']} | - | {r['status']}: "
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
    if c := results.candidate:
        lines += ["", f"Deployable choice: **{c.variant} / {c.runtime} / {c.math}** — {c.reason}."]
        if small := c.small_batch:
            lines.append(f"Batches smaller than {small.below} are served on {small.runtime} ({small.math}): "
                         f"{small.reason}.")
    by_batch = {b: c for b, c in results.candidates_by_batch.items() if c}
    if by_batch:
        lines += ["", "Fastest within the budget at each batch size: " + "; ".join(
            f"{b}: {c.variant} / {c.runtime} / {c.math} ({c.images_per_s:,.0f} images/s"
            f"{'' if c.stable is not False else ', UNSTABLE'})"  # None: a choice recorded before stability was
            for b, c in by_batch.items()) + "."]
    candidate = results.candidate.model_dump() if results.candidate else None
    lines += ["", *peer_table(results.rows, candidate)]
    return "\n".join(lines)


# What a user would do instead of Signpost: each tool's best form of the fp32 parent, by the runtime that runs it.
PEERS = (("ONNX Runtime", "onnxruntime"), ("OpenVINO", "openvino"), ("ExecuTorch", "executorch"),
         ("eager PyTorch (as TorchServe runs it)", "eager"))


def peer_table(rows: list[dict[str, Any]], candidate: dict[str, Any] | None) -> list[str]:
    """The "Signpost vs what you would do instead" section of results.md, as lines: at batch 1 and at the deploy
    batch size (the ``candidate``'s), each peer tool's best cell of the fp32 variant (OpenVINO: the best of its
    math settings; eager: default math only, as TorchServe runs it) against Signpost's deployable (``candidate``;
    at batch 1 the runtime its server answers single images on, ``small_batch``), top-1 beside speed, the ratio
    of Signpost's images/s to each and the top-1 points lost; then the batch-1 goal (Signpost's served p50 no
    worse than the best peer's) as this run measured it, and the settings each peer ran with."""
    ok = [r for r in rows if r["status"] == "ok"]
    lines = ["## Signpost vs what you would do instead", ""]
    if candidate is None:
        return [*lines, "No deployable choice in this run: nothing to compare with the peers."]
    small = candidate.get("small_batch") or {}
    if small.get("below", 2) <= 1:  # the server runs batch 1 on the candidate's own runtime
        small = {}
    ours = {1: (small.get("runtime", candidate["runtime"]), small.get("math", candidate["math"])),
            candidate["batch"]: (candidate["runtime"], candidate["math"])}
    lines += ["| batch | who | form (variant / runtime / math) | images/s (min-max) | batch p50 ms (min-max) | "
              "top-1 | Signpost / this | points lost |", "|---|---|---|---|---|---|---|---|"]
    best_peers: dict[int, dict[str, Any]] = {}
    deployable: dict[int, dict[str, Any]] = {}
    for batch in sorted(ours):
        mine = next((r for r in ok if r["batch"] == batch and r["variant"] == candidate["variant"]
                     and (r["runtime"], r["math"]) == ours[batch] and r["threads"] == candidate["threads"]), None)
        peers = []
        for tool, runtime in PEERS:
            found = [r for r in ok if r["batch"] == batch and r["variant"] == "fp32" and r["runtime"] == runtime
                     and (runtime != "eager" or r["math"] == "default")]
            if found:  # a settled cell first, as the deployable choice is made
                peers.append((tool, max([r for r in found if r.get("stable", True)] or found,
                                        key=lambda r: r["images_per_s"])))
        if mine is not None:
            deployable[batch] = mine
            lines.append(_peer_line(batch, "**Signpost deployable**", mine, None))
        for tool, r in peers:
            lines.append(_peer_line(batch, tool, r, mine))
        if peers:
            tool, best = max(peers, key=lambda peer: peer[1]["images_per_s"])
            best_peers[batch] = best | {"tool": tool}
        if mine is not None and batch in best_peers:
            best = best_peers[batch]
            lines.append(f"| {batch} | best peer: {best['tool']} | - | - | - | - | "
                         f"**{mine['images_per_s'] / best['images_per_s']:.2f}x** | "
                         f"{100 * (best['top1'] - mine['top1']):+.2f} |")
    lines.append("")
    lines.append(_deploy_goal(candidate["batch"], deployable.get(candidate["batch"]),
                              best_peers.get(candidate["batch"])) + "  ")  # two spaces: a markdown line break
    lines.append(_batch_one_goal(ok, candidate, ours[1], best_peers.get(1)))
    lines += ["", *_peer_settings(ok)]
    return lines


def _peer_line(batch: int, who: str, r: dict[str, Any], mine: dict[str, Any] | None) -> str:
    low, high = r.get("images_per_s_min", r["images_per_s"]), r.get("images_per_s_max", r["images_per_s"])
    p_low, p_high = r.get("ms_median_min", r["ms_median"]), r.get("ms_median_max", r["ms_median"])
    ratio = f"{mine['images_per_s'] / r['images_per_s']:.2f}x" if mine else "-"
    lost = f"{100 * (r['top1'] - mine['top1']):+.2f}" if mine else "-"
    return (f"| {batch} | {who} | {r['variant']} / {r['runtime']} / {r['math']} | {r['images_per_s']:,.0f} "
            f"({low:,.0f}-{high:,.0f}) | {r['ms_median']:.3f} ({p_low:.3f}-{p_high:.3f}) | {r['top1']:.4f} | "
            f"{ratio} | {lost} |")


# The goal at the deploy batch size: the deployable at least this many times the best peer's fp32 form ...
DEPLOY_GOAL_RATIO = 2.0
DEPLOY_GOAL_POINTS = 0.5  # ... losing at most this many points of test top-1 against it


def _deploy_goal(batch: int, mine: dict[str, Any] | None, best: dict[str, Any] | None) -> str:
    """The deploy-batch goal, computed from this run: Signpost's deployable against the best peer's fp32 form."""
    if mine is None or best is None:
        return f"Deploy-batch goal: not measured in this run (no deployable or no peer cell at batch {batch})."
    ratio, lost = mine["images_per_s"] / best["images_per_s"], 100 * (best["top1"] - mine["top1"])
    misses = [f"{ratio:.2f}x is short of {DEPLOY_GOAL_RATIO:.0f}x"] if ratio < DEPLOY_GOAL_RATIO else []
    misses += [f"{lost:.2f} points lost is over {DEPLOY_GOAL_POINTS}"] if lost > DEPLOY_GOAL_POINTS else []
    verdict = "holds" if not misses else "MISSED: " + "; ".join(misses)
    return (f"Deploy-batch goal (at batch {batch}, at least {DEPLOY_GOAL_RATIO:.0f}x the best peer's fp32 form, at "
            f"most {DEPLOY_GOAL_POINTS} points of top-1 lost): Signpost {mine['images_per_s']:,.0f} images/s "
            f"({mine['variant']} / {mine['runtime']} / {mine['math']}) against {best['images_per_s']:,.0f} "
            f"({best['tool']}, fp32 / {best['runtime']} / {best['math']}): {ratio:.2f}x, {lost:+.2f} points: "
            f"{verdict}.")


def _batch_one_goal(ok: list[dict[str, Any]], candidate: dict[str, Any], served: tuple[str, str],
                    best: dict[str, Any] | None) -> str:
    """The issue's batch-1 goal, computed from this run: Signpost's served batch-1 p50 against the best peer's."""
    mine = next((r for r in ok if r["batch"] == 1 and r["variant"] == candidate["variant"]
                 and (r["runtime"], r["math"]) == served and r["threads"] == candidate["threads"]), None)
    if mine is None or best is None:
        return "Batch-1 goal: not measured in this run (bench.batch_sizes needs 1, with a peer and the deployable)."
    holds = mine["ms_median"] <= best["ms_median"]
    verdict = "holds" if holds else (f"MISSED by {mine['ms_median'] - best['ms_median']:.3f} ms "
                                     f"({100 * (mine['ms_median'] / best['ms_median'] - 1):.0f}% slower)")
    return (f"Batch-1 goal (Signpost's served batch-1 p50 no worse than the best peer's): Signpost "
            f"{mine['ms_median']:.3f} ms ({mine['variant']} / {mine['runtime']} / {mine['math']}) against "
            f"{best['ms_median']:.3f} ms ({best['tool']}, fp32 / {best['runtime']} / {best['math']}): {verdict}.")


def _peer_settings(ok: list[dict[str, Any]]) -> list[str]:
    """What each peer's fp32 cells ran with, as their loaders reported it (one line per runtime and math)."""
    seen: dict[tuple[str, str], dict[str, Any]] = {}
    for r in ok:
        if r["variant"] == "fp32" and r["runtime"] in dict((rt, t) for t, rt in PEERS) and r.get("settings"):
            seen.setdefault((r["runtime"], r["math"]), r["settings"])
    if not seen:
        return []
    return ["Peer settings:", *(f"- {runtime} ({math}): " + ", ".join(f"{k}={v}" for k, v in settings.items())
                                for (runtime, math), settings in sorted(seen.items()))]


def compare(a_path: Path, b_path: Path, *, threshold: float = 0.10) -> tuple[str, bool]:
    """Compare two results files (or bench folders) cell by cell: the markdown report and whether B regressed
    against A (``compare_results``). A file that is not a bench results file is an ``ArtifactError`` naming it."""
    a, b = (_load_results(p) for p in (a_path, b_path))
    return compare_results(a, b, a_name=str(a_path), b_name=str(b_path), threshold=threshold)


def compare_results(a: BenchResults, b: BenchResults, *, a_name: str = "A", b_name: str = "B",
                    threshold: float = 0.10) -> tuple[str, bool]:
    """Two runs' results cell by cell: the markdown report and whether B regressed against A.

    On one architecture this is a before/after comparison: B regresses when any cell both measured is more than
    ``threshold`` slower (images/s), or a cell ok in A failed in B. Across architectures (x86-64 against Arm64) a
    slower cell is a difference between machines, not a regression: the report gives B/A ratios and never regresses.
    """
    if architecture(a.machine) != architecture(b.machine):
        return _across_architectures(a, b, a_name, b_name), False
    ia, ib = _cells(a), _cells(b)
    lines = [f"- A: {a_name} — {machine_line(a)}", f"- B: {b_name} — {machine_line(b)}", "",
             "| variant | runtime | math | threads | batch | A images/s | B images/s | B/A | verdict |",
             "|---|---|---|---|---|---|---|---|---|"]
    regressions = []
    for k in _shared(ia, ib):
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


def architecture(machine: dict[str, Any]) -> str:
    """The CPU architecture a results file's machine record names, as people write it: x86-64 or Arm64 (another
    name as recorded; ``?`` for a record without one)."""
    arch = str(machine.get("arch") or "?")
    return _ARCHITECTURES.get(arch.lower(), arch)


_ARCHITECTURES = {"x86_64": "x86-64", "amd64": "x86-64", "x64": "x86-64", "aarch64": "Arm64", "arm64": "Arm64"}


def _across_architectures(a: BenchResults, b: BenchResults, a_name: str, b_name: str) -> str:
    """The ratio table of two architectures' results: per cell both measured, images/s on each and B/A. Each side
    ran its own build of every variant on its own CPU, so no ratio is a verdict on the code."""
    arch_a, arch_b = architecture(a.machine), architecture(b.machine)
    ia, ib = _cells(a), _cells(b)
    lines = [f"{arch_a} vs {arch_b}: an architecture comparison (ratios, no regression verdict).", "",
             f"- A ({arch_a}): {a_name} — {machine_line(a)}", f"- B ({arch_b}): {b_name} — {machine_line(b)}", "",
             f"| variant | runtime | math | threads | batch | {arch_a} images/s | {arch_b} images/s | "
             f"{arch_a} p50 ms | {arch_b} p50 ms | {arch_b}/{arch_a} |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    ratios = []
    for k in _shared(ia, ib):
        ra, rb = ia[k], ib[k]
        if k[4] is None:  # failed on both sides: one row each, no figures
            continue
        if "failed" in (ra["status"], rb["status"]):
            side = arch_a if ra["status"] == "failed" else arch_b
            lines.append(f"| {' | '.join(map(str, k))} |" + " - |" * 4 + f" failed on {side} |")
            continue
        ratio = rb["images_per_s"] / ra["images_per_s"]
        ratios.append(ratio)
        lines.append(f"| {' | '.join(map(str, k))} | {ra['images_per_s']:,.0f} | {rb['images_per_s']:,.0f} | "
                     f"{_ms(ra)} | {_ms(rb)} | {ratio:.2f} {_pm(ra.get('spread', 0.0) + rb.get('spread', 0.0))} |")
    only = len(set(ia) ^ set(ib))
    if ratios:
        mean = math.exp(statistics.fmean(math.log(r) for r in ratios))
        summary = (f"{arch_b}/{arch_a} images/s: geometric mean {mean:.2f} over {len(ratios)} cells both measured "
                   f"({sum(r > 1 for r in ratios)} faster on {arch_b}, {sum(r < 1 for r in ratios)} faster on "
                   f"{arch_a})")
    else:
        summary = "no cell was measured on both architectures"
    lines += ["", summary + (f"; {only} cells measured on only one of the two" if only else "") + "."]
    return "\n".join(lines)


def _cells(results: BenchResults) -> dict[tuple, dict[str, Any]]:
    """The rows by cell and batch size: (variant, runtime, math, threads, batch)."""
    return {(r["variant"], r["runtime"], r["math"], r["threads"], r["batch"]): r for r in results.rows}


def _shared(ia: dict[tuple, Any], ib: dict[tuple, Any]) -> list[tuple]:
    """The cells both runs measured, in a stable order (a failed cell's batch is None, hence the str)."""
    return sorted(set(ia) & set(ib), key=lambda k: tuple(str(x) for x in k))


def _ms(row: dict[str, Any]) -> str:
    """A row's p50 latency in ms, or ``-`` for a hand-made row without one."""
    return f"{row['ms_median']:.3f}" if row.get("ms_median") is not None else "-"


def _load_results(path: Path) -> BenchResults:
    """A results file, or the one in a bench folder. It is validated but not checked against a manifest: results
    are compared across machines, copied out of their folders (as the workflow's compare job does)."""
    path = Path(path)
    return load_results(path / RESULTS if path.is_dir() else path)


def machine_line(results: BenchResults) -> str:
    """The machine a results file was measured on, in one line: CPU, architecture, cores, ISA, torch, BLAS."""
    m = results.machine
    return (f"{m['cpu']} ({m['arch']}, {m['physical_cores']} cores, {' '.join(m['isa'])}), torch "
            f"{m['libraries'].get('torch', '?')}, BLAS {blas(m)}")


def blas(machine: dict[str, Any]) -> str:
    """The BLAS a machine record names (``mkl``, ``open``: OpenBLAS). Records keep the rest of torch's build line
    after ``BLAS_INFO=`` (it is one line of ``torch.__config__.show()``): only its first item is the BLAS."""
    return str(machine.get("blas") or "?").split(",")[0].strip() or "?"


def _pm(spread: float) -> str:
    """A relative spread as ``±4.2%``."""
    return f"±{100 * spread:.1f}%"
