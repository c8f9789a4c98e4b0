"""bench: a real matrix measured in subprocesses, one table with a baseline from the same run, every cell repeated
in alternating passes, profile. The choice off the rows, the table's text and compare are in
tests/report/test_bench_table.py."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from signpost.cli import main
from signpost.config import SignpostConfig, load_config
from signpost.contracts import VariantRow
from signpost.report.bench_table import markdown_table
from signpost.stages import bench as bench_module
from signpost.stages.bench import (
    BASELINE,
    bench,
    merge_runs,
    plan,
    repeat_cells,
    repeat_order,
    tracking_summary,
)

SMALL_MATRIX = ["bench.variants=[fp32,int8,pruned]", "bench.runtimes=[eager,aoti,onnxruntime]",
                "bench.math=[default,bf16]", "bench.threads=[1]", "bench.batch_sizes=[1,8]", "bench.min_seconds=0.05",
                "bench.max_seconds=0.3", "bench.deploy_batch_size=8", "bench.repeats=1", "bench.repeat_seconds=20"]


def _config(optimized: dict, *overrides: str) -> SignpostConfig:
    """The optimized fixture's config with a bench section made from ``overrides`` alone."""
    return optimized["config"].model_copy(update={"bench": load_config(None, list(overrides)).bench})


@pytest.fixture(scope="module")
def measured(optimized: dict) -> dict:
    config = _config(optimized, *SMALL_MATRIX)
    result = bench(config, optimize_dir=optimized["result"].path, data_dir=optimized["data_dir"],
                   profile="fp32/eager/default/8", progress=False)
    return {"config": config, "result": result}


def test_the_matrix_is_measured_with_the_baseline_in_the_same_run(measured: dict) -> None:
    results = measured["result"].results
    for threads, (before, after) in results.peak_measurements.items():  # the peak: the larger of two readings
        assert results.peaks_gflops[threads]["bf16"] == max(before["bf16"], after["bf16"]) > 0
    rows = results.rows
    cells = {(r["variant"], r["runtime"], r["math"]) for r in rows}
    # int8 has no ONNX form; ONNX Runtime takes no oneDNN math setting: those cells are not planned.
    assert cells == {
        ("fp32", "eager", "default"), ("fp32", "eager", "bf16"), ("fp32", "aoti", "default"), ("fp32", "aoti", "bf16"),
        ("fp32", "onnxruntime", "default"), ("int8", "eager", "default"), ("int8", "eager", "bf16"),
        ("int8", "aoti", "default"), ("int8", "aoti", "bf16"), ("pruned", "eager", "default"),
        ("pruned", "eager", "bf16"), ("pruned", "aoti", "default"), ("pruned", "aoti", "bf16"),
        ("pruned", "onnxruntime", "default"),
    }
    assert all(r["status"] == "ok" for r in rows), [r.get("reason") for r in rows if r["status"] != "ok"]
    assert len(rows) == 2 * len(cells)  # one row per batch size
    for r in rows:
        assert r["images_per_s"] > 0 and r["ms_p99"] >= r["ms_p95"] >= 0 and r["ms_median"] > 0
        assert r["ms_per_image"] == pytest.approx(r["ms_median"] / r["batch"])
        assert r["rss_mib_peak"] > 0 and r["cpu_cores_mean"] >= 0
        assert 0.0 <= r["top1"] <= 1.0 and r["gflops"] > 0 and r["bf16_peak_fraction"] > 0
    baseline = [r for r in rows if (r["variant"], r["runtime"], r["math"]) == BASELINE]
    assert [r["speedup"] for r in baseline] == [1.0, 1.0]
    assert results.peaks_gflops["1"]["fp32"] > 0 and results.peaks_gflops["1"]["bf16"] > 0
    machine = results.machine
    assert machine["logical_cores"] >= 1 and machine["cpu"] and "torch" in machine["libraries"]


def test_the_table_chart_and_deployable_choice_are_written(measured: dict) -> None:
    path, results = measured["result"].path, measured["result"].results
    table = (path / "results.md").read_text(encoding="utf-8")
    assert "Baseline: fp32/eager/default" in table and "| variant | runtime | math |" in table
    matrix, peers = table.split("## Signpost vs what you would do instead")
    assert matrix.count("\n| ") == len(results.rows) + 1
    # the peer table of a real run: ONNX Runtime's and eager's fp32 against the deployable, and the batch-1 goal
    assert "| 8 | **Signpost deployable** |" in peers and "| 8 | ONNX Runtime | fp32 / onnxruntime / default |" in peers
    assert "| 1 | eager PyTorch (as TorchServe runs it) | fp32 / eager / default |" in peers
    assert "Batch-1 goal (Signpost's served batch-1 p50 no worse than the best peer's): Signpost " in peers
    assert "- onnxruntime (default): " in peers and "graph_optimization_level=ORT_ENABLE_ALL" in peers
    with Image.open(path / "chart.png") as chart:
        assert chart.width > 600 and chart.height > 300
    candidate = json.loads((path / "candidate.json").read_text(encoding="utf-8"))
    at_batch = [r for r in results.rows if r["batch"] == 8 and r["status"] == "ok"]
    settled = [r for r in at_batch if r["stable"]]
    assert candidate["images_per_s"] == max(r["images_per_s"] for r in settled or at_batch)
    assert candidate["stable"] is bool(settled)
    assert candidate["reason"].startswith("fastest within the accuracy budget at batch 8")
    stability = results.stability  # counted before and after the repeat pass, and shown above the table
    assert stability.rows == len(results.rows) and stability.repeat_passes <= 1
    assert stability.unstable == sum(not r["stable"] for r in results.rows) <= stability.unstable_first_pass
    assert f"Stability: {stability.unstable} of {stability.rows} timed rows unstable" in table
    assert all(len(r["runs"]) >= 1 for r in results.rows)
    assert Path(candidate["folder"]).name == candidate["variant"]
    by_batch = results.candidates_by_batch
    assert set(by_batch) == {"1", "8"} and by_batch["8"].model_dump() | {"small_batch": None} == (
        results.candidate.model_dump() | {"small_batch": None})
    small = results.candidate.small_batch  # what serves single images, when not the candidate's runtime
    if small is not None:
        assert small.below > 1 and (small.runtime, small.math) != (candidate["runtime"], candidate["math"])
    # At every batch size the choice passes over a faster cell whose timing never settled (as at batch 8 above).
    at_one = [r for r in results.rows if r["batch"] == 1 and r["status"] == "ok"]
    settled_one = [r for r in at_one if r["stable"]]
    assert by_batch["1"].images_per_s == max(r["images_per_s"] for r in settled_one or at_one)
    assert by_batch["1"].stable is bool(settled_one)
    assert "Fastest within the budget at each batch size: 1: " in table


@pytest.mark.slow
def test_executorch_and_openvino_cells_run_for_real_beside_the_others(optimized: dict, tmp_path: Path) -> None:
    config = _config(optimized, "bench.variants=[fp32]", "bench.runtimes=[eager,executorch,openvino]",
                     "bench.math=[default,bf16]", "bench.threads=[1]", "bench.batch_sizes=[1,8]",
                     "bench.min_seconds=0.05", "bench.max_seconds=0.2", "bench.deploy_batch_size=8",
                     "bench.repeats=1", "bench.repeat_seconds=60")
    config = config.model_copy(update={"workdir": tmp_path})
    result = bench(config, optimize_dir=optimized["result"].path, data_dir=optimized["data_dir"], progress=False)
    rows = {(r["variant"], r["runtime"], r["math"], r["batch"]): r for r in result.results.rows}
    has_bf16 = rows[("fp32", "openvino", "default", 1)]["settings"]["cpu_has_bf16"]
    peers = [("executorch", "default"), ("openvino", "default")] + [("openvino", "bf16")] * has_bf16
    for batch in (1, 8):
        for runtime, math in peers:
            row = rows[("fp32", runtime, math, batch)]
            assert row["status"] == "ok" and row["images_per_s"] > 0 and len(row["runs"]) == 2, row.get("reason")
            assert row["images_per_s_min"] <= row["images_per_s"] <= row["images_per_s_max"]
            assert row["settings"]["inference_precision" if runtime == "openvino" else "delegate"] == (
                {"default": "f32", "bf16": "bf16"}[math] if runtime == "openvino" else "XNNPACK")
    if not has_bf16:  # this CPU has no bf16 kernels for OpenVINO: its bf16 cell is not applicable, never f32
        assert rows[("fp32", "openvino", "bf16", None)]["status"] == "skipped"
    assert ("fp32", "executorch", "bf16", 1) not in rows  # XNNPACK takes no math setting
    table = (result.path / "results.md").read_text(encoding="utf-8")
    for tool in ("OpenVINO", "ExecuTorch", "eager PyTorch (as TorchServe runs it)"):
        assert f"| 8 | {tool} | fp32 / " in table and f"| 1 | {tool} | fp32 / " in table
    assert "- openvino (default): " in table and "batch_1=LATENCY" in table and "delegate=XNNPACK" in table


def test_profile_writes_the_op_table_and_a_chrome_trace(measured: dict) -> None:
    path = measured["result"].path
    profiled = [r for r in measured["result"].results.rows if r.get("profile")]
    assert {(r["variant"], r["runtime"], r["math"]) for r in profiled} == {BASELINE}
    names = profiled[0]["profile"]
    table = (path / "cells" / names["table"]).read_text(encoding="utf-8")
    assert "Self CPU" in table and "aten::" in table
    trace = json.loads((path / "cells" / names["trace"]).read_text(encoding="utf-8"))
    assert trace["traceEvents"]


def test_a_second_run_reuses_the_results(measured: dict, optimized: dict) -> None:
    again = bench(measured["config"], optimize_dir=optimized["result"].path, data_dir=optimized["data_dir"],
                  profile="fp32/eager/default/8", progress=False)
    assert again.reused and again.path == measured["result"].path


def test_a_cell_that_times_out_is_failed_with_the_reason(optimized: dict) -> None:
    config = _config(optimized, "bench.variants=[fp32]", "bench.runtimes=[eager]", "bench.math=[default]",
                     "bench.threads=[1]", "bench.batch_sizes=[1]", "bench.timeout=0.01")
    result = bench(config, optimize_dir=optimized["result"].path, data_dir=optimized["data_dir"], progress=False)
    [row] = result.results.rows
    assert row["status"] == "failed" and "timed out after" in row["reason"] and "bench.timeout" in row["reason"]
    assert result.candidate is None
    assert "failed: timed out" in markdown_table(result.results)
    assert result.results.stability.repeat_measurements == 0  # a failed cell is not timed again


# --- stability: synthetic rows -------------------------------------------------------------------------------


def test_rejected_variants_are_not_planned_unless_asked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bench_module, "available_runtimes", lambda folder: {"eager"})
    variants = [(_variant(name, status), tmp_path / name)
                for name, status in (("fp32", "ok"), ("int8", "rejected"), ("pruned", "ok"), ("broken", "failed"))]
    matrix = ["bench.runtimes=[eager]", "bench.math=[default]", "bench.threads=[1]"]
    planned = plan(variants, load_config(None, matrix).bench)
    assert [c["variant"] for c in planned] == ["fp32", "pruned"]
    asked = plan(variants, load_config(None, [*matrix, "bench.include_rejected=true"]).bench)
    assert [c["variant"] for c in asked] == ["fp32", "int8", "pruned"]


def test_every_peer_runtime_is_planned_and_a_form_optimize_could_not_make_is_skipped_with_why(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    every = ["eager", "compile", "aoti", "onnxruntime", "executorch", "openvino"]
    monkeypatch.setattr(bench_module, "available_runtimes",
                        lambda folder: every if folder.name == "fp32" else ["eager", "executorch"])
    int8 = _variant("int8", "ok", {"openvino_error": "NNCF quantizes activations statically"})
    cfg = load_config(None, ["bench.threads=[1]"]).bench  # the default runtimes and math settings
    assert cfg.runtimes == every
    planned = plan([(_variant("fp32", "ok"), tmp_path / "fp32"), (int8, tmp_path / "int8")], cfg)
    cells = [(c["variant"], c["runtime"], c["math"]) for c in planned]
    # OpenVINO: its own precision hint, default and bf16; ExecuTorch (XNNPACK): no math setting
    assert [c[1:] for c in cells if c[0] == "fp32" and c[1] in ("executorch", "openvino")] == [
        ("executorch", "default"), ("openvino", "default"), ("openvino", "bf16")]
    # int8 has no ONNX form and optimize said nothing about it: left out; its OpenVINO IR failed: skipped, with why
    assert [c[1:] for c in cells if c[0] == "int8"] == [
        ("eager", "default"), ("eager", "bf16"), ("eager", "no-onednn"), ("executorch", "default"),
        ("openvino", "default"), ("openvino", "bf16")]
    skipped = [c for c in planned if "skip" in c]
    assert [(c["variant"], c["runtime"]) for c in skipped] == [("int8", "openvino")] * 2
    assert skipped[0]["skip"] == "optimize could not make its openvino form: NNCF quantizes activations statically"
    monkeypatch.setattr(bench_module.subprocess, "run", lambda *a, **k: pytest.fail("a skipped cell was run"))
    done = bench_module._measure(skipped[0], tmp_path / "out.json", tmp_path, cfg, 0)
    assert done["status"] == "skipped" and done["reason"] == skipped[0]["skip"]
    [row] = bench_module._table_rows([done], {"int8": int8}, {1: {"bf16": 1.0}})
    assert (row["status"], row["batch"], row["reason"]) == ("skipped", None, skipped[0]["skip"])


def _variant(name: str, status: str, settings: dict | None = None) -> VariantRow:
    """A row of optimize's variants table with ``name`` and ``status``; the rest is what plan does not read."""
    return VariantRow(name=name, method="m", settings=settings or {}, status=status, reason="", path=name, forms=[],
                      val_acc=None, test_acc=None, size_bytes=None, parameters=None, mflops=None, seconds=0.0,
                      role="candidate")


def _batch(batch: int, rate: float, stable: bool, spread: float = 0.02) -> dict:
    return {"batch": batch, "images_per_s": rate, "ms_median": 1e3 * batch / rate, "spread": spread, "stable": stable}


def test_merge_runs_takes_the_settled_runs_and_widens_the_spread() -> None:
    swung = merge_runs([_batch(1, 9, False), _batch(1, 190, True), _batch(1, 200, True)], max_cv=0.05)
    assert swung["images_per_s"] == 190 and swung["stable"] and not swung["stable_first_run"]  # the lower median
    assert swung["runs"] == [9, 190, 200] and swung["spread"] == pytest.approx(5 / 195)
    disagree = merge_runs([_batch(1, 100, True), _batch(1, 150, True)], max_cv=0.05)  # each settled, far apart
    assert not disagree["stable"] and disagree["images_per_s"] == 100 and disagree["spread"] == pytest.approx(0.2)
    never = merge_runs([_batch(1, 100, False, 0.3), _batch(1, 120, False, 0.1)], max_cv=0.05)
    assert not never["stable"] and never["spread"] == pytest.approx(0.3)


def test_repeat_passes_alternate_and_never_measure_a_cell_twice_in_a_row() -> None:
    assert repeat_order([1, 3, 5], 1, last=9) == [5, 3, 1]
    assert repeat_order([1, 3, 5], 2, last=9) == [1, 3, 5]
    assert repeat_order([1, 3, 5], 1, last=5) == [3, 1, 5]  # 5 was just measured: it goes last
    assert repeat_order([5], 1, last=5) == [5]


class _Clock:
    """Stands in for the bench module's ``time``: seconds pass only when a fake measurement says so."""

    def __init__(self) -> None:
        self.now = 0.0

    def perf_counter(self) -> float:
        return self.now


def _fake_measurements(monkeypatch: pytest.MonkeyPatch, results: dict[tuple[str, int], list[bool]]) -> tuple:
    """Replace the subprocess measurement: each call to cell ``v`` at ``batch`` pops its next stability from
    ``results``, and takes 100 s of the fake clock. Returns the calls (variant, batches) and the clock."""
    calls, clock = [], _Clock()
    monkeypatch.setattr(bench_module, "time", clock)

    def measure(cell: dict, out: Path, data_dir: Path, cfg: object, profile_batch: int,
                batches: list[int] | None = None) -> dict:
        calls.append((cell["variant"], batches))
        clock.now += 100.0
        batches = batches or sorted(b for v, b in results if v == cell["variant"])  # None: every batch size
        rates = {b: 500.0 + len(calls) for b in batches}  # within 5% of the first pass's 500: runs agree
        return {**cell, "status": "ok", "batches": [_batch(b, rates[b], results[cell["variant"], b].pop(0))
                                                    for b in batches]}

    monkeypatch.setattr(bench_module, "_measure", measure)
    return calls, clock


def _first_pass(spec: dict[str, dict[int, bool] | None]) -> tuple[list[dict], list[dict]]:
    cells = [{"variant": v, "folder": Path(v), "runtime": "eager", "math": "default", "threads": 1} for v in spec]
    measured = [{**c, "status": "failed", "reason": "boom"} if spec[c["variant"]] is None else
                {**c, "status": "ok", "batches": [_batch(b, 500.0, s) for b, s in spec[c["variant"]].items()]}
                for c in cells]
    return cells, measured


def test_every_cell_is_repeated_in_alternating_passes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cells, measured = _first_pass({"a": {1: True, 8: True}, "b": {1: False, 8: True}, "c": None,
                                   "d": {1: True, 8: False}, "e": {1: True, 8: True}})
    calls, _ = _fake_measurements(monkeypatch, {("a", 1): [True] * 2, ("a", 8): [True] * 2,
                                                ("b", 1): [False, True], ("b", 8): [True] * 2,
                                                ("d", 1): [True] * 2, ("d", 8): [False, False],
                                                ("e", 1): [True] * 2, ("e", 8): [True] * 2})
    cfg = load_config(None, ["bench.repeats=2", "bench.repeat_seconds=1000"]).bench  # 100 fake s a measurement
    stability = repeat_cells(cells, measured, tmp_path, tmp_path, cfg, progress=False)
    # pass 1 in reverse but not e (measured last) twice in a row, pass 2 forward; every batch size of every cell
    # that ran (the failed c is not timed again), settled or not
    assert [variant for variant, _ in calls] == ["d", "b", "a", "e", "a", "b", "d", "e"]
    assert all(batches is None for _, batches in calls)
    assert stability | {"repeat_seconds": 0} == {
        "rows": 8, "unstable_first_pass": 2, "unstable": 1, "repeat_passes": 2, "repeat_measurements": 8,
        "repeat_seconds": 0, "stopped": "bench.repeats=2 passes done"}
    b1 = measured[1]["batches"][0]
    assert b1["stable"] and not b1["stable_first_run"] and len(b1["runs"]) == 3
    assert b1["images_per_s"] == b1["runs"][2]  # the one settled run gives the figure
    a1 = measured[0]["batches"][0]  # three settled runs: the median, with the min-max of images/s and p50
    assert a1["runs"] == [500.0, 503.0, 505.0] and a1["images_per_s"] == 503.0
    assert (a1["images_per_s_min"], a1["images_per_s_max"]) == (500.0, 505.0)
    assert a1["ms_median_min"] == pytest.approx(1e3 / 505) and a1["ms_median_max"] == pytest.approx(2.0)
    assert measured[2]["status"] == "failed"
    assert not measured[3]["batches"][1]["stable"] and len(measured[3]["batches"][1]["runs"]) == 3


def test_repeats_stop_at_the_time_budget(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cells, measured = _first_pass({"a": {1: False}, "b": {1: False}, "c": {1: False}})
    calls, _ = _fake_measurements(monkeypatch, {(v, 1): [False] * 4 for v in "abc"})
    cfg = load_config(None, ["bench.repeats=5", "bench.repeat_seconds=150"]).bench
    stability = repeat_cells(cells, measured, tmp_path, tmp_path, cfg, progress=False)
    assert calls == [("b", None), ("a", None)]  # 100 s each: no third start after 150 s; c was measured last
    assert stability["stopped"] == "bench.repeat_seconds=150 spent" and stability["unstable"] == 3


def test_cli_bench_rejects_a_bad_profile_spec(optimized: dict, capsys: pytest.CaptureFixture[str]) -> None:
    config = optimized["config"]
    code = main(["bench", "--optimized", str(optimized["result"].path), "--profile", "int8-compile",
                 "data.source=local", f"data.root={config.data.root}", f"workdir={config.workdir}", "name=t",
                 "tracking.backend=none"])
    assert code == 1
    assert "expected variant/runtime/math/batch" in capsys.readouterr().err


def test_cli_bench_names_a_folder_that_is_not_an_optimize_artifact(
    optimized: dict, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["bench", "--optimized", str(optimized["model_dir"]), "tracking.backend=none"]) == 1
    assert "is a 'train' artifact, not the output of `signpost optimize`" in capsys.readouterr().err
    assert main(["optimize", "--model", str(optimized["model_dir"] / "missing"), "tracking.backend=none"]) == 1
    assert "artifact folder not found" in capsys.readouterr().err


def test_optimize_and_bench_results_become_mlflow_runs(optimized: dict, measured: dict, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    from mlflow import MlflowClient

    from signpost.stages.optimize import tracking_summary as optimize_summary
    from signpost.tracking import log_stage, run_factory, tracking_uri

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    config = measured["config"].model_copy(deep=True)
    config.workdir = tmp_path / "work"
    config.tracking.backend = "mlflow"
    make = run_factory(config)
    optimize_run = log_stage(make, "optimize", **optimize_summary(config, optimized["result"]))
    bench_run = log_stage(make, "bench", **tracking_summary(config, measured["result"]))
    client = MlflowClient(tracking_uri(config.tracking, config.workdir))
    run = client.get_run(optimize_run)
    fp32 = next(v for v in optimized["result"].variants if v.name == "fp32")
    assert run.data.metrics["fp32/test_acc"] == pytest.approx(fp32.test_acc)
    assert run.data.tags["signpost.variant.int8"] == next(v.status for v in optimized["result"].variants
                                                          if v.name == "int8")
    assert {a.path for a in client.list_artifacts(optimize_run, "optimize")} >= {"optimize/variants.json"}
    run = client.get_run(bench_run)
    ok = [r for r in measured["result"].results.rows if r["status"] == "ok"]
    cell = ok[0]
    key = f"{cell['variant']}/{cell['runtime']}/{cell['math']}/{cell['threads']}t/b{cell['batch']}/images_per_s"
    assert run.data.metrics[key] == pytest.approx(cell["images_per_s"])
    assert {"bench/results.md", "bench/chart.png"} <= {a.path for a in client.list_artifacts(bench_run, "bench")}
    assert run.data.params["bench.batch_sizes"] and run.data.tags["signpost.stage"] == "bench"


def test_a_choice_on_openvino_with_executorch_for_small_batches_is_served(optimized: dict, tmp_path: Path) -> None:
    from signpost.artifacts import read_manifest, write_manifest
    from signpost.serve.model import load, resolve

    run = optimized["result"].path
    folder = tmp_path / "bench"
    folder.mkdir()
    candidate = {"variant": "fp32", "runtime": "openvino", "math": "bf16", "threads": 1, "batch": 8,
                 "folder": str(run / "fp32"), "images_per_s": 1000.0, "top1": 0.9, "reason": "test",
                 "small_batch": {"runtime": "executorch", "math": "default", "below": 4, "reason": "test"}}
    (folder / "candidate.json").write_text(json.dumps(candidate))
    write_manifest(folder, stage="bench", key="k", inputs={"optimize": run.name, "optimize_key":
                                                           read_manifest(run)["key"]}, config={}, code="c")
    source = resolve(folder, SignpostConfig(workdir=optimized["config"].workdir))
    assert (source.runtime, source.bf16, source.small_runtime) == ("openvino", True, "executorch")
    model = load(source, threads=1, max_batch=8)
    assert model.predictor_for(1).runtime == "executorch" and model.predictor_for(8).runtime == "openvino"
    images = np.random.default_rng(0).integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)
    together, alone = model.forward(images), [model.forward(images[i : i + 1]) for i in range(8)]
    assert together.top_ids.shape[0] == 8 and all(a.top_ids.shape[0] == 1 for a in alone)
