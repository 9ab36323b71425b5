"""When to checkpoint: every checkpoint.every steps, at the end (checkpoint.save_final), on preemption and on Ctrl-C.

What a checkpoint holds is Trainer.save_checkpoint's business (launch/checkpoint.py writes it); this callback
only decides the steps, and turns an agreed preemption signal or Ctrl-C into a save and a stop.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from launch.callbacks.base import PREEMPTED, Callback

if TYPE_CHECKING:
    from launch.trainer import Trainer

# trainer.stop_reason after a Ctrl-C: Trainer.fit raises launch.signals.TrainingInterrupted once the loop is over.
INTERRUPTED = "interrupted"


class CheckpointCallback(Callback):
    """Last in the list: a step's checkpoint is written after its row is logged, so a run killed in between
    resumes from an earlier checkpoint and redoes the step (metrics.jsonl is cut back), rather than resuming
    past a step whose row was never written.

    Preemption: the handler (launch/signals.py) only sets a flag; the ranks agree on it inside train_step (one
    all-reduce, trainer.preempt_agreed), so every rank saves at the same step, after that step finished."""

    def __init__(self, every: int, save_final: bool) -> None:
        self.every = every  # 0: no periodic checkpoints (preemption and the final one still happen)
        self.save_final = save_final
        self.last_saved: int | None = None

    def on_fit_start(self, trainer: Trainer) -> None:
        speak = trainer.is_main  # one voice for the whole job: every rank of a terminal's job gets the Ctrl-C
        trainer.preempt.install(
            ack_line="ebt train: Ctrl-C: finishing this step, then saving a checkpoint (Ctrl-C again to abort "
                     "without one)" if speak else None,
            abort_line=f"ebt train: interrupted again (Ctrl-C): aborted without saving; run the same command to "
                       f"resume from the newest checkpoint in {trainer.run_dir}" if speak else None)
        self.last_saved = trainer.step  # a resumed run's step is its checkpoint's; a fresh run has nothing to save

    def on_step_end(self, trainer: Trainer, row: dict[str, Any]) -> None:
        if trainer.preempt_agreed and trainer.preempt.interrupt_agreed:
            self._save(trainer, wait=True)  # fit raises TrainingInterrupted, whose one line says where it is
            trainer.request_stop(INTERRUPTED)
        elif trainer.preempt_agreed:
            self._save(trainer, wait=True)  # written before the job exits (and is requeued)
            trainer.log(f"preemption signal: saved checkpoint at step {trainer.step}; exiting")
            trainer.request_stop(PREEMPTED)
        elif self.every and trainer.step % self.every == 0:
            self._save(trainer)

    def on_loop_end(self, trainer: Trainer) -> None:
        # Before the final evaluation and row: launch/resume.py takes a final row at the end of metrics.jsonl
        # (with save_final, plus a valid checkpoint at its step) to mean the run is finished.
        if trainer.stop_reason is None and self.save_final and self.last_saved != trainer.step:
            self._save(trainer)
        # The final evaluation's row means "finished": the checkpoint it vouches for must be on disk first.
        trainer.wait_for_checkpoint()

    def on_fit_end(self, trainer: Trainer, result: dict[str, Any] | None) -> None:
        trainer.preempt.restore()  # (no wait here: on_loop_end waited on the normal path, Trainer.close on any)

    def _save(self, trainer: Trainer, wait: bool = False) -> None:
        """A checkpoint of this step: written in the background under checkpoint.async_save, unless `wait`."""
        trainer.save_checkpoint(wait=wait)
        self.last_saved = trainer.step
