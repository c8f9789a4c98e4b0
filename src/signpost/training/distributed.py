"""Where a run trains: the ``torchrun`` process group, the device, bf16 autocast, and the stop signals it obeys."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Callable, Iterator
from types import FrameType

import torch
import torch.distributed as dist


def init_distributed(device: str) -> tuple[int, int, int]:
    """(rank, world size, local rank); joins the process group when started by torchrun."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return 0, 1, 0
    if not dist.is_initialized():
        use_nccl = device in ("auto", "cuda") and torch.cuda.is_available()
        dist.init_process_group("nccl" if use_nccl else "gloo")
    return dist.get_rank(), world_size, int(os.environ.get("LOCAL_RANK", "0"))


def pick_device(choice: str, local_rank: int) -> torch.device:
    """The device ``train.device`` names (``auto``: CUDA, then MPS, then the CPU); an error naming the fix if absent."""
    if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ValueError("train.device=cuda but no CUDA device is available: use train.device=auto or cpu")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    if choice == "mps" or (choice == "auto" and torch.backends.mps.is_available()):
        if not torch.backends.mps.is_available():
            raise ValueError("train.device=mps but MPS is not available: use train.device=auto or cpu")
        return torch.device("mps")
    return torch.device("cpu")


def use_bf16(choice: str, device: torch.device) -> bool:
    """bf16 autocast where it is fast and well tested: CUDA GPUs that support it. On CPU only when asked."""
    if choice == "off":
        return False
    if choice == "on":
        return True
    return device.type == "cuda" and torch.cuda.is_bf16_supported()


@contextlib.contextmanager
def stop_signals(handler: Callable[[int, FrameType | None], None]) -> Iterator[None]:
    """Route SIGINT and SIGTERM to ``handler`` inside the block, restoring the previous handlers after.

    Python only delivers signals to the main thread; elsewhere (a test's worker thread) nothing is installed.
    """
    previous = {}
    if threading.current_thread() is threading.main_thread():
        previous = {signum: signal.signal(signum, handler) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)
