"""Load on the inference service over loopback: batching on vs one forward pass per request, in one run.

For each server mode it starts a real `signpost serve` process on 127.0.0.1, waits for /readyz, then drives it with
C concurrent keep-alive clients (C = 1, 8, 32 by default) posting real image files, each level bounded by a
request count and a time limit. It prints throughput and p50/p99 latency (client-side, ms) per level, the errors,
and the batching/no-batching throughput ratio at each concurrency; then stops the server with SIGTERM and checks
that the prediction log holds one record per answered request.

Mode ``mixed`` (issue 13: "a cheap request can starve everyone") runs the batching server under clean traffic
alone, then with a quarter of each client's requests replaced by a 25-megapixel image that compresses to almost
nothing (``--flood``: a PNG of ~80 KB, a JPEG of ~400 KB; and a 2048 x 2048 PNG of ~17 KB, the largest the default
limit decodes), and prints the clean requests' p50/p99 against the clean-only traffic on the same server, the 504s,
and what the floods were answered. The traffic kinds take turns in ``--rounds`` blocks (the order reversed every
other round), so that a busy minute of the machine hits each alike.

    python benchmarks/serve_load.py                       # the newest demo model, the demo's test images
    python benchmarks/serve_load.py --model artifacts/optimize/demo-.../pruned --runtime onnxruntime
    python benchmarks/serve_load.py --modes mixed --concurrency 8

The client is a minimal HTTP/1.1 keep-alive client on asyncio streams: on 2 cores the load generator competes
with the server for CPU, and a heavier client (httpx, aiohttp) would measure itself more than the server.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import glob
import io
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from PIL import Image

from signpost.serve import predlog

WARMUP_S = 0.5  # each level's first half second is load but not measurement
MODES = {"batching": ["serve.batching=true"], "per-request": ["serve.batching=false"], "mixed": ["serve.batching=true"]}
MIXED_WARMUP_S = 3.0  # mixed mode: clean traffic before the measured rounds, not measured
FLOOD_EVERY = 4  # mixed mode: every 4th request of each client is a flood image (a quarter of the traffic)
# name: (Pillow format, content type, side in pixels). png and jpeg are the 25-megapixel floods of issue 13; png2048
# is the largest PNG the default serve.max_image_pixels decodes (4.2 megapixels), the costliest flood still accepted.
FLOOD_TYPES = {"png": ("PNG", "image/png", 5000), "jpeg": ("JPEG", "image/jpeg", 5000),
               "png2048": ("PNG", "image/png", 2048)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="model, variant or bench folder (default: the newest under artifacts/train)")
    parser.add_argument("--images", help="glob of image files to send (default: the demo's synthetic test images)")
    parser.add_argument("--runtime", default="auto", help="serve --runtime (default auto)")
    parser.add_argument("--concurrency", default="1,8,32", help="client counts (default 1,8,32)")
    parser.add_argument("--requests", type=int, default=3000, help="most requests per level (default 3000)")
    parser.add_argument("--seconds", type=float, default=10.0, help="most seconds per level (default 10)")
    parser.add_argument("--modes", default="batching,per-request", help="server modes to measure: batching, "
                        "per-request, mixed (default batching,per-request)")
    parser.add_argument("--flood", default="png,jpeg,png2048", help="mixed mode: flood images, of "
                        f"{', '.join(FLOOD_TYPES)} (default all)")
    parser.add_argument("--rounds", type=int, default=5, help="mixed mode: blocks per traffic kind, interleaved; "
                        "each gets 1/rounds of --requests and --seconds (default 5)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="extra config overrides for both servers, e.g. serve.max_wait_ms=1")
    args = parser.parse_args()

    model = args.model or max(glob.glob("artifacts/train/*/"), key=os.path.getmtime, default=None)
    files = sorted(glob.glob(args.images or "artifacts/raw/synthetic-*/GTSRB/Final_Test/Images/*.ppm"))
    if model is None or not files:
        sys.exit("no model or no images: run `make demo` first, or pass --model and --images")
    bodies = [Path(f).read_bytes()[:8 * 1024 * 1024] for f in files[:512]]
    levels = [int(c) for c in args.concurrency.split(",")]
    print(f"model {model}; {len(bodies)} images from {files[0].rsplit('/', 1)[0]}; "
          f"at most {args.requests} requests or {args.seconds:g} s per level; {os.cpu_count()} cores")

    results: dict[str, dict[int, dict]] = {}
    for mode in args.modes.split(","):
        if mode == "mixed":
            mixed = run_mode(mode, model, args.runtime, [*MODES[mode], *args.set], bodies, levels, args,
                             floods=flood_images(args.flood.split(",")))
            print_mixed(mixed)
            continue
        results[mode] = run_mode(mode, model, args.runtime, [*MODES[mode], *args.set], bodies, levels, args)
    if not results:
        return

    print("\n| mode | clients | requests | errors | images/s | p50 ms | p99 ms |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for mode, by_level in results.items():
        for c, r in by_level.items():
            print(f"| {mode} | {c} | {r['n']} | {r['errors']} | {r['rps']:,.0f} | {r['p50']:.2f} | {r['p99']:.2f} |")
    if "batching" in results and "per-request" in results:
        for c in levels:
            ratio = results["batching"][c]["rps"] / max(results["per-request"][c]["rps"], 1e-9)
            print(f"concurrency {c}: batching {ratio:.2f}x the one-forward-per-request server's throughput")


def flood_images(kinds: list[str]) -> dict[str, tuple[bytes, str]]:
    """One flat-coloured image per kind (``FLOOD_TYPES``): the cheap request of issue 13, few bytes, many pixels."""
    floods = {}
    for kind in kinds:
        fmt, content_type, side = FLOOD_TYPES[kind]
        buffer = io.BytesIO()
        Image.new("RGB", (side, side), (180, 40, 40)).save(buffer, fmt)
        floods[kind] = (buffer.getvalue(), content_type)
        print(f"flood image {kind}: {side}x{side} {fmt}, {len(buffer.getvalue()):,} bytes")
    return floods


def print_mixed(by_level: dict[int, dict]) -> None:
    print("\n| traffic | clients | clean requests | clean p50 ms | clean p99 ms | clean errors | 504s "
          "| floods answered |")
    print("|---|---:|---:|---:|---:|---:|---:|---|")
    for c, runs in by_level.items():
        for traffic, r in runs.items():
            answered = ", ".join(f"{n} x {status}" for status, n in sorted(r["flood_statuses"].items())) or "-"
            print(f"| {traffic} | {c} | {r['n']} | {r['p50']:.2f} | {r['p99']:.2f} | {r['errors']} | {r['timeouts']} "
                  f"| {answered} |")
    for c, runs in by_level.items():
        for traffic, r in runs.items():
            if traffic != "clean only":
                print(f"concurrency {c}, {traffic}: clean p99 {r['p99'] / max(runs['clean only']['p99'], 1e-9):.2f}x, "
                      f"p50 {r['p50'] / max(runs['clean only']['p50'], 1e-9):.2f}x the clean-only run's")


def run_mode(mode: str, model: str, runtime: str, overrides: list[str], bodies: list[bytes], levels: list[int],
             args: argparse.Namespace, floods: dict[str, tuple[bytes, str]] | None = None) -> dict[int, dict]:
    port = _free_port()
    workdir = tempfile.mkdtemp(prefix=f"serve-load-{mode}-")
    log_url = predlog.default_url(Path(workdir))
    command = [sys.executable, "-m", "signpost.cli", "serve", "--model", model, "--runtime", runtime, "--port",
               str(port), "-q", f"workdir={workdir}", "tracking.backend=none", *overrides]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        _wait_ready(port, server)
        by_level: dict[int, dict] = {}
        answered = 0  # requests answered 200, each of which the prediction log must hold
        for c in levels:
            if floods is None:
                block = asyncio.run(drive(port, bodies, c, args.requests, args.seconds))
                answered += block["answered"]
                r = summarize([block])
                by_level[c] = r
                print(f"{mode:12} clients {c:3}: {r['n']:5} requests, {r['errors']} errors, {r['rps']:8,.0f} "
                      f"images/s, p50 {r['p50']:7.2f} ms, p99 {r['p99']:7.2f} ms")
                continue
            # The first seconds of a fresh server are slower (new batch sizes, the log's first writes): not measured.
            answered += asyncio.run(drive(port, bodies, c, args.requests, MIXED_WARMUP_S))["answered"]
            traffic_kinds = {"clean only": None, **{f"{kind} floods": flood for kind, flood in floods.items()}}
            names = list(traffic_kinds)
            parts: dict[str, list[dict]] = {name: [] for name in names}
            for round_ in range(args.rounds):
                for name in names if round_ % 2 == 0 else names[::-1]:
                    block = asyncio.run(drive(port, bodies, c, args.requests // args.rounds,
                                              args.seconds / args.rounds, traffic_kinds[name]))
                    answered += block["answered"]
                    parts[name].append(block)
            runs = {name: summarize(blocks) for name, blocks in parts.items()}
            for traffic, r in runs.items():
                print(f"{mode} clients {c:3}, {traffic:11}: {r['n']:5} clean requests, p50 {r['p50']:7.2f} ms, "
                      f"p99 {r['p99']:7.2f} ms, {r['errors']} clean errors, {r['timeouts']} 504s, floods answered "
                      f"{dict(r['flood_statuses'])}")
            by_level[c] = runs
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(60)
        except subprocess.TimeoutExpired:
            server.kill()
    logged = predlog.count(log_url)
    print(f"{mode:12} stopped with SIGTERM (exit {server.returncode}): {logged} records logged for {answered} "
          f"answered requests ({'none lost' if logged == answered else f'{answered - logged} LOST'})")
    return by_level


async def drive(port: int, bodies: list[bytes], clients: int, max_requests: int, max_seconds: float,
                flood: tuple[bytes, str] | None = None) -> dict:
    """``clients`` keep-alive connections posting one image at a time; after a warm-up, at most ``max_requests``
    clean requests or ``max_seconds``. Latency is client-side: request written to response read. With ``flood``
    (bytes, content type), every ``FLOOD_EVERY``-th request of each client sends it instead of a clean image; its
    answers are counted by status, and only the clean requests' latencies and errors are reported."""
    latencies: list[float] = []
    counts = {"sent": 0, "errors": 0, "answered": 0, "timeouts": 0}
    flood_statuses: collections.Counter[int] = collections.Counter()
    warm_until = time.perf_counter() + WARMUP_S
    deadline = warm_until + max_seconds

    async def client(index: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            i = index
            while counts["sent"] < max_requests and time.perf_counter() < deadline:
                flooding = flood is not None and (i // clients + index) % FLOOD_EVERY == 0
                body, kind = flood if flooding else (bodies[i % len(bodies)], "image/x-portable-pixmap")
                i += clients
                started = time.perf_counter()
                writer.write(b"POST /v1/predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: " + kind.encode() +
                             b"\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
                status = await _read_response(reader)
                counts["answered"] += status == 200
                counts["timeouts"] += status == 504
                if flooding:
                    flood_statuses[status] += 1
                    continue
                counts["errors"] += status != 200
                if started >= warm_until:  # connection set-up and the first burst are not steady state
                    counts["sent"] += 1
                    latencies.append((time.perf_counter() - started) * 1000)
        finally:
            writer.close()

    await asyncio.gather(*(client(i) for i in range(clients)))
    return {"latencies": latencies, "elapsed": time.perf_counter() - warm_until, **counts,
            "flood_statuses": flood_statuses}


def summarize(blocks: list[dict]) -> dict:
    """Throughput, p50/p99 (ms) and counts of one or more ``drive`` blocks, their latencies pooled."""
    ordered = sorted(latency for block in blocks for latency in block["latencies"])
    elapsed = sum(block["elapsed"] for block in blocks)
    statuses: collections.Counter[int] = collections.Counter()
    for block in blocks:
        statuses.update(block["flood_statuses"])
    return {"n": len(ordered), "errors": sum(b["errors"] for b in blocks),
            "answered": sum(b["answered"] for b in blocks), "timeouts": sum(b["timeouts"] for b in blocks),
            "flood_statuses": statuses, "rps": len(ordered) / elapsed, "p50": statistics.median(ordered),
            "p99": ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]}


async def _read_response(reader: asyncio.StreamReader) -> int:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split()[1])
    length = next(int(line.split(b":", 1)[1]) for line in lines if line.lower().startswith(b"content-length:"))
    await reader.readexactly(length)
    return status


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_ready(port: int, server: subprocess.Popen, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            sys.exit(f"the server exited ({server.returncode}): {server.stderr.read()[-2000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    sys.exit(f"the server was not ready after {timeout:.0f} s")


if __name__ == "__main__":
    main()
