"""The machine a measurement runs on: its CPU, the instruction-set extensions that matter for inference, core
counts, library builds, and the matmul peak its figures are held against.

The bench keys its results on ``machine_info`` (the same variants measured on another machine are another
artifact) and records both in every results file, so a comparison says what it compares.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from signpost import GLIBC_TUNABLES
from signpost.artifacts import library_versions


def machine_info() -> dict[str, Any]:
    """The CPU, its instruction-set extensions that matter for inference, core counts and library builds."""
    import psutil

    cpu_model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip().lower()
            if key in ("model name", "cpu model", "hardware") and cpu_model in ("", platform.machine()):
                cpu_model = value.strip()
            elif key in ("flags", "features"):
                flags.update(value.split())
    except OSError:
        pass
    wanted = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8",
              "avx_vnni", "asimd", "asimddp", "bf16", "i8mm", "sve", "sve2")
    config = torch.__config__.show()
    blas = next((line.split("=", 1)[1].strip() for line in config.splitlines() if "BLAS_INFO" in line), "")
    return {
        "cpu": cpu_model,
        "arch": platform.machine(),
        "isa": sorted(f for f in wanted if f in flags),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "logical_cores": os.cpu_count(),
        "physical_cores": psutil.cpu_count(logical=False),
        "python": platform.python_version(),
        "libraries": library_versions(),
        "blas": blas,
        "onednn": torch.backends.mkldnn.is_available(),
    }


def matmul_peak(threads: int, seconds: float = 1.0) -> dict[str, float]:
    """GFLOP/s of a large fp32 and bf16 matmul on ``threads`` threads, measured in a fresh subprocess."""
    code = (
        "import torch,time,json,sys\n"
        f"torch.set_num_threads({threads})\n"
        "out={}\n"
        "for name,dt in (('fp32',torch.float32),('bf16',torch.bfloat16)):\n"
        "  a=torch.randn(1024,1024).to(dt); b=torch.randn(1024,1024).to(dt)\n"
        "  for _ in range(3): a@b\n"
        "  best=0.0\n"
        "  for _ in range(5):\n"
        "    n=0; t=time.perf_counter()\n"
        f"    while time.perf_counter()-t<{seconds / 5}: a@b; n+=1\n"
        "    best=max(best, 2*1024**3*n/(time.perf_counter()-t)/1e9)\n"
        "  out[name]=best\n"
        "print(json.dumps(out))\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "GLIBC_TUNABLES": GLIBC_TUNABLES}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    if done.returncode != 0:
        raise RuntimeError(f"matmul peak measurement failed: {done.stderr.strip()[-500:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])
