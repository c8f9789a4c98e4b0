"""The bench's job summary: oneDNN against no-oneDNN for the deployed cell, with the ratio computed right; the
profiler's top ops; a line instead of an empty table; x86-64 vs Arm64 ratios; and one rendered from a real bench."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from signpost.artifacts import ArtifactError, write_manifest
from signpost.cli import main
from signpost.contracts import RESULTS, BenchResults
from signpost.report.summary import bench_summary, render_bench, top_operators

# torch.profiler's key_averages().table() as torch 2.13 prints it, with a name that has spaces in it
PROFILE = """\
----------------------------  ------------  ------------  ------------  ------------  ------------  ------------
                        Name    Self CPU %      Self CPU   CPU total %     CPU total  CPU time avg    # of Calls
----------------------------  ------------  ------------  ------------  ------------  ------------  ------------
    aten::mkldnn_convolution        52.22%      52.187ms        52.30%      52.269ms      17.423ms             3
                 aten::addmm        23.65%      23.639ms        23.71%      23.693ms       7.898ms             3
    Torch-Compiled Region: 0        23.62%      23.604ms        23.62%      23.604ms       7.868ms             3
           aten::convolution         0.10%      96.806us        52.45%      52.416ms      17.472ms             3
----------------------------  ------------  ------------  ------------  ------------  ------------  ------------
Self CPU time total: 99.942ms
"""


def _row(runtime: str, math: str, batch: int, rate: float, spread: float = 0.01, **extra: object) -> dict:
    return {"variant": "int8", "runtime": runtime, "math": math, "threads": 4, "batch": batch, "status": "ok",
            "images_per_s": rate, "ms_median": 1e3 * batch / rate, "spread": spread, "stable": True, **extra}


def _results(rows: list[dict], *, runtime: str = "compile", arch: str = "aarch64", blas: str = "open",
             math: tuple[str, ...] = ("default", "no-onednn")) -> BenchResults:
    machine = {"cpu": "Neoverse-V2" if arch == "aarch64" else "Xeon 8480", "arch": arch, "physical_cores": 4,
               "isa": ["asimd"], "libraries": {"torch": "2.13.0"}, "blas": f"{blas}, BUILD_TYPE=Release, USE_CUDA=0"}
    candidate = {"variant": "int8", "runtime": runtime, "math": "default", "threads": 4, "batch": 64,
                 "folder": "w/optimize/o/int8", "images_per_s": 4000.0, "top1": 0.97, "reason": "fastest"}
    stability = {"rows": len(rows), "unstable_first_pass": 0, "unstable": 0, "repeat_passes": 0,
                 "repeat_measurements": 0, "repeat_seconds": 0.0, "stopped": "every row settled"}
    return BenchResults.model_validate({
        "machine": machine, "peaks_gflops": {}, "peak_measurements": {}, "baseline": "", "optimize": "o",
        "data": "d", "settings": {"math": list(math), "deploy_batch_size": 64}, "variants": [], "rows": rows,
        "stability": stability, "seconds": 1.0, "candidate": candidate, "candidates_by_batch": {}})


BOTH = [_row("compile", "default", 1, 900.0), _row("compile", "default", 64, 4000.0, spread=0.02),
        _row("compile", "no-onednn", 1, 600.0), _row("compile", "no-onednn", 64, 1000.0, spread=0.03),
        _row("eager", "default", 64, 1500.0), _row("eager", "no-onednn", 64, 500.0)]


def test_the_backends_side_by_side_with_the_ratio_computed_right() -> None:
    text = render_bench(_results(BOTH), "bench-arm")
    assert "### Bench on Arm64: bench-arm" in text and "Neoverse-V2" in text
    assert "Deployed: **int8 / compile / default**, 4 threads, batch 64: 4,000 images/s" in text
    # on Arm64 oneDNN runs with the Arm Compute Library; without it, the wheel's BLAS is OpenBLAS
    assert "#### oneDNN + ACL (`default`) vs OpenBLAS (`no-onednn`): int8 on compile, 4 threads" in text
    lines = text.splitlines()
    assert "| 64 | 4,000 | 1,000 | 4.00x ±5.0% | 16.000 | 64.000 |" in lines  # 4000/1000; 2% + 3%
    assert "| 1 | 900 | 600 | 1.50x ±2.0% | 1.111 | 1.667 |" in lines
    assert "| 1500 |" not in text and "1,500" not in text  # eager is not the deployed runtime
    x86 = render_bench(_results(BOTH, arch="x86_64", blas="mkl"), "bench-x86")
    assert "#### oneDNN (`default`) vs MKL (`no-onednn`)" in x86 and "x86-64" in x86


def test_a_runtime_without_math_settings_compares_the_backends_on_the_same_variant() -> None:
    rows = [*BOTH, _row("onnxruntime", "default", 64, 5000.0)]
    text = render_bench(_results(rows, runtime="onnxruntime"), "b")
    assert "The deployed runtime, onnxruntime, takes no math setting" in text
    assert "int8 on compile, 4 threads" in text and "| 64 | 4,000 | 1,000 | 4.00x" in text


def test_a_bench_without_no_onednn_says_so_in_one_line() -> None:
    rows = [r for r in BOTH if r["math"] == "default"]
    text = render_bench(_results(rows, math=("default", "bf16")), "b")
    assert "The bench did not measure `no-onednn` (bench.math: default, bf16)" in text
    assert "| batch |" not in text and "####" not in text
    assert "No profile: the bench ran without `--profile` (`--profile int8/compile/default/64`" in text


def test_the_profilers_top_ops_are_read_by_column() -> None:
    ops, total = top_operators(PROFILE, 3)
    assert [op["Name"] for op in ops] == ["aten::mkldnn_convolution", "aten::addmm", "Torch-Compiled Region: 0"]
    assert ops[0] == {"Name": "aten::mkldnn_convolution", "Self CPU %": "52.22%", "Self CPU": "52.187ms",
                      "# of Calls": "3"}
    assert total == "99.942ms"
    assert top_operators("no table here", 3) == ([], None)
    rows = [r | {"profile": {"table": "x.profile.txt", "trace": "x.trace.json"}} if r["runtime"] == "eager" else r
            for r in BOTH]
    text = render_bench(_results(rows), "b", profile_table=PROFILE, top_ops=2)
    assert "#### Top 2 ops by self CPU time: int8/eager/default, 4 threads (the profiled cell; not the deployed" in text
    assert "| `aten::addmm` | 23.65% | 23.639ms | 3 |" in text and "Torch-Compiled" not in text


def _folder(path: Path, results: BenchResults, profile: str | None = None) -> Path:
    """A bench folder of hand-made results, with its manifest (and ``profile`` as its profiled row's table)."""
    path.mkdir(parents=True)
    (path / RESULTS).write_text(results.model_dump_json(), encoding="utf-8")
    if profile is not None:
        (path / "cells").mkdir()
        (path / "cells" / "c.profile.txt").write_text(profile, encoding="utf-8")
    write_manifest(path, stage="bench", key=path.name, inputs={}, config={}, code="test")
    return path


def test_two_architectures_get_the_ratio_table_and_a_changed_file_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    x86 = _folder(tmp_path / "x86", _results(BOTH, arch="x86_64", blas="mkl"))
    arm_rows = [r | {"images_per_s": r["images_per_s"] / 2, "ms_median": r["ms_median"] * 2} for r in BOTH]
    arm = _folder(tmp_path / "arm", _results(arm_rows))
    assert main(["report", "summary", "--bench", str(x86), "--bench", str(arm)]) == 0
    out = capsys.readouterr().out
    assert "### Bench on x86-64: x86" in out and "### Bench on Arm64: arm" in out
    assert "### x86-64 vs Arm64" in out and "REGRESSION" not in out
    assert "| int8 | compile | default | 4 | 64 | 4,000 | 2,000 | 16.000 | 32.000 | 0.50 ±4.0% |" in out
    text = json.loads((arm / RESULTS).read_text())
    text["rows"][0]["images_per_s"] = 1e9  # a hand-edit the manifest does not know
    (arm / RESULTS).write_text(json.dumps(text))
    assert main(["report", "summary", "--bench", str(arm)]) == 1
    err = capsys.readouterr().err
    assert "results.json does not match its manifest" in err and str(arm) in err
    assert main(["report", "summary", "--bench", str(arm / RESULTS)]) == 1
    assert "not a folder; give the folder `signpost bench` wrote" in capsys.readouterr().err


def test_a_one_cell_profile_bench_goes_with_the_bench_whose_deployed_cell_it_profiled(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # mlops.yml's second bench: the deployed cell alone (int8/compile/default, 4 threads), with --profile
    profiled = [r | {"profile": {"table": "c.profile.txt", "trace": "c.trace.json"}} for r in BOTH
                if (r["runtime"], r["math"], r["batch"]) == ("compile", "default", 64)]
    arm = _folder(tmp_path / "arm", _results(BOTH))
    x86 = _folder(tmp_path / "x86", _results(BOTH, arch="x86_64", blas="mkl"))
    x86_profile = _folder(tmp_path / "x86-profile", _results(profiled, arch="x86_64", blas="mkl"), PROFILE)
    assert main(["report", "summary", "--bench", str(arm), "--bench", str(x86), "--profile", str(x86_profile)]) == 0
    arm_text, x86_text = capsys.readouterr().out.split("### Bench on x86-64")
    assert "No profile: the bench ran without `--profile`" in arm_text, "an x86-64 profile is not Arm64's"
    assert "#### Top 4 ops by self CPU time: int8/compile/default, 4 threads\n" in x86_text
    assert "| `aten::mkldnn_convolution` | 52.22% | 52.187ms | 3 |" in x86_text
    # a profile of another cell than the deployed one is not shown as the deployed cell's
    other = [r | {"runtime": "eager"} for r in profiled]
    eager = _folder(tmp_path / "eager-profile", _results(other, arch="x86_64", blas="mkl"), PROFILE)
    text = bench_summary([x86], profiles=[eager])
    assert "No profile" in text and "aten::addmm" not in text
    # a deployed ONNX Runtime cell is not profiled, and the summary says why
    onnx = render_bench(_results(BOTH, runtime="onnxruntime"), "b")
    assert "No profile: the deployed cell runs on ONNX Runtime (int8/onnxruntime)" in onnx


@pytest.mark.slow
def test_a_real_bench_folder_renders_its_figures_and_profile(backends: Path, tmp_path: Path) -> None:
    results = json.loads((backends / RESULTS).read_text())
    text = bench_summary([backends])
    rows = {(r["runtime"], r["math"], r["batch"]): r for r in results["rows"]}
    for batch in (1, 8):
        on, off = rows[("eager", "default", batch)], rows[("eager", "no-onednn", batch)]
        assert (f"| {batch} | {on['images_per_s']:,.0f} | {off['images_per_s']:,.0f} | "
                f"{on['images_per_s'] / off['images_per_s']:.2f}x ±") in text
    if results["candidate"]["runtime"] == "onnxruntime":
        assert "The deployed runtime, onnxruntime, takes no math setting" in text
    assert "fp32 on eager, 1 threads" in text
    profiled = next(r for r in results["rows"] if r.get("profile"))
    table = (backends / "cells" / profiled["profile"]["table"]).read_text()
    ops, _ = top_operators(table, 8)
    assert ops and all(f"| `{op['Name']}` | {op['Self CPU %']} |" in text for op in ops)
    assert "ops by self CPU time: fp32/eager/default, 1 threads" in text
    # the profile is checked against the manifest too
    shutil.copytree(backends, tmp_path / "copy")
    (tmp_path / "copy" / "cells" / profiled["profile"]["table"]).write_text(PROFILE)
    with pytest.raises(ArtifactError, match="does not match its manifest"):
        bench_summary([tmp_path / "copy"])
