"""Training progress on stderr through the one progress helper (fsutil/progress.py): a rich bar on a terminal,
plain lines with the step, loss, latest validation perplexity, elapsed time and ETA elsewhere (a Slurm log)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, TextIO

from fsutil.progress import Progress
from launch.callbacks.base import Callback

if TYPE_CHECKING:
    from launch.trainer import Trainer


class ProgressCallback(Callback):
    """Shows the loop's progress on rank 0 while it runs (off with logging.progress=false).

    The display lives from on_loop_start to on_loop_end, so the final checkpoint's and evaluation's log lines
    print after the bar is gone instead of through it; on_fit_end closes it after an error."""

    def __init__(self, enabled: bool, total: int, stream: TextIO | None = None) -> None:
        self.enabled = enabled
        self.total = total
        self.stream = stream  # None: sys.stderr
        self.progress: TrainingProgress | None = None

    def on_loop_start(self, trainer: Trainer) -> None:
        self.progress = TrainingProgress(enabled=self.enabled and trainer.is_main, total=self.total,
                                         start=trainer.step, stream=self.stream).__enter__()

    def on_step_end(self, trainer: Trainer, row: dict[str, Any]) -> None:
        if self.progress is not None:
            self.progress.update(trainer.step, row)

    def on_loop_end(self, trainer: Trainer) -> None:
        self._close()

    def on_fit_end(self, trainer: Trainer, result: dict[str, Any] | None) -> None:
        self._close()

    def _close(self) -> None:
        if self.progress is not None:
            self.progress.__exit__(None, None, None)
            self.progress = None


class TrainingProgress:
    """The training task of a Progress: steps of trainer.max_steps, counted from the resumed step (the ETA
    counts only the steps this process ran), with the loss and the latest validation perplexity beside the
    count. A plain line every total/lines steps, after interval_s seconds without one, and at the last step."""

    def __init__(self, enabled: bool, total: int, start: int, stream: TextIO | None = None, lines: int = 10,
                 interval_s: float = 60.0, force_terminal: bool | None = None) -> None:
        self.display = Progress(stream=stream, enabled=enabled, force_terminal=force_terminal, lines=lines,
                                interval_s=interval_s)
        self.total, self.start = total, start
        self._val_ppl: float | None = None
        self._task = -1

    @property
    def live(self) -> bool:
        """A rich bar (a terminal) rather than plain lines."""
        return self.display.live

    def __enter__(self) -> TrainingProgress:
        self.display.__enter__()
        self._task = self.display.add("train", self.total, counter="step", completed=self.start)
        return self

    def update(self, step: int, row: dict[str, Any]) -> None:
        if "val_ppl" in row:
            self._val_ppl = row["val_ppl"]
        info = f"loss {row.get('loss', math.nan):.4f}"
        if self._val_ppl is not None:
            info += f", val_ppl {self._val_ppl:.1f}"
        self.display.update(self._task, step, info=info)

    def __exit__(self, *exc: Any) -> None:
        self.display.__exit__(*exc)
