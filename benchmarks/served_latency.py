"""The served path's forward pass at batch 1 and at the deploy batch size: the bench's choice as served (small
batches on the runtime the bench found fastest for them) against the same variant on ONNX Runtime alone and on the
candidate's runtime alone, all measured in this one process, interleaved, from uint8 images to top-k, the way the
server calls it (decoding excluded). Like ``signpost serve``, it runs with glibc's allocator thresholds raised (it
starts again once with ``GLIBC_TUNABLES`` set): without them every batch's fresh tensors are mmapped and faulted in
again, which cost the compile path at batch 64 ~0.7 ms of its ~1.8 ms here.

With ``--bench`` on a run that has peer runtimes, it also serves the fp32 parent on each peer's runtime (ONNX Runtime,
OpenVINO, ExecuTorch, eager) and says whether the served p50 is no worse than the best peer's. Caveat: every model
lives in this one process, and OpenVINO's and ExecuTorch's thread pools starve each other and torch's there (a
served OpenVINO deployable read 26 ms at batch 64 here against 1.1-1.4 ms in a process of its own): trust figures of
those runtimes only from runs that load one of them.

    python benchmarks/served_latency.py                         # the newest bench folder under artifacts/
    python benchmarks/served_latency.py --bench artifacts/bench/demo-... --calls 2000
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from signpost import GLIBC_TUNABLES
from signpost.config import SignpostConfig
from signpost.runtime import available_runtimes
from signpost.serve.model import ServedModel, load, resolve

BLOCK, SETTLE = 25, 5  # calls per block, and the first ones of each not timed
PEERS = ("onnxruntime", "openvino", "executorch", "eager")  # the runtimes a user would serve the fp32 parent on


def main() -> None:
    if sys.platform == "linux" and "GLIBC_TUNABLES" not in os.environ:
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, "GLIBC_TUNABLES": GLIBC_TUNABLES})
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bench", help="a bench folder with candidate.json (default: the newest under artifacts/)")
    parser.add_argument("--calls", type=int, default=2000, help="timed calls per model and batch size")
    parser.add_argument("--threads", type=int, default=None, help="intra-op threads (default: all cores)")
    args = parser.parse_args()
    found = [p for p in glob.glob("artifacts/bench/*/") if Path(p, "candidate.json").is_file()]
    bench = Path(args.bench) if args.bench else (Path(max(found, key=os.path.getmtime)) if found else None)
    if bench is None:
        sys.exit("no bench folder: run `make demo` first, or pass --bench")
    candidate = json.loads((bench / "candidate.json").read_text())
    config = SignpostConfig(workdir=bench.parent.parent)
    deploy = int(candidate["batch"])
    served = resolve(bench, config)
    models = {"served (bench choice)": served}
    if candidate["runtime"] != "onnxruntime" and "onnxruntime" in available_runtimes(served.folder):
        models["onnxruntime only"] = resolve(served.folder, config, "onnxruntime")
    models[f"{candidate['runtime']} only"] = resolve(bench, config, candidate["runtime"])
    # What a user would serve instead: the fp32 parent on each peer's runtime, served the same way (issue 18's
    # batch-1 goal: Signpost's served p50 no worse than the best peer's)
    parent = served.folder.parent / "fp32"
    for runtime in PEERS:
        if parent != served.folder and runtime in available_runtimes(parent):
            models[f"peer: fp32 {runtime}"] = resolve(parent, config, runtime)
    loaded: dict[str, ServedModel] = {name: load(source, threads=args.threads, max_batch=deploy)
                                      for name, source in models.items()}
    size = next(iter(loaded.values())).card.image_size
    rng = np.random.default_rng(0)
    print(f"{bench.name}: {candidate['variant']} — candidate {candidate['runtime']} ({candidate['math']}); small "
          f"batches: {candidate.get('small_batch') or 'same runtime'}")
    for batch in (1, deploy):
        images = rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8)
        times: dict[str, list[float]] = {name: [] for name in loaded}
        blocks = max(args.calls // batch // BLOCK, 4)
        # Interleaved in blocks, so that a slow minute of the machine slows every model alike; the first calls of a
        # block are not timed: they would pay for the previous model's threads still spinning on the cores.
        for round_ in range(blocks):
            names = list(loaded) if round_ % 2 == 0 else list(loaded)[::-1]  # no model always follows the same one
            for name in names:
                model = loaded[name]
                for call in range(BLOCK):
                    started = time.perf_counter()
                    model.forward(images)
                    if call >= SETTLE:
                        times[name].append(time.perf_counter() - started)
        onnx = np.median(times.get("onnxruntime only", times["served (bench choice)"]))
        onnx_name = "ONNX Runtime's" if "onnxruntime only" in times else "the served"
        for name, seconds in times.items():
            p50 = float(np.median(seconds))
            print(f"  batch {batch:>3} {name:<24} {model_runtime(loaded[name], batch):<12} p50 {1000 * p50:8.3f} ms  "
                  f"{batch / p50:>9,.0f} images/s  {onnx / p50:5.2f}x {onnx_name} speed")
        peers = {name: float(np.median(t)) for name, t in times.items() if name.startswith("peer: ")}
        if peers:
            best = min(peers, key=peers.get)
            ours = float(np.median(times["served (bench choice)"]))
            verdict = "no worse" if ours <= peers[best] else f"{100 * (ours / peers[best] - 1):.0f}% slower"
            print(f"  batch {batch:>3} served p50 {1000 * ours:.3f} ms against the best peer ({best[6:]}) "
                  f"{1000 * peers[best]:.3f} ms: {verdict}")


def model_runtime(model: ServedModel, batch: int) -> str:
    return model.predictor_for(batch).runtime


if __name__ == "__main__":
    main()
