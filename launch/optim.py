"""AdamW with parameter groups: decayed weights, un-decayed norms/biases, and the EBT step size alpha.

The groups' LRs over training are launch/schedule.py's (set before every optimizer step); there is no scheduler
object."""

from __future__ import annotations

import torch
from torch import nn

from ebt.parametrization import MATRIX, parameter_role, widths
from launch.config import TrainConfig
from launch.schedule import group_peak_lr


def param_groups(model: nn.Module, cfg: TrainConfig) -> list[dict]:
    """Groups with their own peak LR and weight decay.

    alpha (any parameter named *alpha*): LR x model.thinking.alpha_lr_mult and no decay; decaying a step size toward 0
    would fight the MCMC. Norm gains and biases (1-D tensors): no decay unless optim.decay_norms_and_biases.
    hidden (model.parametrization mup only): the blocks' and adaLN's weight matrices, at LR / m and decay x m.
    """
    decay, no_decay, alpha, hidden = [], [], [], []
    mup = cfg.model.parametrization == "mup"
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if "alpha" in name.rsplit(".", 1)[-1]:
            alpha.append(param)
        elif param.ndim < 2 and not cfg.optim.decay_norms_and_biases:
            no_decay.append(param)
        elif mup and parameter_role(name, param.ndim) == MATRIX:
            hidden.append(param)
        else:
            decay.append(param)
    # torch's AdamW decays by lr * weight_decay: μP's hidden group keeps that product at the base width's.
    width_mult = widths(cfg.model).width_mult
    groups = [
        {"name": "decay", "params": decay, "lr": group_peak_lr(cfg, "decay"),
         "weight_decay": cfg.optim.weight_decay},
        {"name": "hidden", "params": hidden, "lr": group_peak_lr(cfg, "hidden"),
         "weight_decay": cfg.optim.weight_decay * width_mult},
        {"name": "no_decay", "params": no_decay, "lr": group_peak_lr(cfg, "no_decay"), "weight_decay": 0.0},
        {"name": "alpha", "params": alpha, "lr": group_peak_lr(cfg, "alpha"), "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    o = cfg.optim
    return torch.optim.AdamW(param_groups(model, cfg), betas=tuple(o.betas), eps=o.eps)

