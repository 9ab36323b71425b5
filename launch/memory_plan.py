"""`trainer.checkpointing: auto` in the trainer: choose the recompute policy, its chunk and the micro-batch once,
before the model, the optimizer and the data loader are built.

The per-rank batch (trainer.micro_batch_size x trainer.grad_accum_steps) is what the user fixed: it sets the
global batch and so the optimisation. `auto` only decides how that batch is computed. It takes the largest
micro-batch that divides it and whose predicted peak (planning) fits the budget under some policy, then the
fastest such policy; accumulation makes up the rest. The budget is trainer.memory_budget_gb, else the
device's capacity minus a margin (on CPU: available memory shared by the
ranks on the node). Under distributed.strategy=fsdp the prediction is per rank with parameters and optimizer
state sharded over the world size (planning.state_bytes).

The plan is part of the run. It is written to RUN_DIR/memory_plan.json and reused on resume, so that a
restart on a node with less free memory continues the same computation bit for bit. An explicitly changed
budget re-plans (memory settings may change on resume; the result then differs only in rounding).
Every rank adopts rank 0's plan, so nodes that see different free memory still agree.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from fsutil import atomic_write_text
from launch.config import TrainConfig

PLAN_FILE = "memory_plan.json"


@dataclass(frozen=True)
class MemoryPlan:
    policy: str
    remat_chunk: int
    micro_batch_size: int
    grad_accum_steps: int
    predicted_peak_gb: float
    budget_gb: float
    budget_explicit: bool  # set by the config (re-planned when it changes) rather than the device default

    def describe(self) -> str:
        chunk = f", remat_chunk {self.remat_chunk}" if self.remat_chunk else ""
        return (f"memory plan: checkpointing {self.policy}{chunk}, micro-batch {self.micro_batch_size} x "
                f"{self.grad_accum_steps} accumulation, predicted peak {self.predicted_peak_gb:.2f} GB of a "
                f"{self.budget_gb:.2f} GB budget")


def configured_budget_gb(cfg: TrainConfig) -> float | None:
    return cfg.trainer.memory_budget_gb


def default_budget_gb(device: torch.device) -> float:
    """The device's capacity minus the planner's margin; CPU memory is shared by the node's ranks."""
    from planning import default_budget_bytes

    ranks_here = 1 if device.type == "cuda" else max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return default_budget_bytes(device) / ranks_here / 1e9


def shard_world(cfg: TrainConfig) -> int | None:
    """The ranks fsdp shards parameters and optimizer state over (None: not sharded). Planned before the process
    group exists, so from the launcher's WORLD_SIZE. distributed.fsdp_regather is planned like the plain route
    (its step keeps less gathered, so the prediction errs high)."""
    from launch.strategies import strategy_class

    if not strategy_class(cfg.distributed.strategy).shards_parameters:
        return None
    return max(1, int(os.environ.get("WORLD_SIZE", "1")))


def make_plan(cfg: TrainConfig, device: torch.device) -> MemoryPlan:
    from planning import plan

    t = cfg.trainer
    per_rank = t.micro_batch_size * t.grad_accum_steps
    explicit = configured_budget_gb(cfg)
    budget = explicit if explicit is not None else default_budget_gb(device)
    try:
        chosen = plan(cfg.model, per_rank, device, budget, divides=per_rank, shard_world=shard_world(cfg))
    except ValueError:
        key = "trainer.memory_budget_gb" if explicit is not None else "trainer.checkpointing"
        raise ValueError(f"config key '{key}': {budget:.2f} GB does not fit micro-batch 1 under any "
                         f"checkpointing policy (model {cfg.model.size or f'dim {cfg.model.architecture.dim}'}, "
                         f"context {cfg.model.architecture.context_length}, K={cfg.model.thinking.mcmc_steps}); raise "
                         "the budget or shrink the model") from None
    return MemoryPlan(chosen.policy, chosen.remat_chunk, chosen.micro_batch_size,
                      per_rank // chosen.micro_batch_size, chosen.predicted_peak_gb, budget, explicit is not None)


def load_plan(run_dir: Path) -> MemoryPlan | None:
    path = Path(run_dir) / PLAN_FILE
    if not path.is_file():
        return None
    try:
        return MemoryPlan(**json.loads(path.read_text()))
    except (ValueError, TypeError):
        return None  # damaged or from another version: plan again rather than refuse to train


def save_plan(run_dir: Path, plan: MemoryPlan) -> None:
    atomic_write_text(Path(run_dir) / PLAN_FILE, json.dumps(dataclasses.asdict(plan), indent=2) + "\n")


def reusable(saved: MemoryPlan | None, cfg: TrainConfig) -> bool:
    """A saved plan continues the run unless the per-rank batch or an explicit budget changed."""
    if saved is None:
        return False
    t = cfg.trainer
    if saved.micro_batch_size * saved.grad_accum_steps != t.micro_batch_size * t.grad_accum_steps:
        return False
    explicit = configured_budget_gb(cfg)
    return explicit is None or (saved.budget_explicit and saved.budget_gb == explicit)


def resolve(cfg: TrainConfig, device: torch.device, resuming: bool) -> MemoryPlan | None:
    """This rank's plan (None unless trainer.checkpointing is auto): the saved one when resuming allows it."""
    if cfg.trainer.checkpointing != "auto":
        return None
    saved = load_plan(cfg.run_dir) if resuming else None
    return saved if reusable(saved, cfg) else make_plan(cfg, device)


def apply(cfg: TrainConfig, plan: MemoryPlan | None) -> TrainConfig:
    """The config the trainer computes with: concrete policy, chunk, micro-batch and accumulation."""
    if plan is None:
        return cfg
    # The budget has done its work: the applied config is a plain, explicit one (and validates as such).
    trainer = dataclasses.replace(cfg.trainer, checkpointing=plan.policy, remat_chunk=plan.remat_chunk,
                                  micro_batch_size=plan.micro_batch_size, grad_accum_steps=plan.grad_accum_steps,
                                  memory_budget_gb=None)
    return dataclasses.replace(cfg, trainer=trainer)
