"""GPU memory plans on disk, keyed by what determines them, and progress while a plan is made.

A GPU plan (planning/gpu.py `plan_cuda`) is a pure function of the model config (every field but its size name
and CPU memory budget), the per-rank batch, the GPU (name and capacity), the margin, the strategy and world size,
the dtype (bf16 autocast with fp32 weights and AdamW: fixed), the planner's own code (PLANNER_VERSION) and
torch (whose dispatch decides the traced timeline). Their sha256 names one small JSON file under `cache_dir()`:
$EBT_PLAN_CACHE if set (tests point it at a tmp dir), else $XDG_CACHE_HOME/ebt/plans, else ~/.cache/ebt/plans.
Writes are atomic (fsutil); a damaged or unreadable entry is planned again, and a cache that cannot be written
(a read-only home) only costs the next run the same time. Deleting the directory is always safe.

A plan that is not cached traces tiny replicas (seconds per size on a small CPU); each one is announced before
it starts and timed when it ends (fsutil/progress.py's `status`): a rich spinner on a terminal, plain lines
otherwise (logs, CI, a login node's nohup), so that a cold `ebt sweep submit --dry-run` never looks hung.
Progress goes to stdout, with the report it belongs to (the grid, the memory plans, the scripts): stderr stays
the one line of an error.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path

import torch

from ebt.config import ModelConfig
from fsutil import atomic_write_json
from fsutil.progress import status
from planning.gpu import GpuPlan, plan_cuda
from planning.host import DEFAULT_MARGIN

# Bump whenever a change to tracing, rescaling, the constants or the search can change what a plan says: every
# cached plan is then made afresh.
PLANNER_VERSION = 4  # 2: the replay buffer is counted; 3: nested ModelConfig, the memory policy keyed apart;
# 4: model.parametrization and replay.top_k
CACHE_ENV = "EBT_PLAN_CACHE"
# Fields of ModelConfig that do not enter a GPU plan: the size's name (its dimensions do).
_IGNORED_FIELDS = ("size",)


def cache_dir() -> Path:
    override = os.environ.get(CACHE_ENV)
    if override:
        return Path(override)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "ebt" / "plans"


def plan_key(cfg: ModelConfig, per_rank_batch: int, capacity_bytes: float, gpu: str, strategy: str, world: int,
             margin: float, policy: str = "auto", remat_chunk: int = 0) -> dict:
    model = {k: v for k, v in cfg.to_dict().items() if k not in _IGNORED_FIELDS}
    return {"planner": PLANNER_VERSION, "torch": torch.__version__, "dtype": "bf16-autocast+fp32-adamw",
            "model": model, "policy": policy, "remat_chunk": remat_chunk, "per_rank_batch": per_rank_batch,
            "capacity_bytes": float(capacity_bytes), "gpu": gpu,
            "strategy": strategy, "world": world, "margin": margin}


def _digest(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def _read(path: Path, key: dict) -> GpuPlan | str | None:
    try:
        entry = json.loads(path.read_text())
        if entry.get("key") != json.loads(json.dumps(key)):  # a hash collision or a hand-edited file
            return None
        if "error" in entry:
            return str(entry["error"])
        return GpuPlan(**entry["plan"])
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return None


def _write(path: Path, key: dict, result: GpuPlan | str) -> None:
    entry = {"key": key, **({"error": result} if isinstance(result, str) else {"plan": dataclasses.asdict(result)})}
    try:
        atomic_write_json(path, entry, indent=1, sort_keys=True)
    except OSError:
        pass  # no cache here: the next run plans again


def cached_plan_cuda(cfg: ModelConfig, per_rank_batch: int, capacity_bytes: float, gpu: str = "gpu",
                     strategy: str = "ddp", world: int = 1, margin: float = DEFAULT_MARGIN,
                     label: str | None = None, policy: str = "auto", remat_chunk: int = 0) -> GpuPlan:
    """`plan_cuda`, read from the plan cache when this exact question was planned before (same result, same
    ValueError when it does not fit); otherwise planned with progress on stdout and stored. `label` names the
    run in the progress line (default: the size or width)."""
    key = plan_key(cfg, per_rank_batch, capacity_bytes, gpu, strategy, world, margin, policy, remat_chunk)
    path = cache_dir() / f"{_digest(key)}.json"
    result = _read(path, key)
    if result is None:
        name = label or cfg.size or f"width {cfg.architecture.dim}"
        with status(f"planning memory: {name} {cfg.kind} on {gpu} ({strategy} x{world}, {per_rank_batch} "
                      "sequences per rank; cached afterwards)"):
            try:
                result = plan_cuda(cfg, per_rank_batch, capacity_bytes, gpu, strategy, world, margin, policy,
                                   remat_chunk)
            except ValueError as error:
                result = str(error)
        _write(path, key, result)
    if isinstance(result, str):
        raise ValueError(result)
    return result
