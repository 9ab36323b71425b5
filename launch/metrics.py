"""metrics.jsonl, throughput, MFU and memory.

One JSON object per logged step. On resume the file is cut back to the rows at or before the checkpoint's step,
so after a kill -9 it reads exactly like an uninterrupted run (timing fields aside).
"""

from __future__ import annotations

import json
import math
import os
import resource
import time
from pathlib import Path
from typing import Any

import torch

from launch.fsutil import atomic_write_text

# Fields of a metrics row that measure wall time or the machine, not training: they legitimately differ between
# an uninterrupted run and a resumed one. Everything else in a row must match bit for bit.
TIMING_FIELDS = frozenset({"time", "tokens_per_s", "mfu", "peak_mem_mb", "compute_frac", "data_frac", "eval_s"})

# Dense bf16 peak FLOP/s per device by CUDA device name fragment (vendor data sheets, no sparsity).
CUDA_PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12,
                  "L4": 121e12, "V100": 125e12, "4090": 165e12, "3090": 71e12}


class MetricsWriter:
    def __init__(self, path: Path, enabled: bool = True) -> None:
        self.path = Path(path)
        self.enabled = enabled
        self._file = None

    def truncate_after(self, step: int) -> None:
        """Drop rows with step > `step` (they belong to work the resumed run will redo)."""
        if not self.enabled or not self.path.is_file():
            return
        keep = []
        for line in self.path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:  # a row torn by kill -9
                continue
            if row.get("step", 0) <= step and not row.get("final"):  # the resumed run writes its own final row
                keep.append(line)
        atomic_write_text(self.path, "".join(f"{line}\n" for line in keep))

    def write(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "a")
        self._file.write(json.dumps(_jsonable(row)) + "\n")
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            self._file = None


def _jsonable(row: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for key, value in row.items():
        if isinstance(value, torch.Tensor):
            value = value.item()
        if isinstance(value, float) and not math.isfinite(value):
            value = str(value)  # JSON has no inf/nan; keep them visible
        out[key] = value
    return out


def peak_rss_mb() -> float:
    """This process's peak resident set.

    From /proc's VmHWM, the high-water mark of the process's own address space. Not ru_maxrss: Linux carries
    the PARENT's peak into a child started with vfork + exec (how Python's subprocess starts processes), so a
    small training process launched from a large one reports the large one's peak (measured here: 1,038 MB
    for a 14 MB child of a 1 GB parent).
    """
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux; macOS has no /proc


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return peak_rss_mb()


def measured_peak_flops(device: torch.device, dtype: torch.dtype = torch.float32) -> float:
    """Peak FLOP/s of one device for MFU.

    CUDA: the data-sheet bf16 number when known. CPU: there is no data sheet for "this share of a shared
    machine", so time a square fp32 matmul with this process's threads; MFU is then relative to what a
    matmul achieves here, which is the honest ceiling for the step.
    """
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, flops in CUDA_PEAK_BF16.items():
            if key in name:
                return flops if dtype == torch.bfloat16 else flops / 2
    n = 512
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    best = math.inf
    for _ in range(5):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


class Throughput:
    """tokens/s over the steps since the last log line (wall time, all ranks' tokens)."""

    def __init__(self) -> None:
        self._t = time.perf_counter()
        self._tokens = 0

    def add(self, tokens: int) -> None:
        self._tokens += tokens

    def rate(self) -> tuple[float, float]:
        """(tokens/s, wall seconds) since the previous call."""
        now = time.perf_counter()
        wall = max(now - self._t, 1e-9)
        rate = self._tokens / wall
        self._t, self._tokens = now, 0
        return rate, wall
