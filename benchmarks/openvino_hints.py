"""OpenVINO's two performance hints on one variant at batch 64, in one process, alternating: LATENCY (one request on
every thread) against THROUGHPUT as Signpost's runtime uses it (the batch split over the plugin's streams, one
thread each: OpenVINO's documented setting for batches), 7 rounds of 300 calls each; medians with min and max.

    python benchmarks/openvino_hints.py artifacts/optimize/<run>/pruned-int8 bf16     # or f32
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from signpost.artifacts import verify_artifact
from signpost.runtime import OV_BIN, OV_XML, no_openvino_telemetry, openvino_forward

folder, bf16 = Path(sys.argv[1]), sys.argv[2] == "bf16"
verify_artifact(folder, [OV_XML, OV_BIN])
xml, weights = (folder / OV_XML).read_bytes(), (folder / OV_BIN).read_bytes()
thr, _ = openvino_forward(xml, weights, bf16=bf16, threads=2, batches=(1, 64))
with no_openvino_telemetry():
    import openvino as ov
core = ov.Core()
model = core.read_model(model=xml, weights=ov.Tensor(np.frombuffer(weights, dtype=np.uint8)))
lat = core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "bf16" if bf16 else "f32",
                                        "INFERENCE_NUM_THREADS": 2, "PERFORMANCE_HINT": "LATENCY"})
req = lat.create_infer_request()
x = torch.randn(64, 3, 32, 32)
xn = x.numpy()


def a() -> None:
    req.infer({0: xn}, share_outputs=False)


def b() -> None:
    thr(x)


res = {"latency": [], "throughput": []}
for f in (a, b):
    for _ in range(50):
        f()
for r in range(7):
    for name, f in ((("latency", a), ("throughput", b)) if r % 2 == 0 else (("throughput", b), ("latency", a))):
        t = time.perf_counter()
        for _ in range(300):
            f()
        res[name].append(64 * 300 / (time.perf_counter() - t))
for k, v in res.items():
    print(f"{k}: median {statistics.median(v):,.0f} images/s (min {min(v):,.0f}, max {max(v):,.0f})")
