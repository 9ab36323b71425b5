"""Validation during training (every trainer.eval_every steps) and the final evaluation that ends a run."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from launch.callbacks.base import Callback

if TYPE_CHECKING:
    from launch.trainer import Trainer


class EvaluationCallback(Callback):
    """Adds trainer.evaluate()'s val_loss, val_ppl and val_tokens to the rows it evaluates.

    Must come before the callbacks that write rows: a row carrying val_loss is always logged
    (launch/callbacks/metrics.py), and the progress line shows the latest val_ppl. Evaluation is collective, so
    every rank runs it at the same steps; trainer.evaluate() forks the RNG, so it never shifts training."""

    def __init__(self, every: int) -> None:
        self.every = every  # 0: only the final evaluation

    def on_step_end(self, trainer: Trainer, row: dict[str, Any]) -> None:
        if self.every and trainer.step % self.every == 0:
            start = time.perf_counter()
            row.update(trainer.evaluate(), eval_s=time.perf_counter() - start)

    def on_train_end(self, trainer: Trainer, row: dict[str, Any]) -> None:
        row.update(trainer.evaluate())
