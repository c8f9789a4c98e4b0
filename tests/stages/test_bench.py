"""bench: a real matrix measured in subprocesses, one table with a baseline from the same run, compare, profile."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from signpost.cli import EXIT_REGRESSION, main
from signpost.config import SignpostConfig, load_config
from signpost.stages.bench import BASELINE, bench, compare, markdown_table, tracking_summary

SMALL_MATRIX = ["bench.variants=[fp32,int8,pruned]", "bench.runtimes=[eager,aoti,onnxruntime]",
                "bench.math=[default,bf16]", "bench.threads=[1]", "bench.batch_sizes=[1,8]", "bench.min_seconds=0.05",
                "bench.max_seconds=0.3", "bench.deploy_batch_size=8"]


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
    for threads, (before, after) in results["peak_measurements"].items():  # the peak: the larger of two readings
        assert results["peaks_gflops"][threads]["bf16"] == max(before["bf16"], after["bf16"]) > 0
    rows = results["rows"]
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
    assert results["peaks_gflops"]["1"]["fp32"] > 0 and results["peaks_gflops"]["1"]["bf16"] > 0
    machine = results["machine"]
    assert machine["logical_cores"] >= 1 and machine["cpu"] and "torch" in machine["libraries"]


def test_the_table_chart_and_deployable_choice_are_written(measured: dict) -> None:
    path, results = measured["result"].path, measured["result"].results
    table = (path / "results.md").read_text(encoding="utf-8")
    assert "Baseline: fp32/eager/default" in table and "| variant | runtime | math |" in table
    assert table.count("\n| ") == len(results["rows"]) + 1
    with Image.open(path / "chart.png") as chart:
        assert chart.width > 600 and chart.height > 300
    candidate = json.loads((path / "candidate.json").read_text(encoding="utf-8"))
    at_batch = [r for r in results["rows"] if r["batch"] == 8 and r["status"] == "ok"]
    assert candidate["images_per_s"] == max(r["images_per_s"] for r in at_batch)
    assert candidate["reason"].startswith("fastest within the accuracy budget at batch 8")
    assert Path(candidate["folder"]).name == candidate["variant"]
    by_batch = results["candidates_by_batch"]
    assert set(by_batch) == {"1", "8"} and by_batch["8"] | {"small_batch": None} == results["candidate"] | {
        "small_batch": None}
    small = results["candidate"]["small_batch"]  # what serves single images, when not the candidate's runtime
    if small is not None:
        assert small["below"] > 1 and (small["runtime"], small["math"]) != (candidate["runtime"], candidate["math"])
    at_one = [r for r in results["rows"] if r["batch"] == 1 and r["status"] == "ok"]
    assert by_batch["1"]["images_per_s"] == max(r["images_per_s"] for r in at_one)
    assert "Fastest within the budget at each batch size: 1: " in table


def test_profile_writes_the_op_table_and_a_chrome_trace(measured: dict) -> None:
    path = measured["result"].path
    profiled = [r for r in measured["result"].results["rows"] if r.get("profile")]
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
    [row] = result.results["rows"]
    assert row["status"] == "failed" and "timed out after" in row["reason"] and "bench.timeout" in row["reason"]
    assert result.candidate is None
    assert "failed: timed out" in markdown_table(result.results)


def _results(rate: float, *, failed: bool = False) -> dict:
    row = {"variant": "int8", "runtime": "compile", "math": "default", "threads": 2, "batch": 64,
           "status": "failed" if failed else "ok", "images_per_s": rate}
    machine = {"cpu": "test cpu", "arch": "x86_64", "physical_cores": 2, "isa": ["avx2"], "libraries": {"torch": "x"}}
    return {"machine": machine, "rows": [row]}


@pytest.mark.parametrize(("a", "b", "regressed"), [(1000, 950, False), (1000, 850, True), (1000, 1300, False)])
def test_compare_gives_a_regression_verdict(tmp_path: Path, a: float, b: float, regressed: bool) -> None:
    (tmp_path / "a.json").write_text(json.dumps(_results(a)))
    (tmp_path / "b.json").write_text(json.dumps(_results(b)))
    report, verdict = compare(tmp_path / "a.json", tmp_path / "b.json", threshold=0.10)
    assert verdict is regressed
    assert ("Verdict: REGRESSION" in report) is regressed
    assert "test cpu" in report and f"{b / a:.2f}" in report


def test_cli_compare_exit_codes_and_bad_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "a.json").write_text(json.dumps(_results(1000)))
    (tmp_path / "b.json").write_text(json.dumps(_results(1000, failed=True)))
    assert main(["bench", "--compare", str(tmp_path / "a.json"), str(tmp_path / "b.json")]) == EXIT_REGRESSION
    assert "REGRESSION" in capsys.readouterr().out
    assert main(["bench", "--compare", str(tmp_path / "a.json"), str(tmp_path / "a.json")]) == 0
    (tmp_path / "other.json").write_text(json.dumps({"hello": 1}))
    assert main(["bench", "--compare", str(tmp_path / "a.json"), str(tmp_path / "other.json")]) == 1
    assert "not a signpost bench results file" in capsys.readouterr().err


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
    fp32 = next(v for v in optimized["result"].variants if v["name"] == "fp32")
    assert run.data.metrics["fp32/test_acc"] == pytest.approx(fp32["test_acc"])
    assert run.data.tags["signpost.variant.int8"] == next(v["status"] for v in optimized["result"].variants
                                                          if v["name"] == "int8")
    assert {a.path for a in client.list_artifacts(optimize_run, "optimize")} >= {"optimize/variants.json"}
    run = client.get_run(bench_run)
    ok = [r for r in measured["result"].results["rows"] if r["status"] == "ok"]
    cell = ok[0]
    key = f"{cell['variant']}/{cell['runtime']}/{cell['math']}/{cell['threads']}t/b{cell['batch']}/images_per_s"
    assert run.data.metrics[key] == pytest.approx(cell["images_per_s"])
    assert {"bench/results.md", "bench/chart.png"} <= {a.path for a in client.list_artifacts(bench_run, "bench")}
    assert run.data.params["bench.batch_sizes"] and run.data.tags["signpost.stage"] == "bench"
