"""Progress of a long command, one way for all of them: training, `ebt eval`, downstream tasks, data preparation,
memory planning, sweep submission and reports.

On a terminal: a rich bar (or spinner) that redraws in place. Anywhere else (a Slurm log, a pipe, a file, CI),
where a live bar would print nothing useful until the end: plain lines, each with the count and total, the
percentage, the time elapsed and the ETA, written every total/lines units, after `interval_s` seconds without
one, and at the end, so a log shows how far a command got and when it will end.

    with Progress(stream=sys.stderr, prefix="ebt eval: ") as progress:
        task = progress.add("eval val", total=120, unit="batches")
        for batch in batches:
            ...
            progress.advance(task)
        progress.finish(task)

and for one step of unknown length, `status("planning memory: ...")`: a spinner on a terminal, a start and a
"done in" line otherwise. The bottom layer (fsutil): the standard library, with rich imported only on a
terminal.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, TextIO, TypeVar

T = TypeVar("T")


def clock(seconds: float) -> str:
    """H:MM:SS, as the plain lines show elapsed time and ETA."""
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def si_count(value: float) -> str:
    """A count with an SI suffix (1.23M): token counts in data preparation."""
    for suffix, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.3g}{suffix}"
    return f"{value:.0f}"


def is_terminal(stream: Any) -> bool:
    return bool(getattr(stream, "isatty", lambda: False)())


@dataclass
class _Task:
    name: str
    total: int | None  # in shown units; None: unknown
    unit: str  # after the count ("batches"); "" for none
    counter: str  # before the count ("step"); "" for none
    scale: int  # advances per shown unit (eval: grid cells per batch)
    every: int  # a line each time the count passes a multiple of this (0: by time only)
    si: bool  # counts with SI suffixes
    start_count: int  # shown units already done when the task was added (a resumed run): not in the ETA
    began: float
    last_line: float
    advanced: int = 0  # in advances, i.e. shown units x scale
    printed: int | None = None  # the shown count of the last plain line
    info: str = ""
    bar_id: Any = field(default=None)

    @property
    def count(self) -> int:
        return self.advanced // self.scale


class Progress:
    """Tasks with a count and an optional total, shown as a rich bar on a terminal and as plain lines elsewhere.

    stream: where to write (None: sys.stderr). enabled=False: silent (ranks other than 0, --no-progress).
    force_terminal: True or False overrides what `stream.isatty()` says. prefix: put before every plain line
    (e.g. "ebt eval: "). lines: plain lines per task with a known total (per `lines` units when unknown).
    transient: the rich bar disappears when done (its final state is in the lines the command prints next).
    """

    def __init__(self, *, stream: TextIO | None = None, enabled: bool = True, force_terminal: bool | None = None,
                 prefix: str = "", lines: int = 10, interval_s: float = 60.0, transient: bool = False) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled
        self.live = enabled and (force_terminal if force_terminal is not None else is_terminal(self.stream))
        self.prefix = prefix
        self.lines = max(1, lines)
        self.interval_s = interval_s
        self.transient = transient
        self._bar: Any = None
        self._tasks: dict[int, _Task] = {}

    def __enter__(self) -> Progress:
        if self.live:
            from rich import progress as rich_progress
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn

            console = Console(file=self.stream, force_terminal=True)
            columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                       TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn())
            self._bar = rich_progress.Progress(*columns, console=console, transient=self.transient)
            self._bar.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._bar is not None:
            self._bar.__exit__(*exc)
            self._bar = None

    def add(self, name: str, total: int | None = None, *, unit: str = "", counter: str = "", scale: int = 1,
            completed: int = 0, si: bool = False, every: int | None = None) -> int:
        """A new task of `total` shown units (None: unknown), `completed` of them already done; returns its id.

        unit/counter: words after/before the count in a plain line ("2/4 batches", "step 4/40"). scale: how many
        `advance` units make one shown unit (the rich bar counts the advances themselves). every: a plain line
        each time the count passes a multiple of it (default total/lines, or `lines` units when the total is
        unknown; 0: only after interval_s and at the end, for counts that jump, like tokens)."""
        now = time.monotonic()
        task_id = len(self._tasks)
        if every is None:
            every = max(1, -(-total // self.lines)) if total else self.lines
        task = _Task(name=name, total=total, unit=unit, counter=counter, scale=max(1, scale), every=every, si=si,
                     start_count=completed, began=now, last_line=now, advanced=completed * max(1, scale))
        self._tasks[task_id] = task
        if self._bar is not None:
            task.bar_id = self._bar.add_task(name, total=None if total is None else total * task.scale,
                                             completed=task.advanced, info="")
        return task_id

    def advance(self, task_id: int, amount: int = 1, info: str | None = None) -> None:
        """`amount` more units done (scaled: see add)."""
        task = self._tasks.get(task_id)
        if task is not None:
            self._set(task, task.advanced + amount, info)

    def update(self, task_id: int, completed: int, info: str | None = None) -> None:
        """`completed` shown units done in all (training's step), with `info` (e.g. the loss) beside the count."""
        task = self._tasks.get(task_id)
        if task is not None:
            self._set(task, completed * task.scale, info)

    def finish(self, task_id: int) -> None:
        """The end of a task: a last plain line unless the last count already printed one."""
        task = self._tasks.get(task_id)
        if task is None or not self.enabled or self._bar is not None:
            return
        if task.printed != task.count:
            self._line(task, time.monotonic())

    def _set(self, task: _Task, advanced: int, info: str | None) -> None:
        if not self.enabled:
            return
        before = task.count
        task.advanced = advanced
        if info is not None:
            task.info = info
        if self._bar is not None:
            self._bar.update(task.bar_id, completed=advanced, info=task.info)
            return
        count, now = task.count, time.monotonic()
        if count == before:
            return
        done = task.total is not None and count >= task.total
        passed = task.every > 0 and count // task.every > before // task.every
        if passed or done or now - task.last_line >= self.interval_s:
            self._line(task, now)

    def _line(self, task: _Task, now: float) -> None:
        count, total = task.count, task.total
        shown = si_count if task.si else str
        counter = f"{task.counter} " if task.counter else ""
        unit = f" {task.unit}" if task.unit else ""
        elapsed = now - task.began
        if total:
            done = count - task.start_count
            eta = clock(elapsed / done * (total - count)) if done > 0 else "?"
            text = f"{counter}{shown(count)}/{shown(total)}{unit} ({100 * count / total:.0f}%)"
        else:
            eta, text = None, f"{counter}{shown(count)}{unit}"
        info = f", {task.info}" if task.info else ""
        timing = f"{clock(elapsed)} elapsed" + (f", ETA {eta}" if eta is not None else "")
        print(f"{self.prefix}{task.name}: {text}{info}, {timing}", file=self.stream, flush=True)
        task.last_line, task.printed = now, count


def track(items: Sequence[T], name: str, *, unit: str = "", prefix: str = "", stream: TextIO | None = None,
          lines: int = 10) -> Iterator[T]:
    """Iterate over `items` with one Progress task counting them (a loop's `continue` still counts its item);
    the progress of a script's loop in one line, as rich.progress.track, and in plain lines off a terminal."""
    with Progress(stream=stream, prefix=prefix, lines=lines) as progress:
        task = progress.add(name, len(items), unit=unit)
        for item in items:
            yield item
            progress.advance(task)
        progress.finish(task)


@contextmanager
def status(message: str, *, stream: TextIO | None = None, enabled: bool = True,
           force_terminal: bool | None = None) -> Iterator[None]:
    """One long step of unknown length: a rich spinner on a terminal, else a "<message> ..." line; then
    "<message>: done in N s" either way (stream None: sys.stdout, beside the report the step belongs to)."""
    stream = stream if stream is not None else sys.stdout
    if not enabled:
        yield
        return
    start = time.perf_counter()
    live = force_terminal if force_terminal is not None else is_terminal(stream)
    if live:
        from rich.console import Console

        console = Console(file=stream, force_terminal=True)
        with console.status(message + " ..."):
            yield
        console.print(f"{message}: done in {time.perf_counter() - start:.1f} s", highlight=False)
        return
    print(f"{message} ...", file=stream, flush=True)
    yield
    print(f"{message}: done in {time.perf_counter() - start:.1f} s", file=stream, flush=True)
