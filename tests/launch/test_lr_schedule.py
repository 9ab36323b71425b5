"""The LR as a function of (config, step), launch/schedule.py: bit-identical to what torch's LambdaLR over the
former WarmupCosine scheduler produced at every step and in every param group, set by the trainer before each
update, logged from the same function, and absent from checkpoints."""

from __future__ import annotations

import math

import pytest
import torch
from train_support import tiny_raw

from launch.config import build_config
from launch.optim import build_optimizer, param_groups
from launch.schedule import apply_lr, group_lr, lr_multiplier, warmup_cosine


class FormerWarmupCosine:
    """launch/schedule.py's class before the LR became a function: the reference the new values must equal."""

    def __init__(self, warmup_steps: int, total_steps: int, min_lr_scale: float) -> None:
        self.warmup_steps, self.total_steps, self.min_lr_scale = warmup_steps, total_steps, min_lr_scale

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / (self.warmup_steps + 1)
        decay_steps = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / decay_steps)
        cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
        return self.min_lr_scale + (1.0 - self.min_lr_scale) * cosine


def _model_and_cfg(**optim):
    from ebt import build_model

    cfg = build_config(tiny_raw(optim={"lr": 3.0e-4, **optim}, trainer={"max_steps": 40}))
    return build_model(cfg.model), cfg


@pytest.mark.parametrize("warmup, min_scale", [(7, 0.1), (0, 0.0), (39, 0.25), (60, 0.1)])
def test_every_groups_lr_equals_lambdalr_over_the_whole_schedule(warmup, min_scale):
    """Warm-up, cosine decay, and past max_steps the floor: the values equal LambdaLR's bit for bit."""
    model, cfg = _model_and_cfg(warmup_steps=warmup, min_lr_scale=min_scale)
    former = torch.optim.AdamW(param_groups(model, cfg))
    fn = FormerWarmupCosine(warmup, cfg.trainer.max_steps, min_scale)
    scheduler = torch.optim.lr_scheduler.LambdaLR(former, [fn] * len(former.param_groups))
    new = build_optimizer(model, cfg)
    assert [g["name"] for g in new.param_groups] == ["decay", "no_decay", "alpha"]
    for step in range(cfg.trainer.max_steps + 15):
        logged = apply_lr(new.param_groups, cfg, step)
        assert logged == scheduler.get_last_lr()[0]  # what the metrics row logged
        assert [g["lr"] for g in new.param_groups] == scheduler.get_last_lr(), step
        assert [group_lr(cfg, g["name"], step) for g in new.param_groups] == scheduler.get_last_lr()
        assert lr_multiplier(cfg, step) == fn(step)
        former.step()
        scheduler.step()
    alpha_peak = cfg.peak_lr * cfg.model.thinking.alpha_lr_mult
    assert new.param_groups[-1]["lr"] == alpha_peak * min_scale or warmup >= cfg.trainer.max_steps


def test_the_schedule_shape():
    def sched(step):
        return warmup_cosine(step, warmup_steps=10, total_steps=110, min_lr_scale=0.1)

    assert sched(0) == pytest.approx(1 / 11) and sched(10) == 1.0 and sched(60) == pytest.approx(0.55)
    assert sched(110) == pytest.approx(0.1) and sched(10_000) == pytest.approx(0.1)


def test_the_trainer_sets_the_lr_before_each_update_and_saves_no_scheduler(tmp_path):
    """Trainer.optimizer_step is where the LR is set (from its step), and trainer.pt holds no scheduler."""
    from launch.trainer import Trainer

    raw = tiny_raw(trainer={"max_steps": 6}, checkpoint={"every": 100})
    raw["runs_dir"] = str(tmp_path / "runs")
    cfg = build_config(raw)
    trainer = Trainer(cfg)
    try:
        trainer.setup()
        assert not hasattr(trainer, "scheduler")
        lrs = []
        for step in range(3):
            row = trainer.train_step()
            lrs.append(row["lr"])
            assert [g["lr"] for g in trainer.optimizer.param_groups] == \
                [group_lr(cfg, g["name"], step) for g in trainer.optimizer.param_groups]
        assert lrs == [group_lr(cfg, "decay", s) for s in range(3)]
        path = trainer.save_checkpoint()
        state = trainer.ckpt.load_shared(path, "trainer")
        assert "scheduler" not in state and state["step"] == 3
        # An older checkpoint carries LambdaLR's state in trainer.pt: it still resumes, and the state is ignored.
        save = trainer.ckpt.save

        def save_with_scheduler(step, shared, *args, **kwargs):
            shared["trainer"]["scheduler"] = {"last_epoch": step, "base_lrs": [1.0], "_last_lr": [1.0]}
            return save(step, shared, *args, **kwargs)

        trainer.ckpt.save = save_with_scheduler
        trainer.train_step()
        assert "scheduler" in trainer.ckpt.load_shared(trainer.save_checkpoint(), "trainer")
    finally:
        trainer.close(True)
    resumed = Trainer(cfg)
    try:
        resumed.setup()
        assert resumed.step == 4
        assert resumed.train_step()["lr"] == group_lr(cfg, "decay", 4)
        # The groups the resumed optimizer updates with (load_state_dict replaced them) got the step's LR too.
        assert [g["lr"] for g in resumed.optimizer.param_groups] == \
            [group_lr(cfg, g["name"], 4) for g in resumed.optimizer.param_groups]
    finally:
        resumed.close(True)
