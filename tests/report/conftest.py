"""Fixtures of the report tests: real artifacts that the job summary and the pull request comment render."""

from __future__ import annotations

from pathlib import Path

import pytest

from signpost.config import load_config
from signpost.stages.bench import bench


@pytest.fixture(scope="session")
def backends(optimized: dict, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real bench of fp32 under oneDNN and without it, eager and ONNX Runtime, profiled."""
    settings = ["bench.variants=[fp32]", "bench.runtimes=[eager,onnxruntime]", "bench.math=[default,no-onednn]",
                "bench.threads=[1]", "bench.batch_sizes=[1,8]", "bench.min_seconds=0.05", "bench.max_seconds=0.3",
                "bench.deploy_batch_size=8", "bench.repeats=0"]
    config = optimized["config"].model_copy(update={"bench": load_config(None, settings).bench,
                                                    "workdir": tmp_path_factory.mktemp("summary")})
    result = bench(config, optimize_dir=optimized["result"].path, data_dir=optimized["data_dir"],
                   profile="fp32/eager/default/8", progress=False)
    return result.path


@pytest.fixture(scope="session")
def evaluated(optimized: dict, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real evaluation of the optimized fixture's model against a champion's figures (top-1 0.3, top-5 0.8)."""
    from signpost.stages.evaluate import evaluate

    config = optimized["config"].model_copy(update={"workdir": tmp_path_factory.mktemp("evaluated")})
    result = evaluate(config, model_dir=optimized["model_dir"], data_dir=optimized["data_dir"],
                      champion={"top1": 0.3, "top5": 0.8}, progress=False)
    return result.path
