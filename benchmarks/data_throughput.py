"""Data-path throughput: Signpost's prepare and augmented batch stream against the per-image reference loader.

The reference is what the tutorial this project grew from does: a PyTorch Dataset that opens each image with PIL,
crops, resizes and normalizes it, inside a DataLoader at batch size 1, decoded again every epoch. Everything is
measured in this one run on the same files, and printed as ratios.

    .venv/bin/python benchmarks/data_throughput.py               # synthetic data the size of GTSRB (~52,000 images)
    .venv/bin/python benchmarks/data_throughput.py --small       # ~9,000 images, for a quick look
    .venv/bin/python benchmarks/data_throughput.py --data-root data/gtsrb   # a real GTSRB copy, any layout
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from signpost.config import AugmentConfig, SyntheticConfig, load_config
from signpost.data.cache import load_split
from signpost.data.layouts import Sample, read_dataset
from signpost.data.loader import BatchLoader
from signpost.data.synthetic import generate_gtsrb
from signpost.stages.prepare import prepare

from reference import ReferenceDataset  # benchmarks/reference.py: the tutorial's loading, shared by the benchmarks


def reference_images_per_s(samples: list[Sample], size: int, limit: int, seconds: float) -> float:
    """Images/s of the reference loader over at most ``limit`` images or ``seconds`` of work."""
    loader = DataLoader(ReferenceDataset(samples[:limit], size), batch_size=1, shuffle=True, num_workers=0)
    count, start = 0, time.perf_counter()
    for x, _ in loader:
        count += x.shape[0]
        if time.perf_counter() - start > seconds:
            break
    return count / (time.perf_counter() - start)


def timed_prepare(overrides: list[str]) -> float:
    """Seconds one ``prepare()`` call takes in a fresh Python process (imports excluded)."""
    code = (
        "import sys, time\n"
        "from signpost.config import load_config\n"
        "from signpost.stages.prepare import prepare\n"
        "config = load_config(None, sys.argv[1:])\n"
        "start = time.perf_counter()\n"
        "assert not prepare(config, progress=False).reused\n"
        "print(time.perf_counter() - start)\n"
    )
    out = subprocess.run([sys.executable, "-c", code, *overrides], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def stream_images_per_s(path: Path, batch_size: int, epochs: int) -> list[float]:
    """Images/s of Signpost's augmented batch stream from the cache, one figure per epoch after a warm-up."""
    train = load_split(path / "train.safetensors")
    loader = BatchLoader(
        train.images, train.labels, batch_size, mean=[0.5] * 3, std=[0.25] * 3, augment=AugmentConfig(), seed=0
    )
    rates = []
    for epoch in range(epochs + 1):
        loader.set_epoch(epoch)
        start, count = time.perf_counter(), 0
        for x, _ in loader:
            count += x.shape[0]
        if epoch > 0:  # epoch 0 is warm-up: first-touch allocations and kernel selection
            rates.append(count / (time.perf_counter() - start))
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-root", type=Path, help="a real dataset instead of generated data")
    parser.add_argument("--small", action="store_true", help="~9,000 synthetic images instead of GTSRB's size")
    parser.add_argument("--repeats", type=int, default=3, help="cold prepare runs (median reported)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--reference-seconds", type=float, default=10.0, help="time budget of the reference loader")
    args = parser.parse_args()
    torch.set_num_threads(min(2, os.cpu_count() or 1))

    with tempfile.TemporaryDirectory(prefix="signpost-bench-") as tmp:
        work = Path(tmp)
        root = args.data_root
        if root is None:
            root = work / "raw"
            # GTSRB has 7 to 75 training tracks of 30 frames per class (39,209 images) and 12,630 test images.
            synthetic = (
                SyntheticConfig(min_tracks=3, max_tracks=12, frames_per_track=30, test_tracks=2)
                if args.small
                else SyntheticConfig(min_tracks=7, max_tracks=75, frames_per_track=30, test_tracks=30)
            )
            print(f"generating synthetic GTSRB-layout data ({synthetic.min_tracks}-{synthetic.max_tracks} tracks "
                  f"x {synthetic.frames_per_track} frames per class) ...", flush=True)
            generate_gtsrb(root, synthetic)
        raw = read_dataset(root)
        samples = raw.train + raw.test
        print(f"{len(samples)} images ({raw.layout} layout), {torch.get_num_threads()} threads, "
              f"{os.cpu_count()} CPUs\n", flush=True)

        # Cold prepare: a fresh workdir each time, so every file is read, hashed and decoded, and a fresh process,
        # as when a user runs `signpost prepare` (the generator above leaves this process's heap fragmented).
        prepare_seconds = []
        for i in range(args.repeats):
            # Flush dirty pages first (the generated files, the last run's cache): a dataset is normally at rest
            # when prepare runs, and the kernel's write-back would otherwise compete for the two cores.
            os.sync()
            overrides = ["data.source=local", f"data.root={root}", f"workdir={work / f'w{i}'}", "name=bench"]
            prepare_seconds.append(timed_prepare(overrides))
        prepare_rates = [len(samples) / seconds for seconds in prepare_seconds]
        config = load_config(None, overrides)
        warm_start = time.perf_counter()
        result = prepare(config, progress=False)
        warm_seconds = time.perf_counter() - warm_start
        assert result.reused
        path = result.path

        reference = reference_images_per_s(samples, 32, limit=len(samples), seconds=args.reference_seconds)
        stream = stream_images_per_s(path, args.batch_size, epochs=3)

    prep = statistics.median(prepare_rates)
    aug = statistics.median(stream)
    print("| path | images/s (median) | spread | vs reference |")
    print("|---|---|---|---|")
    print(f"| reference: PIL open+resize, ToTensor, Normalize, DataLoader batch 1 | {reference:,.0f} | 1 run | 1.0x |")
    print(f"| prepare, cold (list + hash + decode + crop + resize + split + stats + write) | {prep:,.0f} | "
          f"{min(prepare_rates):,.0f}-{max(prepare_rates):,.0f} | {prep / reference:.1f}x |")
    print(f"| augmented batch stream from the cache (batch {args.batch_size}) | {aug:,.0f} | "
          f"{min(stream):,.0f}-{max(stream):,.0f} | {aug / reference:.1f}x |")
    print(f"\nprepare, warm (unchanged inputs, cache reused): {warm_seconds * 1000:.0f} ms for {len(samples)} files")
    print(f"prepare, cold, all {len(samples)} images: {statistics.median(prepare_seconds):.2f} s (median)")


if __name__ == "__main__":
    main()
