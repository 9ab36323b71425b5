"""metrics.jsonl: which step rows are logged, and the throughput, compute share and MFU fields they carry."""

from __future__ import annotations

import errno
import time
from typing import TYPE_CHECKING, Any

from launch.callbacks.base import Callback
from launch.cli import RunError
from launch.metrics import MetricsWriter, Throughput, peak_memory_mb

if TYPE_CHECKING:
    from launch.trainer import Trainer


def is_logged(step: int, row: dict[str, Any], log_every: int) -> bool:
    """A step's row is logged every log_every steps and whenever it carries a validation result (an evaluation
    is rare and expensive: its numbers must never be dropped by the cadence). Shared with the wandb callback so
    both logs hold the same rows."""
    return step % log_every == 0 or "val_loss" in row


class MetricsCallback(Callback):
    """Writes the logged rows to <run dir>/metrics.jsonl on rank 0, with the timing fields added in place (so the
    callbacks after it, wandb's, see them too), and the final row.

    On fit start the file is cut back to the rows at or before the step the run starts from: after a kill -9
    the rows past the resumed checkpoint belong to work this run redoes, so the file then reads like an
    uninterrupted run's (timing fields aside, launch.metrics.TIMING_FIELDS)."""

    def __init__(self, log_every: int) -> None:
        self.log_every = log_every
        self.writer: MetricsWriter | None = None
        self.throughput: Throughput | None = None
        self._peak_source_pending = True  # the first logged row says what MFU is relative to

    def on_fit_start(self, trainer: Trainer) -> None:
        self.writer = MetricsWriter(trainer.run_dir / "metrics.jsonl", enabled=trainer.is_main)
        self.writer.truncate_after(trainer.step)

    def on_loop_start(self, trainer: Trainer) -> None:
        # Started here, after every callback's setup (a wandb init takes seconds), so the first row's throughput
        # measures steps only.
        self.throughput = Throughput()

    def on_step_end(self, trainer: Trainer, row: dict[str, Any]) -> None:
        assert self.writer is not None and self.throughput is not None, "on_fit_start and on_loop_start come first"
        self.throughput.add(trainer.tokens_per_step)
        if not is_logged(trainer.step, row, self.log_every):
            return
        tokens_per_s, wall = self.throughput.rate()
        step_time, data_time = trainer.take_step_times()
        # Share of the wall time since the last row spent computing steps (data fetch excluded): 1 - compute_frac
        # is the loop's overhead (data, logging, eval, checkpoints), measured in the same window, so it holds even
        # on a machine whose load drifts.
        row.update(compute_frac=(step_time - data_time) / wall, data_frac=data_time / wall)
        row.update(tokens_per_s=tokens_per_s,
                   mfu=tokens_per_s * trainer.flops_per_token / (trainer.peak_flops * trainer.world),
                   peak_mem_mb=peak_memory_mb(trainer.device), time=time.time())
        if self._peak_source_pending:  # once per process: a machine fact (launch.metrics.TIMING_FIELDS)
            row["peak_flops_source"] = trainer.peak_flops_source
            self._peak_source_pending = False
        self._write(trainer, row)

    def on_train_end(self, trainer: Trainer, row: dict[str, Any]) -> None:
        self._write(trainer, row)

    def _write(self, trainer: Trainer, row: dict[str, Any]) -> None:
        """A full disk here is one line. With checkpoint.async_save, a checkpoint being written in the background
        is what usually fills it; that save's own error (which says what it needed and which checkpoint is still
        the newest) is the one to report, so it is waited for first."""
        assert self.writer is not None, "on_fit_start comes first"
        try:
            self.writer.write(row)
        except OSError as error:
            if error.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            self.writer.abandon()
            trainer.wait_for_checkpoint()
            raise RunError(f"no space left on the device to write {self.writer.path} at step {trainer.step}: free "
                           "some space, then run the same command to resume from the newest checkpoint") from None

    def on_fit_end(self, trainer: Trainer, result: dict[str, Any] | None) -> None:
        if self.writer is not None:
            self.writer.close()  # fsyncs: the rows survive a node failure right after the run
