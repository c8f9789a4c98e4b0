"""Signpost: an end-to-end MLOps pipeline for PyTorch image classifiers (GTSRB traffic signs first)."""

__version__ = "0.1.0"

# glibc returns freed blocks above 128 KiB to the kernel and takes them back page fault by page fault: with large
# thresholds a training, serving or benchmark process reuses its memory instead, measured at 1.5-1.7x the training
# throughput on this project's CPUs (see BENCHMARKS.md). It only takes effect when set before a process starts: the
# CLI restarts itself with it, and the bench starts its measuring subprocesses with it.
GLIBC_TUNABLES = "glibc.malloc.mmap_threshold=1073741824:glibc.malloc.trim_threshold=17179869184"
