"""trainer.checkpointing=auto in the trainer: the planner picks policy, chunk and micro-batch under
trainer.memory_budget_gb, keeps the per-rank batch, computes exactly what the same explicit settings compute, and
a resume reuses the saved plan."""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest
from train_support import read_rows, tiny_raw, training_rows

from launch import memory_plan
from launch.config import build_config
from launch.train import run_training
from planning import host
from planning import search as planner

STEPS = 6


def auto_raw(tmp_path, **trainer) -> dict:
    return tiny_raw(runs_dir=str(tmp_path / "runs"),
                    trainer={"max_steps": STEPS, "micro_batch_size": 4, "grad_accum_steps": 1, "checkpointing": "auto",
                             **trainer},
                    checkpoint={"every": 3, "keep_last": 3})


@pytest.fixture(autouse=True)
def default_calibration(monkeypatch, tmp_path):
    # A calibration saved by benchmarks/planner.py on this machine must not move the budgets below.
    monkeypatch.setattr(host, "CALIBRATION_FILE", tmp_path / "no-calibration.json")


def budget_for_micro_batch_two(cfg) -> float:
    """A budget that fits micro-batch 2 under its cheapest option but not micro-batch 4 under any."""
    def cheapest(batch: int) -> float:
        return min(planner._predict(cfg.model, policy, chunk, batch, planner.torch.device("cpu"))
                   for policy, chunk in planner._options_fastest_first(cfg.model, batch))

    two, four = cheapest(2), cheapest(4)
    assert two < four
    return (two + min(four, two * 1.02)) / 2 / 1e9


def test_plan_splits_the_per_rank_batch_to_fit_the_budget(tmp_path):
    cfg = build_config(auto_raw(tmp_path))
    budget = budget_for_micro_batch_two(cfg)
    cfg = build_config(auto_raw(tmp_path, memory_budget_gb=budget))
    plan = memory_plan.make_plan(cfg, planner.torch.device("cpu"))
    assert (plan.micro_batch_size, plan.grad_accum_steps) == (2, 2)
    assert plan.predicted_peak_gb <= budget and plan.budget_explicit
    applied = memory_plan.apply(cfg, plan)
    assert (applied.trainer.checkpointing, applied.trainer.remat_chunk) == (plan.policy, plan.remat_chunk)
    assert applied.trainer.micro_batch_size * applied.trainer.grad_accum_steps == 4
    # A generous budget keeps the whole batch in one micro-batch with the fastest policy.
    roomy = memory_plan.make_plan(build_config(auto_raw(tmp_path, memory_budget_gb=100.0)), planner.torch.device("cpu"))
    assert (roomy.policy, roomy.micro_batch_size, roomy.grad_accum_steps) == ("none", 4, 1)


def test_budget_errors_name_the_key(tmp_path):
    with pytest.raises(ValueError, match=r"^config key 'trainer.memory_budget_gb': is only used with "
                                         r"trainer.checkpointing=auto, not 'none'$"):
        build_config(tiny_raw(trainer={"memory_budget_gb": 4}))
    with pytest.raises(ValueError, match=r"^config key 'trainer.memory_budget_gb': must be > 0, got -1"):
        build_config(auto_raw(tmp_path, memory_budget_gb=-1))
    cfg = build_config(auto_raw(tmp_path, memory_budget_gb=1e-3))
    with pytest.raises(ValueError, match=r"^config key 'trainer.memory_budget_gb': 0.00 GB does not fit "
                                         r"micro-batch 1 under any checkpointing policy"):
        memory_plan.make_plan(cfg, planner.torch.device("cpu"))


def test_auto_trains_like_its_explicit_plan_and_resume_reuses_the_plan(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    budget = budget_for_micro_batch_two(build_config(auto_raw(tmp_path)))
    run_training(build_config(auto_raw(tmp_path, memory_budget_gb=budget) | {"name": "auto"}))
    run_dir = tmp_path / "runs" / "auto"
    saved = json.loads((run_dir / memory_plan.PLAN_FILE).read_text())
    assert (saved["micro_batch_size"], saved["grad_accum_steps"]) == (2, 2)
    kept = build_config(json.loads(json.dumps(_yaml(run_dir / "config.yaml"))))
    assert (kept.trainer.checkpointing, kept.trainer.micro_batch_size) == ("auto", 4)  # the user's config

    explicit = auto_raw(tmp_path) | {"name": "explicit"}
    explicit["trainer"] = {**explicit["trainer"], "checkpointing": saved["policy"], "remat_chunk": saved["remat_chunk"],
                           "micro_batch_size": 2, "grad_accum_steps": 2}
    run_training(build_config(explicit))
    expected = training_rows(tmp_path / "runs" / "explicit")
    assert [r["step"] for r in expected] == list(range(1, STEPS + 1))
    assert training_rows(run_dir) == expected

    # Lose the last checkpoint and restart WITHOUT the budget: the default (this machine's free memory) would
    # plan one micro-batch of 4, but the run continues with its saved plan, bit for bit.
    shutil.rmtree(run_dir / "checkpoints" / f"step_{STEPS}")
    before = (run_dir / memory_plan.PLAN_FILE).read_text()
    run_training(build_config(auto_raw(tmp_path) | {"name": "auto"}))
    assert (run_dir / memory_plan.PLAN_FILE).read_text() == before
    assert training_rows(run_dir) == expected
    assert sum(bool(r.get("final")) for r in read_rows(run_dir)) == 1


def test_a_changed_per_rank_batch_or_budget_plans_again(tmp_path):
    cfg = build_config(auto_raw(tmp_path, memory_budget_gb=2.0))
    plan = memory_plan.make_plan(cfg, planner.torch.device("cpu"))
    assert memory_plan.reusable(plan, cfg)
    assert memory_plan.reusable(plan, build_config(auto_raw(tmp_path)))  # no budget given: keep the run's plan
    assert not memory_plan.reusable(plan, build_config(auto_raw(tmp_path, memory_budget_gb=3.0)))
    assert not memory_plan.reusable(plan, build_config(auto_raw(tmp_path, grad_accum_steps=2)))
    assert not memory_plan.reusable(dataclasses.replace(plan, budget_explicit=False), cfg)


def _yaml(path):
    import yaml

    return yaml.safe_load(path.read_text())
