"""Host probing: the process's allocator (/proc/self/maps), the device's capacity (/proc/meminfo or CUDA), and
the calibration (peak = base + factor x tensor peak) per device and allocator, saved by `planning.calibrate`
(benchmarks/planner.py) to CALIBRATION_FILE ($EBT_PLANNER_CALIBRATION, default ~/.cache/ebt/planner.json).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

DEFAULT_MARGIN = 0.10  # of device capacity, kept free by the default budget
CALIBRATION_FILE = Path(os.environ.get("EBT_PLANNER_CALIBRATION", Path.home() / ".cache/ebt/planner.json"))


@dataclass(frozen=True)
class Calibration:
    base_bytes: float  # constant: interpreter, libraries, allocator arenas (0 on CUDA)
    factor: float  # measured / predicted tensor bytes


# Measured here (benchmarks/planner.py, settled peaks; a saved calibration wins): the CPU overhead over the
# live tensors depends on the host allocator. glibc's heap fragments (2.1-2.4x for none, less for the
# recompute policies: the larger, safe value is kept); tcmalloc and jemalloc stay at 1.2-1.5x for every policy
# (launch/allocator.py).
DEFAULT_CPU = {"system": Calibration(base_bytes=221 * 2**20, factor=2.22),
               "tcmalloc": Calibration(base_bytes=226 * 2**20, factor=1.37),
               "jemalloc": Calibration(base_bytes=223 * 2**20, factor=1.35)}
DEFAULT_CUDA = Calibration(base_bytes=0.0, factor=1.05)
ALLOCATOR_LIBRARIES = ("tcmalloc", "jemalloc")


def host_allocator() -> str:
    """The allocator this process runs on: jemalloc or tcmalloc when mapped into it, else "system"."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return "system"
    return next((name for name in ALLOCATOR_LIBRARIES if f"lib{name}" in maps), "system")


def calibration_key(device: torch.device) -> str:
    return "cuda" if device.type == "cuda" else f"cpu:{host_allocator()}"


def calibration_for(device: torch.device) -> Calibration:
    key = calibration_key(device)
    if CALIBRATION_FILE.is_file():
        try:
            data = json.loads(CALIBRATION_FILE.read_text()).get(key)
            if data:
                return Calibration(**data)
        except (ValueError, TypeError):
            pass  # a damaged cache falls back to the defaults rather than stopping a training run
    return DEFAULT_CUDA if device.type == "cuda" else DEFAULT_CPU[key.partition(":")[2]]


def device_capacity_bytes(device: torch.device) -> float:
    if device.type == "cuda":
        return float(torch.cuda.get_device_properties(device).total_memory)
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemAvailable:"):
                return float(line.split()[1]) * 1024
    return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def default_budget_bytes(device: torch.device) -> float:
    return device_capacity_bytes(device) * (1 - DEFAULT_MARGIN)
