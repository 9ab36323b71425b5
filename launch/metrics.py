"""metrics.jsonl, throughput, MFU and memory.

One JSON object per logged step. On resume the file is cut back to the rows at or before the checkpoint's step,
so after a kill -9 it reads exactly like an uninterrupted run (timing fields aside).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fsutil import atomic_write_text

# Fields of a metrics row that measure wall time or the machine, not training: they legitimately differ between
# an uninterrupted run and a resumed one. Everything else in a row must match bit for bit.
TIMING_FIELDS = frozenset({"time", "tokens_per_s", "mfu", "peak_mem_mb", "compute_frac", "data_frac", "eval_s",
                           "peak_flops_source"})

# Dense peak FLOP/s per precision (no structured sparsity: the data sheets' starred figures halved), from the
# vendors' data sheets, by a fragment of torch.cuda.get_device_name(). Matched longest fragment first, so
# "H100 PCIe" wins over "H100" and "A100" over "A10". "tf32" is fp32 matmuls on tensor cores (what torch runs
# when float32_matmul_precision is "high"/"medium"); "fp16"/"bf16" accumulate in fp32, as torch's matmuls do
# (GeForce cards run that at half their fp16-accumulate rate).
CUDA_PEAKS: dict[str, dict[str, float]] = {
    "H200 NVL": {"fp32": 60e12, "tf32": 417.5e12, "bf16": 835.5e12, "fp16": 835.5e12},
    "H200": {"fp32": 67e12, "tf32": 494.5e12, "bf16": 989.5e12, "fp16": 989.5e12},  # SXM
    "H100 NVL": {"fp32": 60e12, "tf32": 417.5e12, "bf16": 835.5e12, "fp16": 835.5e12},
    "H100 PCIe": {"fp32": 51e12, "tf32": 378e12, "bf16": 756.5e12, "fp16": 756.5e12},
    "H100": {"fp32": 67e12, "tf32": 494.5e12, "bf16": 989.5e12, "fp16": 989.5e12},  # SXM ("H100 80GB HBM3")
    "A100": {"fp32": 19.5e12, "tf32": 156e12, "bf16": 312e12, "fp16": 312e12},
    "L40S": {"fp32": 91.6e12, "tf32": 183e12, "bf16": 362.05e12, "fp16": 362.05e12},
    "A10G": {"fp32": 31.2e12, "tf32": 62.5e12, "bf16": 125e12, "fp16": 125e12},  # AWS's A10: the A10 sheet
    "A10": {"fp32": 31.2e12, "tf32": 62.5e12, "bf16": 125e12, "fp16": 125e12},
    "L4": {"fp32": 30.3e12, "tf32": 60e12, "bf16": 121e12, "fp16": 121e12},
    "V100-PCIE": {"fp32": 14e12, "fp16": 112e12},  # no bf16 or tf32 on Volta
    "V100": {"fp32": 15.7e12, "fp16": 125e12},  # SXM2
    "4090": {"fp32": 82.6e12, "tf32": 82.6e12, "bf16": 165.2e12, "fp16": 165.2e12},
    "3090": {"fp32": 35.6e12, "tf32": 35.6e12, "bf16": 71e12, "fp16": 71e12},
}
_BY_LENGTH = sorted(CUDA_PEAKS, key=len, reverse=True)
# The bf16 column alone, longest fragment first (benchmarks/gpu_step.py reads it).
CUDA_PEAK_BF16 = {key: CUDA_PEAKS[key]["bf16"] for key in _BY_LENGTH if "bf16" in CUDA_PEAKS[key]}


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

    def abandon(self) -> None:
        """Close without flushing (after a write failed on a full disk: a flush would fail again)."""
        if self._file is not None:
            with contextlib.suppress(OSError):
                self._file.close()
            self._file = None

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


@dataclass(frozen=True)
class PeakFlops:
    """The peak FLOP/s MFU is relative to, and where it came from (logged, and in the first metrics row)."""

    flops: float
    source: str


def precision_name(dtype: torch.dtype) -> str:
    """The data-sheet column a matmul in `dtype` runs at on CUDA (fp32: tf32 when torch allows tensor cores)."""
    if dtype == torch.bfloat16:
        return "bf16"
    if dtype == torch.float16:
        return "fp16"
    if dtype == torch.float32:
        return "fp32" if torch.get_float32_matmul_precision() == "highest" else "tf32"
    return str(dtype).removeprefix("torch.")


def training_dtype(mixed_precision: str, param_dtype: torch.dtype) -> torch.dtype:
    """The precision the matmuls of a step run in: the autocast dtype of Accelerate's mixed_precision, else the
    parameters' own (fp64 in the exactness tests)."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed_precision, param_dtype)


def cuda_table_peak(device_name: str, dtype: torch.dtype) -> tuple[float, str] | None:
    """(peak, what matched) from CUDA_PEAKS for a device name and dtype; None for an unknown device/precision."""
    precision = precision_name(dtype)
    for key in _BY_LENGTH:
        if key in device_name and precision in CUDA_PEAKS[key]:
            return CUDA_PEAKS[key][precision], f"{key} {precision}"
    return None


def best_rate(run: Callable[[], None], flops: float, rounds: int,
              clock: Callable[[], float] = time.perf_counter, sync: Callable[[], None] = lambda: None) -> float:
    """flops / the fastest of `rounds` timed runs of `run`: a round slowed by other load cannot lower it."""
    run()  # warm-up (allocation, kernel selection)
    best = math.inf
    for _ in range(rounds):
        sync()
        start = clock()
        run()
        sync()
        best = min(best, clock() - start)
    return flops / max(best, 1e-12)


def _matmul_rate(device: torch.device, dtype: torch.dtype, n: int, rounds: int) -> float:
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    return best_rate(lambda: a @ b, 2 * n**3, rounds, sync=sync)


def default_cache_path() -> Path:
    """Where calibrated CPU peaks persist: $EBT_PEAK_FLOPS_CACHE, else the user's cache directory."""
    explicit = os.environ.get("EBT_PEAK_FLOPS_CACHE")
    if explicit:
        return Path(explicit)
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return root / "ebt" / "peak_flops.json"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_calibration_key(dtype: torch.dtype, threads: int) -> str:
    """One cache entry per machine (host name and CPU model), thread count and dtype."""
    return f"{platform.node()}|{_cpu_model()}|threads={threads}|{str(dtype).removeprefix('torch.')}"


def cpu_peak_flops(dtype: torch.dtype, threads: int | None = None, cache_path: Path | None = None,
                   rounds: int = 20, n: int = 512,
                   measure: Callable[[torch.dtype, int, int], float] | None = None) -> PeakFlops:
    """A CPU's matmul peak with this process's threads, which load cannot pull down.

    There is no data sheet for "this share of a shared machine", so MFU is relative to what a square matmul
    achieves here. Timed at start-up on a loaded machine, a single measurement came out low and inflated MFU
    (0.1355 logged at 44 tokens/s). So: the fastest of `rounds` short matmuls (best-of-N: slowed rounds do
    not count), and the highest value ever measured for this machine, thread count and dtype is kept in a small
    JSON file (`cache_path`), so a start under load reuses an earlier quiet measurement. Still approximate: a
    machine that was never quiet has no honest peak, and the source string says it was calibrated.
    """
    threads = threads or torch.get_num_threads()
    path = default_cache_path() if cache_path is None else Path(cache_path)
    if measure is None:
        def measure(dtype: torch.dtype, n: int, rounds: int) -> float:
            return _matmul_rate(torch.device("cpu"), dtype, n, rounds)
    now = measure(dtype, n, rounds)
    key = cpu_calibration_key(dtype, threads)
    try:
        cache = json.loads(path.read_text())
        cached = float(cache.get(key, 0.0))
    except (OSError, ValueError, TypeError, AttributeError):
        cache, cached = {}, 0.0
    best = max(now, cached)
    if now > cached:
        cache[key] = now
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(path, json.dumps(cache, indent=1, sort_keys=True) + "\n")
        except OSError:
            pass  # a read-only home: this run still uses its own measurement
    name = str(dtype).removeprefix("torch.")
    return PeakFlops(best, f"cpu calibration (approximate): {name} {n}x{n} matmul with {threads} thread(s), best "
                           f"of {rounds} now {now / 1e9:.1f} GFLOP/s, best kept {best / 1e9:.1f} GFLOP/s ({path})")


def peak_flops(device: torch.device, dtype: torch.dtype, override: float = 0.0,
               cache_path: Path | None = None) -> PeakFlops:
    """Peak FLOP/s of one device in the precision a step trains in, for MFU.

    override (trainer.peak_flops) > 0 wins. CUDA: the data-sheet figure for the device and precision
    (CUDA_PEAKS), else a best-of-N matmul calibration on the device. CPU: cpu_peak_flops."""
    if override > 0:
        return PeakFlops(float(override), "config (trainer.peak_flops)")
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        found = cuda_table_peak(name, dtype)
        if found is not None:
            flops, matched = found
            return PeakFlops(flops, f"data sheet: {name} as {matched} (dense)")
        flops = _matmul_rate(device, dtype, 4096, 10)
        return PeakFlops(flops, f"cuda calibration (approximate): {name} not in the table, "
                                f"best of 10 {str(dtype).removeprefix('torch.')} 4096^3 matmuls")
    return cpu_peak_flops(dtype, cache_path=cache_path)


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
