"""What happens around the training loop: evaluation, metrics.jsonl, wandb, progress, checkpoint cadence.

Trainer.fit (launch/trainer.py) is the loop alone and calls these hooks (launch/callbacks/base.py says when);
`default_callbacks` builds the list a config asks for, in the one order that keeps the logs and checkpoints
consistent.
"""

from __future__ import annotations

from launch.callbacks.base import PREEMPTED, Callback
from launch.callbacks.checkpoint import CheckpointCallback
from launch.callbacks.evaluation import EvaluationCallback
from launch.callbacks.metrics import MetricsCallback, is_logged
from launch.callbacks.progress import ProgressCallback
from launch.callbacks.wandb_logging import WandbCallback
from launch.config import TrainConfig

__all__ = ["PREEMPTED", "Callback", "CheckpointCallback", "EvaluationCallback", "MetricsCallback",
           "ProgressCallback", "WandbCallback", "default_callbacks", "is_logged"]


def default_callbacks(cfg: TrainConfig) -> list[Callback]:
    """The callbacks of an `ebt train` run, in order:

    evaluation first (the val_* fields it adds decide that a row is logged and show in the progress line),
    metrics next (it adds the timing fields), wandb after it (it logs the same rows with those fields), then
    progress, and checkpoints last (a step's checkpoint follows its logged row; preemption stops the loop
    after everything else has seen the step)."""
    t = cfg.trainer
    callbacks: list[Callback] = [EvaluationCallback(t.eval_every), MetricsCallback(t.log_every)]
    if cfg.logging.wandb:
        callbacks.append(WandbCallback(cfg.logging, t.log_every))
    callbacks.append(ProgressCallback(cfg.logging.progress, t.max_steps))
    callbacks.append(CheckpointCallback(cfg.checkpoint.every, cfg.checkpoint.save_final))
    return callbacks
