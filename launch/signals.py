"""Preemption signals: SIGTERM, SIGUSR1 and SIGUSR2 ask for a checkpoint and a clean exit.

The handler only sets a flag. The trainer checks it between optimizer steps (agreeing across ranks with one
all-reduce), so the in-flight step always finishes, then it saves a checkpoint and exits with
PREEMPTED_EXIT_CODE, which schedulers (submitit, the Slurm scripts) read as "requeue me".
"""

from __future__ import annotations

import signal
from types import FrameType

# EX_TEMPFAIL from sysexits.h: "temporary failure, try again"; distinct from crashes (1), usage errors (2)
# and deaths by signal (128 + n).
PREEMPTED_EXIT_CODE = 75

PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)


class PreemptionFlag:
    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.signum = signum

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def install(self) -> PreemptionFlag:
        for sig in PREEMPTION_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]
        self._previous.clear()
