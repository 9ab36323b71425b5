"""Stop signals: SIGTERM, SIGUSR1 and SIGUSR2 (preemption) and SIGINT (Ctrl-C) ask for a checkpoint and an exit.

The handler only sets a flag. The trainer checks it between optimizer steps (agreeing across ranks with one
all-reduce), so the in-flight step always finishes, then it saves a checkpoint and exits: with
PREEMPTED_EXIT_CODE after a preemption, which schedulers (submitit, the Slurm scripts) read as "requeue me", and
with INTERRUPTED_EXIT_CODE after a Ctrl-C (a user stop, not to be requeued; any rank's Ctrl-C wins over a
preemption). A second Ctrl-C aborts at once without a checkpoint: the user does not want to wait for it.
"""

from __future__ import annotations

import os
import signal
import time
from types import FrameType

# EX_TEMPFAIL from sysexits.h: "temporary failure, try again"; distinct from crashes (1), usage errors (2)
# and deaths by signal (128 + n).
PREEMPTED_EXIT_CODE = 75
# 128 + SIGINT: what a shell reports for a command that Ctrl-C ended, so scripts (`set -e`, `make`) stop too.
INTERRUPTED_EXIT_CODE = 128 + signal.SIGINT

# Every signal that stops a run with a checkpoint. launch/train.py's `--nproc` launcher forwards these to its
# ranks, SIGINT included (a `kill -INT` of the launcher alone must reach them; at a terminal they also get the
# Ctrl-C themselves, hence SAME_CTRL_C_S).
PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2, signal.SIGINT)

# SIGINTs this close to the first are the same Ctrl-C: the terminal's copy and the `--nproc` launcher's forwarded
# one arrive milliseconds apart, and counting both as two presses would abort every multi-rank Ctrl-C.
SAME_CTRL_C_S = 1.0


class TrainingInterrupted(KeyboardInterrupt):
    """A Ctrl-C stopped training after checkpointing. A KeyboardInterrupt, so that callers who catch Exception do
    not swallow it; `ebt` prints its message (empty on ranks other than 0) as one line and exits
    INTERRUPTED_EXIT_CODE."""


class PreemptionFlag:
    """Set by the stop signals; read between steps. `interrupted`: this rank got a Ctrl-C; `interrupt_agreed`:
    set by the trainer's all-reduce when any rank did (the exit then says Ctrl-C, not preemption)."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.interrupted = False
        self.interrupt_agreed = False
        self._first_ctrl_c: float | None = None
        self._ack_line: str | None = None
        self._abort_line: str | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if signum == signal.SIGINT:
            now = time.monotonic()
            if self._first_ctrl_c is None:
                self._first_ctrl_c = now
                self.interrupted = True
                self._say(self._ack_line, 1)
            elif now - self._first_ctrl_c > SAME_CTRL_C_S:
                # The second Ctrl-C: leave now, mid-step or mid-save. A half-written checkpoint is a .tmp-step_N
                # directory that the next run removes; the newest complete one stays the one it resumes from.
                self._say(self._abort_line, 2)
                os._exit(INTERRUPTED_EXIT_CODE)
        if self.signum is None:
            self.signum = signum

    @staticmethod
    def _say(line: str | None, fd: int) -> None:
        # os.write, not print: a handler that prints while the interrupted code is inside a print to the same
        # stream raises "reentrant call".
        if line:
            os.write(fd, f"{line}\n".encode())

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def install(self, ack_line: str | None = None, abort_line: str | None = None) -> PreemptionFlag:
        """`ack_line` (stdout) on the first Ctrl-C, `abort_line` (stderr) on the second; None: silent (ranks
        other than 0)."""
        self._ack_line, self._abort_line = ack_line, abort_line
        for sig in PREEMPTION_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]
        self._previous.clear()
