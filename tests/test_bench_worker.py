"""bench_worker: what one measurement records beside its figures (the runtime's settings), and the OpenVINO bf16
cell on a CPU without bf16 kernels, recorded as not applicable instead of timed as f32 under the bf16 name."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from signpost import bench_worker


def _run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, settings: dict, runtime: str, math: str) -> dict:
    """The worker's main with a loader standing in that reports ``settings``, reading no test split."""
    monkeypatch.setattr(bench_worker, "load_predictor", lambda *a, **k: SimpleNamespace(settings=settings))
    out = tmp_path / "cell.json"
    code = bench_worker.main(["--folder", str(tmp_path), "--runtime", runtime, "--math", math, "--threads", "2",
                              "--test", str(tmp_path / "absent.safetensors"), "--out", str(out)])
    return {"code": code, **json.loads(out.read_text(encoding="utf-8"))}


def test_openvino_bf16_on_a_cpu_without_bf16_is_skipped_as_not_applicable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    f32 = {"inference_precision": "f32", "cpu_has_bf16": False, "batch_1": "LATENCY", "batches": "THROUGHPUT"}
    done = _run(tmp_path, monkeypatch, f32, "openvino", "bf16")
    assert done["code"] == 0 and done["status"] == "skipped" and "batches" not in done
    assert done["reason"].startswith("not applicable: OpenVINO has no bf16 kernels for this CPU")
    assert done["settings"]["inference_precision"] == "f32"  # what the loader did, recorded


@pytest.mark.parametrize("runtime", ["onnxruntime", "openvino", "executorch"])
def test_each_peer_runs_with_its_best_settings_recorded_with_the_cell(optimized: dict, tmp_path: Path,
                                                                       runtime: str) -> None:
    out = tmp_path / "cell.json"
    code = bench_worker.main(["--folder", str(optimized["result"].path / "fp32"), "--runtime", runtime, "--threads",
                              "1", "--batches", "1,8", "--test", str(optimized["data_dir"] / "test.safetensors"),
                              "--min-seconds", "0.02", "--max-seconds", "0.1", "--out", str(out)])
    done = json.loads(out.read_text(encoding="utf-8"))
    assert code == 0 and done["status"] == "ok", done.get("reason")
    settings = done["settings"]
    assert settings["threads"] == 1 and [b["batch"] for b in done["batches"]] == [1, 8]
    if runtime == "onnxruntime":  # all graph optimizations, no spinning threads
        assert settings["graph_optimization_level"] == "ORT_ENABLE_ALL"
        assert settings["session.intra_op.allow_spinning"] == settings["session.inter_op.allow_spinning"] == "0"
    elif runtime == "openvino":  # LATENCY for batch 1, THROUGHPUT for batches (8 was named), f32 at default math
        assert (settings["batch_1"], settings["batches"], settings["inference_precision"]) == (
            "LATENCY", "THROUGHPUT", "f32")
    else:
        assert settings["delegate"] == "XNNPACK"
