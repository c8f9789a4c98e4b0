"""One benchmark measurement, run by ``signpost bench`` in a fresh subprocess: ``python -m signpost.bench_worker``.

A fresh process per (variant, runtime, math setting, threads) keeps one measurement's compiled kernels, allocator
state, thread pools and oneDNN settings from leaking into the next; the environment it starts with carries the
settings that must be in place before libraries initialise (``DNNL_DEFAULT_FPMATH_MODE``, ``OMP_NUM_THREADS``,
``GLIBC_TUNABLES``). Within the process: load the model, warm up (compilation excluded from every figure), score
top-1 on the test split, then for each batch size repeat calls until the latency is stable, sampling CPU use and
memory all along. Writes one JSON file; ``--profile`` also writes the profiler's op table and a Chrome trace.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

import torch

from signpost.data.cache import load_split
from signpost.data.loader import BatchLoader
from signpost.runtime import load_predictor, math_mode

_CHUNK_SECONDS = 0.05  # calls are timed in chunks about this long; each chunk gives one per-call latency sample
_WINDOW = 10  # stability: the relative spread of the last this-many chunk latencies


class _Sampler:
    """Samples this process's CPU use (in cores) and resident memory every 50 ms on a background thread."""

    def __init__(self) -> None:
        import psutil

        self.process = psutil.Process()
        self.cpu: list[float] = []
        self.rss: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        self.process.cpu_percent(None)
        while not self._stop.wait(0.05):
            self.cpu.append(self.process.cpu_percent(None) / 100.0)
            self.rss.append(self.process.memory_info().rss)

    def __enter__(self) -> _Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def summary(self) -> dict[str, float]:
        return {
            "cpu_cores_mean": statistics.fmean(self.cpu) if self.cpu else math.nan,
            "rss_mib_mean": statistics.fmean(self.rss) / 2**20 if self.rss else math.nan,
            "rss_mib_peak": max(self.rss, default=0) / 2**20,
        }


def measure_batch(predict: Any, x: torch.Tensor, *, min_seconds: float, max_seconds: float,
                  max_cv: float) -> dict[str, Any]:
    """Latency statistics of ``predict(x)``, repeated until stable (or ``max_seconds``)."""
    predict(x)  # one more warm call at this exact shape
    start = time.perf_counter()
    per_call: list[float] = []  # seconds per call, one value per chunk
    chunk_calls, stable = 1, False
    while True:
        t0 = time.perf_counter()
        for _ in range(chunk_calls):
            predict(x)
        elapsed = time.perf_counter() - t0
        per_call.append(elapsed / chunk_calls)
        if elapsed < _CHUNK_SECONDS / 2:
            chunk_calls = min(chunk_calls * 2, 1 << 16)
        total = time.perf_counter() - start
        recent = per_call[-_WINDOW:]
        if len(recent) == _WINDOW and total >= min_seconds:
            spread = statistics.pstdev(recent) / statistics.fmean(recent)
            if spread <= max_cv:
                stable = True
                break
        if total >= max_seconds:
            break
    samples = sorted(per_call)
    median = statistics.median(samples)
    batch = x.shape[0]
    return {
        "batch": batch,
        "ms_median": 1e3 * median,
        "ms_p95": 1e3 * _quantile(samples, 0.95),
        "ms_p99": 1e3 * _quantile(samples, 0.99),
        "spread": (statistics.pstdev(samples) / statistics.fmean(samples)) if len(samples) > 1 else 0.0,
        "ms_per_image": 1e3 * median / batch,
        "images_per_s": batch / median,
        "chunks": len(samples),
        "stable": stable,
        "seconds": time.perf_counter() - start,
    }


def _quantile(sorted_values: list[float], q: float) -> float:
    index = min(len(sorted_values) - 1, max(0, math.ceil(q * len(sorted_values)) - 1))
    return sorted_values[index]


def run(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    result: dict[str, Any] = {"variant_dir": args.folder, "runtime": args.runtime, "math": args.math,
                              "threads": args.threads, "env": {k: os.environ.get(k, "") for k in
                                                               ("DNNL_DEFAULT_FPMATH_MODE", "OMP_NUM_THREADS")}}
    with _Sampler() as sampler, math_mode(args.math) as settings:
        result["settings"] = settings
        t0 = time.perf_counter()
        # Compiles for the measured batch sizes (and the accuracy pass's 256) up front: compilation is never timed.
        predictor = load_predictor(Path(args.folder), args.runtime, bf16=args.math == "bf16", threads=args.threads,
                                   warmup=(*args.batches, 256))
        result["load_seconds"] = time.perf_counter() - t0  # includes compiling, for torch.compile
        # what the loader set the runtime to (Predictor.settings: each peer's documented best) beside every figure
        result["settings"] = settings | {"threads": args.threads} | predictor.settings
        if args.runtime == "openvino" and args.math == "bf16" and predictor.settings["inference_precision"] != "bf16":
            # OpenVINO fell back to f32 on a CPU without bf16 kernels: timing that as "bf16" would mislabel it
            return result | {"status": "skipped", "reason": "not applicable: OpenVINO has no bf16 kernels for this "
                             "CPU (no AMX, AVX-512 BF16 or Arm BF16), so its bf16 precision hint would run f32"}
        card = predictor.card
        test = load_split(Path(args.test))
        loader = BatchLoader(test.images, test.labels, 256, mean=card.mean, std=card.std, shuffle=False)
        correct = 0
        for x, y in loader:
            correct += int((predictor(x).argmax(1) == y).sum())
        result["top1"] = correct / max(1, len(test))
        images = next(iter(BatchLoader(test.images, test.labels, max(args.batches), mean=card.mean, std=card.std,
                                       shuffle=False)))[0]
        while images.shape[0] < max(args.batches):  # a test split smaller than the largest batch: repeat it
            images = torch.cat([images, images])
        result["batches"] = []
        layout = torch.channels_last if predictor.channels_last else torch.contiguous_format
        result["layout"] = "channels_last" if predictor.channels_last else "nchw"
        for batch in args.batches:
            x = images[:batch].contiguous(memory_format=layout)  # as the server's decoding hands it over
            result["batches"].append(measure_batch(predictor, x, min_seconds=args.min_seconds,
                                                   max_seconds=args.max_seconds, max_cv=args.max_cv))
        if args.profile_batch:
            x = images[: args.profile_batch].contiguous(memory_format=layout)
            result["profile"] = _profile(predictor, x, Path(args.out))
    result["resources"] = sampler.summary()
    result["resources"]["max_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return result


def _profile(predict: Any, x: torch.Tensor, out: Path) -> dict[str, str]:
    """torch.profiler over 20 calls: the top ops by self CPU time as a table, and a Chrome trace."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        for _ in range(20):
            predict(x)
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25)
    table_path, trace_path = out.with_suffix(".profile.txt"), out.with_suffix(".trace.json")
    table_path.write_text(table + "\n", encoding="utf-8")
    prof.export_chrome_trace(str(trace_path))
    return {"table": table_path.name, "trace": trace_path.name}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="one signpost bench measurement (run by `signpost bench`)")
    parser.add_argument("--folder", required=True, help="model variant folder")
    parser.add_argument("--runtime", required=True)
    parser.add_argument("--math", default="default")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batches", type=lambda s: [int(b) for b in s.split(",")], default=[1, 64])
    parser.add_argument("--test", required=True, help="the prepared test split (safetensors)")
    parser.add_argument("--min-seconds", type=float, default=1.0)
    parser.add_argument("--max-seconds", type=float, default=6.0)
    parser.add_argument("--max-cv", type=float, default=0.05)
    parser.add_argument("--profile-batch", type=int, default=0)
    parser.add_argument("--out", required=True, help="JSON file to write")
    args = parser.parse_args(argv)
    try:
        result = {"status": "ok", **run(args)}
    except Exception as exc:  # any failure is a result: the cell is reported failed, with the reason
        result = {"status": "failed", "reason": f"{type(exc).__name__}: {exc}".splitlines()[0][:400],
                  "traceback": traceback.format_exc()[-4000:]}
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    return 0 if result["status"] != "failed" else 1


if __name__ == "__main__":
    sys.exit(main())
