"""Non-finite losses and gradients: the step is skipped everywhere and counted, N in a row abort the run, and
non-finite weights are never checkpointed. Also the optimizer groups and LR schedule the trainer builds."""

from __future__ import annotations

import math

import pytest
import torch
from ebt_factories import InfGrad
from train_support import tiny_raw

from ebt import NonFiniteEnergyGradientError
from launch.config import build_config
from launch.optim import param_groups
from launch.schedule import warmup_cosine
from launch.trainer import NonFiniteAbort, Trainer


@pytest.fixture
def trainer(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = build_config(tiny_raw(trainer={"max_nonfinite_in_row": 3, "max_steps": 50}))
    tr = Trainer(cfg, log=lambda msg: None)
    tr.setup()
    return tr


def snapshot(tr: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in tr.raw_model.state_dict().items()}


def same(a: dict, b: dict) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


def test_nonfinite_steps_are_skipped_counted_and_abort_after_n_in_a_row(trainer, monkeypatch):
    real_loss = trainer.module.loss
    row = trainer.train_step()
    assert not row["skipped"] and math.isfinite(row["grad_norm"])

    def nan_loss(wrapped, tokens, **kw):
        loss, metrics = real_loss(wrapped, tokens, **kw)
        return loss * math.nan, metrics

    def inf_grad(wrapped, tokens, **kw):
        loss, metrics = real_loss(wrapped, tokens, **kw)
        return InfGrad.apply(loss), metrics

    def inner_error(wrapped, tokens, **kw):
        raise NonFiniteEnergyGradientError("inner gradient is not finite")

    for bad in (nan_loss, inf_grad, inner_error):
        before = snapshot(trainer)
        adam_state = {k: v["exp_avg"].clone() for k, v in trainer.optimizer.state.items()}
        monkeypatch.setattr(trainer.module, "loss", bad)
        row = trainer.train_step()
        assert row["skipped"] and row["nonfinite_steps"] == trainer.nonfinite_total
        assert same(before, snapshot(trainer)), f"{bad.__name__}: weights moved on a skipped step"
        assert all(torch.equal(v["exp_avg"], adam_state[k]) for k, v in trainer.optimizer.state.items())
        assert all(p.grad is None for p in trainer.raw_model.parameters())
        monkeypatch.setattr(trainer.module, "loss", real_loss)
        row = trainer.train_step()  # a good step resets the run of bad ones
        assert not row["skipped"] and trainer.nonfinite_in_row == 0
    assert trainer.nonfinite_total == 3

    monkeypatch.setattr(trainer.module, "loss", nan_loss)
    trainer.train_step()
    trainer.train_step()
    with pytest.raises(NonFiniteAbort, match="3 non-finite steps in a row"):
        trainer.train_step()


def test_nonfinite_weights_are_never_checkpointed(trainer):
    trainer.train_step()
    trainer.save_checkpoint()
    with torch.no_grad():
        next(trainer.raw_model.parameters()).view(-1)[0] = math.inf
    trainer.train_step()
    with pytest.raises(NonFiniteAbort, match="non-finite weights"):
        trainer.save_checkpoint()
    assert trainer.ckpt.list_steps() == [1]


def test_param_groups_and_schedule():
    cfg = build_config(tiny_raw(optim={"lr": 1e-3, "weight_decay": 0.1}))
    from ebt import build_model

    model = build_model(cfg.model)
    groups = {g["name"]: g for g in param_groups(model, cfg)}
    names = {id(p): n for n, p in model.named_parameters()}
    assert [names[id(p)] for p in groups["alpha"]["params"]] == ["alpha_raw"]
    assert groups["alpha"]["lr"] == pytest.approx(1e-3 * cfg.model.thinking.alpha_lr_mult)
    assert groups["alpha"]["weight_decay"] == 0.0
    assert all(p.ndim == 1 for p in groups["no_decay"]["params"]) and groups["no_decay"]["weight_decay"] == 0.0
    assert any("norm" in names[id(p)] for p in groups["no_decay"]["params"])
    assert all(p.ndim >= 2 for p in groups["decay"]["params"]) and groups["decay"]["weight_decay"] == 0.1
    total = sum(len(g["params"]) for g in groups.values())
    assert total == len(list(model.parameters()))
    cfg.optim.decay_norms_and_biases = True
    assert "no_decay" not in {g["name"] for g in param_groups(model, cfg)}

    def sched(step):
        return warmup_cosine(step, warmup_steps=10, total_steps=110, min_lr_scale=0.1)

    assert sched(0) == pytest.approx(1 / 11) and sched(9) == pytest.approx(10 / 11)
    assert sched(10) == pytest.approx(1.0)
    assert sched(60) == pytest.approx(0.55)  # half-way down the cosine: (1 + 0.1) / 2
    assert sched(110) == pytest.approx(0.1) and sched(500) == pytest.approx(0.1)
    assert all(sched(s) >= sched(s + 1) for s in range(10, 120))
