"""Where an OpenVINO cell's time goes, layer by layer: the variant's IR compiled for the CPU plugin as the bench
compiles it (LATENCY hint, one request on every thread; f32 or bf16 precision hint), run at one batch size with the
plugin's per-layer counters on, then each layer's median time over the runs, its share of the forward pass and, for
convolutions and matmuls, the FLOPs it does and the rate it reaches against the matmul peak the bench measured.

The torch runtimes have `signpost bench --profile` (the torch profiler); the profiler cannot see into OpenVINO, whose
own counters (PERF_COUNT) are what this reads. Counters cost a little time per layer, so the total here is a bit
above the bench's figure: use the shares, not the absolute time.

    python benchmarks/layer_times.py --variant artifacts/optimize/<run>/pruned-int8 --batch 64 --bf16 \\
        --peak-gflops 987       # the bench's bf16 matmul peak for its thread count (results.md's "Matmul peaks")
"""

from __future__ import annotations

import argparse
import statistics
from collections import defaultdict
from pathlib import Path

import numpy as np

from signpost.artifacts import verify_artifact
from signpost.runtime import OV_BIN, OV_XML, no_openvino_telemetry

# Layers whose FLOPs are counted (multiply-adds × 2); everything else is the "rest" the table accounts for by time.
COMPUTE = ("Convolution", "GroupConvolution", "MatMul", "FullyConnected")  # a type starting with one (FullyConnected-
# QuantizedLegacy is the int8 form)


def is_compute(kind: str) -> bool:
    return kind.startswith(COMPUTE)


def layer_flops(node) -> float:  # an ov.Node of the runtime model
    """FLOPs of one convolution or matmul of the runtime graph, from its output shape and its weights' shape."""
    out = list(node.get_output_shape(0))
    weights = list(node.get_input_shape(1)) if node.get_input_size() > 1 else []
    kind = node.get_rt_info()["layerType"].astype(str)
    if kind in ("Convolution", "GroupConvolution") and len(out) == 4 and len(weights) >= 4:
        # weights [Cout, Cin, kh, kw] or, grouped, [G, Cout/G, Cin/G, kh, kw]: per output element Cin/G·kh·kw MACs
        per_output = int(np.prod(weights[-3:]))
        return 2.0 * float(np.prod(out)) * per_output
    if kind.startswith(("MatMul", "FullyConnected")) and weights:
        return 2.0 * float(np.prod(out)) * weights[-1]
    return 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variant", type=Path, required=True, help="an optimize variant folder with model.xml")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--bf16", action="store_true", help="the bf16 inference precision hint (the bench's bf16)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=200, help="timed forward passes (after 20 untimed)")
    parser.add_argument("--peak-gflops", type=float, help="the bench's matmul peak, for the rate column")
    parser.add_argument("--top", type=int, default=12)
    args = parser.parse_args()

    manifest = verify_artifact(args.variant, [OV_XML, OV_BIN])  # the bytes the bench measured, unchanged
    with no_openvino_telemetry():
        import openvino as ov

        core = ov.Core()
        model = core.read_model(str(args.variant / OV_XML), str(args.variant / OV_BIN))
        compiled = core.compile_model(model, "CPU", {
            "INFERENCE_PRECISION_HINT": "bf16" if args.bf16 else "f32", "INFERENCE_NUM_THREADS": args.threads,
            "PERFORMANCE_HINT": "LATENCY", "PERF_COUNT": True})
    request = compiled.create_infer_request()
    size = int(model.input(0).get_partial_shape()[2].get_length())
    x = np.random.default_rng(0).standard_normal((args.batch, 3, size, size)).astype(np.float32)
    for _ in range(20):
        request.infer({0: x})
    times: dict[str, list[float]] = defaultdict(list)
    kinds: dict[str, tuple[str, str]] = {}
    totals = []
    for _ in range(args.runs):
        request.infer({0: x})
        run_total = 0.0
        for info in request.profiling_info:
            if info.status != info.Status.EXECUTED:
                continue
            us = info.real_time.total_seconds() * 1e6
            times[info.node_name].append(us)
            kinds[info.node_name] = (info.node_type, info.exec_type)
            run_total += us
        totals.append(run_total)
    flops = {node.get_friendly_name(): layer_flops(node) for node in compiled.get_runtime_model().get_ordered_ops()
             if is_compute(node.get_rt_info()["layerType"].astype(str))}

    median = {name: statistics.median(values) for name, values in times.items()}
    total = statistics.median(totals)
    print(f"{args.variant} (manifest {manifest['key'][:12]}), batch {args.batch}, "
          f"{'bf16' if args.bf16 else 'f32'} hint, {args.threads} threads, {args.runs} runs")
    print(f"forward pass, sum of layer medians: {total / 1000:.3f} ms ({total / args.batch:.2f} us an image)")
    all_flops = sum(flops.values())
    print(f"convolution/matmul FLOPs: {all_flops / args.batch / 1e6:.2f} MFLOP an image; achieved over the whole "
          f"pass {all_flops / total / 1e3:.0f} GFLOP/s" + (f" = {100 * all_flops / total / 1e3 / args.peak_gflops:.1f}%"
                                                           f" of the {args.peak_gflops:.0f} GFLOP/s peak"
                                                           if args.peak_gflops else ""))
    by_kind: dict[str, float] = defaultdict(float)
    for name, us in median.items():
        by_kind[kinds[name][0]] += us
    print("\nby layer type: type, ms, share")
    for kind, us in sorted(by_kind.items(), key=lambda item: -item[1]):
        print(f"  {kind:<22} {us / 1000:8.3f} {100 * us / total:6.1f}%")
    compute_us = sum(us for name, us in median.items() if name in flops)
    if compute_us:
        print(f"  convolutions/matmuls alone reach {all_flops / compute_us / 1e3:.0f} GFLOP/s"
              + (f" ({100 * all_flops / compute_us / 1e3 / args.peak_gflops:.1f}% of peak)" if args.peak_gflops else "")
              + f"; the other layers take {100 * (1 - compute_us / total):.1f}% of the time doing no counted FLOPs")
    print(f"\ntop {args.top} layers: name, type, kernel, ms, share, GFLOP/s")
    for name, us in sorted(median.items(), key=lambda item: -item[1])[:args.top]:
        rate = f"{flops[name] / us / 1e3:7.0f}" if flops.get(name) else "      -"
        kind, exec_type = kinds[name]
        print(f"  {name[:38]:<38} {kind:<18} {exec_type[:24]:<24} {us / 1000:7.3f} {100 * us / total:5.1f}% {rate}")


if __name__ == "__main__":
    main()
