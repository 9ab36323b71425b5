"""Training progress on stderr: a rich bar on a terminal, plain lines elsewhere (launch/callbacks/progress.py)."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, TextIO

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
        self.progress: _Progress | None = None

    def on_loop_start(self, trainer: Trainer) -> None:
        self.progress = _Progress(enabled=self.enabled and trainer.is_main, total=self.total, start=trainer.step,
                                  stream=self.stream).__enter__()

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


class _Progress:
    """Training progress on rank 0 (a no-op elsewhere or when logging.progress=false), on stderr.

    On a terminal: a rich bar. Elsewhere (a Slurm log, a pipe, a file), where a live bar would print nothing until
    the end: a plain line every total/lines steps, after interval_s seconds without one, and at the last step, each
    with the loss, the latest validation perplexity, elapsed time and ETA, so a log shows how far a run got and
    when it will end.
    """

    def __init__(self, enabled: bool, total: int, start: int, stream=None, lines: int = 10,
                 interval_s: float = 60.0) -> None:
        self.enabled = enabled
        self.total = total
        self.start = start
        self._stream = stream
        self.every = max(1, -(-total // lines))
        self.interval_s = interval_s
        self._bar = None
        self._plain = False
        self._val_ppl: float | None = None

    def __enter__(self) -> _Progress:
        if not self.enabled:
            return self
        import sys

        stream = self._stream if self._stream is not None else sys.stderr
        self._stream = stream
        if bool(getattr(stream, "isatty", lambda: False)()):
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self._bar = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[info]}"), TimeRemainingColumn(),
                                 console=Console(file=stream))
            self._bar.__enter__()
            self._task = self._bar.add_task("train", total=self.total, completed=self.start, info="")
        else:
            self._plain = True
            self._began = self._last = time.monotonic()
        return self

    def update(self, step: int, row: dict) -> None:
        if "val_ppl" in row:
            self._val_ppl = row["val_ppl"]
        if self._bar is not None:
            info = f"loss {row.get('loss', float('nan')):.3f}"
            if "val_ppl" in row:
                info += f" val_ppl {row['val_ppl']:.1f}"
            self._bar.update(self._task, completed=step, info=info)
        elif self._plain:
            now = time.monotonic()
            if step % self.every == 0 or step >= self.total or now - self._last >= self.interval_s:
                self._line(step, row, now)

    def _line(self, step: int, row: dict, now: float) -> None:
        def clock(seconds: float) -> str:
            seconds = int(round(seconds))
            return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"

        elapsed = now - self._began
        done = step - self.start
        eta = clock(elapsed / done * (self.total - step)) if done > 0 else "?"
        loss = row.get("loss", float("nan"))
        text = f"train: step {step}/{self.total} ({100 * step / self.total:.0f}%), loss {loss:.4f}"
        if self._val_ppl is not None:
            text += f", val_ppl {self._val_ppl:.1f}"
        print(f"{text}, {clock(elapsed)} elapsed, ETA {eta}", file=self._stream, flush=True)
        self._last = now

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.__exit__(*exc)
