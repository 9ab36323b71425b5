"""Weights & Biases on rank 0: one run per run dir (resumed by id), the logged rows, the final summary.

(Not named wandb.py, so that reading `import wandb` here never makes anyone wonder which module it is.)
"""

from __future__ import annotations

import dataclasses
import os
from typing import TYPE_CHECKING, Any

from launch.callbacks.base import Callback
from launch.callbacks.metrics import is_logged
from launch.config import LoggingConfig, config_to_dict

if TYPE_CHECKING:
    from launch.trainer import Trainer

# Row fields that are the row's position, not a measurement: wandb takes the step as its own axis.
_FINAL_ROW_KEYS = frozenset({"step", "tokens", "final"})


class WandbCallback(Callback):
    """Logs the rows metrics.jsonl gets (same cadence, is_logged), so it must come after MetricsCallback, whose
    timing fields it then carries too.

    The run id is trainer.wandb_id: kept in every checkpoint and in <run dir>/wandb_id, so a resumed or
    re-launched run continues the same wandb run (resume="allow") instead of starting a new one."""

    def __init__(self, logging: LoggingConfig, log_every: int) -> None:
        self.logging = logging
        self.log_every = log_every
        self.run: Any = None  # the wandb Run on rank 0 once started

    def on_fit_start(self, trainer: Trainer) -> None:
        if not trainer.is_main:
            return
        os.environ.setdefault("WANDB_MODE", self.logging.wandb_mode)
        os.environ.setdefault("WANDB_SILENT", "true")
        (trainer.run_dir / "wandb_id").write_text(str(trainer.wandb_id))
        import wandb

        config = config_to_dict(trainer.user_cfg)
        if trainer.memory_plan is not None:
            config["memory_plan"] = dataclasses.asdict(trainer.memory_plan)
        self.run = wandb.init(project=self.logging.wandb_project, name=trainer.cfg.name, id=trainer.wandb_id,
                              resume="allow", dir=str(trainer.run_dir), config=config)

    def on_step_end(self, trainer: Trainer, row: dict[str, Any]) -> None:
        if self.run is not None and is_logged(trainer.step, row, self.log_every):
            self.run.log({k: v for k, v in row.items() if k != "step"}, step=trainer.step)

    def on_train_end(self, trainer: Trainer, row: dict[str, Any]) -> None:
        if self.run is not None:
            self.run.summary.update({k: v for k, v in row.items() if k not in _FINAL_ROW_KEYS})

    def on_fit_end(self, trainer: Trainer, result: dict[str, Any] | None) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None
