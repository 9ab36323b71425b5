"""The hooks Trainer.fit calls around its loop, and the base class that leaves every one of them empty.

Order of one fit (launch/trainer.py):

    on_fit_start(trainer)              resources: the metrics file, the wandb run, signal handlers
    on_loop_start(trainer)             clocks: throughput, the progress bar's elapsed time
    on_step_end(trainer, row)          after each optimizer step, with that step's metrics row
    on_loop_end(trainer)               the loop is over, whether it reached max_steps or was stopped
    on_train_end(trainer, row)         only when it reached max_steps: `row` becomes the final row
    on_fit_end(trainer, result)        always, also after an error (result is then None)

Callbacks run in list order, so a callback sees what the ones before it added to a row (the evaluation's val_*
fields, the metrics callback's timing fields); on_fit_end runs in reverse, as a `with` block unwinds, and only for
callbacks whose on_fit_start ran. A callback stops the loop with trainer.request_stop(reason) (the checkpoint
callback does on preemption); the rest of the list still sees that step's row.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from launch.trainer import Trainer

# trainer.stop_reason when a preemption signal stopped the run (fit's result then has "preempted": True).
PREEMPTED = "preempted"


class Callback:
    """A no-op for every hook; subclasses override the ones they need."""

    def on_fit_start(self, trainer: Trainer) -> None:
        pass

    def on_loop_start(self, trainer: Trainer) -> None:
        pass

    def on_step_end(self, trainer: Trainer, row: dict[str, Any]) -> None:
        pass

    def on_loop_end(self, trainer: Trainer) -> None:
        pass

    def on_train_end(self, trainer: Trainer, row: dict[str, Any]) -> None:
        pass

    def on_fit_end(self, trainer: Trainer, result: dict[str, Any] | None) -> None:
        pass
