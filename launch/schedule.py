"""The learning rate as a pure function of (TrainConfig, optimizer step): linear warm-up, then cosine decay to
peak * optim.min_lr_scale, times each parameter group's multiplier (alpha's: model.thinking.alpha_lr_mult; μP's
hidden matrices': 1/m).

Nothing of the schedule is state: the trainer sets every group's LR from cfg before each optimizer step
(`apply_lr`, called by Trainer.optimizer_step) and logs the value the same function gave, so checkpoints carry no
scheduler, a resume recomputes the LR from the step, and an accepted schedule change (--allow-schedule-change,
launch/resume.py) takes effect because the new cfg is what the function reads. Old checkpoints that carry a
LambdaLR state still resume; that state is ignored. No torch here: only floats.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, MutableMapping
from typing import Any

from ebt.parametrization import MATRIX, lr_scale, widths
from launch.config import TrainConfig


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, min_lr_scale: float) -> float:
    """Multiplier of the peak LR at optimizer step `step` (0-based: the update that makes step + 1).

    Warm-up never multiplies by 0 (step 0 already updates), and past total_steps the floor holds."""
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
    return min_lr_scale + (1.0 - min_lr_scale) * cosine


def lr_multiplier(cfg: TrainConfig, step: int) -> float:
    """cfg's schedule (optim.warmup_steps, trainer.max_steps, optim.min_lr_scale) at optimizer step `step`."""
    return warmup_cosine(step, cfg.optim.warmup_steps, cfg.trainer.max_steps, cfg.optim.min_lr_scale)


def group_peak_lr(cfg: TrainConfig, group_name: str) -> float:
    """A parameter group's peak LR (launch/optim.py names the groups): alpha, the EBT step size, learns at
    peak x model.thinking.alpha_lr_mult; μP's hidden matrices at peak / m (ebt/parametrization.py); the other
    weights at the peak."""
    if group_name == "alpha":
        return cfg.peak_lr * cfg.model.thinking.alpha_lr_mult
    if group_name == "hidden":
        return cfg.peak_lr * lr_scale(MATRIX, widths(cfg.model))
    return cfg.peak_lr


def group_lr(cfg: TrainConfig, group_name: str, step: int) -> float:
    """The LR a group updates with at optimizer step `step`: its peak times the schedule's multiplier (the
    product in this order, as torch's LambdaLR formed it, so the values are bit-identical to before)."""
    return group_peak_lr(cfg, group_name) * lr_multiplier(cfg, step)


def apply_lr(param_groups: Iterable[MutableMapping[str, Any]], cfg: TrainConfig, step: int) -> float:
    """Set every group's "lr" for the update at optimizer step `step`; returns the first group's, the LR the
    metrics log (the weights' LR: the alpha group, when there is one, comes last)."""
    lrs = []
    for group in param_groups:
        group["lr"] = group_lr(cfg, group["name"], step)
        lrs.append(group["lr"])
    if not lrs:
        raise ValueError("the optimizer has no parameter groups to set an LR on")
    return lrs[0]
