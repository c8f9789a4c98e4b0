"""Small batches on the runtime the bench found fastest for them, the rest on the deployable candidate's runtime."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from signpost.artifacts import read_manifest, write_manifest
from signpost.config import SignpostConfig
from signpost.serve.model import load, resolve
from signpost.stages.bench import small_batch_runtime


def _row(runtime: str, batch: int, images_per_s: float, math: str = "default") -> dict:
    return {"variant": "pruned", "runtime": runtime, "math": math, "threads": 2, "batch": batch, "status": "ok",
            "images_per_s": images_per_s, "ms_median": 1000 * batch / images_per_s}


def test_the_bench_names_the_small_batch_runtime_and_where_the_candidate_takes_over() -> None:
    rows = [_row("onnxruntime", 1, 16_000), _row("onnxruntime", 8, 30_000), _row("onnxruntime", 64, 40_000),
            _row("compile", 1, 3_000, "bf16"), _row("compile", 8, 25_000, "bf16"), _row("compile", 64, 70_000, "bf16"),
            _row("eager", 1, 5_000)]
    candidate = {"variant": "pruned", "runtime": "compile", "math": "bf16", "threads": 2, "batch": 64}
    small = small_batch_runtime(rows, candidate)
    assert small is not None and small["runtime"] == "onnxruntime" and small["below"] == 64
    assert "0.062 ms at batch 1 against 0.333 ms on compile (bf16)" in small["reason"]
    # When the candidate's runtime is also the quickest on single images there is nothing to switch to.
    quick = [r for r in rows if (r["runtime"], r["batch"]) != ("compile", 1)] + [_row("compile", 1, 20_000, "bf16")]
    assert small_batch_runtime(quick, candidate) is None


def test_a_bench_candidate_serves_small_batches_on_onnx_runtime(optimized: dict, tmp_path: Path) -> None:
    run = optimized["result"].path
    bench = tmp_path / "bench"
    bench.mkdir()
    candidate = {"variant": "pruned", "runtime": "eager", "math": "default", "threads": 2, "batch": 64,
                 "folder": str(run / "pruned"), "images_per_s": 1000.0, "top1": 0.9, "reason": "test",
                 "small_batch": {"runtime": "onnxruntime", "math": "default", "below": 8, "reason": "test"}}
    (bench / "candidate.json").write_text(json.dumps(candidate))
    inputs = {"optimize": run.name, "optimize_key": read_manifest(run)["key"]}
    write_manifest(bench, stage="bench", key="k", inputs=inputs, config={}, code="c")
    config = SignpostConfig(workdir=optimized["config"].workdir)
    source = resolve(bench, config)
    assert (source.runtime, source.small_runtime, source.small_below) == ("eager", "onnxruntime", 8)
    model = load(source, threads=1, max_batch=16)
    assert model.predictor_for(1).runtime == model.predictor_for(7).runtime == "onnxruntime"
    assert model.predictor_for(8).runtime == model.predictor_for(16).runtime == "eager"
    assert model.describe()["small_batches"] == {"runtime": "onnxruntime", "form": "onnx", "below": 8}
    images = np.random.default_rng(0).integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)
    together = model.forward(images)  # one batch of 8: eager
    alone = [model.forward(images[i : i + 1]) for i in range(8)]  # eight of 1: ONNX Runtime
    np.testing.assert_array_equal(together.top_ids[:, 0], [a.top_ids[0, 0] for a in alone])
    np.testing.assert_allclose(together.top_probs[:, 0], [a.top_probs[0, 0] for a in alone], atol=1e-4)
    # An explicit runtime serves everything on it.
    assert resolve(bench, config, "eager").small_runtime is None
