"""AdamW with parameter groups: decayed weights, un-decayed norms/biases, and the EBT step size alpha."""

from __future__ import annotations

import torch
from torch import nn

from launch.config import TrainConfig
from launch.schedule import WarmupCosine


def param_groups(model: nn.Module, cfg: TrainConfig) -> list[dict]:
    """Groups with their own peak LR and weight decay.

    alpha (any parameter named *alpha*): LR x model.alpha_lr_mult and no decay; decaying a step size toward 0
    would fight the MCMC. Norm gains and biases (1-D tensors): no decay unless optim.decay_norms_and_biases.
    """
    peak = cfg.peak_lr
    decay, no_decay, alpha = [], [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if "alpha" in name.rsplit(".", 1)[-1]:
            alpha.append(param)
        elif param.ndim < 2 and not cfg.optim.decay_norms_and_biases:
            no_decay.append(param)
        else:
            decay.append(param)
    groups = [
        {"name": "decay", "params": decay, "lr": peak, "weight_decay": cfg.optim.weight_decay},
        {"name": "no_decay", "params": no_decay, "lr": peak, "weight_decay": 0.0},
        {"name": "alpha", "params": alpha, "lr": peak * cfg.model.alpha_lr_mult, "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    o = cfg.optim
    return torch.optim.AdamW(param_groups(model, cfg), betas=tuple(o.betas), eps=o.eps)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    fn = WarmupCosine(cfg.optim.warmup_steps, cfg.trainer.max_steps, cfg.optim.min_lr_scale)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, [fn] * len(optimizer.param_groups))
