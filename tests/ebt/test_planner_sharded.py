"""The memory planner under distributed.strategy=fsdp: per rank, parameters and AdamW's moments count 1/world
(plus the step's gathered parameters), and trainer.checkpointing=auto plans with that, so a sharded run fits a
budget that the same model under DDP does not."""

from __future__ import annotations

import pytest
from model_configs import model_config, nested

from ebt.flops import parameter_count
from launch import memory_plan
from launch.config import build_config
from planning import host
from planning import search as planner


@pytest.fixture(autouse=True)
def default_calibration(monkeypatch, tmp_path):
    # A calibration saved by benchmarks/planner.py on this machine must not move the budgets below.
    monkeypatch.setattr(host, "CALIBRATION_FILE", tmp_path / "no-calibration.json")


# Parameter-heavy for its activations (vocab 8192 at width 64): the sharded state decides what fits.
MODEL = {"kind": "ebt", "vocab_size": 8192, "dim": 64, "n_layers": 2, "n_heads": 2, "context_length": 32,
         "mcmc_steps": 2}
BATCH = 8


def test_sharded_state_is_one_over_world_plus_the_gathered_parameters():
    cfg = model_config(**MODEL)
    params = parameter_count(cfg) * 4
    assert planner.state_bytes(cfg) == 3 * params
    assert planner.state_bytes(cfg, shard_world=2) == 1.5 * params + params
    assert planner.state_bytes(cfg, shard_world=8) == 3 * params / 8 + params
    # Only the state term changes: the traced activations and gradients are those of the same step.
    ddp = planner.tensor_peak_bytes(cfg, "none", 4)
    fsdp = planner.tensor_peak_bytes(cfg, "none", 4, shard_world=2)
    assert ddp - fsdp == pytest.approx(0.5 * params)


def test_auto_plans_per_rank_with_the_sharded_state(monkeypatch):
    cpu = planner.torch.device("cpu")
    model = model_config(**MODEL)
    # A budget between the two predictions of the whole per-rank batch under its cheapest option: fsdp over 2
    # ranks fits it in one micro-batch, DDP has to split it.
    options = planner._options_fastest_first(model, BATCH)
    ddp = min(planner._predict(model, policy, chunk, BATCH, cpu) for policy, chunk in options)
    fsdp = min(planner._predict(model, policy, chunk, BATCH, cpu, 2) for policy, chunk in options)
    assert fsdp < ddp
    trainer = {"micro_batch_size": BATCH, "grad_accum_steps": 1, "checkpointing": "auto",
               "memory_budget_gb": (ddp + fsdp) / 2 / 1e9}
    raw = {"model": nested(**MODEL), "trainer": trainer, "logging": {"wandb": False, "progress": False}}
    monkeypatch.setenv("WORLD_SIZE", "2")
    sharded_cfg = build_config({**raw, "distributed": {"strategy": "fsdp"}})
    assert memory_plan.shard_world(sharded_cfg) == 2
    sharded = memory_plan.make_plan(sharded_cfg, cpu)
    assert (sharded.micro_batch_size, sharded.grad_accum_steps) == (BATCH, 1)
    replicated_cfg = build_config(raw)
    assert memory_plan.shard_world(replicated_cfg) is None
    replicated = memory_plan.make_plan(replicated_cfg, cpu)
    assert replicated.micro_batch_size < BATCH and replicated.micro_batch_size * replicated.grad_accum_steps == BATCH
